"""Segment memberships carry the event time their membership changed at, not the run's.

The expected times are worked out by hand from the events below (no cdpflow code): a customer
who orders 300 on 10 January 2026 and 250 on 1 February, then nothing.
  high_value (revenue_365d >= 500): entered at the second order; exited when the first order
      leaves the 365-day window, at the start of 10 January 2027 (UTC day buckets).
  lifecycle (default thresholds 30/90/180/365 days): new at the first order; active 30 days
      after it; at_risk 90 days after the last order; lapsed after 180; churned after 365.
  big_spenders_at_risk (at_risk and revenue_total >= 300): while at_risk.
A visitor who only browses is a prospect from the first page view.
"""
import json
from datetime import datetime, timedelta, timezone

import duckdb
import pytest

from cdpflow.cli import main

pytestmark = pytest.mark.e2e

FIRST = datetime(2026, 1, 10, 9, 30, tzinfo=timezone.utc)
SECOND = datetime(2026, 2, 1, 18, 5, tzinfo=timezone.utc)
VIEW = datetime(2026, 1, 20, 12, 0, tzinfo=timezone.utc)


def _iso(moment):
    return moment.isoformat().replace("+00:00", "Z")


def _order(message_id, at, revenue):
    return {"type": "track", "event": "Order Completed", "userId": "u-buyer", "messageId": message_id,
            "timestamp": _iso(at), "receivedAt": _iso(at + timedelta(seconds=2)),
            "properties": {"order_id": message_id, "revenue": revenue, "total": revenue, "currency": "USD"}}


EVENTS = [
    _order("o1", FIRST, 300),
    _order("o2", SECOND, 250),
    {"type": "page", "name": "Home", "anonymousId": "a-visitor", "messageId": "p1", "timestamp": _iso(VIEW),
     "receivedAt": _iso(VIEW + timedelta(seconds=1))},
]

EXPECTED_BUYER = {
    ("high_value", SECOND, datetime(2027, 1, 10, tzinfo=timezone.utc)),
    ("big_spenders_at_risk", SECOND + timedelta(days=90), SECOND + timedelta(days=180)),
    ("lifecycle:new", FIRST, FIRST + timedelta(days=30)),
    ("lifecycle:active", FIRST + timedelta(days=30), SECOND + timedelta(days=90)),
    ("lifecycle:at_risk", SECOND + timedelta(days=90), SECOND + timedelta(days=180)),
    ("lifecycle:lapsed", SECOND + timedelta(days=180), SECOND + timedelta(days=365)),
    ("lifecycle:churned", SECOND + timedelta(days=365), None),
}


def _spans(wh):
    con = duckdb.connect(str(wh), read_only=True)
    rows = con.execute("SELECT p.user_id, m.segment, m.entered_at, m.exited_at FROM segment_memberships m "
                       "JOIN profiles p USING (profile_id)").fetchall()
    changes = con.execute("SELECT payload FROM outbox").fetchall()
    con.close()
    spans = {}
    for user, segment, entered, exited in rows:
        spans.setdefault(user, set()).add((segment, entered, exited))
    return spans, [json.loads(p) for (p,) in changes]


@pytest.fixture(scope="module")
def events_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("times") / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    return path


def test_memberships_are_entered_and_exited_at_the_event_or_edge_that_changed_them(events_file, tmp_path):
    wh = tmp_path / "w.duckdb"
    assert main(["run", "--input", str(events_file), "--warehouse", str(wh), "--as-of", "2027-03-01T00:00:00Z"]) == 0
    spans, changes = _spans(wh)
    assert spans["u-buyer"] == EXPECTED_BUYER
    assert spans[None] == {("lifecycle:prospect", VIEW, None)}
    # The segment changes sent for them carry the same times, and name the event that caused
    # them (an edge: the latest event before it, with the edge's time).
    buyer = sorted((c["segment"], c["direction"], c["at"], c["cause_message_id"]) for c in changes
                   if c["segment"] == "high_value")
    assert buyer == [("high_value", "enter", "2026-02-01T18:05:00.000000Z", "o2"),
                     ("high_value", "exit", "2027-01-10T00:00:00.000000Z", "o2@2027-01-10T00:00:00.000000Z")]


def test_a_later_run_extends_the_history_in_event_time_and_keeps_what_an_earlier_run_recorded(events_file, tmp_path):
    wh = tmp_path / "w.duckdb"
    assert main(["run", "--input", str(events_file), "--warehouse", str(wh), "--as-of", "2026-03-01T00:00:00Z"]) == 0
    first, _ = _spans(wh)
    assert first["u-buyer"] == {("high_value", SECOND, None), ("lifecycle:new", FIRST, FIRST + timedelta(days=30)),
                                ("lifecycle:active", FIRST + timedelta(days=30), None)}
    # The same events again, months later: the open spans close, and new ones open, when the
    # events and window edges made them, as if one run had seen it all.
    assert main(["run", "--input", str(events_file), "--warehouse", str(wh), "--as-of", "2027-03-01T00:00:00Z"]) == 0
    later, _ = _spans(wh)
    assert later["u-buyer"] == EXPECTED_BUYER
    assert later[None] == {("lifecycle:prospect", VIEW, None)}
