"""cdpflow's PyFlink job on a real Flink cluster (a JobManager, two TaskManagers), Kafka and Redis.

Generated traffic with its default noise goes live through the collector into a broker of the
test's own; `cdpflow flink submit` runs the job at parallelism 2; `cdpflow load` loads what it
wrote. The reference is `cdpflow run` over the events exactly as `cdp.events.raw` holds them:
the same accepted events, the same dead letters, and the same profiles by identifier set for
everyone in no merge-protection conflict. While the job runs, its operator metrics are read back
over the REST API (both subtasks of the identity stage received records, in two Python
processes); then it is stopped with a savepoint, more traffic (with copies of earlier events)
arrives, and the job resumed from the savepoint finishes the input: its dedup state survived, so
the copies are dropped, and the warehouse still equals the batch run. Before that, one
TaskManager is SIGKILLed mid-stream and replaced: the job restores from its checkpoint, and a
read_committed reader finds every accepted event on `cdp.warehouse.rows` exactly once.
"""
from __future__ import annotations

import time
import uuid

import pytest

from cdpflow import flink
from cdpflow.cli import main
from cdpflow.stack.base import free_port
from cdpflow.synthetic import generate
from tests.stack.test_flink import LOOPBACK, listening
from tests.stream.test_live import broker, end_time, raw_events, run_reference, send_live, tables  # noqa: F401

pytestmark = pytest.mark.e2e


def _metric_ids(jobmanager, job_id, vertex, subtask):
    return [m["id"] for m in flink.rest(jobmanager, f"/jobs/{job_id}/vertices/{vertex}/subtasks/{subtask}/metrics")]


def _metric(jobmanager, job_id, vertex, subtask, suffix):
    ids = [i for i in _metric_ids(jobmanager, job_id, vertex, subtask) if i.endswith(suffix)]
    if not ids:
        return None
    values = flink.rest(jobmanager, f"/jobs/{job_id}/vertices/{vertex}/subtasks/{subtask}/metrics?get={ids[0]}")
    return float(values[0]["value"]) if values else None


def _wait_read_to_end(broker, group, timeout=180):
    from kafka import KafkaConsumer, TopicPartition

    from cdpflow.schemas.topics import RAW_EVENTS
    # a consumer of the job's group that never joins it: it only reads the committed offsets
    consumer = KafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(RAW_EVENTS.name, p) for p in consumer.partitions_for_topic(RAW_EVENTS.name)]
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            committed = {tp: consumer.committed(tp) for tp in tps}
            if all((committed[tp] or 0) >= ends[tp] for tp in tps):
                return
            time.sleep(1)
        raise AssertionError(f"the job did not read {RAW_EVENTS.name} to its end {ends}: {committed}")
    finally:
        consumer.close()


def _submit(broker, warehouse, store, jobmanager, tmp_path, *extra):
    spec = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.json"
    assert main(["flink", "submit", "--bootstrap", broker, "--warehouse", str(warehouse), "--identity-store", store,
                 "--jobmanager", jobmanager, "--spec-out", str(spec), "--checkpoint-ms", "2000", *extra]) == 0
    jobs = flink.list_jobs(jobmanager)
    return jobs[0]["jid"]


def test_the_flink_job_equals_the_batch_run_exactly_once_across_a_taskmanager_kill_and_a_savepoint(
        tmp_path, broker, flink_cluster, redis_url, capsys):
    jobmanager = flink_cluster.address
    traffic = tmp_path / "sample"
    generate(traffic, customers=20, days=20, seed=31)
    send_live(traffic, broker)
    warehouse = tmp_path / "live.duckdb"
    store = f"{redis_url}?prefix=flink:{uuid.uuid4().hex}"
    job_id = _submit(broker, warehouse, store, jobmanager, tmp_path)
    flink.wait_for(job_id, ("RUNNING",), jobmanager)
    # both subtasks of the identity stage receive records, each in a Python process of its own
    vertex = next(v["id"] for v in flink.rest(jobmanager, f"/jobs/{job_id}")["vertices"]
                  if "ResolveIdentity" in v["name"])
    deadline, seen = time.monotonic() + 120, {}
    while time.monotonic() < deadline and not (len(seen) == 2 and all(v[0] > 0 for v in seen.values())):
        for subtask in (0, 1):
            received = _metric(jobmanager, job_id, vertex, subtask, "cdpflow.received")
            pid = _metric(jobmanager, job_id, vertex, subtask, "cdpflow.python_pid")
            if received is not None and pid is not None:
                seen[subtask] = (received, int(pid))
        time.sleep(1)
    assert len(seen) == 2 and all(r > 0 for r, _ in seen.values()), seen
    assert seen[0][1] != seen[1][1], f"both subtasks ran in one Python process: {seen}"
    # while a Python job runs, the JobManager and the Python workers listen on 127.0.0.1 only, and
    # so do the TaskManagers' Flink ports; what a TaskManager opens for its Python workers (Beam's
    # gRPC control, data, state, logging and provisioning services, bound by Beam's own server
    # factory to every interface, with no setting to change it) is the known exception (README).
    workers = [int(pid) for _, pid in seen.values()]
    assert {a for a, _ in listening([flink_cluster.jobmanager.pid()] + workers)} <= {LOOPBACK}
    taskmanagers = [tm.pid() for tm in flink_cluster.taskmanagers]
    wildcard = {s for s in listening(taskmanagers) if s[0] != LOOPBACK}
    assert len(wildcard) <= 6 * len(taskmanagers), sorted(wildcard)
    # a TaskManager dies mid-stream (SIGKILL) and is replaced: the job restores from its last
    # completed checkpoint and reads the topic to its end
    flink_cluster.kill_taskmanager(1)
    flink_cluster.start_taskmanager(1)
    _wait_read_to_end(broker, "cdpflow-flink")
    assert flink.rest(jobmanager, f"/jobs/{job_id}")["state"] == "RUNNING"
    restarts = flink.rest(jobmanager, f"/jobs/{job_id}/checkpoints")["counts"]["restored"]
    assert restarts >= 1, "the job did not restore from a checkpoint after the kill"
    # stop with a savepoint; more traffic arrives (with copies of earlier events); resume from it
    capsys.readouterr()
    assert main(["flink", "list", "--jobmanager", jobmanager]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["flink", "savepoint", job_id, "--stop", "--jobmanager", jobmanager]) == 0
    location = capsys.readouterr().out.strip().splitlines()[-1]
    assert location.startswith("file:")
    flink.wait_for(job_id, ("FINISHED",), jobmanager)
    more = tmp_path / "more"
    generate(more, customers=5, days=5, seed=32)
    send_live(more, broker)
    earlier = raw_events(broker, tmp_path / "so-far.jsonl")
    copies = tmp_path / "copies.jsonl"
    import orjson
    copies.write_bytes(b"".join(orjson.dumps({k: v for k, v in e.items() if k != "receivedAt"}) + b"\n"
                                for e in earlier[:15]))
    send_live(None, broker, [(copies, 5000)])
    resumed = _submit(broker, warehouse, store, jobmanager, tmp_path, "--from-savepoint", location)
    assert resumed != job_id
    flink.wait_for(resumed, ("RUNNING",), jobmanager)
    # the source commits its offsets at each checkpoint: once they reach the end of the topic,
    # stop-with-savepoint commits the last of the output (exactly-once: visible at checkpoints)
    _wait_read_to_end(broker, "cdpflow-flink")
    flink.savepoint(resumed, jobmanager, stop=True)
    flink.wait_for(resumed, ("FINISHED",), jobmanager)
    assert main(["load", "--bootstrap", broker, "--warehouse", str(warehouse), "--identity-store", store,
                 "--until-caught-up"]) == 0
    events = raw_events(broker, tmp_path / "raw.jsonl")
    batch = tables(run_reference(tmp_path, traffic, tmp_path / "raw.jsonl", end_time(events)))
    ours = tables(warehouse)
    assert ours["events"] == batch["events"]
    assert ours["dead_letters"] == batch["dead_letters"]
    theirs = {frozenset(ids) for ids in batch["ids"].values()}
    mine = {frozenset(ids) for ids in ours["ids"].values()}
    clean = {ids for ids in theirs if not ids & (batch["conflicted"] | ours["conflicted"])}
    assert len(clean) >= 0.8 * len(theirs) and clean <= mine, sorted(map(sorted, clean - mine))[:3]
    # exactly once across the kill and the savepoint: a read_committed reader finds every accepted
    # event on cdp.warehouse.rows once. A copy of an earlier event that got past a dedup state
    # lost with the savepoint would be there twice (the identity store answers it again).
    from collections import Counter

    import orjson
    from kafka import KafkaConsumer, TopicPartition

    from cdpflow.schemas.topics import WAREHOUSE_ROWS
    consumer = KafkaConsumer(bootstrap_servers=broker, isolation_level="read_committed", consumer_timeout_ms=5000)
    tps = [TopicPartition(WAREHOUSE_ROWS.name, p) for p in consumer.partitions_for_topic(WAREHOUSE_ROWS.name)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    written = Counter(orjson.loads(r.value)["row"]["message_id"] for r in consumer)
    consumer.close()
    assert not {m: n for m, n in written.items() if n > 1}
    assert set(written) == batch["events"]


def test_an_unreachable_cluster_is_said_in_words(capsys):
    assert main(["flink", "list", "--jobmanager", f"127.0.0.1:{free_port()}"]) == 2
    assert "no Flink JobManager" in capsys.readouterr().err


def test_the_flink_job_keeps_forgotten_people_out_whether_forgotten_before_or_while_it_runs(
        tmp_path, broker, flink_cluster, redis_url):
    # Forgotten before the submit: in the warehouse's governance, which the job's rules start
    # from. Forgotten while it runs: written to the identity store (as the loader's forget does),
    # which every worker reads at each batch. Neither person's events reach the output topics.
    from collections import Counter

    import orjson
    from kafka import KafkaConsumer, TopicPartition

    from cdpflow.config import load_config
    from cdpflow.core import governance
    from cdpflow.core.identity import open_identity_store
    from cdpflow.core.timeutil import format_ts
    from cdpflow.schemas.topics import WAREHOUSE_ROWS
    from cdpflow.warehouse import open_warehouse
    jobmanager = flink_cluster.address
    warehouse = tmp_path / "live.duckdb"
    store_uri = f"{redis_url}?prefix=flink:{uuid.uuid4().hex}"
    before, during = ("email", "forgotten.before@family.org"), ("email", "forgotten.during@family.org")
    with open_warehouse(str(warehouse)) as wh:
        key = governance.suppression_key(load_config(None), wh.demo_key_file())
        wh.suppress([before], int(time.time() * 1_000_000), key)

    def events(tag, who):
        now = int(time.time() * 1_000_000)
        path = tmp_path / f"{tag}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(
            {"type": "identify", "messageId": f"{tag}-{i}", "anonymousId": f"{tag}-device",
             "traits": {"email": email}, "timestamp": format_ts(now - (3 - i) * 1_000_000)}) + b"\n"
            for i, email in enumerate(who)))
        send_live(None, broker, [(path, 5000)])

    events("first", [before[1], "kept.one@family.org", before[1]])
    job_id = _submit(broker, warehouse, store_uri, jobmanager, tmp_path)
    flink.wait_for(job_id, ("RUNNING",), jobmanager)
    _wait_read_to_end(broker, "cdpflow-flink")
    store = open_identity_store(store_uri)
    try:
        store.forget([during], hashes=[key.hash(during)])
    finally:
        store.close()
    events("second", [during[1], "kept.two@family.org"])
    _wait_read_to_end(broker, "cdpflow-flink")
    flink.savepoint(job_id, jobmanager, stop=True)
    flink.wait_for(job_id, ("FINISHED",), jobmanager)
    consumer = KafkaConsumer(bootstrap_servers=broker, isolation_level="read_committed", consumer_timeout_ms=5000)
    tps = [TopicPartition(WAREHOUSE_ROWS.name, p) for p in consumer.partitions_for_topic(WAREHOUSE_ROWS.name)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    rows = [orjson.loads(r.value)["row"] for r in consumer]
    consumer.close()
    assert Counter(r["message_id"] for r in rows) == {"first-1": 1, "second-1": 1}, rows
    text = b"".join(orjson.dumps(r) for r in rows)
    assert before[1].encode() not in text and during[1].encode() not in text
