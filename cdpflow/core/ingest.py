"""The per-record steps before identity, engine-free: parse and validate, normalise, time checks.

Each function takes one record and returns the next stage's value or a `DeadLetter` (with the
raw payload, the stage, the error and the schema version), never raising for bad input. The
Beam DoFns (`cdpflow.transforms.validate`, `.normalize`, `.lateness`) and the Flink job's
functions (`cdpflow.flink.job`) are thin adapters over them, so both engines refuse the same
records with the same words.
"""
from __future__ import annotations

import time
from typing import Any, Dict, NamedTuple, Optional, Union

import orjson

from cdpflow.core.normalize import NormalizationError, normalize_event
from cdpflow.core.timeutil import US_PER_SECOND, parse_ts
from cdpflow.schemas import EventValidator, SchemaViolation
from cdpflow.schemas.records import DeadLetter, NormalizedEvent


class ParsedEvent(NamedTuple):
    """A schema-valid event: the decoded object, its raw line and the schema version it matched."""

    event: Dict[str, Any]
    raw: str
    schema_version: str


def received_at_of(event: Any) -> int:
    """receivedAt of a (possibly broken) event in microseconds, else now."""
    if isinstance(event, dict) and isinstance(event.get("receivedAt"), str):
        try:
            return parse_ts(event["receivedAt"])
        except ValueError:
            pass
    return int(time.time() * 1_000_000)


# Deeper JSON is refused at parse: a record nested hundreds of levels deep overflowed Python's
# recursion while a runner pickled it (the run stopped), and BigQuery's JSON type refuses
# nesting past 500; no tracking SDK nests events more than a few levels.
MAX_DEPTH = 64


def nesting(value) -> int:
    """How deeply a parsed JSON value nests objects and arrays (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict):
            children = current.values()
        elif isinstance(current, list):
            children = current
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest


# The largest event cdpflow accepts, in bytes: the collector refuses a bigger one (400), and a
# file's or a topic's line past it is a dead letter, so every path holds the same limit.
MAX_EVENT_BYTES = 32 * 1024
# How much of an oversized line its dead letter keeps (the rest is dropped: a 30 MB line would
# otherwise be stored whole in the dead-letter table).
KEPT_OF_OVERSIZED = 4 * 1024


def _oversized(line: Union[bytes, str], size: int) -> DeadLetter:
    data = line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
    kept = data[:KEPT_OF_OVERSIZED].decode("utf-8", "ignore")
    return DeadLetter(kept, "parse", f"the line is {size:,} bytes: cdpflow accepts events of at most {MAX_EVENT_BYTES:,} "
                      f"bytes (the collector's limit); its first {KEPT_OF_OVERSIZED:,} bytes are kept here", None,
                      received_at_of(None))


_JSON_KINDS = {str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def parse_line(line: Union[bytes, str], validator: EventValidator) -> Union[ParsedEvent, DeadLetter]:
    """One raw line: its size, UTF-8, JSON, one object, and the JSON Schema of its kind (stages
    `parse`, `validate`)."""
    size = len(line) if isinstance(line, bytes) else len(line.encode("utf-8", "surrogatepass"))
    if size > MAX_EVENT_BYTES:
        return _oversized(line, size)
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return DeadLetter(line.decode("utf-8", "backslashreplace").strip(), "parse", f"not UTF-8: {err}", None,
                              received_at_of(None))
    raw = line.strip()
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        return DeadLetter(raw, "parse", f"not valid JSON: {err}", None, received_at_of(None))
    if isinstance(event, list):
        return DeadLetter(raw, "parse", f"expected JSON lines (one event object per line), found a JSON array of "
                          f"{len(event)} item(s): write each event on its own line", None, received_at_of(None))
    if not isinstance(event, dict):
        return DeadLetter(raw, "parse", f"expected a JSON object (one event per line), found a JSON "
                          f"{_JSON_KINDS.get(type(event), type(event).__name__)}", None, received_at_of(None))
    depth = nesting(event)
    if depth > MAX_DEPTH:
        return DeadLetter(raw, "parse", f"nested more than {MAX_DEPTH} levels deep: cdpflow accepts at most {MAX_DEPTH}", None,
                          received_at_of(event if isinstance(event, dict) else None))
    try:
        version = validator.validate(event)
    except SchemaViolation as err:
        return DeadLetter(raw, "validate", str(err), err.schema_version, received_at_of(event))
    return ParsedEvent(event, raw, version)


def normalize(parsed: ParsedEvent, default_region: str) -> Union[NormalizedEvent, DeadLetter]:
    """Identifiers, UTC skew-corrected times and money (stage `normalize`)."""
    try:
        return normalize_event(parsed.event, parsed.raw, parsed.schema_version, default_region)
    except NormalizationError as err:
        return DeadLetter(parsed.raw, "normalize", str(err), parsed.schema_version, received_at_of(parsed.event))


def _hours(us: int) -> str:
    return f"{us / (3600 * US_PER_SECOND):.1f} h"


def time_refusal(event: NormalizedEvent, allowed_us: int, future_us: int) -> Optional[DeadLetter]:
    """The dead letter of an event too far ahead of its receivedAt (`future`) or too late
    (`lateness`: receivedAt minus event time over the allowed lateness), else None."""
    lateness = event.received_at - event.timestamp
    if -lateness > future_us:
        return DeadLetter(event.raw, "future",
                          f"event time is {_hours(-lateness)} after its receivedAt; at most {_hours(future_us)} is "
                          "allowed (features.max_future_skew_hours)", event.schema_version, event.received_at)
    if lateness > allowed_us:
        return DeadLetter(event.raw, "lateness",
                          f"received {_hours(lateness)} after its event time; the allowed lateness is "
                          f"{_hours(allowed_us)}", event.schema_version, event.received_at)
    return None
