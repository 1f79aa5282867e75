"""`cdpflow send` through a real collector into a real Kafka: every sendable event is either in Kafka or refused with its reason."""
import uuid

import orjson
import pytest

from cdpflow.cli import main
from cdpflow.collector.app import Collector
from cdpflow.collector.send import live
from cdpflow.collector.sink import KafkaSink
from cdpflow.core.timeutil import parse_ts
from tests.collector.test_collector import Server, stored

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(kafka_bootstrap):
    sink = KafkaSink(kafka_bootstrap)
    running = Server(Collector(sink, {"wk_send": "replay"}))
    yield running
    running.stop()
    sink.close()


def test_a_generated_history_sent_live_arrives_whole_with_its_lateness(tmp_path, server, kafka_bootstrap, capsys):
    from cdpflow.synthetic import generate
    generate(tmp_path / "s", customers=6, days=15, seed=3)
    lines = [l for p in sorted((tmp_path / "s" / "events").glob("*.jsonl")) for l in p.read_bytes().splitlines() if l.strip()]
    tag = uuid.uuid4().hex[:8]
    # this run's copy, with messageIds of its own (the session's topic is shared)
    objects, originals = [], {}
    for line in lines:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and isinstance(event.get("messageId"), str):
            event["messageId"] = f"{tag}-{event['messageId']}"
            originals[event["messageId"]] = event
        objects.append(orjson.dumps(event) if isinstance(event, dict) else line)
    (tmp_path / "mine.jsonl").write_bytes(b"\n".join(objects) + b"\n")
    assert main(["send", "--input", str(tmp_path / "mine.jsonl"), "--collector", server.url, "--write-key", "wk_send",
                 "--batch-size", "50", "--rate", "5000", "--live"]) == 0
    printed = capsys.readouterr().out
    found = {e["messageId"]: e for _, _, e in stored(kafka_bootstrap, [m for m in originals], timeout=10)}
    refused = len(originals) - len(found)
    # the generator's noise includes events the collector must refuse (unknown types): each is
    # reported, and every other one is in Kafka exactly once
    assert found and refused == sum(1 for e in originals.values()
                                    if e.get("type") not in ("track", "identify", "page", "screen", "alias", "group"))
    assert "refused (4xx)" in printed
    for message_id, event in list(found.items())[:200]:
        original = originals[message_id]
        try:
            before = parse_ts(original["receivedAt"]) - parse_ts(original["timestamp"])
        except (KeyError, TypeError, ValueError):
            continue
        after = parse_ts(event["receivedAt"]) - parse_ts(event["timestamp"])
        assert abs(after - before) < 5_000_000  # its lateness, give or take the trip (µs)


def test_live_keeps_lateness_and_skew():
    event = {"timestamp": "2026-01-01T10:00:00Z", "sentAt": "2026-01-01T10:00:30Z",
             "receivedAt": "2026-01-01T10:01:00Z", "messageId": "m"}
    now = parse_ts("2026-12-02T12:00:00Z")
    moved = live(event, now)
    assert moved["receivedAt"].startswith("2026-12-02T12:00:00")
    assert parse_ts(moved["receivedAt"]) - parse_ts(moved["timestamp"]) == 60_000_000
    assert parse_ts(moved["sentAt"]) - parse_ts(moved["timestamp"]) == 30_000_000
    assert live({"messageId": "no times"}, now) == {"messageId": "no times"}
