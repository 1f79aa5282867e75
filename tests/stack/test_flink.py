"""Flink as a stack component: a JobManager and two TaskManagers on 127.0.0.1, and its REST API."""
from cdpflow.stack.base import RUNNING, STOPPED, free_port
from cdpflow.stack.flink import Flink
from tests.stack.test_kafka import listening_addresses

LOOPBACK = "0100007F"  # 127.0.0.1 as /proc writes it (little-endian hex)


def listening(pids):
    """(address in /proc's hex form, port) of every TCP socket these processes listen on."""
    return {found for pid in pids for found in listening_addresses(pid)}


def test_the_cluster_runs_two_taskmanagers_answers_rest_on_loopback_and_is_idempotent(flink_cluster):
    flink = flink_cluster
    overview = flink.rest("/overview")
    assert overview["taskmanagers"] == 2 and overview["slots-total"] == 2
    assert flink.status().state == RUNNING
    assert not flink.up()  # running and healthy: left as it is
    pids = [flink.jobmanager.pid()] + [tm.pid() for tm in flink.taskmanagers]
    assert len(set(pids)) == 3 and all(pids)
    sockets = listening(pids)
    assert {(LOOPBACK, flink.port), (LOOPBACK, flink.rpc_port)} <= sockets
    assert {address for address, _ in sockets} == {LOOPBACK}, sockets
    config = (flink.folder / "conf" / "config.yaml").read_text()
    assert f"execution.checkpointing.dir: {(flink.folder / 'checkpoints').as_uri()}" in config


def test_a_stopped_cluster_says_so_and_down_is_idempotent(tmp_path):
    flink = Flink(tmp_path / "stack", port=free_port(), rpc_port=free_port())
    assert flink.status().state == STOPPED
    assert not flink.down()
