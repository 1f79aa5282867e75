"""cdpflow's PyFlink job on a real Flink cluster (a JobManager, two TaskManagers), Kafka and Redis.

Generated traffic with its default noise goes live through the collector into a broker of the
test's own; `cdpflow flink submit` runs the job at parallelism 2; `cdpflow load` loads what it
wrote. The reference is `cdpflow run` over the events exactly as `cdp.events.raw` holds them,
as of the same end: the same accepted events, the same dead letters, and for everyone in no
merge-protection conflict the same profiles (identifier sets and every feature column) and open
memberships, with the merge-protection limits held for the rest and identity precision and
recall against the generator's truth no worse than the batch run's.

The live test: while the job runs its operator metrics are read back over the REST API (both
subtasks of the identity stage worked, in two Python processes); a TaskManager is SIGKILLed
between a merge and the next completed checkpoint and replaced (the job restores and resolves the
merge's batch again); the job is stopped with a savepoint, more traffic (with copies of earlier
events) arrives, and the job resumed from the savepoint finishes the input; a read_committed
reader finds every accepted event on `cdp.warehouse.rows` and every segment change once.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict

import orjson
import pytest

from cdpflow import flink
from cdpflow.cli import main
from cdpflow.core.evaluation import evaluate, load_truth
from cdpflow.core.timeutil import format_ts
from cdpflow.schemas.topics import DEAD_LETTERS, PROFILE_CHANGES, SEGMENT_CHANGES, WAREHOUSE_ROWS
from cdpflow.stack.base import free_port
from cdpflow.synthetic import generate
from tests.stack.test_flink import LOOPBACK, listening
from tests.stream.test_live import (assert_same_as_batch, broker, changes_on_topic, end_time,  # noqa: F401
                                    net_memberships, raw_events, run_reference, send_live, tables)

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


def _vertex(jobmanager, job_id, name):
    return next(v["id"] for v in flink.rest(jobmanager, f"/jobs/{job_id}")["vertices"] if name in v["name"])


def _wait_decided(store_uri, message_ids, timeout=180):
    """Until the identity store has decided every one of these events (the job has read them all)."""
    from cdpflow.core.identity import open_identity_store
    store = open_identity_store(store_uri)
    try:
        deadline = time.monotonic() + timeout
        while len(store.current_profiles(sorted(message_ids))) < len(message_ids):
            assert time.monotonic() < deadline, "the job did not read every event"
            time.sleep(0.5)
    finally:
        store.close()


def _merge_events(folder, now_us, tag):
    """Two visitors browse anonymously, then sign in to one account: the sign-in resolved second merges.

    Two files: the visits, then the sign-ins, to be sent once the visits are decided. Sent
    together, a sign-in (keyed by the user id, so on another partition and in another of the
    identity stage's buckets) could be resolved before its visitor's pages: its anonymous id then
    joins the account's profile, and no merge is made (the profiles are the same either way).
    """
    visits, signins = [], []
    for i, anonymous in enumerate((f"{tag}-a", f"{tag}-b")):
        for j in range(3):
            visits.append({"type": "page", "name": "Home", "messageId": f"{anonymous}-page-{j}",
                           "anonymousId": anonymous, "timestamp": format_ts(now_us - (60 - 10 * i - j) * 1_000_000)})
        signins.append({"type": "identify", "messageId": f"{anonymous}-signin", "anonymousId": anonymous,
                        "userId": f"usr_{tag}", "timestamp": format_ts(now_us - (40 - 10 * i) * 1_000_000)})
    files = []
    for name, lines in (("visits", visits), ("signins", signins)):
        path = folder / f"{tag}-{name}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        files.append((path, {line["messageId"] for line in lines}))
    return files


def _read_committed(broker, *topics):
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=broker, isolation_level="read_committed", consumer_timeout_ms=5000)
    tps = [TopicPartition(topic, p) for topic in topics for p in consumer.partitions_for_topic(topic)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = list(consumer)
    consumer.close()
    return records


def _assert_changes_net_to_memberships(changes, ours):
    by_id = {pid: frozenset(ids) for pid, ids in ours["ids"].items()}
    netted = defaultdict(set)
    for pid, segment in net_memberships(changes):
        netted[by_id.get(pid, frozenset({("profile", pid)}))].add(segment)
    assert {k: v for k, v in netted.items() if v} == {k: v for k, v in ours["open"].items() if v}


def _assert_identity_quality(ours, batch, traffic):
    truth = load_truth(str(traffic / "truth" / "identities.csv"))
    mine, theirs = evaluate(ours["links"], truth), evaluate(batch["links"], truth)
    assert mine.precision >= theirs.precision and mine.recall >= theirs.recall, (mine, theirs)


def test_the_flink_job_equals_the_batch_run_exactly_once_across_a_taskmanager_kill_and_a_savepoint(
        tmp_path, broker, flink_cluster, redis_url, capsys):
    # Every profile's last row is as of `until`, ten minutes ahead: the final stop drains the job
    # (its watermark goes to the end), so the warehouse can be compared with a batch run as of then.
    from cdpflow.core.identity import open_identity_store
    jobmanager = flink_cluster.address
    traffic = tmp_path / "sample"
    generate(traffic, customers=20, days=20, seed=31)
    warehouse = tmp_path / "live.duckdb"
    store = f"{redis_url}?prefix=flink:{uuid.uuid4().hex}"
    until = (int(time.time()) + 600) * 1_000_000
    reference = ["--catalog", str(traffic / "catalog.csv"), "--rates", str(traffic / "rates.csv"),
                 "--until", format_ts(until), "--checkpoint-ms", "5000"]
    job_id = _submit(broker, warehouse, store, jobmanager, tmp_path, *reference)
    flink.wait_for(job_id, ("RUNNING",), jobmanager)
    send_live(traffic, broker)
    raw_events(broker, tmp_path / "part1.jsonl")
    (tmp_path / "part1").mkdir()
    part1 = tables(run_reference(tmp_path / "part1", traffic, tmp_path / "part1.jsonl", until))
    _wait_decided(store, part1["events"])
    # both subtasks of the identity stage received records, each in a Python process of its own
    vertex = _vertex(jobmanager, job_id, "ResolveIdentity")
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline and not (len(seen) == 2 and all(v[0] > 0 for v in seen.values())):
        for subtask in (0, 1):
            received = _metric(jobmanager, job_id, vertex, subtask, "cdpflow.received")
            pid = _metric(jobmanager, job_id, vertex, subtask, "cdpflow.python_pid")
            if received is not None and pid is not None:
                seen[subtask] = (received, int(pid))
        time.sleep(1)
    assert len(seen) == 2 and all(r > 0 for r, _ in seen.values()), seen
    assert seen[0][1] != seen[1][1], f"both subtasks ran in one Python process: {seen}"
    # what the stages after identity did shows too (counts kept by the workers, reported as gauges)
    # (a gauge shows once the subtask's worker has reported it: asked again until then)
    features = _vertex(jobmanager, job_id, "ProfileFeatures")
    deadline = time.monotonic() + 60
    while True:
        rows = [_metric(jobmanager, job_id, features, subtask, "cdpflow.rows") for subtask in (0, 1)]
        if (None not in rows and sum(rows) > 0) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert None not in rows and sum(rows) > 0, rows
    # while a Python job runs, the JobManager and the Python workers listen on 127.0.0.1 only, and
    # so do the TaskManagers' Flink ports; what a TaskManager opens for its Python workers (Beam's
    # gRPC control, data, state, logging and provisioning services, bound by Beam's own server
    # factory to every interface, with no setting to change it) is the known exception (README).
    workers = [pid for _, pid in seen.values()]
    assert {a for a, _ in listening([flink_cluster.jobmanager.pid()] + workers)} <= {LOOPBACK}
    taskmanagers = [tm.pid() for tm in flink_cluster.taskmanagers]
    wildcard = {s for s in listening(taskmanagers) if s[0] != LOOPBACK}
    assert len(wildcard) <= 6 * len(taskmanagers), sorted(wildcard)
    flink.checkpoint(job_id, jobmanager)  # one completed checkpoint at least, before any merge below
    # A merge, then a TaskManager dies (SIGKILL) before the next checkpoint completes and is
    # replaced: the job restores from the checkpoint and resolves the merge's batch again, and the
    # identity store gives back the decisions and moves of the first attempt. Checkpoints come
    # every 5 s: should one complete between the merge and the kill (about 1 in 25), another pair
    # of visitors merges and the kill is tried again.
    graph = open_identity_store(store)
    try:
        for attempt in range(3):
            (visits, visited), (signins, merging) = _merge_events(
                tmp_path, int(time.time() * 1_000_000), f"kill-test-{attempt}")
            send_live(None, broker, [(visits, 5000)])
            _wait_decided(store, visited)
            send_live(None, broker, [(signins, 5000)])
            deadline = time.monotonic() + 120
            while not any(m["cause_message_id"] in merging for m in graph.merges()):
                assert time.monotonic() < deadline, "the job made no merge of the two visitors"
                time.sleep(0.05)
            merged_at_ms = int(time.time() * 1000)
            flink_cluster.kill_taskmanager(1)
            latest = flink.rest(jobmanager, f"/jobs/{job_id}/checkpoints")["latest"]["completed"]
            flink_cluster.start_taskmanager(1)
            if latest["latest_ack_timestamp"] < merged_at_ms:
                break  # killed between the merge and the next completed checkpoint
            flink.wait_for(job_id, ("RUNNING",), jobmanager)
        else:
            raise AssertionError("a checkpoint completed between every merge and its kill")
    finally:
        graph.close()
    deadline = time.monotonic() + 180
    while flink.rest(jobmanager, f"/jobs/{job_id}/checkpoints")["counts"]["restored"] < 1:
        assert time.monotonic() < deadline, "the job did not restore from its checkpoint after the kill"
        time.sleep(1)
    flink.wait_for(job_id, ("RUNNING",), jobmanager)
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
    copies.write_bytes(b"".join(orjson.dumps({k: v for k, v in e.items() if k != "receivedAt"}) + b"\n"
                                for e in earlier[:15]))
    send_live(None, broker, [(copies, 5000)])
    events = raw_events(broker, tmp_path / "raw.jsonl")
    assert len(events) == len(earlier) + 15
    assert sum(1 for e in events if str(e.get("messageId", "")).startswith("kill-test-")) == 8 * (attempt + 1)
    batch = tables(run_reference(tmp_path, traffic, tmp_path / "raw.jsonl", until))
    resumed = _submit(broker, warehouse, store, jobmanager, tmp_path, *reference, "--from-savepoint", location)
    assert resumed != job_id
    flink.wait_for(resumed, ("RUNNING",), jobmanager)
    _wait_decided(store, batch["events"])
    # the last stop drains: the watermark goes to the end, every profile's timer at `until` fires
    flink.savepoint(resumed, jobmanager, stop=True, drain=True)
    flink.wait_for(resumed, ("FINISHED",), jobmanager)
    assert main(["load", "--bootstrap", broker, "--warehouse", str(warehouse), "--identity-store", store,
                 "--until-caught-up"]) == 0
    ours = tables(warehouse)
    assert_same_as_batch(ours, batch)
    _assert_identity_quality(ours, batch, traffic)
    merged = next(ids for ids in ours["profiles"] if ("user_id", f"usr_kill-test-{attempt}") in ids)
    assert {("anonymous_id", f"kill-test-{attempt}-a"), ("anonymous_id", f"kill-test-{attempt}-b")} <= merged
    assert ours["profiles"][merged]["event_count"] == 8
    # exactly once across the kill and the savepoint, to a read_committed reader: every accepted
    # event once on cdp.warehouse.rows (a copy that got past a dedup state lost with the savepoint
    # would be there twice), every segment change once, and the changes net to the memberships
    rows = [orjson.loads(r.value) for r in _read_committed(broker, WAREHOUSE_ROWS.name)]
    written = Counter(r["row"]["message_id"] for r in rows if r["table"] == "events")
    assert not {m: n for m, n in written.items() if n > 1}
    assert set(written) == batch["events"]
    changes = [orjson.loads(r.value) for r in _read_committed(broker, SEGMENT_CHANGES.name)]
    keys = Counter(c["idempotency_key"] for c in changes)
    assert not {k: n for k, n in keys.items() if n > 1}
    _assert_changes_net_to_memberships(changes, ours)


def test_a_bounded_flink_run_computes_the_profiles_and_segments_of_a_batch_run(
        tmp_path, broker, flink_cluster, redis_url):
    # The job's features, CLV scoring and segments on Flink (`--bounded --until`: the topic as it
    # is, every profile's last row as of the end), loaded by `cdpflow load`, against `cdpflow run`
    # over the same raw records; and the change topic, netted, says what the loader committed.
    jobmanager = flink_cluster.address
    traffic = tmp_path / "sample"
    generate(traffic, customers=20, days=20, seed=41)
    send_live(traffic, broker)
    events = raw_events(broker, tmp_path / "raw.jsonl")
    until = end_time(events)
    warehouse = tmp_path / "live.duckdb"
    store = f"{redis_url}?prefix=flink:{uuid.uuid4().hex}"
    job_id = _submit(broker, warehouse, store, jobmanager, tmp_path, "--bounded", "--until", format_ts(until),
                     "--catalog", str(traffic / "catalog.csv"), "--rates", str(traffic / "rates.csv"))
    flink.wait_for(job_id, ("FINISHED",), jobmanager, timeout=300)
    assert main(["load", "--bootstrap", broker, "--warehouse", str(warehouse), "--identity-store", store,
                 "--until-caught-up"]) == 0
    ours = tables(warehouse)
    batch = tables(run_reference(tmp_path, traffic, tmp_path / "raw.jsonl", until))
    assert_same_as_batch(ours, batch)
    _assert_identity_quality(ours, batch, traffic)
    _assert_changes_net_to_memberships(changes_on_topic(broker), ours)


def test_an_unreachable_cluster_is_said_in_words(capsys):
    assert main(["flink", "list", "--jobmanager", f"127.0.0.1:{free_port()}"]) == 2
    assert "no Flink JobManager" in capsys.readouterr().err


def test_the_flink_job_keeps_forgotten_people_out_whether_forgotten_before_or_while_it_runs(
        tmp_path, broker, flink_cluster, redis_url):
    # Forgotten before the submit: in the warehouse's governance, which the job's rules start
    # from. Forgotten while it runs: written to the identity store (as the loader's forget does),
    # which every worker reads at each batch. Neither person's events reach the output topics.
    from cdpflow.config import load_config
    from cdpflow.core import governance
    from cdpflow.core.identity import open_identity_store
    from cdpflow.core.timeutil import format_ts
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
    records = _read_committed(broker, WAREHOUSE_ROWS.name, PROFILE_CHANGES.name, SEGMENT_CHANGES.name,
                              DEAD_LETTERS.name)
    rows = [orjson.loads(r.value) for r in records if r.topic == WAREHOUSE_ROWS.name]
    events = [r["row"] for r in rows if r["table"] == "events"]
    assert Counter(r["message_id"] for r in events) == {"first-1": 1, "second-1": 1}, events
    # nothing of either person on any output topic: events, profile rows, segment changes, dead
    # letters (the kept people's rows come when the watermark passes their events: maybe after the stop)
    profiles = {r.key for r in records if r.topic == PROFILE_CHANGES.name}
    assert profiles and profiles <= {r["profile_id"].encode() for r in events}, profiles
    text = b"".join((r.value or b"") + (r.key or b"") for r in records)
    assert before[1].encode() not in text and during[1].encode() not in text


def test_the_flink_job_follows_a_promotion_and_a_rules_edit_while_it_runs(tmp_path, broker, flink_cluster, redis_url):
    # A warehouse from a batch run, two cluster models trained on it, the first promoted, and a
    # rules file: the job scores in batches with the first model's arrays. While it runs the
    # second model is promoted and the rules file edited; a person who arrives after that gets
    # the second model's cluster and the edited rules' segment, with their versions, from the
    # same job (never restarted); one who arrived before got the first's.
    from tests.stream.test_live_models import two_models_and_a_rules_file
    jobmanager = flink_cluster.address
    sample = tmp_path / "sample"
    generate(sample, customers=20, days=60, seed=44)
    warehouse, registry, first, second, rules, config = two_models_and_a_rules_file(
        tmp_path, sample, 4, "version: rules-before\nsegments:\n  - name: visitors\n    when: {orders_365d: {eq: 0}}\n")
    store = f"{redis_url}?prefix=flink:{uuid.uuid4().hex}"

    def visit(tag):
        # the visitor's events a minute back, and a later event of someone else, so the watermark
        # (bounded out-of-orderness) passes the visitor's and their profile row is made
        now = int(time.time() * 1_000_000)
        path = tmp_path / f"{tag}.jsonl"
        lines = [{"type": "identify", "messageId": f"{tag}-1", "anonymousId": f"{tag}-device",
                  "traits": {"email": f"{tag}@shop.example"}, "timestamp": format_ts(now - 60_000_000)},
                 {"type": "page", "name": "Home", "messageId": f"{tag}-2", "anonymousId": f"{tag}-device",
                  "timestamp": format_ts(now - 59_000_000)},
                 {"type": "page", "name": "Home", "messageId": f"{tag}-tick", "anonymousId": f"{tag}-ticker",
                  "timestamp": format_ts(now)}]
        path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        send_live(None, broker, [(path, 5000)])

    def enters_of(tag, timeout=120):
        """The versions on the segment enters caused by the visitor's events (read_committed)."""
        deadline = time.monotonic() + timeout
        while True:
            changes = changes_on_topic(broker)
            mine = {c["profile_id"] for c in changes if c["cause_message_id"].startswith(f"{tag}-")
                    and not c["cause_message_id"].endswith("-tick")}
            found = {(c["source"], c["model_version"]) for c in changes
                     if c["profile_id"] in mine and c["direction"] == "enter" and c["source"] != "lifecycle"}
            if {source for source, _ in found} >= {"model", "rule"}:
                return found
            assert time.monotonic() < deadline, f"no cluster and rule enters for {tag}: {changes[-5:]}"
            time.sleep(1)

    visit("before")
    job_id = _submit(broker, warehouse, store, jobmanager, tmp_path, "--config", str(config))
    flink.wait_for(job_id, ("RUNNING",), jobmanager)
    assert enters_of("before") == {("model", first), ("rule", "rules-before")}
    assert main(["models", "promote", second, "--registry", registry.root]) == 0
    rules.write_text("version: rules-after\nsegments:\n  - name: still_browsing\n    when: {orders_365d: {eq: 0}}\n")
    time.sleep(3)  # both are looked at every second
    visit("after")
    assert enters_of("after") == {("model", second), ("rule", "rules-after")}
    assert flink.rest(jobmanager, f"/jobs/{job_id}")["state"] == "RUNNING"  # the same job throughout
    vertex = _vertex(jobmanager, job_id, "ScoreClusters")
    deadline = time.monotonic() + 60
    while True:  # the workers report their gauges every few seconds
        scored = sum(_metric(jobmanager, job_id, vertex, s, "cdpflow.scored") or 0 for s in range(2))
        if scored >= 4 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert scored >= 4  # both visitors' rows and the tickers', in batches
    flink.cancel(job_id, jobmanager)
    clusters = [c for c in changes_on_topic(broker) if c["segment"].startswith("cluster:")]
    assert {c["model_version"] for c in clusters} == {first, second}
