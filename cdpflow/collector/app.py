"""The collector's HTTP API, compatible with the Segment and RudderStack tracking APIs.

Endpoints: `POST /v1/batch`, `/v1/track`, `/v1/identify`, `/v1/page`, `/v1/screen`,
`/v1/alias`, `/v1/group` (also without the `/v1` prefix, as analytics.js may send), `GET /health`,
`GET /metrics` (Prometheus).

- **Write keys.** The key is the HTTP Basic user (password empty), as the SDKs send it, or the
  body's `writeKey` (what analytics.js sends with `text/plain` beacons). A key names its source
  (configuration `collector.write_keys: {KEY: source name}`); an unknown key is 401.
- **Bodies.** JSON, `gzip`-encoded or not, any content type (`text/plain` included). At most
  32 KB per event and 500 KB per request (decompressed): larger is 413 (the request) or 400
  (the event), with the reason. A batch is accepted or refused whole.
- **What is added.** `receivedAt` (the collector's clock), `messageId` when the client sent none,
  `type` from the endpoint, the batch's shared `context` and `integrations` under each event's
  own, and the source's name in `context.source.name`.
- **When it answers 200.** Only once the sink (Kafka, `cdp.events.raw`, acks=all) holds every
  event of the request. A broker that is down or slow, or more than `max_in_flight_bytes`
  waiting already, is 503 with `Retry-After`: the SDKs retry, and the stream deduplicates.
"""
from __future__ import annotations

import base64
import gzip
import threading
import time
import uuid
import zlib
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import orjson
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from cdpflow.collector.sink import Record, Sink, SinkUnavailable
from cdpflow.core.ingest import MAX_EVENT_BYTES
from cdpflow.errors import BadInput
from cdpflow.schemas.topics import raw_event_key

EVENT_TYPES = ("track", "identify", "page", "screen", "alias", "group")
MAX_REQUEST_BYTES = 500 * 1024
RETRY_AFTER_S = 2


class Refused(Exception):
    """A request the collector answers with a 4xx/5xx and a reason."""

    def __init__(self, status: int, reason: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Metrics:
    """The collector's Prometheus metrics, in a registry of its own (several apps per process in tests)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.events = Counter("cdpflow_collector_events", "Events stored in the sink", ["source", "type"],
                              registry=self.registry)
        self.refused = Counter("cdpflow_collector_refused_requests", "Requests refused, by HTTP status", ["status"],
                               registry=self.registry)
        self.in_flight = Gauge("cdpflow_collector_in_flight_bytes", "Bytes of requests waiting for the sink",
                               registry=self.registry)
        self.latency = Histogram("cdpflow_collector_store_seconds", "Time for the sink to acknowledge a request",
                                 registry=self.registry)


class Collector:
    """The request logic, independent of the web framework.

    Args:
      sink: where accepted events go.
      write_keys: write key -> source name.
      max_in_flight_bytes: request bytes waiting for the sink at once, past which requests get 503.
    """

    def __init__(self, sink: Sink, write_keys: Mapping[str, str], max_in_flight_bytes: int = 8 * 1024 * 1024):
        if not write_keys:
            raise BadInput("no write keys: configure collector.write_keys (write key: source name)")
        self.sink = sink
        self.write_keys = dict(write_keys)
        self.max_in_flight_bytes = max_in_flight_bytes
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self._in_flight = 0

    # -------------------------------------------------------------------------- parsing
    @staticmethod
    def body(raw: bytes, encoding: Optional[str]) -> Any:
        """The request's JSON, decompressed if gzip, within the request limit."""
        if len(raw) > MAX_REQUEST_BYTES:
            raise Refused(413, f"request of {len(raw)} bytes: at most {MAX_REQUEST_BYTES} are accepted")
        if (encoding or "").lower() in ("gzip", "x-gzip"):
            try:
                # Decompressed with a ceiling, so a small gzip bomb cannot take the memory.
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                raw = inflater.decompress(raw, MAX_REQUEST_BYTES + 1)
            except (zlib.error, gzip.BadGzipFile) as err:
                raise Refused(400, f"body is not valid gzip: {err}") from None
            if len(raw) > MAX_REQUEST_BYTES:
                raise Refused(413, f"request over {MAX_REQUEST_BYTES} bytes once decompressed")
        elif encoding and encoding.lower() not in ("identity",):
            raise Refused(415, f"Content-Encoding {encoding!r} is not supported (gzip or none)")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise Refused(400, f"body is not JSON: {err}") from None

    def source(self, authorization: Optional[str], body: Any) -> str:
        """The source name of the request's write key (Basic user, or the body's writeKey)."""
        key = None
        if authorization and authorization.lower().startswith("basic "):
            try:
                key = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8").split(":", 1)[0]
            except (ValueError, UnicodeDecodeError):
                raise Refused(401, "malformed Basic authorization") from None
        if not key and isinstance(body, dict) and isinstance(body.get("writeKey"), str):
            key = body["writeKey"]
        if not key:
            raise Refused(401, "no write key: send it as the HTTP Basic user, or as writeKey in the body",
                          {"WWW-Authenticate": 'Basic realm="cdpflow collector"'})
        if key not in self.write_keys:
            raise Refused(401, "unknown write key", {"WWW-Authenticate": 'Basic realm="cdpflow collector"'})
        return self.write_keys[key]

    @staticmethod
    def events(body: Any, kind: str) -> List[Dict[str, Any]]:
        """The events of a request: a batch's, or the one event of a single-event endpoint."""
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        if kind == "batch":
            batch = body.get("batch")
            if not isinstance(batch, list) or not batch:
                raise Refused(400, "a batch needs a non-empty `batch` list of events")
            shared = {k: body[k] for k in ("context", "integrations") if isinstance(body.get(k), dict)}
            events = []
            for index, event in enumerate(batch):
                if not isinstance(event, dict):
                    raise Refused(400, f"batch[{index}] is not an event object")
                if event.get("type") not in EVENT_TYPES:
                    raise Refused(400, f"batch[{index}]: type must be one of {', '.join(EVENT_TYPES)}, "
                                       f"got {event.get('type')!r}")
                for name, value in shared.items():
                    own = event.get(name)
                    event[name] = {**value, **own} if isinstance(own, dict) else dict(value)
                events.append(event)
            return events
        event = {k: v for k, v in body.items() if k != "writeKey"}
        event["type"] = kind
        return [event]

    # ------------------------------------------------------------------------- handling
    def handle(self, kind: str, raw: bytes, encoding: Optional[str], authorization: Optional[str]) -> Dict[str, Any]:
        """Handles one request; returns the 200 body, or raises Refused."""
        body = self.body(raw, encoding)
        source = self.source(authorization, body)
        events = self.events(body, kind)
        received = _now_iso()
        records: List[Record] = []
        for index, event in enumerate(events):
            event.pop("writeKey", None)
            event["receivedAt"] = received
            if not event.get("messageId"):
                event["messageId"] = f"cdp-{uuid.uuid4()}"
            context = event.get("context") if isinstance(event.get("context"), dict) else {}
            event["context"] = {**context, "source": {"name": source}}
            value = orjson.dumps(event)
            if len(value) > MAX_EVENT_BYTES:
                raise Refused(400, f"event {index} ({event.get('messageId')}) is {len(value)} bytes: "
                                   f"at most {MAX_EVENT_BYTES} per event")
            records.append((self.partition_key(event), value))
        self._store(records, len(raw), source, events)
        return {"success": True}

    @staticmethod
    def partition_key(event: Mapping[str, Any]) -> Optional[bytes]:
        """userId, else anonymousId: one person's events stay in one partition, in order."""
        key = raw_event_key(event)
        return key.encode("utf-8") if key is not None else None

    def _store(self, records: Sequence[Record], size: int, source: str, events: Sequence[Mapping[str, Any]]):
        with self._lock:
            if self._in_flight + size > self.max_in_flight_bytes and self._in_flight:
                raise Refused(503, "too many events waiting for Kafka: retry later", {"Retry-After": str(RETRY_AFTER_S)})
            self._in_flight += size
            self.metrics.in_flight.set(self._in_flight)
        started = time.perf_counter()
        try:
            self.sink.send(records)
        except SinkUnavailable as err:
            raise Refused(503, f"events not stored, retry later: {err}", {"Retry-After": str(RETRY_AFTER_S)}) from None
        finally:
            with self._lock:
                self._in_flight -= size
                self.metrics.in_flight.set(self._in_flight)
        self.metrics.latency.observe(time.perf_counter() - started)
        for event in events:
            self.metrics.events.labels(source=source, type=event["type"]).inc()

    def metrics_text(self) -> Tuple[bytes, str]:
        return generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST


def create_app(collector: Collector, cors_origins: Sequence[str] = ()):
    """The ASGI app (FastAPI) serving `collector`."""

    app = FastAPI(title="cdpflow collector", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "Content-Encoding"], max_age=600)

    def endpoint(kind: str):
        # A plain `def`: FastAPI runs it in its thread pool, so waiting for Kafka blocks no other request.
        def handler(request: Request, raw: bytes):
            try:
                return JSONResponse(collector.handle(kind, raw, request.headers.get("content-encoding"),
                                                     request.headers.get("authorization")))
            except Refused as refused:
                collector.metrics.refused.labels(status=str(refused.status)).inc()
                return JSONResponse({"success": False, "error": refused.reason}, refused.status, refused.headers)
        return handler

    def post_route(kind: str):
        handler = endpoint(kind)

        async def route(request: Request):
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
                # Refused before the body is read, so an oversized upload takes no memory.
                collector.metrics.refused.labels(status="413").inc()
                return JSONResponse({"success": False, "error": f"request of {declared} bytes: at most "
                                     f"{MAX_REQUEST_BYTES} are accepted"}, 413)
            # The body is read whole here (any content type: analytics.js beacons are text/plain).
            raw = await request.body()
            return await run_in_threadpool(handler, request, raw)
        return route

    for kind in ("batch",) + EVENT_TYPES:
        for path in (f"/v1/{kind}", f"/{kind}"):
            app.add_api_route(path, post_route(kind), methods=["POST"], name=f"{kind}{path.count('/')}")

    @app.get("/health")
    def health():
        healthy = collector.sink.healthy()
        return JSONResponse({"status": "ok" if healthy else "sink unavailable"}, 200 if healthy else 503)

    @app.get("/metrics")
    def metrics():
        body, content_type = collector.metrics_text()
        return Response(body, media_type=content_type)

    return app
