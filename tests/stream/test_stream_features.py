"""TestStream tests of the streaming features: window expiry, late data, lifecycle transitions,
and features right at the moment two profiles with history merge."""
from __future__ import annotations

from decimal import Decimal

from apache_beam.testing.test_stream import TestStream as EventStream
from apache_beam.utils.timestamp import Timestamp

from cdpflow.core.timeutil import US_PER_DAY, parse_ts
import pytest

from cdpflow.runners.direct import STREAM_RUNNERS
from tests.stream.helpers import HOUR, latest_rows, run_stream, stamped, track

T0 = parse_ts("2026-03-01T10:00:00Z")
DAY = US_PER_DAY


def watermark(stream, at):
    return stream.advance_watermark_to(Timestamp(micros=at))


@pytest.mark.parametrize("runner", STREAM_RUNNERS)
def test_windows_fall_with_time_and_no_new_event(tmp_path, runner):
    stream = EventStream().add_elements([stamped(track("o1", T0, revenue=40, userId="u1"))])
    stream = watermark(stream, T0 + HOUR)
    stream = watermark(stream, T0 + 40 * DAY)
    out = run_stream(stream, str(tmp_path / "id.sqlite"), runner=runner, until=T0 + 40 * DAY)
    rows = out["profiles"]
    assert rows[0]["as_of"] == T0 and (rows[0]["orders_7d"], rows[0]["orders_30d"]) == (1, 1)
    first_day = T0 // DAY
    by_time = {r["as_of"]: r for r in rows}
    # the order's day leaves the 7-day window at the start of day +7, and the 30-day one at day +30
    leaves_7 = by_time[(first_day + 7) * DAY]
    assert (leaves_7["orders_7d"], leaves_7["revenue_7d"], leaves_7["orders_30d"]) == (0, Decimal(0), 1)
    leaves_30 = by_time[(first_day + 30) * DAY]
    assert (leaves_30["orders_30d"], leaves_30["orders_90d"], leaves_30["orders_total"]) == (0, 1, 1)
    assert [r["as_of"] for r in rows] == sorted(r["as_of"] for r in rows)  # never back in time


@pytest.mark.parametrize("runner", STREAM_RUNNERS)
def test_late_event_within_allowed_lateness_corrects_later_one_is_dead_letter(tmp_path, runner):
    stream = EventStream().add_elements([stamped(track("o1", T0, revenue=10, userId="u1"))])
    stream = watermark(stream, T0 + 2 * DAY)
    late = track("o2", T0 + HOUR, received=T0 + 2 * DAY, revenue=5, userId="u1")  # 47 h late: within 72 h
    too_late = track("o3", T0 + 2 * HOUR, received=T0 + 5 * DAY, revenue=7, userId="u1")  # 118 h late
    stream = stream.add_elements([stamped(late)])
    stream = watermark(stream, T0 + 3 * DAY)
    stream = stream.add_elements([stamped(too_late)])
    stream = watermark(stream, T0 + 6 * DAY)
    out = run_stream(stream, str(tmp_path / "id.sqlite"), runner=runner, until=T0 + 6 * DAY)
    rows = out["profiles"]
    assert rows[0]["orders_total"] == 1
    corrected = [r for r in rows if r["orders_total"] == 2]
    assert corrected and corrected[0]["revenue_total"] == Decimal(15)
    # the correction came when the late event arrived (watermark at 2 days), not at the next
    # window edge: the 7-day window still holds both orders
    assert corrected[0]["as_of"] < (T0 // DAY + 7) * DAY and corrected[0]["orders_7d"] == 2
    assert all(r["orders_total"] <= 2 for r in rows)  # o3 never counted
    letters = out["dead_letters"]
    assert [(d.stage, '"o3"' in d.raw) for d in letters] == [("lateness", True)]
    assert "118.0 h" in letters[0].error


@pytest.mark.parametrize("runner", STREAM_RUNNERS)
def test_lifecycle_transitions_are_emitted_when_the_watermark_passes_them(tmp_path, runner):
    stream = EventStream().add_elements([stamped(track("o1", T0, revenue=10, userId="u1"))])
    stream = watermark(stream, T0 + 400 * DAY)
    stream = stream.add_elements([stamped(track("o2", T0 + 400 * DAY + HOUR, revenue=10, userId="u1"))])
    stream = watermark(stream, T0 + 401 * DAY)
    out = run_stream(stream, str(tmp_path / "id.sqlite"), runner=runner, until=T0 + 401 * DAY)
    transitions = [(t["from_stage"], t["to_stage"], t["transitioned_at"]) for t in out["lifecycle_transitions"]]
    assert transitions[:6] == [
        (None, "new", T0), ("new", "active", T0 + 30 * DAY), ("active", "at_risk", T0 + 90 * DAY),
        ("at_risk", "lapsed", T0 + 180 * DAY), ("lapsed", "churned", T0 + 365 * DAY),
        ("churned", "reactivated", T0 + 400 * DAY + HOUR)]
    # each came with a row at that moment carrying the new stage
    stages = {r["as_of"]: r["lifecycle_stage"] for r in out["profiles"]}
    assert stages[T0 + 90 * DAY] == "at_risk" and stages[T0 + 400 * DAY + HOUR] == "reactivated"


@pytest.mark.parametrize("runner", STREAM_RUNNERS)
def test_survivor_covers_both_histories_right_after_the_merge(tmp_path, runner):
    before = [
        track("a1", T0, revenue=10, anonymousId="cookie-1"),
        track("a2", T0 + HOUR, name="Product Viewed", anonymousId="cookie-1", channel="web"),
        track("b1", T0 + 2 * HOUR, revenue=20, userId="user-1"),
        track("b2", T0 + 3 * HOUR, name="Email Opened", userId="user-1"),
    ]
    merge_at = T0 + 5 * HOUR
    joining = {"type": "identify", "messageId": "m1", "userId": "user-1", "anonymousId": "cookie-1",
               "timestamp": "2026-03-01T15:00:00Z", "receivedAt": "2026-03-01T15:00:01Z"}
    stream = EventStream().add_elements([stamped(b) for b in before])
    stream = watermark(stream, T0 + 4 * HOUR)
    stream = stream.add_elements([stamped(joining)])
    stream = watermark(stream, merge_at + 1000)
    stream = stream.add_elements([stamped(track("c1", T0 + 6 * HOUR, revenue=5, anonymousId="cookie-1"))])
    stream = watermark(stream, T0 + 7 * HOUR)
    out = run_stream(stream, str(tmp_path / "id.sqlite"), runner=runner, until=T0 + 7 * HOUR)
    rows = out["profiles"]
    before_merge = {r["profile_id"]: r for r in rows if r["as_of"] < merge_at and not r.get("deleted")}
    assert len(before_merge) == 2  # two profiles, each with history
    at_merge = [r for r in rows if r["as_of"] == merge_at]
    survivor = [r for r in at_merge if not r.get("deleted")]
    gone = [r for r in at_merge if r.get("deleted")]
    assert len(survivor) == 1 and len(gone) == 1
    row = survivor[0]
    assert (row["orders_total"], row["revenue_total"], row["product_views_7d"], row["email_opens_7d"]) == (2, Decimal(30), 1, 1)
    assert row["event_count"] == 5 and row["first_seen"] == T0 and row["user_id"] == "user-1"
    assert {row["profile_id"], gone[0]["profile_id"]} == set(before_merge)
    final = latest_rows(rows)
    assert list(final) == [row["profile_id"]] and final[row["profile_id"]]["orders_total"] == 3


@pytest.mark.parametrize("runner", STREAM_RUNNERS)
def test_a_late_order_before_the_last_row_retracts_the_superseded_transition_and_sends_the_new(tmp_path, runner):
    stream = EventStream().add_elements([stamped(track("p1", T0, name="Product Viewed", userId="u1"))])
    stream = watermark(stream, T0 + HOUR)
    late_order = track("o1", T0 - HOUR, received=T0 + 2 * HOUR, revenue=9, userId="u1")  # 3 h late: accepted
    stream = stream.add_elements([stamped(late_order)])
    stream = watermark(stream, T0 + 3 * HOUR)
    out = run_stream(stream, str(tmp_path / "id.sqlite"), runner=runner, until=T0 + 3 * HOUR)
    sent = [(t["transitioned_at"], t["from_stage"], t["to_stage"], t.get("retracted", False))
            for t in out["lifecycle_transitions"]]
    # first the stage as it stood; then the late order rewrites the history: the transition it
    # superseded is retracted and the new one sent, each once, so the net history is the batch's
    assert sent == [(T0, None, "prospect", False), (T0, None, "prospect", True), (T0 - HOUR, None, "new", False)]
    assert out["profiles"][-1]["lifecycle_stage"] == "new"


@pytest.mark.parametrize("runner", STREAM_RUNNERS)
def test_a_late_copy_processed_first_does_not_take_the_message_from_the_on_time_one(tmp_path, runner):
    on_time = track("o1", T0, received=T0 + HOUR, revenue=9, userId="u1")
    late_copy = dict(on_time, receivedAt=track("x", T0, received=T0 + 100 * HOUR)["receivedAt"])
    stream = EventStream().add_elements([stamped(late_copy)])  # e.g. a preload and a re-send out of order
    stream = stream.add_elements([stamped(on_time)])
    stream = watermark(stream, T0 + 101 * HOUR)
    out = run_stream(stream, str(tmp_path / "id.sqlite"), runner=runner, until=T0 + 101 * HOUR)
    assert [e.message_id for e in out["events"]] == ["o1"]
    assert [d.stage for d in out["dead_letters"]] == ["lateness"]
    assert latest_rows(out["profiles"])[out["profiles"][-1]["profile_id"]]["orders_total"] == 1


class _Value:
    """A stand-in for a Beam state cell or timer, to drive a DoFn's methods directly."""

    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None

    def set(self, value):
        self.value = value


def test_profile_state_does_not_depend_on_the_order_messages_arrive_in():
    # Runners do not keep order across the shuffle between the two stateful stages.
    from apache_beam.utils.timestamp import Timestamp as BeamTime

    from cdpflow.core.features import FeatureSettings, ProfileState, features
    from cdpflow.schemas.records import NormalizedEvent
    from cdpflow.transforms.stream_features import _IdentifierStateFn, _ProfileFeaturesFn

    def order(mid, at, amount):
        return NormalizedEvent(message_id=mid, type="track", event="Order Completed", timestamp=at, received_at=at,
                               identifiers=(("user_id", "u"),), traits={}, properties={}, context={}, raw="{}",
                               schema_version="track/v1", revenue=Decimal(amount), currency="USD",
                               revenue_reporting=Decimal(amount), profile_id="pA")
    source = _IdentifierStateFn(30 * 60 * 1_000_000)
    state, owner, seen = _Value(), _Value(), _Value()
    messages = []
    for i, amount in enumerate((10, 20, 30)):
        messages += list(source.process(("k", ("event", (order(f"o{i}", T0 + i * HOUR, amount), 0))),
                                        state=state, owner=owner, seen=seen))
    assert len(messages) == 3
    # the same event delivered again is folded once
    assert list(source.process(("k", ("event", (order("o1", T0 + HOUR, 20), 0))), state=state, owner=owner,
                               seen=seen)) == []
    whole = ProfileState()
    for i, amount in enumerate((10, 20, 30)):
        whole.add(order(f"o{i}", T0 + i * HOUR, amount))
    for arrival in ([2, 0, 1], [1, 2, 0], [0, 1, 2]):
        sink = _ProfileFeaturesFn(FeatureSettings())
        members, pending, tick = _Value(), _Value(), _Value()
        for index in arrival:
            sink.process(messages[index], timestamp=BeamTime(micros=T0), members=members, pending=pending, tick=tick)
        merged = ProfileState()
        for _, held in members.read().values():
            merged.merge(held)
        assert features(merged, T0 + DAY) == features(whole, T0 + DAY), arrival
