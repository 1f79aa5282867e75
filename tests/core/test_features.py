from decimal import Decimal

import math

from hypothesis import given, settings, strategies as st

from cdpflow.core.features import (FeatureSettings, ProfileState, age_at, features, lifecycle_stage,
                                   lifecycle_transitions, next_change)
from cdpflow.core.timeutil import US_PER_DAY, parse_ts
from cdpflow.schemas.records import NormalizedEvent

AS_OF = parse_ts("2026-06-30T12:00:00Z")


def ev(mid, days_ago, type_="track", name=None, revenue=None, traits=None, ids=(("user_id", "u"),), products=(),
       channel=None):
    return NormalizedEvent(
        message_id=mid, type=type_, event=name, timestamp=AS_OF - int(days_ago * US_PER_DAY),
        received_at=AS_OF, identifiers=tuple(ids), traits=traits or {}, properties={}, context={}, raw="{}",
        schema_version="v", revenue=revenue, currency="USD" if revenue is not None else None,
        revenue_reporting=revenue, enrichment={"products": list(products)} if products else {}, channel=channel)


def test_rfm_windows_and_engagement():
    events = [
        ev("o1", 200, name="Order Completed", revenue=Decimal("100")),
        ev("o2", 60, name="Order Completed", revenue=Decimal("50"), products=[{"category": "running"}]),
        ev("o3", 10.2, name="Order Completed", revenue=Decimal("25.5")),
        ev("e1", 3, name="Email Opened"), ev("e2", 3, name="Email Link Clicked"),
        ev("e3", 40, name="Email Opened"),
        ev("p1", 1, type_="page"), ev("v1", 2, name="Product Viewed", products=[{"category": "running"}]),
        ev("u1", 5, name="Unsubscribed"),
    ]
    state = ProfileState()
    for e in events:
        state.add(e)
    row = features(state, AS_OF)
    assert row["orders_total"] == 3 and row["revenue_total"] == Decimal("175.5")
    assert row["avg_order_value"] == Decimal("58.5000")
    assert (row["orders_30d"], row["orders_90d"], row["orders_365d"]) == (1, 2, 3)
    assert (row["revenue_30d"], row["revenue_90d"]) == (Decimal("25.5"), Decimal("75.5"))
    assert row["recency_days"] == 10.2
    assert (row["email_opens_30d"], row["email_clicks_30d"]) == (1, 1)
    assert row["unsubscribed"] is True
    assert (row["page_views_30d"], row["product_views_30d"]) == (1, 1)
    assert row["top_category"] == "running"
    assert row["lifecycle_stage"] == "active"
    assert row["event_count"] == 9


def test_merge_equals_folding_everything_into_one_state():
    events = [ev("a", 5, name="Order Completed", revenue=Decimal("10"), traits={"city": "Paris"}),
              ev("b", 2, name="Order Completed", revenue=Decimal("5"), traits={"city": "Lyon"}),
              ev("c", 1, type_="identify", traits={"age": 30}), ev("d", 400, type_="page")]
    whole = ProfileState()
    for e in events:
        whole.add(e)
    left, right = ProfileState(), ProfileState()
    for e in events[::2]:
        left.add(e)
    for e in events[1::2]:
        right.add(e)
    merged = ProfileState().merge(right).merge(left)
    assert features(merged, AS_OF) == features(whole, AS_OF)
    assert features(merged, AS_OF)["city"] == "Lyon"  # the latest event time wins


def test_lifecycle_stages():
    def stage(*order_days):
        state = ProfileState()
        for i, d in enumerate(order_days):
            state.add(ev(f"o{i}", d, name="Order Completed", revenue=Decimal(1)))
        return lifecycle_stage(state, AS_OF)
    assert stage() == "prospect"
    assert stage(10) == "new"
    assert stage(100, 20) == "active"
    assert stage(300, 120) == "at_risk"
    assert stage(300, 200) == "lapsed"
    assert stage(500, 400) == "churned"
    assert stage(400, 10) == "reactivated"  # 390 days between the two orders
    assert stage(400, 60, 10) == "reactivated"  # the reactivating order is still within 90 days
    assert stage(400, 100, 10) == "active"  # it is not any more
    assert stage(200, 20.5) == "active"  # 179.5 days between: not a lapse
    assert stage(200, 20) == "reactivated"  # exactly 180 days: a lapse


def test_lifecycle_boundaries_are_strict_and_transitions_exact():
    state = ProfileState().add(ev("o", 0, name="Order Completed", revenue=Decimal(1)))
    order = state.orders[0]
    day = US_PER_DAY
    assert lifecycle_stage(state, order + 30 * day - 1) == "new"
    assert lifecycle_stage(state, order + 30 * day) == "active"
    assert lifecycle_stage(state, order + 90 * day) == "at_risk"
    assert lifecycle_stage(state, order + 180 * day) == "lapsed"
    assert lifecycle_stage(state, order + 365 * day) == "churned"
    state.add(ev("p", 2, type_="page"))  # two days before the order: a prospect then
    first = state.first_seen
    assert lifecycle_transitions(state, None, order + 400 * day) == [
        (first, None, "prospect"), (order, "prospect", "new"), (order + 30 * day, "new", "active"),
        (order + 90 * day, "active", "at_risk"), (order + 180 * day, "at_risk", "lapsed"),
        (order + 365 * day, "lapsed", "churned")]
    assert lifecycle_transitions(state, order + 30 * day, order + 100 * day) == [(order + 90 * day, "active", "at_risk")]
    assert next_change(state, order + 91 * day) == order + 180 * day


def test_seven_day_windows_sessions_affinity_engagement_tenure():
    mins = 1 / (24 * 60)
    events = [
        ev("a", 1, type_="page", channel="web"), ev("b", 1 - 30 * mins, type_="page"),  # gap exactly 30 min: one session
        ev("c", 1 - 61 * mins, name="Product Viewed", channel="web", products=[{"category": "shoes"}]),  # 31 min: a new one
        ev("d", 6.5, type_="screen"), ev("e", 8, type_="page"),
        ev("f", 3, name="Email Opened", channel="server"),  # not an interaction
        ev("g", 2, name="Email Link Clicked", channel="server"),
        ev("h", 20, name="Product Added", products=[{"category": "socks"}, {"category": "shoes"}]),
        ev("i", 100, name="Product Viewed", products=[{"category": "hats"}]),  # outside the 90-day affinity window
    ]
    state = ProfileState()
    for e in events:
        state.add(e)
    row = features(state, AS_OF)
    assert (row["sessions_7d"], row["sessions_30d"]) == (3, 4)
    assert (row["page_views_7d"], row["page_views_30d"]) == (3, 4)
    assert row["category_affinity"] == {"shoes": round(2 / 3, 4), "socks": round(1 / 3, 4)}
    assert row["top_category"] == "shoes"
    assert row["engagement_score"] == round(100 * (1 - math.exp(-(1 + 3) / 5)), 2)
    assert row["tenure_days"] == 100
    assert row["email_opens_7d"] == 1 and row["email_clicks_7d"] == 1
    state.add(ev("u", 0.5, name="Unsubscribed"))
    row = features(state, AS_OF, FeatureSettings(click_weight=10))
    assert row["engagement_score"] == 0 and row["unsubscribes_7d"] == 1 and row["unsubscribed"]


def test_windows_fall_with_time_and_next_change_says_when():
    state = ProfileState().add(ev("o", 0, name="Order Completed", revenue=Decimal(5)))
    today = AS_OF // US_PER_DAY
    assert features(state, AS_OF)["orders_7d"] == 1
    leaves = next_change(state, AS_OF)
    assert leaves == (today + 7) * US_PER_DAY
    assert features(state, leaves - 1)["orders_7d"] == 1
    assert features(state, leaves)["orders_7d"] == 0 and features(state, leaves)["orders_30d"] == 1


def test_a_birthday_is_a_change_with_no_new_event():
    state = ProfileState().add(ev("i", 0, type_="identify", traits={"birthday": "1990-07-04"}))
    birthday = parse_ts("2026-07-04T00:00:00Z")
    assert next_change(state, AS_OF) == birthday  # before the page's day leaves the 7-day window
    assert features(state, birthday - 1)["age"] == 35 and features(state, birthday)["age"] == 36
    leap = ProfileState().add(ev("j", 0, type_="identify", traits={"birthday": "2000-02-29"}))
    assert next_change(leap, parse_ts("2027-01-10T00:00:00Z")) <= parse_ts("2027-03-01T00:00:00Z")
    assert features(leap, parse_ts("2027-03-01T00:00:00Z"))["age"] == 27
    assert features(leap, parse_ts("2027-03-01T00:00:00Z") - 1)["age"] == 26


_EVENTS = st.lists(st.tuples(st.integers(0, 60 * 24 * 20), st.sampled_from(["page", "order", "open", "view", "track"]),
                             st.sampled_from([None, "web", "server"])), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(_EVENTS, st.data())
def test_any_split_of_a_history_merges_into_the_whole(spec, data):
    events = []
    for i, (minute, kind, channel) in enumerate(spec):
        days_ago = minute / (24 * 60)
        name = {"order": "Order Completed", "open": "Email Opened", "view": "Product Viewed", "track": "Signed In"}.get(kind)
        events.append(ev(f"m{i}", days_ago, type_="page" if kind == "page" else "track", name=name, channel=channel,
                         revenue=Decimal(i) if kind == "order" else None, products=[{"category": f"c{i % 3}"}]))
    whole = ProfileState()
    for e in events:
        whole.add(e)
    sides = data.draw(st.lists(st.integers(0, 2), min_size=len(events), max_size=len(events)))
    parts = [ProfileState() for _ in range(3)]
    for e, side in zip(events, sides):
        parts[side].add(e)
    merged = ProfileState()
    for part in data.draw(st.permutations(parts)):
        merged.merge(part)
    assert merged.runs == whole.runs
    assert features(merged, AS_OF) == features(whole, AS_OF)


def test_age_from_birthday():
    assert age_at({"birthday": "1990-07-01"}, AS_OF) == 35
    assert age_at({"birthday": "1990-06-30"}, AS_OF) == 36
    assert age_at({"age": 41, "birthday": "1990-06-30"}, AS_OF) == 41
    assert age_at({"birthday": "garbage"}, AS_OF) is None


def _history(spec):
    events = []
    for i, (minute, kind, channel) in enumerate(spec):
        name = {"order": "Order Completed", "open": "Email Opened", "view": "Product Viewed", "track": "Signed In"}.get(kind)
        events.append(ev(f"m{i}", minute / (24 * 60), type_="page" if kind == "page" else "track", name=name,
                         channel=channel, revenue=Decimal(i) if kind == "order" else None,
                         products=[{"category": f"c{i % 3}", "name": "x", "price": 1}],
                         ids=(("user_id", f"u{i % 2}"), ("anonymous_id", f"a{i}")),
                         traits={"birthday": "1990-07-04"} if i == 0 else {}))
    return sorted(events, key=lambda e: (e.timestamp, e.message_id))


@settings(max_examples=150, deadline=None)
@given(_EVENTS, st.lists(st.integers(0, 400 * 24), min_size=1, max_size=20))
def test_the_change_clock_answers_as_next_change_while_the_state_grows(spec, probes):
    # The timeline asks for the next change at moments that never go back, folding events in
    # between; the clock must give what a full scan gives at every step (and slim events the
    # same features as whole ones, which is what the timeline's shuffle carries).
    from cdpflow.core.features import ChangeClock, slim_for_features
    events = _history(spec)
    state, slim, clock = ProfileState(), ProfileState(), ChangeClock()
    moments = sorted({e.timestamp for e in events} | {events[0].timestamp + h * 3_600_000_000 for h in probes})
    i = 0
    for moment in moments:
        while i < len(events) and events[i].timestamp <= moment:
            orders = len(state.orders)
            state.add(events[i])
            slim.add(slim_for_features(events[i]))
            clock.add(events[i].timestamp, len(state.orders) > orders)
            i += 1
        assert clock.next(state, moment) == next_change(state, moment)
        assert repr(features(slim, moment)) == repr(features(state, moment))
