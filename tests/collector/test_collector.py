"""The collector over real HTTP into a real Kafka, driven by a real tracking SDK and raw requests.

Every check reads what Kafka holds (`cdp.events.raw`) with a consumer of its own, so "200" is
proved to mean "stored": the events sent are there once each, keyed by userId (else
anonymousId), with receivedAt and the source; refused requests store nothing.
"""
import base64
import gzip
import threading
import time
import uuid

import orjson
import pytest
import requests

from cdpflow.collector.app import MAX_EVENT_BYTES, Collector, create_app
from cdpflow.collector.sink import RAW_TOPIC, KafkaSink
from cdpflow.stack.base import free_port

KEY, SOURCE = "wk_test_web", "web-shop"


class Server:
    """The collector's app under uvicorn, on a free port, in a thread."""

    def __init__(self, collector, cors=()):
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(collector, cors), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the collector did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def collector(kafka_bootstrap):
    sink = KafkaSink(kafka_bootstrap, timeout_s=10)
    server = Server(Collector(sink, {KEY: SOURCE, "wk_app": "mobile-app"}), cors=["https://shop.example.com"])
    yield server
    server.stop()
    sink.close()


def stored(bootstrap, message_ids, timeout=20):
    """(key, event) of every record in cdp.events.raw whose messageId is one of these, in partition order."""
    from kafka import KafkaConsumer
    consumer = KafkaConsumer(RAW_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=f"test-{uuid.uuid4().hex}", enable_auto_commit=False, consumer_timeout_ms=1500)
    wanted, found, deadline = set(message_ids), [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for record in consumer:
                event = orjson.loads(record.value)
                if event.get("messageId") in wanted:
                    found.append((record.key.decode() if record.key else None, record.partition, event))
            if {e["messageId"] for _, _, e in found} >= wanted:
                break
    finally:
        consumer.close()
    return found


def basic(key):
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def test_a_real_sdk_sends_every_call_type_and_kafka_holds_each_once(collector, kafka_bootstrap):
    from segment.analytics import Client
    sent = []
    client = Client(KEY, host=collector.url, sync_mode=True, on_error=lambda e, batch: sent.append(("error", e)))
    run = uuid.uuid4().hex[:8]
    client.identify(f"u-{run}", {"email": f"ann-{run}@x.com", "plan": "gold"})
    client.track(f"u-{run}", "Order Completed", {"revenue": 49.9, "currency": "EUR"})
    client.page(anonymous_id=f"a-{run}", category="Docs", name="Intro", properties={"path": "/intro"})
    client.screen(f"u-{run}", "App", "Home")
    client.alias(f"a-{run}", f"u-{run}")
    client.group(f"u-{run}", f"g-{run}", {"name": "Acme"})
    client.flush()
    assert not [s for s in sent if s[0] == "error"]
    # The SDK set the messageIds: find them by what we sent.
    from kafka import KafkaConsumer
    consumer = KafkaConsumer(RAW_TOPIC, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             group_id=f"t-{run}", consumer_timeout_ms=3000)
    mine = [orjson.loads(r.value) | {"_key": r.key.decode()} for r in consumer
            if run.encode() in r.value]
    consumer.close()
    assert sorted(e["type"] for e in mine) == sorted(["identify", "track", "page", "screen", "alias", "group"])
    assert len({e["messageId"] for e in mine}) == 6
    for event in mine:
        assert event["context"]["source"] == {"name": SOURCE}
        assert event["receivedAt"].endswith("Z") and event["context"]["library"]["name"] == "analytics-python"
        assert event["_key"] == (event.get("userId") or event.get("anonymousId"))
    track = next(e for e in mine if e["type"] == "track")
    assert track["event"] == "Order Completed" and track["properties"] == {"revenue": 49.9, "currency": "EUR"}
    assert next(e for e in mine if e["type"] == "identify")["traits"]["email"] == f"ann-{run}@x.com"


def test_write_keys_bodies_and_limits(collector, kafka_bootstrap):
    mid = f"m-{uuid.uuid4().hex}"
    event = {"type": "track", "event": "Product Viewed", "userId": "u1", "messageId": mid,
             "timestamp": "2026-12-01T10:00:00Z"}
    assert requests.post(f"{collector.url}/v1/batch", json={"batch": [event]}).status_code == 401
    assert requests.post(f"{collector.url}/v1/batch", json={"batch": [event]}, headers=basic("nope")).status_code == 401
    # gzip, under the batch's shared context
    body = gzip.compress(orjson.dumps({"batch": [event], "context": {"ip": "1.2.3.4"}}))
    answer = requests.post(f"{collector.url}/v1/batch", data=body,
                           headers={**basic("wk_app"), "Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert answer.status_code == 200 and answer.json() == {"success": True}
    # what analytics.js sends as a beacon: text/plain, the write key in the body, no type (the path says)
    beacon_id = f"b-{uuid.uuid4().hex}"
    beacon = {"writeKey": KEY, "anonymousId": "anon-9", "messageId": beacon_id, "name": "Home"}
    assert requests.post(f"{collector.url}/v1/page", data=orjson.dumps(beacon),
                         headers={"Content-Type": "text/plain"}).status_code == 200
    found = {e["messageId"]: (key, e) for key, _, e in stored(kafka_bootstrap, [mid, beacon_id])}
    assert found[mid][1]["context"] == {"ip": "1.2.3.4", "source": {"name": "mobile-app"}} and found[mid][0] == "u1"
    assert found[beacon_id][1]["type"] == "page" and "writeKey" not in found[beacon_id][1]
    assert found[beacon_id][0] == "anon-9"
    # limits: a 33 KB event (400) and a 600 KB request (413) are refused whole, with the reason
    big_id = f"big-{uuid.uuid4().hex}"
    big = dict(event, messageId=big_id, properties={"blob": "x" * MAX_EVENT_BYTES})
    answer = requests.post(f"{collector.url}/v1/track", json=big, headers=basic(KEY))
    assert answer.status_code == 400 and "at most 32768" in answer.json()["error"]
    huge = {"batch": [dict(event, messageId=f"h{i}-{uuid.uuid4().hex}", properties={"b": "y" * 20_000})
                      for i in range(30)]}
    answer = requests.post(f"{collector.url}/v1/batch", json=huge, headers=basic(KEY))
    assert answer.status_code == 413
    assert requests.post(f"{collector.url}/v1/batch", data=b"{not json", headers=basic(KEY)).status_code == 400
    assert requests.post(f"{collector.url}/v1/batch", json={"batch": [{"type": "nope"}]},
                         headers=basic(KEY)).status_code == 400
    assert stored(kafka_bootstrap, [big_id], timeout=3) == []


def test_one_persons_events_keep_their_order_in_one_partition(collector, kafka_bootstrap):
    user = f"u-{uuid.uuid4().hex[:6]}"
    ids = [f"o{i}-{uuid.uuid4().hex}" for i in range(30)]
    for start in range(0, 30, 7):
        batch = [{"type": "track", "event": "Product Viewed", "userId": user, "messageId": m} for m in ids[start:start + 7]]
        assert requests.post(f"{collector.url}/v1/batch", json={"batch": batch}, headers=basic(KEY)).status_code == 200
    found = stored(kafka_bootstrap, ids)
    assert [e["messageId"] for _, _, e in found] == ids and len({p for _, p, _ in found}) == 1


def test_cors_for_configured_origins_health_and_metrics(collector):
    preflight = {"Origin": "https://shop.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    allowed = requests.options(f"{collector.url}/v1/track", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://shop.example.com"
    other = requests.options(f"{collector.url}/v1/track", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert requests.get(f"{collector.url}/health").json() == {"status": "ok"}
    metrics = requests.get(f"{collector.url}/metrics").text
    assert f'cdpflow_collector_events_total{{source="{SOURCE}",type="track"}}' in metrics
    assert 'cdpflow_collector_refused_requests_total{status="401"}' in metrics


def test_with_kafka_down_it_answers_503_with_retry_after_and_never_200():
    sink = KafkaSink(f"127.0.0.1:{free_port()}", timeout_s=1)  # nothing listens there
    server = Server(Collector(sink, {KEY: SOURCE}))
    try:
        started = time.monotonic()
        answer = requests.post(f"{server.url}/v1/track", json={"event": "X", "userId": "u", "messageId": "m"},
                               headers=basic(KEY), timeout=30)
        assert answer.status_code == 503 and answer.headers["Retry-After"].isdigit()
        assert time.monotonic() - started < 15
        assert requests.get(f"{server.url}/health").status_code == 503
    finally:
        server.stop()


def test_with_kafka_stalled_it_holds_a_bounded_amount_answers_503_and_recovers(tmp_path):
    # A broker of this test's own, frozen with SIGSTOP: requests wait for acknowledgements that
    # do not come. The one in flight ends in 503 after the store timeout; one more beyond the
    # in-flight bound is refused at once; after SIGCONT the next is stored and answered 200.
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor
    from cdpflow.stack.kafka import Kafka
    broker = Kafka(tmp_path / "stack", port=free_port(), controller_port=free_port())
    broker.up()
    sink = KafkaSink(broker.bootstrap_servers(), timeout_s=3)
    server = Server(Collector(sink, {KEY: SOURCE}, max_in_flight_bytes=100))  # one request at a time
    event = {"event": "Product Viewed", "userId": "u-stall"}
    try:
        assert requests.post(f"{server.url}/v1/track", json=dict(event, messageId="warm"), headers=basic(KEY)).status_code == 200
        os.kill(broker.pid(), signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(requests.post, f"{server.url}/v1/track", json=dict(event, messageId="stalled"),
                                  headers=basic(KEY), timeout=60)
            time.sleep(0.5)
            started = time.monotonic()
            over = requests.post(f"{server.url}/v1/track", json=dict(event, messageId="over"), headers=basic(KEY))
            assert over.status_code == 503 and over.headers["Retry-After"] and time.monotonic() - started < 1
            assert waiting.result().status_code == 503  # never 200 without Kafka's acknowledgement
        os.kill(broker.pid(), signal.SIGCONT)
        deadline = time.monotonic() + 30
        while True:
            answer = requests.post(f"{server.url}/v1/track", json=dict(event, messageId="after"), headers=basic(KEY))
            if answer.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(float(answer.headers.get("Retry-After", 1)))
        assert answer.status_code == 200
        assert [e["messageId"] for _, _, e in stored(broker.bootstrap_servers(), ["after"])] == ["after"]
    finally:
        if broker.pid():
            os.kill(broker.pid(), signal.SIGCONT)
        server.stop()
        sink.close()
        broker.down()
