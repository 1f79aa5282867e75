"""`cdpflow stack` with its Redis component: idempotent up and down, health, AOF, loopback only.

The module drives one Redis through the command line (`main(["stack", ...])`) on a free port in
a temporary stack folder, as `make stack` would, and takes it down at the end. It names `redis`
when it starts the stack: the default set holds Kafka too (tests/stack/test_kafka.py).
"""
import os
import signal
import socket
import types

import pytest
import redis

from cdpflow.cli import main
from cdpflow.stack import StackError
from cdpflow.stack.redis import Redis
from tests.services import free_port, require


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require(Redis.program)
    root, port = tmp_path_factory.mktemp("stack"), free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CDPFLOW_STACK_DIR", str(root))
        env.setenv("CDPFLOW_STACK_REDIS_PORT", str(port))
        try:
            yield types.SimpleNamespace(root=root, port=port, redis=Redis(root))
        finally:
            main(["stack", "down"])


def client(port):
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)


def test_up_twice_keeps_the_same_process_and_status_is_healthy(stack, capsys):
    assert main(["stack", "up", "redis"]) == 0
    first = stack.redis.pid()
    assert first is not None
    capsys.readouterr()
    assert main(["stack", "up", "redis"]) == 0
    assert "redis: already running" in capsys.readouterr().out
    assert stack.redis.pid() == first
    assert main(["stack", "status"]) == 0
    out = capsys.readouterr().out
    assert "running" in out and f"127.0.0.1:{stack.port}" in out and str(first) in out


def test_it_listens_on_loopback_only_with_the_append_only_file_on(stack):
    assert main(["stack", "up", "redis"]) == 0
    with client(stack.port) as c:
        assert c.config_get("bind") == {"bind": "127.0.0.1"}
        assert c.config_get("protected-mode") == {"protected-mode": "yes"}
        assert c.config_get("appendonly") == {"appendonly": "yes"}
        assert c.config_get("dir") == {"dir": str(stack.redis.folder)}


def test_data_outlives_down_and_up_in_the_append_only_file(stack):
    assert main(["stack", "up", "redis"]) == 0
    before = stack.redis.pid()
    with client(stack.port) as c:
        c.set("profile:p-1", "ann@example.org")
    assert main(["stack", "down"]) == 0
    assert stack.redis.pid() is None
    aof = stack.redis.folder / "appendonlydir"
    assert any(b"profile:p-1" in f.read_bytes() for f in aof.iterdir())
    assert not (stack.redis.folder / "dump.rdb").exists()  # the AOF is the one copy
    assert main(["stack", "up", "redis"]) == 0
    assert stack.redis.pid() not in (None, before)
    with client(stack.port) as c:
        assert c.get("profile:p-1") == b"ann@example.org"


def test_status_fails_while_the_process_lives_but_does_not_answer(stack, capsys):
    assert main(["stack", "up", "redis"]) == 0
    pid = stack.redis.pid()
    capsys.readouterr()
    os.kill(pid, signal.SIGSTOP)
    try:
        assert main(["stack", "status"]) == 1
        captured = capsys.readouterr()
        assert "unhealthy" in captured.out and "redis" in captured.err
    finally:
        os.kill(pid, signal.SIGCONT)
    assert main(["stack", "status"]) == 0


def test_a_process_that_died_is_reported_and_started_again(stack):
    assert main(["stack", "up", "redis"]) == 0
    pid = stack.redis.pid()
    os.kill(pid, signal.SIGKILL)
    assert stack.redis.status().state == "unhealthy"
    assert main(["stack", "status"]) == 1
    assert main(["stack", "up", "redis"]) == 0
    assert stack.redis.pid() not in (None, pid)


def test_down_stops_it_once_and_status_then_says_stopped(stack, capsys):
    assert main(["stack", "up", "redis"]) == 0
    capsys.readouterr()
    assert main(["stack", "down"]) == 0
    assert "redis: stopped" in capsys.readouterr().out
    assert stack.redis.pid() is None and not stack.redis.pidfile.exists()
    assert main(["stack", "down"]) == 0
    assert "redis: not running" in capsys.readouterr().out
    assert main(["stack", "status"]) == 0
    assert "stopped" in capsys.readouterr().out


def test_an_unknown_component_is_bad_input(stack, capsys):
    assert main(["stack", "up", "redis", "zookeeper"]) == 2
    assert "zookeeper" in capsys.readouterr().err
    assert main(["stack", "status", "zookeeper"]) == 2


def test_a_start_that_fails_says_why_from_the_log(tmp_path, monkeypatch, capsys):
    require(Redis.program)
    monkeypatch.setenv("CDPFLOW_STACK_DIR", str(tmp_path))
    monkeypatch.setenv("CDPFLOW_STACK_REDIS_PORT", str(free_port()))
    broken = Redis(tmp_path)
    (broken.folder / "appendonlydir").mkdir(parents=True)
    (broken.folder / "appendonlydir" / "appendonly.aof.manifest").write_text("not a manifest\n")
    with pytest.raises(StackError, match="exited while starting") as failed:
        broken.up(timeout=10)
    assert "MANIFEST" in str(failed.value)  # the end of its log
    assert broken.pid() is None
    capsys.readouterr()
    assert main(["stack", "up", "redis"]) == 1
    assert "MANIFEST" in capsys.readouterr().err


def test_a_taken_port_is_refused_before_starting(tmp_path):
    require(Redis.program)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = Redis(tmp_path, port=other.getsockname()[1])
        with pytest.raises(StackError, match="CDPFLOW_STACK_REDIS_PORT"):
            taken.up()
    assert taken.pid() is None


def test_the_session_redis_answers_on_its_own_port(redis_url):
    assert redis_url.startswith("redis://127.0.0.1:") and redis_url.endswith("/0")
    assert ":6379/" not in redis_url
    with redis.Redis.from_url(redis_url, socket_timeout=2) as c:
        assert c.ping() is True
