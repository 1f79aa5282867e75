"""Real services for tests, started through `cdpflow stack`'s own code and stopped afterwards.

Registered in tests/conftest.py (`pytest_plugins`), so any test module can ask for them:

    def test_something(redis_url):      # redis://127.0.0.1:PORT/0 of a Redis started for the session
        ...

    def test_other(kafka_bootstrap):    # 127.0.0.1:PORT of a Kafka broker with the project's topics
        ...

Each service gets free ports (never the defaults, so a developer's own Redis on 6379 or Kafka on
9092 is left alone) and a temporary stack folder. The programs are installed by `make test`; a missing one
fails the tests that need it rather than skipping them.
"""
from __future__ import annotations

import shutil
import time

import pytest

from cdpflow.stack.base import free_port
from cdpflow.stack.kafka import Kafka
from cdpflow.stack.redis import Redis


def require(program: str) -> None:
    if shutil.which(program) is None:
        pytest.fail(f"{program} is not installed: run `make test`, which installs it before the suite")


def require_kafka(kafka: Kafka) -> None:
    """Fails (never skips) when Java or the broker's jars are missing."""
    require(Kafka.program)
    if not any(kafka.libs.glob("kafka_2.13-*.jar")):
        pytest.fail(f"Kafka's jars are not in {kafka.libs}: run `make test`, which fetches them before the suite")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The URL of a Redis (AOF on, 127.0.0.1 only) that lives for the test session."""
    require(Redis.program)
    redis = Redis(tmp_path_factory.mktemp("stack"), port=free_port())
    redis.up()
    try:
        yield redis.url()
    finally:
        redis.down()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    """The bootstrap servers (`127.0.0.1:PORT`) of a Kafka broker, with the project's topics, for the session."""
    kafka = Kafka(tmp_path_factory.mktemp("stack"), port=free_port(), controller_port=free_port())
    require_kafka(kafka)
    kafka.up()
    try:
        yield kafka.bootstrap_servers()
    finally:
        kafka.down()


@pytest.fixture(scope="session")
def _flink_session(tmp_path_factory):
    from cdpflow.stack.flink import Flink, distribution
    distribution()  # a missing `make flink` fails here, with what to run
    flink = Flink(tmp_path_factory.mktemp("stack"), port=free_port(), rpc_port=free_port())
    flink.up()
    try:
        yield flink
    finally:
        flink.down()


@pytest.fixture
def flink_cluster(_flink_session):
    """A Flink session cluster (a JobManager, two TaskManagers) on free ports, shared by the session.

    Each test gets it with no job running and both TaskManagers up, and leaves it so: a test that
    fails half-way would otherwise leave its job holding both slots (the next tests' jobs would
    then fail for want of slots, and their failures hide the first one).
    """
    from cdpflow import flink as client
    flink = _flink_session
    yield flink
    for job in client.list_jobs(flink.address):
        if job["state"] not in ("FINISHED", "CANCELED", "FAILED"):
            client.cancel(job["jid"], flink.address)
            client.wait_for(job["jid"], ("CANCELED", "FAILED", "FINISHED"), flink.address)
    for index, taskmanager in enumerate(flink.taskmanagers, start=1):
        if taskmanager.pid() is None:
            flink.start_taskmanager(index)
    deadline = time.monotonic() + 60
    while not flink.healthy():
        assert time.monotonic() < deadline, "the Flink cluster did not get its two TaskManagers back"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def bigquery_emulator(tmp_path_factory):
    """The stack's BigQuery emulator (local-bigquery) on free ports for the session; tests reach it
    with `bigquery_emulator.warehouse_uri(DATASET)` through the official client."""
    from cdpflow.stack.bigquery import BigQueryEmulator
    emulator = BigQueryEmulator(tmp_path_factory.mktemp("stack"), port=free_port(), grpc_port=free_port())
    if emulator.executable() is None:
        pytest.fail("the BigQuery emulator is not installed: run `make test`, which installs it before the suite")
    emulator.up()
    try:
        yield emulator
    finally:
        emulator.down()
