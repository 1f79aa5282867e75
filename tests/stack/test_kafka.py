"""`cdpflow stack` with its Kafka component: KRaft broker, the project's topics, health, loopback, persistence.

The module drives one broker through the command line (`main(["stack", ...])`) on free ports in a
temporary stack folder, as `make stack` would, and takes it down at the end. The broker starts
in a few seconds, so the tests share it; those that stop it start it again.
"""
import json
import os
import signal
import time
import types
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from cdpflow.cli import main
from cdpflow.schemas.topics import DAY_MS, raw_event_key
from cdpflow.stack import StackError, up
from cdpflow.stack.kafka import Kafka
from tests.services import free_port, require_kafka

# The names the issue fixed, spelt out rather than read from the module under test.
TOPIC_NAMES = {"cdp.events.raw", "cdp.events.deadletter", "cdp.segments.changes", "cdp.profiles.changes",
               "cdp.control", "cdp.warehouse.rows", "cdp.destinations.deadletter"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    ports = {"CDPFLOW_STACK_KAFKA_PORT": free_port(), "CDPFLOW_STACK_KAFKA_CONTROLLER_PORT": free_port(),
             "CDPFLOW_STACK_REDIS_PORT": free_port()}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CDPFLOW_STACK_DIR", str(root))
        for variable, port in ports.items():
            env.setenv(variable, str(port))
        kafka = Kafka(root)
        require_kafka(kafka)
        try:
            yield types.SimpleNamespace(root=root, port=ports["CDPFLOW_STACK_KAFKA_PORT"],
                                        controller_port=ports["CDPFLOW_STACK_KAFKA_CONTROLLER_PORT"], kafka=kafka)
        finally:
            main(["stack", "down"])


def admin(stack):
    return KafkaAdminClient(bootstrap_servers=stack.kafka.bootstrap_servers(), request_timeout_ms=10_000)


def consume(bootstrap, topic, count, timeout=20.0):
    """The first `count` records of every partition of `topic`, read from the start (no consumer group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
        records, deadline = [], time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def listening_addresses(pid):
    """The (address, port) pairs the process listens on for TCP, from /proc; addresses in its hex form."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    address, port = local.split(":")
                    # The JVM listens on IPv6 sockets; 127.0.0.1 shows there as ::ffff:127.0.0.1.
                    found.add((address.removeprefix("0000000000000000FFFF0000"), int(port, 16)))
    return found


def test_up_twice_keeps_the_same_process_and_status_is_healthy(stack, capsys):
    assert main(["stack", "up", "kafka"]) == 0
    first = stack.kafka.pid()
    assert first is not None
    capsys.readouterr()
    assert main(["stack", "up", "kafka"]) == 0
    assert "kafka: already running" in capsys.readouterr().out
    assert stack.kafka.pid() == first
    started = time.monotonic()
    assert main(["stack", "status", "kafka"]) == 0
    assert time.monotonic() - started < 3
    out = capsys.readouterr().out
    assert "running" in out and f"127.0.0.1:{stack.port}" in out and str(first) in out


def test_the_topics_exist_with_their_partitions_retention_and_compaction(stack):
    assert main(["stack", "up", "kafka"]) == 0
    with admin(stack) as client:
        described = {t["name"]: t for t in client.describe_topics(sorted(TOPIC_NAMES))}
        assert set(described) == TOPIC_NAMES
        for topic in described.values():
            assert len(topic["partitions"]) == 2, topic["name"]
            assert all(len(p["replica_nodes"]) == 1 for p in topic["partitions"]), topic["name"]
        configs = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in TOPIC_NAMES],
                                          config_filter="all")["topic"]
    value = {name: {key: entry["value"] for key, entry in found.items()} for name, found in configs.items()}
    assert value["cdp.profiles.changes"]["cleanup.policy"] == "compact"
    assert value["cdp.destinations.deadletter"]["cleanup.policy"] == "compact,delete"
    assert value["cdp.destinations.deadletter"]["retention.ms"] == str(30 * DAY_MS)
    assert {value[name]["cleanup.policy"] for name in TOPIC_NAMES - {"cdp.profiles.changes",
                                                                     "cdp.destinations.deadletter"}} == {"delete"}
    assert value["cdp.events.raw"]["retention.ms"] == str(7 * DAY_MS)
    assert value["cdp.events.deadletter"]["retention.ms"] == str(30 * DAY_MS)


def test_topics_that_exist_are_left_as_they_are(stack):
    assert main(["stack", "up", "kafka"]) == 0
    # Another configuration over the same broker finds every topic and changes none.
    assert Kafka(stack.root, partitions=3).ensure_topics() == []
    with admin(stack) as client:
        assert {len(t["partitions"]) for t in client.describe_topics(sorted(TOPIC_NAMES))} == {2}


def test_an_existing_topic_gets_the_configuration_declared_now(stack):
    # a stack made before the destinations' dead letters were compacted
    assert main(["stack", "up", "kafka"]) == 0
    name = "cdp.destinations.deadletter"
    resource = ConfigResource(ConfigResourceType.TOPIC, name, configs={"cleanup.policy": "delete",
                                                                       "retention.ms": str(30 * DAY_MS)})
    with admin(stack) as client:
        client.alter_configs([resource])
    assert Kafka(stack.root, partitions=3).ensure_topics() == []
    with admin(stack) as client:
        found = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])["topic"][name]
        assert {"cleanup.policy", "segment.ms"} <= set(found)
        assert found["cleanup.policy"]["value"] == "compact,delete"
        assert {len(t["partitions"]) for t in client.describe_topics([name])} == {2}


def test_a_round_trip_keeps_each_persons_order(stack):
    assert main(["stack", "up", "kafka"]) == 0
    from kafka.partitioner.default import murmur2

    def partition(key):  # the producer's default partitioner (Java's): murmur2 of the key
        return (murmur2(key.encode()) & 0x7FFFFFFF) % 2

    while True:  # six persons whose keys fall in both partitions (random keys all in one: 1 in 32)
        run = uuid.uuid4().hex[:8]  # this run's events only, whatever an earlier test left on the topic
        persons = [{"userId": f"{run}-u{i}"} for i in range(3)] + [{"anonymousId": f"{run}-a{i}"} for i in range(3)]
        if len({partition(raw_event_key(p)) for p in persons}) == 2:
            break
    sent = [dict(person, messageId=f"{run}-{n}", type="track", event="Viewed")
            for n in range(40) for person in persons]
    producer = KafkaProducer(bootstrap_servers=stack.kafka.bootstrap_servers(), acks="all", enable_idempotence=True,
                             key_serializer=str.encode, value_serializer=lambda v: json.dumps(v).encode())
    try:
        for event in sent:
            producer.send("cdp.events.raw", key=raw_event_key(event), value=event)
        producer.flush(timeout=20)
    finally:
        producer.close()
    records = [r for r in consume(stack.kafka.bootstrap_servers(), "cdp.events.raw", len(sent))
               if r.key.decode().startswith(run)]
    assert len(records) == len(sent)
    for person in persons:
        key = raw_event_key(person)
        mine = [r for r in records if r.key.decode() == key]
        assert len({r.partition for r in mine}) == 1, key  # one partition per person: Kafka's order holds
        got = [int(json.loads(r.value)["messageId"].rsplit("-", 1)[1]) for r in mine]
        assert got == list(range(40)), key
    assert len({r.partition for r in records}) == 2  # and the six persons use both partitions


def test_it_listens_on_loopback_only(stack):
    assert main(["stack", "up", "kafka"]) == 0
    listening = listening_addresses(stack.kafka.pid())
    assert {port for _, port in listening} == {stack.port, stack.controller_port}
    assert {address for address, _ in listening} == {"0100007F"}  # 127.0.0.1, little-endian hex


def test_status_fails_while_the_process_lives_but_does_not_answer(stack, capsys):
    assert main(["stack", "up", "kafka"]) == 0
    pid = stack.kafka.pid()
    capsys.readouterr()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert main(["stack", "status", "kafka"]) == 1
        assert time.monotonic() - started < 5  # the check's own timeout, not the client's 30 s
        captured = capsys.readouterr()
        assert "unhealthy" in captured.out and "kafka" in captured.err
    finally:
        os.kill(pid, signal.SIGCONT)
    assert main(["stack", "status", "kafka"]) == 0


def test_data_outlives_down_and_up(stack, capsys):
    assert main(["stack", "up", "kafka"]) == 0
    before = stack.kafka.pid()
    meta = (stack.kafka.data / "meta.properties").read_text()
    producer = KafkaProducer(bootstrap_servers=stack.kafka.bootstrap_servers(), acks="all")
    try:
        producer.send("cdp.control", key=b"p-1", value=b'{"command": "forget"}').get(timeout=20)
    finally:
        producer.close()
    capsys.readouterr()
    assert main(["stack", "down", "kafka"]) == 0
    assert "kafka: stopped" in capsys.readouterr().out
    assert stack.kafka.pid() is None and not stack.kafka.pidfile.exists()
    assert not os.path.exists(f"/proc/{before}/cmdline") or b"kafka.Kafka" not in open(
        f"/proc/{before}/cmdline", "rb").read()
    assert main(["stack", "down", "kafka"]) == 0
    assert "kafka: not running" in capsys.readouterr().out
    assert main(["stack", "up", "kafka"]) == 0
    assert stack.kafka.pid() not in (None, before)
    assert (stack.kafka.data / "meta.properties").read_text() == meta  # not formatted again
    records = consume(stack.kafka.bootstrap_servers(), "cdp.control", 1)
    assert [(r.key, r.value) for r in records] == [(b"p-1", b'{"command": "forget"}')]


def test_the_default_set_starts_redis_then_kafka(stack):
    assert list(up(timeout=60)) == ["redis", "kafka"]
    assert main(["stack", "status"]) == 0


def test_missing_jars_are_refused_with_the_make_target(tmp_path):
    missing = Kafka(tmp_path, port=free_port(), controller_port=free_port(), libs=tmp_path / "no-jars")
    with pytest.raises(StackError, match="make stack"):
        missing.up()
    assert missing.pid() is None


def test_the_session_kafka_answers_on_its_own_port(kafka_bootstrap):
    assert kafka_bootstrap.startswith("127.0.0.1:") and not kafka_bootstrap.endswith(":9092")
    with KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000) as client:
        assert TOPIC_NAMES <= set(client.list_topics())
