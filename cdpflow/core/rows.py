"""Table rows as every path writes them (accepted events, dead letters, their JSON lines), and the stream's Kafka records.

Rows are dicts with the table contract's column names (`cdpflow.schemas.tables`); timestamps
are integer microseconds, amounts Decimal (written as strings). Engine-free: the Beam sinks and
the Flink job use the same functions.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Dict, List, Optional, Sequence, Tuple

import orjson

from cdpflow.schemas.records import DeadLetter, Identifier, NormalizedEvent
from cdpflow.schemas.topics import DEAD_LETTERS, PROFILE_CHANGES, SEGMENT_CHANGES, WAREHOUSE_ROWS


def _default(value: Any):
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot stage {type(value).__name__}")


def to_json_line(row: Dict[str, Any]) -> str:
    return orjson.dumps(row, default=_default).decode("utf-8")


def event_row(event: NormalizedEvent) -> Dict[str, Any]:
    """An accepted event as an `events` row."""
    return {
        "message_id": event.message_id, "profile_id": event.profile_id, "type": event.type,
        "event": event.event, "timestamp": event.timestamp, "received_at": event.received_at,
        "channel": event.channel, "revenue": event.revenue, "currency": event.currency,
        "revenue_reporting": event.revenue_reporting, "schema_version": event.schema_version,
        "identifiers": [list(i) for i in event.identifiers], "enrichment": event.enrichment,
        "raw": event.raw,
    }


def dead_letter_row(letter: DeadLetter, identifiers: Optional[Sequence[Identifier]] = None) -> Dict[str, Any]:
    return {"dead_letter_id": letter.dead_letter_id, "raw": letter.raw, "stage": letter.stage,
            "error": letter.error, "schema_version": letter.schema_version,
            "identifiers": [list(i) for i in identifiers] if identifiers is not None else None,
            "received_at": letter.received_at}


# ------------------------------------------------------------------- the stream's Kafka records
# (topic, key bytes, value bytes or None for a tombstone[, headers]): what the Beam stream and
# the Flink job write, so the loader and the sidecar read one format whichever engine ran.
Record = Tuple[str, bytes, Optional[bytes], List[Tuple[str, bytes]]]


def _json(value: Dict[str, Any]) -> bytes:
    return to_json_line(value).encode("utf-8")


def _public(row: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def profile_record(row: Dict[str, Any]) -> Record:
    """A profile row as a `cdp.profiles.changes` record: a tombstone (no value) for a deletion.

    Every record carries the row's as_of and emission time in headers, so a reader keeps the
    newest per profile even when two of a profile's records overtake each other on the way.
    """
    headers = [("as_of", str(row.get("as_of") or 0).encode()), ("updated_at", str(row.get("updated_at") or 0).encode())]
    return (PROFILE_CHANGES.name, row["profile_id"].encode("utf-8"),
            None if row.get("deleted") else _json(_public(row)), headers)


def segment_record(change: Dict[str, Any]) -> Record:
    """A segment enter or exit as a `cdp.segments.changes` record, keyed by profile."""
    return (SEGMENT_CHANGES.name, change["profile_id"].encode("utf-8"), _json(change),
            [("idempotency_key", change["idempotency_key"].encode())])


def dead_letter_record(row: Dict[str, Any]) -> Record:
    return (DEAD_LETTERS.name, row["dead_letter_id"].encode("utf-8"), _json(row), [])


def event_record(event: NormalizedEvent) -> Record:
    """An accepted event with its profile, for the warehouse's `events` table."""
    return (WAREHOUSE_ROWS.name, f"events:{event.message_id}".encode("utf-8"),
            _json({"table": "events", "row": event_row(event)}), [])


def transition_record(row: Dict[str, Any]) -> Record:
    return (WAREHOUSE_ROWS.name, f"lifecycle_transitions:{row['profile_id']}".encode("utf-8"),
            _json({"table": "lifecycle_transitions", "row": row}), [])
