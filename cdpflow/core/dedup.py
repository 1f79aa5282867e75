"""Deduplication by messageId within a horizon.

The first copy received (ties broken by the raw text, so every run picks the same one) is
kept; repeats received within the horizon after it are duplicates; repeats received later are
refused as dead letters, because a stream that has forgotten the messageId by then would accept
them and the warehouse would hold two events with one key.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from cdpflow.core.timeutil import US_PER_SECOND, format_ts
from cdpflow.schemas.records import DeadLetter, NormalizedEvent

FIRST, DUPLICATE, TOO_LATE = "first", "duplicate", "too_late"


def split_copies(copies: Sequence[NormalizedEvent], horizon_us: int
                 ) -> Tuple[NormalizedEvent, List[NormalizedEvent], List[NormalizedEvent]]:
    """(kept, duplicates within the horizon, repeats beyond it) of the copies of one messageId."""
    ordered = sorted(copies, key=lambda e: (e.received_at, e.raw))
    kept = ordered[0]
    duplicates = [e for e in ordered[1:] if e.received_at - kept.received_at <= horizon_us]
    too_late = [e for e in ordered[1:] if e.received_at - kept.received_at > horizon_us]
    return kept, duplicates, too_late


def repeat_too_late(event: NormalizedEvent, first_received_at: int, horizon_us: int) -> DeadLetter:
    """The dead letter for a copy received more than the horizon after the first one (batch and stream)."""
    return DeadLetter(
        event.raw, "dedup",
        f"messageId {event.message_id} was first received at {format_ts(first_received_at)}, "
        f"more than the dedup horizon ({horizon_us // US_PER_SECOND} s) before this copy",
        event.schema_version, event.received_at)


def classify_copy(first_received_at, event: NormalizedEvent, horizon_us: int) -> str:
    """What a stream does with a copy, given when the first copy of its messageId was received
    (None: this is the first): FIRST passes it on, DUPLICATE drops it, TOO_LATE dead-letters it
    (`repeat_too_late`)."""
    if first_received_at is None:
        return FIRST
    return DUPLICATE if event.received_at - first_received_at <= horizon_us else TOO_LATE
