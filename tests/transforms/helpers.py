"""Building blocks for the transform tests."""
import orjson

from cdpflow.core.normalize import normalize_event
from cdpflow.schemas.records import NormalizedEvent


def raw(**fields) -> str:
    event = {"type": "track", "event": "Product Viewed", "timestamp": "2026-03-01T10:00:00.000Z",
             "receivedAt": "2026-03-01T10:00:01.000Z"}
    event.update(fields)
    return orjson.dumps(event).decode()


def normalized(**fields) -> NormalizedEvent:
    line = raw(**fields)
    return normalize_event(orjson.loads(line), line, "track/v1")
