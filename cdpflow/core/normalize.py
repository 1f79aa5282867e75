"""Normalising raw tracking events: identifiers, timestamps, money.

Rules:
- email: trimmed and lowercased; a value without exactly one '@' and a dotted domain is not
  used as an identifier (it stays in the traits as sent).
- phone: parsed by `phonenumbers` with a configurable default region and written as E.164;
  an unparseable or invalid number is not used as an identifier.
- timestamps: UTC; Segment's clock-skew correction
  `timestamp = receivedAt - (sentAt - originalTimestamp)` when all three are present, else the
  event's `timestamp`, else `originalTimestamp`, else `receivedAt`.
- money: `Decimal` from the number or decimal string, with the ISO currency uppercased.
"""
from __future__ import annotations

import functools
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, Iterable, List, Optional, Tuple

import phonenumbers

from cdpflow.core.timeutil import parse_ts
from cdpflow.schemas.records import Identifier, NormalizedEvent

# Identifier types taken from fixed places in the event; externalIds add any other type.
USER_ID = "user_id"
ANONYMOUS_ID = "anonymous_id"
EMAIL = "email"
PHONE = "phone"


class NormalizationError(ValueError):
    """The event passed its schema but cannot be used (no identifier, bad timestamps...)."""


def _text(value: Any) -> Optional[str]:
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def normalize_email(value: Any) -> Optional[str]:
    """Returns the email trimmed and lowercased, or None if it is not an email address."""
    text = _text(value)
    if text is None:
        return None
    text = text.lower()
    local, at, domain = text.partition("@")
    if not at or not local or "@" in domain or "." not in domain or " " in text:
        return None
    if domain.startswith(".") or domain.endswith("."):
        return None
    return text


@functools.lru_cache(maxsize=65536)
def normalize_phone(value: str, default_region: str = "US") -> Optional[str]:
    """Returns the phone number in E.164, or None if it is not a valid number.

    Cached because the same customers' numbers recur on many events and parsing costs ~20 us.
    """
    text = _text(value)
    if text is None:
        return None
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# Money beyond this is refused: no order is worth 10^15 in any currency, and the warehouses'
# NUMERIC (38 digits, 9 after the point; BigQuery's too) must hold sums of amounts converted at
# any rate. Without it an amount such as 1e30 stopped the whole run (the features overflowed).
MAX_AMOUNT = Decimal(10) ** 15


def parse_money(value: Any) -> Optional[Decimal]:
    """A JSON number or decimal string as Decimal (None when absent).

    Raises:
      NormalizationError: not an amount, not finite, or beyond `MAX_AMOUNT`.
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        # str() first so that floats keep the digits they were written with (49.9, not 49.89999...).
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise NormalizationError(f"not an amount: {value!r}") from None
    if not amount.is_finite():
        raise NormalizationError(f"not an amount: {value!r}")
    if abs(amount) >= MAX_AMOUNT:
        raise NormalizationError(f"amount {value!r} is beyond what cdpflow accepts (under 10^15)")
    return amount


def event_time(event: Dict[str, Any]) -> Tuple[int, int]:
    """Returns (event time, received time) in UTC microseconds, skew-corrected.

    Raises:
      NormalizationError: no usable timestamp.
    """
    try:
        received = parse_ts(event["receivedAt"]) if event.get("receivedAt") else None
        original = parse_ts(event["originalTimestamp"]) if event.get("originalTimestamp") else None
        sent = parse_ts(event["sentAt"]) if event.get("sentAt") else None
        stamped = parse_ts(event["timestamp"]) if event.get("timestamp") else None
    except ValueError as err:
        raise NormalizationError(f"bad timestamp: {err}") from None
    if received is not None and original is not None and sent is not None:
        # The device's clock may be wrong; sentAt and originalTimestamp are on the same wrong
        # clock, so their difference is trustworthy and is anchored on the server's receivedAt.
        timestamp = received - (sent - original)
    else:
        timestamp = stamped if stamped is not None else original if original is not None else received
    if timestamp is None:
        raise NormalizationError("no timestamp, originalTimestamp or receivedAt")
    return timestamp, received if received is not None else timestamp


def _trait_sources(event: Dict[str, Any]) -> Iterable[Dict[str, Any]]:
    context = event.get("context") or {}
    for traits in (context.get("traits"), event.get("traits") if event.get("type") != "group" else None):
        if isinstance(traits, dict):
            yield traits


def normalize_traits(event: Dict[str, Any], default_region: str) -> Dict[str, Any]:
    """Merges context.traits and traits (traits win) and normalises email, phone and interests."""
    merged: Dict[str, Any] = {}
    for traits in _trait_sources(event):
        merged.update(traits)
    if "email" in merged:
        merged["email"] = normalize_email(merged["email"]) or merged["email"]
    if merged.get("phone") is not None:
        merged["phone"] = normalize_phone(str(merged["phone"]), default_region) or merged["phone"]
    interests = merged.get("interests")
    if isinstance(interests, str):
        interests = [part for part in interests.replace("|", ",").split(",")]
    if isinstance(interests, list):
        merged["interests"] = sorted({str(i).strip().lower() for i in interests if str(i).strip()})
    return merged


def extract_identifiers(event: Dict[str, Any], default_region: str) -> List[Identifier]:
    """Every normalised identifier an event carries, sorted and without repeats.

    user_id from userId; anonymous_id from anonymousId and, on alias, previousId; email and
    phone from traits and context.traits; device_id from context.device.id; any type from
    context.externalIds.
    """
    found = set()
    user_id = _text(event.get("userId"))
    if user_id:
        found.add((USER_ID, user_id))
    anonymous_id = _text(event.get("anonymousId"))
    if anonymous_id:
        found.add((ANONYMOUS_ID, anonymous_id))
    if event.get("type") == "alias":
        previous = _text(event.get("previousId"))
        if previous:
            found.add((ANONYMOUS_ID, previous))
    for traits in _trait_sources(event):
        email = normalize_email(traits.get("email"))
        if email:
            found.add((EMAIL, email))
        if traits.get("phone") is not None:
            phone = normalize_phone(str(traits["phone"]), default_region)
            if phone:
                found.add((PHONE, phone))
    context = event.get("context") or {}
    device = context.get("device")
    if isinstance(device, dict):
        device_id = _text(device.get("id"))
        if device_id:
            found.add(("device_id", device_id))
    for external in context.get("externalIds") or ():
        if not isinstance(external, dict):
            continue
        id_type = _text(external.get("type"))
        value = _text(external.get("id"))
        if id_type and value:
            id_type = id_type.lower()
            # The same normalisation as the traits', so one phone is one identifier wherever it came from.
            if id_type == EMAIL:
                value = normalize_email(value)
            elif id_type == PHONE:
                value = normalize_phone(value, default_region)
            if value:
                found.add((id_type, value))
    return sorted(found)


def normalize_event(event: Dict[str, Any], raw: str, schema_version: str,
                    default_region: str = "US") -> NormalizedEvent:
    """Turns a schema-valid raw event into a NormalizedEvent.

    Raises:
      NormalizationError: the event has no usable identifier, timestamp or amount.
    """
    timestamp, received_at = event_time(event)
    identifiers = extract_identifiers(event, default_region)
    if not identifiers:
        raise NormalizationError("no usable identifier (userId, anonymousId, email, phone or externalIds)")
    properties = event.get("properties") if isinstance(event.get("properties"), dict) else {}
    revenue = currency = None
    if event.get("type") == "track":
        # Segment's e-commerce spec: revenue excludes shipping and tax; fall back to total.
        amount = properties.get("revenue", properties.get("total"))
        revenue = parse_money(amount)
        if revenue is not None:
            currency = (_text(properties.get("currency")) or "USD").upper()
    name = event.get("event") if event.get("type") == "track" else event.get("name")
    return NormalizedEvent(
        message_id=str(event["messageId"]),
        type=event["type"],
        event=_text(name),
        timestamp=timestamp,
        received_at=received_at,
        identifiers=tuple(identifiers),
        traits=normalize_traits(event, default_region),
        properties=properties,
        context=event.get("context") if isinstance(event.get("context"), dict) else {},
        raw=raw,
        schema_version=schema_version,
        channel=_text(event.get("channel")),
        revenue=revenue,
        currency=currency,
    )
