from decimal import Decimal

from cdpflow.core.features import ProfileState, age_at, features, lifecycle_stage
from cdpflow.core.timeutil import US_PER_DAY, parse_ts
from cdpflow.schemas.records import NormalizedEvent

AS_OF = parse_ts("2026-06-30T12:00:00Z")


def ev(mid, days_ago, type_="track", name=None, revenue=None, traits=None, ids=(("user_id", "u"),), products=()):
    return NormalizedEvent(
        message_id=mid, type=type_, event=name, timestamp=AS_OF - int(days_ago * US_PER_DAY),
        received_at=AS_OF, identifiers=tuple(ids), traits=traits or {}, properties={}, context={}, raw="{}",
        schema_version="v", revenue=revenue, currency="USD" if revenue is not None else None,
        revenue_reporting=revenue, enrichment={"products": list(products)} if products else {})


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


def test_age_from_birthday():
    assert age_at({"birthday": "1990-07-01"}, AS_OF) == 35
    assert age_at({"birthday": "1990-06-30"}, AS_OF) == 36
    assert age_at({"age": 41, "birthday": "1990-06-30"}, AS_OF) == 41
    assert age_at({"birthday": "garbage"}, AS_OF) is None
