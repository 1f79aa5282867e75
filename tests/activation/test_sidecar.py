"""The activation sidecar against a real Kafka, a real Redis and a real HTTP receiver on loopback.

The changes are a batch run's over generated traffic (its profiles and its published segment
changes), with each profile also entering and leaving a segment a few times so that order
matters; they are written to `cdp.profiles.changes` and `cdp.segments.changes` as the stream
writes them. The receiver (tests/activation/receiver.py) verifies signatures, deduplicates by
idempotency key and fails on purpose. The expected deliveries come from those topics' records,
not from anything the sidecar keeps.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict

import duckdb
import orjson
import pytest
import yaml

from cdpflow.cli import main
from cdpflow.core.rows import profile_record, segment_record
from cdpflow.core.segments import segment_change
from cdpflow.core.timeutil import format_ts
from cdpflow.io.kafka_producer import producer, send_all
from cdpflow.schemas.topics import DESTINATION_DEAD_LETTERS
from cdpflow.synthetic import generate
from tests.activation.receiver import Receiver
from tests.stream.test_live import broker  # noqa: F401  (a Kafka broker of the test's own)

pytestmark = pytest.mark.e2e

SECRET = "a-webhook-secret-for-tests"
FAST_RETRIES = {"timeout_seconds": 0.4, "max_attempts": 25, "backoff_seconds": 0.01, "max_backoff_seconds": 0.2}


def _batch_run(folder):
    sample = folder / "sample"
    generate(sample, customers=30, days=60, seed=5)
    warehouse = folder / "cdp.duckdb"
    assert main(["run", "--input", str(sample / "events"), "--warehouse", str(warehouse),
                 "--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv")]) == 0
    con = duckdb.connect(str(warehouse), read_only=True)
    cur = con.execute("select profile_id, user_id, email, phone, first_name, last_name, city, traits, unsubscribed, "
                      "epoch_us(as_of), epoch_us(updated_at) from profiles order by profile_id")
    profiles = []
    for pid, user_id, email, phone, first, last, city, traits, unsubscribed, as_of, updated in cur.fetchall():
        profiles.append({"profile_id": pid, "user_id": user_id, "email": email, "phone": phone, "first_name": first,
                         "last_name": last, "city": city, "traits": orjson.loads(traits) if traits else {},
                         "unsubscribed": unsubscribed, "as_of": as_of, "updated_at": updated})
    con.close()
    changes = [orjson.loads(line) for line in (folder / "cdp.segment_changes.jsonl").read_bytes().splitlines() if line]
    # each profile also flips in and out of a segment, so a wrong order would show
    now = int(time.time() * 1_000_000)
    for profile in profiles:
        for i, direction in enumerate(("enter", "exit", "enter", "exit")):
            changes.append(segment_change(profile["profile_id"], "flip_flop", "rule", direction,
                                          format_ts(now + i), f"flip-{i}"))
    return warehouse, profiles, changes


@pytest.fixture(scope="module")
def _seeded(tmp_path_factory):
    """One batch run for the module's tests: its warehouse, profiles and segment changes."""
    return _batch_run(tmp_path_factory.mktemp("seeded"))


@pytest.fixture
def seeded(_seeded, tmp_path):
    """The batch run's results, the warehouse copied for the test (a test may add governance to it)."""
    import copy
    import shutil
    warehouse, profiles, changes = _seeded
    own = tmp_path / "cdp.duckdb"
    for path in warehouse.parent.glob("cdp.*"):
        if path.is_file():
            shutil.copy(path, tmp_path / path.name)
    return own, copy.deepcopy(profiles), copy.deepcopy(changes)


def _publish(bootstrap, profiles=(), changes=()):
    client = producer(bootstrap)
    try:
        send_all(client, [profile_record(p) for p in profiles] + [segment_record(c) for c in changes])
    finally:
        client.close()


def _config(tmp_path, destinations):
    path = tmp_path / f"activation-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"activation": {"destinations": destinations}}))
    return path


def _sidecar_command(config, bootstrap, store, warehouse, *more):
    # the warehouse: the governance the sidecar starts from (its forgotten identifiers)
    return [sys.executable, "-c", "import sys; from cdpflow.cli import main; sys.exit(main(sys.argv[1:]))",
            "serve", "sidecar", "--config", str(config), "--bootstrap", bootstrap, "--profile-store", store,
            "--warehouse", str(warehouse), *more]


def _env():
    return dict(os.environ, TEST_WEBHOOK_SECRET=SECRET)


def _wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _in_topic_order(changes):
    order = defaultdict(list)
    for change in changes:
        order[change["profile_id"]].append(change["idempotency_key"])
    return dict(order)


def _dead_letters(bootstrap, with_keys=False):
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed", consumer_timeout_ms=3000)
    tps = [TopicPartition(DESTINATION_DEAD_LETTERS.name, p)
           for p in consumer.partitions_for_topic(DESTINATION_DEAD_LETTERS.name)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = list(consumer)
    consumer.close()
    if with_keys:
        return [(r.partition, r.key, None if r.value is None else orjson.loads(r.value)) for r in records]
    return [orjson.loads(r.value) for r in records if r.value is not None]


def test_every_change_reaches_a_flaky_receiver_once_in_order_signed_across_a_sidecar_kill(
        tmp_path, broker, redis_url, seeded):
    warehouse, profiles, changes = seeded
    _publish(broker, profiles, changes)
    store = f"{redis_url}?prefix=sidecar-{uuid.uuid4().hex[:8]}"
    # 30% of requests fail (500, 503, or 429 asking for a 1 s pause), 10% are processed but
    # answered after the sender's timeout (so they are sent again), the rest answer 200
    with Receiver(SECRET.encode(), fail_rate=0.3, slow_rate=0.1, slow_s=0.8, seed=11) as receiver:
        config = _config(tmp_path, {"crm": {"type": "webhook", "url": receiver.url, "secret_env": "TEST_WEBHOOK_SECRET",
                                            **FAST_RETRIES}})
        command = _sidecar_command(config, broker, store, warehouse)
        first = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: len(receiver.processed) >= len(changes) // 3, 120, "the sidecar delivered nothing")
        finally:
            first.kill()  # SIGKILL: no goodbye, offsets of the batch in flight not committed
            first.wait()
        assert len(receiver.processed) < len(changes), "the kill came too late to mean anything"
        second = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: len(receiver.processed) == len(changes), 240, "not every change was delivered")
        finally:
            second.terminate()
            output = second.communicate(timeout=60)[0].decode()
        assert second.returncode == 0, output[-3000:]
    keys = {c["idempotency_key"]: c for c in changes}
    assert set(receiver.processed) == set(keys)
    assert dict(receiver.order) == _in_topic_order(changes)
    for key, body in receiver.processed.items():
        change = keys[key]
        assert {k: body[k] for k in ("profile_id", "segment", "direction", "at")} == \
               {k: change[k] for k in ("profile_id", "segment", "direction", "at")}
        assert "profile" not in body  # no field policy: the profile id and the change only
    assert receiver.bad_signatures == 0 and receiver.requests > len(changes)
    statuses = [s for tries in receiver.attempts.values() for _, s in tries]
    assert {500, 503, 429, "slow"} <= set(statuses)
    # Retry-After honoured: no attempt of a key came sooner than 1 s after a 429 for it
    for tries in receiver.attempts.values():
        for (at, status), (next_at, _) in zip(tries, tries[1:]):
            if status == 429:
                assert next_at - at >= 0.95, tries
    assert _dead_letters(broker) == []


def test_a_destination_receives_only_the_fields_its_policy_allows(tmp_path, broker, redis_url, seeded):
    warehouse, profiles, changes = seeded
    _publish(broker, profiles, changes)
    store = f"{redis_url}?prefix=sidecar-{uuid.uuid4().hex[:8]}"
    with Receiver(SECRET.encode()) as crm, Receiver(SECRET.encode()) as ads:
        config = _config(tmp_path, {
            "crm": {"type": "webhook", "url": crm.url, "secret_env": "TEST_WEBHOOK_SECRET",
                    "fields": {"identifiers": ["email"], "traits": ["first_name"]}},
            "ads": {"type": "webhook", "url": ads.url, "secret_env": "TEST_WEBHOOK_SECRET",
                    "fields": {"hashed": ["email", "phone"]}, "segments": ["flip_flop"]}})
        done = subprocess.run(_sidecar_command(config, broker, store, warehouse, "--until-idle", "3"), env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    by_id = {p["profile_id"]: p for p in profiles}
    assert set(crm.processed) == {c["idempotency_key"] for c in changes}
    assert set(ads.processed) == {c["idempotency_key"] for c in changes if c["segment"] == "flip_flop"}
    with_email = 0
    for body in crm.processed.values():
        profile = by_id[body["profile_id"]]
        allowed = {}
        if profile["email"]:
            allowed["email"] = profile["email"]
        if "first_name" in profile["traits"]:
            allowed["traits"] = {"first_name": profile["traits"]["first_name"]}
        assert body.get("profile", {}) == allowed
        with_email += bool(profile["email"])
    assert with_email > 0
    for body in ads.processed.values():
        profile = by_id[body["profile_id"]]
        expected = {f"{k}_sha256": hashlib.sha256(profile[k].strip().lower().encode()).hexdigest()
                    for k in ("email", "phone") if profile[k]}
        assert body.get("profile", {}) == expected
    # nothing the policies leave out appears anywhere in what left, in any form
    for raw in crm.bodies:
        profile = by_id[orjson.loads(raw)["profile_id"]]
        for field in ("phone", "user_id", "last_name", "city"):
            if profile[field]:
                assert profile[field].encode() not in raw, field
    for raw in ads.bodies:
        profile = by_id[orjson.loads(raw)["profile_id"]]
        for field in ("email", "phone", "user_id", "first_name", "last_name"):
            value = profile[field] or (profile["traits"].get(field) if field in ("first_name", "last_name") else None)
            if value:
                assert str(value).encode() not in raw, field


def test_a_refused_change_holds_its_profile_until_replayed_and_forgotten_people_never_leave(
        tmp_path, broker, redis_url, seeded):
    # One person's change is refused (400): it and every later change of theirs go to the
    # dead-letter topic, in order, while everyone else is delivered. Two people are forgotten:
    # one in the warehouse before the sidecar starts, one in the identity store while it runs.
    # After the receiver is fixed, `cdpflow destinations replay` delivers the held changes in
    # order and releases the profile; nothing of either forgotten person ever leaves.
    from cdpflow.config import load_config
    from cdpflow.core import governance
    from cdpflow.core.identity import open_identity_store
    from cdpflow.warehouse import open_warehouse
    warehouse, profiles, changes = seeded
    with_email = [p for p in profiles if p["email"]]
    held, before, during, late = with_email[0], with_email[1], with_email[2], with_email[3]
    with open_warehouse(str(warehouse)) as wh:
        key = governance.suppression_key(load_config(None), wh.demo_key_file())
        wh.suppress([("email", before["email"])], int(time.time() * 1_000_000), key)
    identity_store = f"{redis_url}?prefix=identity-{uuid.uuid4().hex[:8]}"
    store = f"{redis_url}?prefix=sidecar-{uuid.uuid4().hex[:8]}"
    first_of_held = next(c for c in changes if c["profile_id"] == held["profile_id"])
    refusing = {"on": True}
    _publish(broker, profiles, changes)
    with Receiver(SECRET.encode(), refuse=lambda c: refusing["on"] and c["idempotency_key"] == first_of_held["idempotency_key"]) as receiver:
        config = _config(tmp_path, {"crm": {"type": "webhook", "url": receiver.url, "secret_env": "TEST_WEBHOOK_SECRET",
                                            **FAST_RETRIES}})
        command = _sidecar_command(config, broker, store, warehouse, "--identity-store", identity_store)
        sidecar = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            expected = [c for c in changes if c["profile_id"] not in (held["profile_id"], before["profile_id"])]
            _wait(lambda: len(receiver.processed) == len(expected), 120, "the other profiles were not delivered")
            # forgotten while the sidecar runs: the identity store keeps the hash, as a forget does
            graph = open_identity_store(identity_store)
            try:
                graph.forget([("email", during["email"])], hashes=[key.hash(("email", during["email"]))])
            finally:
                graph.close()
            more = [segment_change(p["profile_id"], "after_the_forget", "rule", "enter", format_ts(int(time.time() * 1e6)),
                                   "more-1") for p in (held, during, late)]
            _publish(broker, changes=more)
            _wait(lambda: more[2]["idempotency_key"] in receiver.processed, 60, "a new change was not delivered")
            time.sleep(1.0)  # the same batch held the other two: nothing else may come
        finally:
            sidecar.terminate()
            output = sidecar.communicate(timeout=60)[0].decode()
        assert sidecar.returncode == 0, output[-3000:]
        assert set(receiver.processed) == {c["idempotency_key"] for c in expected + [more[2]]}
        letters = _dead_letters(broker)
        held_changes = [c for c in changes if c["profile_id"] == held["profile_id"]] + [more[0]]
        assert [letter["change"]["idempotency_key"] for letter in letters] == [c["idempotency_key"] for c in held_changes]
        assert letters[0]["error"].startswith("refused: HTTP 400")
        assert all(letter["error"].startswith("held behind") for letter in letters[1:])
        # the receiver is fixed: the replay delivers the held profile's changes in their order
        refusing["on"] = False
        args = ["destinations", "replay", "crm", "--config", str(config), "--bootstrap", broker, "--profile-store", store,
                "--warehouse", str(warehouse), "--identity-store", identity_store]
        os.environ["TEST_WEBHOOK_SECRET"] = SECRET
        try:
            assert main(args) == 0
            assert receiver.order[held["profile_id"]] == [c["idempotency_key"] for c in held_changes]
            # released: the profile's next change goes out live again; a second replay has nothing to do
            again = segment_change(held["profile_id"], "after_the_replay", "rule", "enter",
                                   format_ts(int(time.time() * 1e6)), "more-2")
            _publish(broker, changes=[again])
            done = subprocess.run(command + ["--until-idle", "3"], env=_env(), capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            assert receiver.order[held["profile_id"]][-1] == again["idempotency_key"]
            sent = len(receiver.processed)
            assert main(args) == 0
            assert len(receiver.processed) == sent
        finally:
            os.environ.pop("TEST_WEBHOOK_SECRET", None)
    # nothing of the person forgotten before left, in any request; of the one forgotten while
    # the sidecar ran, nothing after the forget (neither live nor by the replay)
    assert before["profile_id"] not in receiver.order
    assert not any(before["profile_id"].encode() in body for body in receiver.bodies)
    assert receiver.order[during["profile_id"]] == [c["idempotency_key"] for c in changes
                                                   if c["profile_id"] == during["profile_id"]]
    assert more[1]["idempotency_key"] not in receiver.attempts
    # The held person is forgotten: each of their dead letters (all in their profile's partition,
    # keyed one per letter) gets a tombstone; the letters of anyone else stay.
    extra = segment_change(late["profile_id"], "kept", "rule", "enter", format_ts(int(time.time() * 1e6)), "kept-1")
    with Receiver(SECRET.encode(), refuse=lambda c: True) as refusing_receiver:
        config = _config(tmp_path, {"crm": {"type": "webhook", "url": refusing_receiver.url,
                                            "secret_env": "TEST_WEBHOOK_SECRET", **FAST_RETRIES}})
        _publish(broker, changes=[extra])
        done = subprocess.run(_sidecar_command(config, broker, store, warehouse, "--until-idle", "3"), env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert main(["forget", f"email:{held['email']}", "--warehouse", str(warehouse), "--profile-store", store,
                 "--bootstrap", broker]) == 0
    newest, partitions = {}, defaultdict(set)
    for partition, key, letter in _dead_letters(broker, with_keys=True):
        newest[key] = letter
        partitions[key.decode().split("|")[0]].add(partition)
    mine = {k: v for k, v in newest.items() if k.decode().startswith(held["profile_id"] + "|")}
    assert set(mine) == {f"{held['profile_id']}|crm|{c['idempotency_key']}".encode() for c in held_changes}
    assert all(letter is None for letter in mine.values())
    assert len(partitions[held["profile_id"]]) == 1
    kept = newest[f"{late['profile_id']}|crm|{extra['idempotency_key']}".encode()]
    assert kept is not None and kept["change"]["idempotency_key"] == extra["idempotency_key"]


def _consented(profile):
    # the rule as the issue states it, written here on its own: unsubscribed, or consent withdrawn
    return not profile.get("unsubscribed") and (profile.get("traits") or {}).get("marketing_consent") is not False


def test_an_email_platform_gets_batched_audience_changes_within_its_rate_limit_and_only_with_consent(
        tmp_path, broker, redis_url, seeded):
    from tests.activation.email_platform import EmailPlatform
    warehouse, profiles, changes = seeded
    with_email = [p for p in profiles if p["email"]]
    unsubscribed = with_email[0]
    unsubscribed["unsubscribed"] = True  # the Unsubscribed event's feature, as the stream's row carries it
    _publish(broker, profiles, changes)
    store = f"{redis_url}?prefix=sidecar-{uuid.uuid4().hex[:8]}"
    audiences = {"high_value": "aud_high_value"}
    # the platform refuses a request sooner than 50 ms after the last (20 a second) and throttles
    # a fifth of the others at random, each time asking for a 1 s pause
    with EmailPlatform("key-for-tests", min_interval_s=0.05, throttle_rate=0.2) as platform:
        config = _config(tmp_path, {"email": {
            "type": "email_audience", "base_url": platform.url, "api_key_env": "TEST_EMAIL_KEY",
            "fields": {"identifiers": ["email"], "traits": ["first_name"]}, "audiences": audiences,
            "requests_per_second": 15, "batch_size": 10, "timeout_seconds": 2, "max_attempts": 25,
            "backoff_seconds": 0.01, "max_backoff_seconds": 0.2}})
        env = dict(_env(), TEST_EMAIL_KEY="key-for-tests")
        expected = defaultdict(set)
        by_id = {p["profile_id"]: p for p in profiles}
        for change in changes:
            profile = by_id[change["profile_id"]]
            if not profile["email"]:
                continue
            audience = audiences.get(change["segment"], change["segment"])
            if change["direction"] == "enter" and _consented(profile):
                expected[audience].add(profile["email"])
            else:
                expected[audience].discard(profile["email"])
        expected = {a: m for a, m in expected.items() if m}
        sidecar = subprocess.Popen(_sidecar_command(config, broker, store, warehouse), env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: platform.members() == expected, 180, "the audiences never matched the changes")
            # a member withdraws consent (a newer row of theirs): they leave every audience
            member = next(p for p in with_email[1:] if any(p["email"] in m for m in expected.values()))
            withdrawn = dict(member, traits=dict(member["traits"], marketing_consent=False),
                             as_of=member["as_of"] + 1, updated_at=member["updated_at"] + 1)
            _publish(broker, [withdrawn])
            _wait(lambda: not any(member["email"] in m for m in platform.members().values()), 60,
                  "a profile that withdrew consent stayed in an audience")
            # an enter while consent is withdrawn does not add them back; once it returns, one does
            _publish(broker, changes=[segment_change(member["profile_id"], "spring_sale", "rule", "enter",
                                                     format_ts(int(time.time() * 1e6)), "no-consent")])
            time.sleep(3)
            assert not any(member["email"] in m for m in platform.members().values())
            returned = dict(member, traits=dict(member["traits"], marketing_consent=True),
                            as_of=member["as_of"] + 2, updated_at=member["updated_at"] + 2)
            _publish(broker, [returned], [segment_change(member["profile_id"], "spring_sale", "rule", "enter",
                                                         format_ts(int(time.time() * 1e6)), "consent-back")])
            _wait(lambda: member["email"] in platform.members().get("spring_sale", set()), 60,
                  "consent returned but the enter did not add the member")
        finally:
            sidecar.terminate()
            output = sidecar.communicate(timeout=60)[0].decode()
        assert sidecar.returncode == 0, output[-3000:]
    assert not any(unsubscribed["email"] in m for m in platform.members().values())
    accepted = [r for r in platform.requests if r[4] == 200]
    assert max(adds + removes for _, _, adds, removes, _ in accepted) > 1  # members go in batches
    assert all(adds + removes <= 10 for _, _, adds, removes, _ in accepted)
    assert not [r for r in platform.requests if r[4] == 401]
    throttled = [r for r in platform.requests if r[4] == 429]
    assert throttled  # the random throttling was met ...
    for when, audience, *_ in throttled:  # ... and no retry of it came sooner than it asked
        later = [t for t, a, *_ in platform.requests if a == audience and t > when]
        assert not later or min(later) - when >= 0.95


def test_a_worker_that_fails_stops_the_sidecar_with_its_error(tmp_path, broker, redis_url, seeded, monkeypatch, capsys):
    # A destination's worker that raises (here: its profile store read fails) ends the sidecar
    # with exit 1 and the error in words; nothing of its batch was committed.
    from cdpflow.activation import sidecar
    warehouse, profiles, changes = seeded
    _publish(broker, profiles[:2], changes[:3])

    def broken(self, profile_id, items):
        raise ConnectionError("the profile store went away")

    monkeypatch.setattr(sidecar.DestinationWorker, "_prepare", broken)
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    config = _config(tmp_path, {"crm": {"type": "webhook", "url": "http://127.0.0.1:9/h", "secret_env": "TEST_WEBHOOK_SECRET"}})
    store = f"{redis_url}?prefix=sidecar-{uuid.uuid4().hex[:8]}"
    assert main(["serve", "sidecar", "--config", str(config), "--bootstrap", broker, "--profile-store", store,
                 "--warehouse", str(warehouse), "--until-idle", "5"]) == 1
    assert "crm: ConnectionError: the profile store went away" in capsys.readouterr().err.replace("\n", " ")


def test_each_profile_store_reads_the_topics_whole_and_a_store_that_lost_its_data_is_rebuilt(
        broker, redis_url, seeded):
    from cdpflow.activation.profile_store import ProfileStoreUpdater, open_profile_store
    _, profiles, changes = seeded
    _publish(broker, profiles, changes)
    ids = {p["profile_id"] for p in profiles}
    first, second = (open_profile_store(f"{redis_url}?prefix=ps-{uuid.uuid4().hex[:8]}") for _ in range(2))
    try:
        for store in (first, second):
            updater = ProfileStoreUpdater(broker, store)
            updater.catch_up()
            updater.close()
            assert {pid for pid in ids if store.profile(pid)} == ids
        for key in first.client.scan_iter(f"{first.prefix}:*"):  # its Redis lost the data
            first.client.delete(key)
        updater = ProfileStoreUpdater(broker, first)
        updater.catch_up()
        updater.close()
        assert {pid for pid in ids if first.profile(pid)} == ids
        flips = {c["profile_id"] for c in changes if c["segment"] == "flip_flop"}
        assert first.segment_size("flip_flop") == 0 and flips == ids  # every flip ended with an exit
    finally:
        first.close()
        second.close()


def test_a_forget_asks_each_destination_to_delete_the_member(tmp_path, redis_url, seeded, monkeypatch):
    # `cdpflow forget --profile-store`: before the store drops the person, every configured
    # destination is asked to delete them: the webhook gets a signed delete_member with what its
    # policy allows, the email platform loses the member from the audiences of their segments.
    from tests.activation.email_platform import EmailPlatform
    from cdpflow.activation.profile_store import open_profile_store
    warehouse, profiles, _ = seeded
    person = next(p for p in profiles if p["email"])
    uri = f"{redis_url}?prefix=forget-{uuid.uuid4().hex[:8]}"
    store = open_profile_store(uri)
    store.apply_profile(person["profile_id"], person, person["as_of"], person["updated_at"])
    for segment in ("vip", "high_value"):
        store.apply_change(segment_change(person["profile_id"], segment, "rule", "enter", "2026-01-01T00:00:00Z", "m"))
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("TEST_EMAIL_KEY", "key-for-tests")
    with Receiver(SECRET.encode()) as crm, EmailPlatform("key-for-tests") as platform:
        platform.audiences["aud_high_value"][person["email"]] = {}
        platform.audiences["vip"][person["email"]] = {}
        platform.audiences["vip"]["someone.else@example.org"] = {}
        config = _config(tmp_path, {
            "crm": {"type": "webhook", "url": crm.url, "secret_env": "TEST_WEBHOOK_SECRET",
                    "fields": {"hashed": ["email"]}},
            "email": {"type": "email_audience", "base_url": platform.url, "api_key_env": "TEST_EMAIL_KEY",
                      "fields": {"identifiers": ["email"]}, "audiences": {"high_value": "aud_high_value"}}})
        assert main(["forget", f"email:{person['email']}", "--warehouse", str(warehouse), "--config", str(config),
                     "--profile-store", uri]) == 0
        assert platform.members() == {"vip": {"someone.else@example.org"}}
    deletes = [orjson.loads(b) for b in crm.bodies]
    assert [d["type"] for d in deletes] == ["delete_member"] and crm.bad_signatures == 0
    assert deletes[0]["profile_id"] == person["profile_id"]
    assert deletes[0]["profile"] == {"email_sha256": hashlib.sha256(person["email"].encode()).hexdigest()}
    assert store.profile(person["profile_id"]) is None and store.is_forgotten(person["profile_id"])
    store.close()
