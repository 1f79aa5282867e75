from decimal import Decimal

import orjson
import pytest

from cdpflow.core.normalize import (NormalizationError, event_time, extract_identifiers, normalize_email,
                                    normalize_event, normalize_phone, parse_money)
from cdpflow.core.timeutil import format_ts, parse_ts


@pytest.mark.parametrize("raw, expected", [
    ("  Jane.Doe@Example.COM ", "jane.doe@example.com"),
    ("jane@example.com", "jane@example.com"),
    ("not-an-email", None), ("a@b", None), ("", None), (None, None), ("a b@c.com", None), ("@c.com", None),
])
def test_normalize_email(raw, expected):
    assert normalize_email(raw) == expected


@pytest.mark.parametrize("raw, region, expected", [
    ("+44 7400 123456", "US", "+447400123456"),
    ("(201) 555-0123", "US", "+12015550123"),
    ("07400 123456", "GB", "+447400123456"),
    ("+49 1512 3456789", "US", "+4915123456789"),
    ("12345", "US", None), ("000-000-0000", "US", None), ("call me", "US", None),
])
def test_normalize_phone_to_e164(raw, region, expected):
    assert normalize_phone(raw, region) == expected


def test_clock_skew_correction():
    # The device clock is 2 h fast: originalTimestamp and sentAt both carry it, receivedAt does not.
    event = {"originalTimestamp": "2026-05-01T14:00:00Z", "sentAt": "2026-05-01T14:00:05Z",
             "receivedAt": "2026-05-01T12:00:06Z", "timestamp": "2026-05-01T14:00:00Z"}
    ts, received = event_time(event)
    assert format_ts(ts) == "2026-05-01T12:00:01.000000Z"
    assert received == parse_ts("2026-05-01T12:00:06Z")


def test_timestamp_fallbacks_and_offsets():
    assert event_time({"timestamp": "2026-05-01T14:00:00+02:00"})[0] == parse_ts("2026-05-01T12:00:00Z")
    assert event_time({"originalTimestamp": "2026-05-01T14:00:00"})[0] == parse_ts("2026-05-01T14:00:00Z")
    assert event_time({"receivedAt": "2026-05-01T14:00:00Z"}) == (parse_ts("2026-05-01T14:00:00Z"),) * 2
    with pytest.raises(NormalizationError):
        event_time({})


def test_money():
    assert parse_money(49.9) == Decimal("49.9")
    assert parse_money(" 10.50 ") == Decimal("10.50")
    assert parse_money(None) is None
    with pytest.raises(NormalizationError):
        parse_money("ten")


def test_identifiers_from_every_place():
    event = {
        "type": "alias", "userId": " u1 ", "anonymousId": "a1", "previousId": "a0",
        "traits": {"email": "X@Y.com", "phone": "+44 7400 123456"},
        "context": {"traits": {"email": "other@y.com"}, "device": {"id": "dev-1"},
                    "externalIds": [{"id": "L-9", "type": "Loyalty_ID"}, {"id": "", "type": "x"}]},
    }
    assert extract_identifiers(event, "US") == [
        ("anonymous_id", "a0"), ("anonymous_id", "a1"), ("device_id", "dev-1"), ("email", "other@y.com"),
        ("email", "x@y.com"), ("loyalty_id", "L-9"), ("phone", "+447400123456"), ("user_id", "u1")]


def test_normalize_event_money_and_traits():
    event = {"type": "track", "event": "Order Completed", "messageId": "m", "userId": "u",
             "timestamp": "2026-01-01T00:00:00Z",
             "properties": {"total": "12.30", "currency": "eur"},
             "context": {"traits": {"email": " A@B.CO ", "interests": "Running, yoga"}}}
    normalized = normalize_event(event, "{}", "track/v1")
    assert (normalized.revenue, normalized.currency) == (Decimal("12.30"), "EUR")
    assert normalized.traits["email"] == "a@b.co"
    assert normalized.traits["interests"] == ["running", "yoga"]
    assert normalized.received_at == normalized.timestamp


def test_event_without_identifier_is_refused():
    with pytest.raises(NormalizationError, match="no usable identifier"):
        normalize_event({"type": "track", "event": "x", "messageId": "m", "timestamp": "2026-01-01T00:00:00Z",
                         "traits": {"email": "nope"}}, "{}", "track/v1")


def test_amounts_past_what_a_numeric_holds_and_json_nested_too_deep_are_refused():
    # (a batch run over such records: tests/pipelines/test_batch.py)
    from cdpflow.core.ingest import MAX_DEPTH, nesting
    for amount in ("1e30", 10 ** 15, "NaN", "-Infinity"):
        with pytest.raises(NormalizationError):
            parse_money(amount)
    assert parse_money("999999999999999.99") == Decimal("999999999999999.99")
    deep: dict = {}
    cursor = deep
    for _ in range(600):
        cursor["a"] = {}
        cursor = cursor["a"]
    assert nesting(deep) > MAX_DEPTH and nesting({"a": [1, {"b": 2}]}) == 3 and nesting(5) == 0


def test_a_line_that_is_not_one_event_object_or_is_too_big_is_a_parse_dead_letter_that_says_so():
    # The same function parses for the Beam pipelines and the Flink job (tests/core runs in both venvs).
    from cdpflow.core.ingest import MAX_EVENT_BYTES, ParsedEvent, parse_line
    from cdpflow.schemas import EventValidator
    validator = EventValidator()
    event = {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m1",
             "timestamp": "2026-10-01T10:00:00Z", "receivedAt": "2026-10-01T10:00:01Z"}
    array = parse_line(orjson.dumps([event, event]), validator)
    assert (array.stage, array.error.split(" of ")[0]) == (
        "parse", "expected JSON lines (one event object per line), found a JSON array")
    assert "found a JSON string" in parse_line(b'"hello"', validator).error
    padded = dict(event, properties={"blob": "x" * MAX_EVENT_BYTES})
    line = orjson.dumps(padded)
    letter = parse_line(line, validator)
    assert letter.stage == "parse" and letter.error.startswith(f"the line is {len(line):,} bytes")
    assert len(letter.raw.encode()) == 4096
    fits = dict(event, properties={"blob": "x" * (MAX_EVENT_BYTES - 400)})
    assert isinstance(parse_line(orjson.dumps(fits), validator), ParsedEvent)
