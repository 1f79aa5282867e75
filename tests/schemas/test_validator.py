import pytest

from cdpflow.schemas import EVENT_TYPES, EventValidator, SchemaViolation, available_versions
from cdpflow.schemas.tables import ALL_TABLES

BASE = {"messageId": "m1", "userId": "u1", "timestamp": "2026-01-02T03:04:05.000Z"}


@pytest.fixture(scope="module")
def validator():
    return EventValidator()


def test_every_kind_has_a_version_1():
    for kind in EVENT_TYPES:
        assert available_versions(kind)[0] == 1


@pytest.mark.parametrize("event, version", [
    ({**BASE, "type": "track", "event": "Order Completed",
      "properties": {"revenue": "49.90", "currency": "eur", "products": [{"price": 10, "quantity": 2}]}}, "track/v1"),
    ({**BASE, "type": "identify", "traits": {"email": "A@B.com", "age": 30, "interests": ["running"]}}, "identify/v1"),
    ({**BASE, "type": "page", "name": "Home", "properties": {"path": "/"}}, "page/v1"),
    ({**BASE, "type": "screen", "name": "Cart"}, "screen/v1"),
    ({**BASE, "type": "alias", "previousId": "anon-1"}, "alias/v1"),
    ({**BASE, "type": "group", "groupId": "acme"}, "group/v1"),
    ({"type": "track", "event": "x", "messageId": "m", "anonymousId": "a", "receivedAt": "2026-01-01T00:00:00Z",
      "context": {"externalIds": [{"id": "L-1", "type": "loyalty_id"}]}}, "track/v1"),
])
def test_valid_events_pass(validator, event, version):
    assert validator.validate(event) == version


@pytest.mark.parametrize("event, fragment, version", [
    ({**BASE, "type": "track"}, "event", "track/v1"),
    ({**BASE, "type": "trak", "event": "x"}, "unknown event type", "none"),
    ({**BASE, "type": "track", "event": "Order Completed", "properties": {"revenue": "abc"}}, "revenue", "track/v1"),
    ({**BASE, "type": "track", "event": "x", "timestamp": "not-a-date"}, "date-time", "track/v1"),
    ({"type": "identify", "userId": "u", "timestamp": "2026-01-01T00:00:00Z"}, "messageId", "identify/v1"),
    ({**BASE, "type": "alias"}, "previousId", "alias/v1"),
    ({**BASE, "type": "track", "event": "x", "context": {"externalIds": [{"id": "1"}]}}, "type", "track/v1"),
    ([1, 2], "JSON object", "none"),
])
def test_violations_say_what_and_which_version(validator, event, fragment, version):
    with pytest.raises(SchemaViolation) as caught:
        validator.validate(event)
    assert fragment in str(caught.value)
    assert caught.value.schema_version == version


def test_table_contract_gives_both_warehouses_the_same_columns():
    for table in ALL_TABLES.values():
        ddl = table.duckdb_ddl()
        bq = table.bigquery_schema()
        assert [f["name"] for f in bq] == table.column_names
        for name in table.column_names:
            assert f'"{name}"' in ddl
    assert {"message_id", "profile_id", "type", "event", "timestamp", "received_at", "raw"} <= set(ALL_TABLES["events"].column_names)
    assert set(ALL_TABLES["dead_letters"].column_names) >= {"raw", "stage", "error", "schema_version", "received_at"}


@pytest.mark.parametrize("event", [
    {**BASE, "type": "identify", "context": None, "traits": None},
    {**BASE, "type": "track", "event": "x", "properties": None, "context": {"traits": None}},
    {**BASE, "type": "page", "properties": None, "timestamp": "2026-01-02T03:04:05.123456789+0000"},
])
def test_null_objects_and_timestamp_variants_that_sdks_send_are_accepted(validator, event):
    from cdpflow.core.normalize import normalize_event
    validator.validate(event)
    assert normalize_event(event, "{}", "v1").identifiers == (("user_id", "u1"),)
