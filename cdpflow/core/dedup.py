"""Deduplication by messageId within a horizon.

The first copy received (ties broken by the raw text, so every run picks the same one) is
kept; repeats received within the horizon after it are duplicates; repeats received later are
refused as dead letters, because a stream that has forgotten the messageId by then would accept
them and the warehouse would hold two events with one key.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from cdpflow.schemas.records import NormalizedEvent


def split_copies(copies: Sequence[NormalizedEvent], horizon_us: int
                 ) -> Tuple[NormalizedEvent, List[NormalizedEvent], List[NormalizedEvent]]:
    """(kept, duplicates within the horizon, repeats beyond it) of the copies of one messageId."""
    ordered = sorted(copies, key=lambda e: (e.received_at, e.raw))
    kept = ordered[0]
    duplicates = [e for e in ordered[1:] if e.received_at - kept.received_at <= horizon_us]
    too_late = [e for e in ordered[1:] if e.received_at - kept.received_at > horizon_us]
    return kept, duplicates, too_late
