"""Record types that flow between the pipeline's stages."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, Optional, Tuple

Identifier = Tuple[str, str]  # (identifier_type, normalised value)


@dataclass(frozen=True)
class NormalizedEvent:
    """An accepted event after validation and normalisation (and, later, enrichment and identity)."""

    message_id: str
    type: str
    event: Optional[str]
    timestamp: int  # event time, UTC microseconds, skew-corrected
    received_at: int  # UTC microseconds
    identifiers: Tuple[Identifier, ...]
    traits: Dict[str, Any]
    properties: Dict[str, Any]
    context: Dict[str, Any]
    raw: str
    schema_version: str
    channel: Optional[str] = None
    revenue: Optional[Decimal] = None
    currency: Optional[str] = None
    revenue_reporting: Optional[Decimal] = None
    enrichment: Dict[str, Any] = field(default_factory=dict)
    profile_id: Optional[str] = None

    def replace(self, **changes) -> "NormalizedEvent":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DeadLetter:
    """A record that a stage refused: kept whole so that it can be fixed and replayed."""

    raw: str
    stage: str
    error: str
    schema_version: Optional[str]
    received_at: Optional[int]  # UTC microseconds

    @property
    def dead_letter_id(self) -> str:
        return hashlib.sha1(f"{self.stage}\x00{self.raw}".encode("utf-8")).hexdigest()
