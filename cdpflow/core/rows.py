"""Table rows as every path writes them: accepted events, dead letters, and their JSON lines.

Rows are dicts with the table contract's column names (`cdpflow.schemas.tables`); timestamps
are integer microseconds, amounts Decimal (written as strings). Engine-free: the Beam sinks and
the Flink job use the same functions.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Dict, Optional, Sequence

import orjson

from cdpflow.schemas.records import DeadLetter, Identifier, NormalizedEvent


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
