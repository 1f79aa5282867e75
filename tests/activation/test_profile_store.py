"""The Redis profile store: newest row per profile, lookups, memberships, tombstones and forgets."""
from __future__ import annotations

import uuid

import pytest

from cdpflow.activation.profile_store import open_profile_store
from cdpflow.core.segments import segment_change
from cdpflow.errors import BadInput


@pytest.fixture
def store(redis_url):
    store = open_profile_store(f"{redis_url}?prefix=ps-{uuid.uuid4().hex[:8]}")
    yield store
    store.close()


def _row(pid, email, as_of, updated, **more):
    return {"profile_id": pid, "email": email, "phone": more.pop("phone", None), "user_id": more.pop("user_id", None),
            "as_of": as_of, "updated_at": updated, **more}


def test_the_newest_row_wins_whatever_the_order_and_lookups_follow_it(store):
    assert store.apply_profile("p1", _row("p1", "old@x.org", 10, 1), 10, 1)
    assert store.apply_profile("p1", _row("p1", "new@x.org", 20, 2, phone="+15551234567"), 20, 2)
    # an older row redelivered (or overtaken on the way) changes nothing
    assert not store.apply_profile("p1", _row("p1", "old@x.org", 10, 1), 10, 1)
    assert not store.apply_profile("p1", _row("p1", "same-time@x.org", 20, 1), 20, 1)
    assert store.profile("p1")["email"] == "new@x.org"
    assert store.lookup("email", "new@x.org") == "p1" and store.lookup("email", "old@x.org") is None
    assert store.lookup("phone", "+15551234567") == "p1"
    with pytest.raises(ValueError):
        store.lookup("cookie", "x")


def test_memberships_follow_enters_and_exits_and_page_by_cursor(store):
    for i in range(5):
        store.apply_change(segment_change(f"p{i}", "vip", "rule", "enter", "2026-01-01T00:00:00Z", "m"))
    store.apply_change(segment_change("p2", "vip", "rule", "exit", "2026-01-02T00:00:00Z", "m2"))
    store.apply_change(segment_change("p2", "vip", "rule", "exit", "2026-01-02T00:00:00Z", "m2"))  # redelivered
    assert store.segments_of("p1") == ["vip"] and store.segments_of("p2") == []
    assert store.segment_size("vip") == 4
    first = store.members("vip", limit=2)
    assert first == ["p0", "p1"] and store.members("vip", after=first[-1], limit=10) == ["p3", "p4"]
    assert store.segment_names() == ["vip"]


def test_a_tombstone_removes_a_profile_and_an_older_row_does_not_bring_it_back(store):
    store.apply_profile("p1", _row("p1", "a@x.org", 10, 1), 10, 1)
    store.apply_change(segment_change("p1", "vip", "rule", "enter", "2026-01-01T00:00:00Z", "m"))
    assert store.apply_profile("p1", None, 30, 3)
    assert store.profile("p1") is None and store.lookup("email", "a@x.org") is None
    assert store.segment_size("vip") == 0
    assert not store.apply_profile("p1", _row("p1", "a@x.org", 20, 2), 20, 2)
    assert store.apply_profile("p1", _row("p1", "a@x.org", 40, 4), 40, 4)  # a split may reuse an id later


def test_a_forgotten_profile_is_gone_for_good(store):
    store.apply_profile("p1", _row("p1", "a@x.org", 10, 1, user_id="u1"), 10, 1)
    store.apply_change(segment_change("p1", "vip", "rule", "enter", "2026-01-01T00:00:00Z", "m"))
    assert store.forget("p1") and store.is_forgotten("p1")
    assert store.profile("p1") is None and store.lookup("user_id", "u1") is None and store.members("vip") == []
    assert not store.apply_profile("p1", _row("p1", "a@x.org", 99, 99), 99, 99)
    assert not store.apply_change(segment_change("p1", "vip", "rule", "enter", "2026-01-03T00:00:00Z", "m3"))
    assert store.members("vip") == []


def test_only_redis_is_a_profile_store():
    with pytest.raises(BadInput, match="redis://"):
        open_profile_store("sqlite:///tmp/x.sqlite")


def test_cdpflow_forget_removes_the_person_from_the_profile_store_and_tombstones_their_rows(
        sample, tmp_path, redis_url, kafka_bootstrap):
    # A forget on the warehouse also reaches activation: the profile store drops the profile for
    # good (nothing of it is stored or delivered again), and the compacted profile topic gets
    # its tombstone, so a reader of the topic from the start finds no row of theirs.
    import duckdb
    from kafka import KafkaConsumer, TopicPartition

    from cdpflow.cli import main
    from cdpflow.core.rows import profile_record
    from cdpflow.io.kafka_producer import producer, send_all
    from cdpflow.schemas.topics import PROFILE_CHANGES
    warehouse = tmp_path / "cdp.duckdb"
    assert main(["run", "--input", str(sample / "events"), "--warehouse", str(warehouse),
                 "--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv")]) == 0
    con = duckdb.connect(str(warehouse), read_only=True)
    pid, email = con.execute("SELECT profile_id, email FROM profiles WHERE email IS NOT NULL ORDER BY 1 LIMIT 1").fetchone()
    con.close()
    uri = f"{redis_url}?prefix=forget-{uuid.uuid4().hex[:8]}"
    store = open_profile_store(uri)
    row = {"profile_id": pid, "email": email, "as_of": 10, "updated_at": 10}
    store.apply_profile(pid, row, 10, 10)
    store.apply_change(segment_change(pid, "vip", "rule", "enter", "2026-01-01T00:00:00Z", "m"))
    client = producer(kafka_bootstrap)
    send_all(client, [profile_record(row)])
    client.close()
    assert main(["forget", f"email:{email}", "--warehouse", str(warehouse), "--profile-store", uri,
                 "--bootstrap", kafka_bootstrap]) == 0
    assert store.profile(pid) is None and store.is_forgotten(pid) and store.lookup("email", email) is None
    assert pid not in store.members("vip")
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, consumer_timeout_ms=3000)
    tps = [TopicPartition(PROFILE_CHANGES.name, p) for p in consumer.partitions_for_topic(PROFILE_CHANGES.name)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    last = {}
    for record in consumer:
        last[record.key] = record.value
    consumer.close()
    assert pid.encode() in last and last[pid.encode()] is None  # the newest record of theirs: a tombstone
    store.close()
