"""Timestamps as integer microseconds since the epoch, UTC: parsing and formatting."""
from __future__ import annotations

from datetime import datetime, timezone

US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_ts(value: str) -> int:
    """Parses an ISO-8601 timestamp to UTC microseconds.

    A timestamp without an offset is taken as UTC, as the tracking spec says timestamps are.

    Raises:
      ValueError: the string is not an ISO-8601 date-time.
    """
    if not isinstance(value, str):
        raise ValueError(f"timestamp must be a string, got {type(value).__name__}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds


def from_datetime(value: datetime) -> int:
    """A datetime (naive = UTC) as UTC microseconds."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds


def to_datetime(us: int) -> datetime:
    return datetime.fromtimestamp(us / US_PER_SECOND, tz=timezone.utc)


def format_ts(us: int) -> str:
    """UTC microseconds as ISO-8601 with a Z suffix."""
    return to_datetime(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch_day(us: int) -> int:
    """The UTC calendar day of a timestamp, as days since 1970-01-01."""
    return us // US_PER_DAY
