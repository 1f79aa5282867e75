from decimal import Decimal

import pytest

from cdpflow.config import default_config, load_config
from cdpflow.core.segments import RuleError, parse_rules

RULES = {"version": "t1", "segments": [
    {"name": "runners", "when": {"all": [
        {"age": {"between": [25, 34]}}, {"city": {"in": ["London", "Berlin"]}},
        {"interests": {"contains": "running"}}, {"orders_90d": {"gte": 2}}]}},
    {"name": "not_london_or_rich", "when": {"any": [{"not": {"city": {"eq": "london"}}}, {"revenue_total": {"gt": 1000}}]}},
    {"name": "has_phone", "when": {"phone": {"exists": True}}},
    {"name": "vip_trait", "when": {"tier": {"eq": "VIP"}}},
]}


def profile(**over):
    base = {"age": 30, "city": "london", "interests": ["running", "yoga"], "orders_90d": 2,
            "revenue_total": Decimal("10"), "phone": None, "traits": {"tier": "vip"}}
    base.update(over)
    return base


def test_rules_combine_demographic_psychographic_and_behavioural():
    rules = parse_rules(RULES)
    assert rules.evaluate(profile()) == ["runners", "vip_trait"]
    assert "runners" not in rules.evaluate(profile(age=35))
    assert "runners" not in rules.evaluate(profile(orders_90d=1))
    assert "runners" not in rules.evaluate(profile(interests=["yoga"]))
    assert "runners" not in rules.evaluate(profile(age=None))
    assert rules.evaluate(profile(city="Paris", phone="+1"))[:2] == ["not_london_or_rich", "has_phone"]
    assert "not_london_or_rich" in rules.evaluate(profile(revenue_total=Decimal("1000.01")))


@pytest.mark.parametrize("bad, fragment", [
    ({"segments": [{"name": "x", "when": {"age": {"older": 3}}}]}, "unknown operator"),
    ({"segments": [{"name": "x", "when": {"age": {"between": [1]}}}]}, "between"),
    ({"segments": [{"name": "x"}]}, "needs 'name' and 'when'"),
    ({"segments": [{"name": "x", "when": {"all": []}}]}, "non-empty list"),
    ({"segments": [{"name": "lifecycle:new", "when": {"a": {"eq": 1}}}]}, "reserved"),
    ({"segments": [{"name": "x", "when": {"city": {"in": "London"}}}]}, "takes a list"),
])
def test_bad_rules_fail_with_where(bad, fragment):
    with pytest.raises(RuleError, match=fragment):
        parse_rules(bad)


def test_shipped_rules_parse_and_config_merges(tmp_path):
    assert len(parse_rules(default_config()["segments"]).segments) >= 4
    user = tmp_path / "c.yaml"
    user.write_text("default_region: GB\nlifecycle: {new_days: 14}\n")
    config = load_config(str(user))
    assert config["default_region"] == "GB"
    assert config["lifecycle"] == {"new_days": 14, "active_days": 90, "at_risk_days": 180, "churned_days": 365}


def test_in_and_not_in_on_list_fields_and_values_of_any_shape_never_raise():
    rules = parse_rules({"version": "t", "segments": [
        {"name": "likes_running", "when": {"interests": {"in": ["Running", "trail"]}}},
        {"name": "no_yoga", "when": {"interests": {"not_in": ["yoga"]}}},
        {"name": "odd_shapes", "when": {"tags": {"in": [{"a": 1}, ["x"], "plain"]}}}]})
    assert rules.evaluate(profile(interests=["running", "cycling"])) == ["likes_running", "no_yoga"]
    assert rules.evaluate(profile(interests=["Yoga"])) == []
    assert rules.evaluate(profile(interests=[], tags=[{"a": 1}])) == ["no_yoga", "odd_shapes"]
    assert rules.evaluate(profile(interests="running", tags={"nested": ["x"]})) == ["likes_running", "no_yoga"]


def test_stream_memberships_enter_and_exit_with_ordinal_keys_and_resume_from_the_warehouse():
    from cdpflow.core.segments import MembershipMachine, held_from_memberships
    document = {"version": "r1", "segments": [{"name": "big", "when": {"revenue_total": {"gte": 100}}}]}
    lifecycle = {"new_days": 30, "active_days": 90, "at_risk_days": 180, "churned_days": 365}
    machine = MembershipMachine(document, lifecycle)

    def row(revenue, stage, at):
        return {"profile_id": "p", "revenue_total": revenue, "lifecycle_stage": stage, "as_of": at,
                "_cause_message_id": f"m{at}"}
    held, first = machine.on_row("p", row(150, "new", 1_000_000), None)
    assert {(c["segment"], c["direction"], c["ordinal"]) for c in first} == {("big", "enter", 1), ("lifecycle:new", "enter", 1)}
    held, second = machine.on_row("p", row(50, "new", 2_000_000), held)
    assert [(c["segment"], c["direction"], c["ordinal"]) for c in second] == [("big", "exit", 1)]
    held, third = machine.on_row("p", row(200, "active", 3_000_000), held)
    assert [(c["segment"], c["direction"], c["ordinal"]) for c in third] == [
        ("lifecycle:new", "exit", 1), ("big", "enter", 2), ("lifecycle:active", "enter", 1)]
    # a stream resuming from the warehouse's spans sends the same change under the same key,
    # whatever row causes it this time
    spans = [{"segment": "big", "source": "rule", "model_version": "r1", "entered_at": 1, "exited_at": 2},
             {"segment": "lifecycle:new", "source": "lifecycle", "model_version": "x", "entered_at": 1, "exited_at": 3}]
    _, resumed = machine.on_row("p", row(300, "active", 9_000_000), held_from_memberships(spans))
    keys = {c["segment"]: c["idempotency_key"] for c in resumed}
    assert keys == {c["segment"]: c["idempotency_key"] for c in third if c["direction"] == "enter"}
    # a deleted profile leaves every segment
    after, gone = machine.on_row("p", {"profile_id": "p", "deleted": True, "as_of": 10_000_000}, held)
    assert sorted((c["segment"], c["direction"]) for c in gone) == [("big", "exit"), ("lifecycle:active", "exit")]
    # a row older than the last one applied (rows overtake each other on the way) changes nothing
    assert machine.on_row("p", row(500, "active", 9_000_000), after) == (after, [])
    assert machine.on_row("p", row(500, "active", 10_000_000), after) == (after, [])  # a deletion wins its as_of
    early, _ = machine.on_row("p", {"profile_id": "p", "deleted": True, "as_of": 5_000_000}, None)
    assert machine.on_row("p", row(150, "new", 1_000_000), early)[1] == []


def test_the_membership_timeline_changes_at_events_and_edges_and_a_dense_profile_per_day():
    # Hand-worked: 300 and 250 ordered 60 and 40 days before AS_OF; high_value (revenue_365d >= 500)
    # starts at the second order; the view-only day after does not change it.
    from decimal import Decimal
    from cdpflow.core import segments as seg
    from cdpflow.core.features import FeatureSettings
    from cdpflow.core.timeutil import US_PER_DAY, parse_ts
    from cdpflow.schemas.records import NormalizedEvent
    as_of = parse_ts("2026-06-30T12:00:00Z")

    def ev(mid, days_ago, name="Product Viewed", revenue=None):
        return NormalizedEvent(
            message_id=mid, type="track", event=name, timestamp=as_of - int(days_ago * US_PER_DAY),
            received_at=as_of, identifiers=(("user_id", "u"),), traits={}, properties={}, context={}, raw="{}",
            schema_version="v", revenue=revenue, currency="USD" if revenue is not None else None,
            revenue_reporting=revenue, enrichment={}, channel=None)

    rules = seg.parse_rules({"version": "r1", "segments": [
        {"name": "high_value", "when": {"revenue_365d": {"gte": 500}}},
        {"name": "predicted", "when": {"clv_90d": {"gte": 1}}}]})
    events = [ev("o1", 60, "Order Completed", Decimal(300)), ev("o2", 40, "Order Completed", Decimal(250)),
              ev("v1", 39)]
    timeline = seg.membership_timeline(events, FeatureSettings(), rules, None, as_of)
    entered = [(at, cause) for at, now, cause in timeline if "high_value" in now]
    assert entered[0] == (events[1].timestamp, "o2")
    assert all("predicted" not in now for _, now, _ in timeline)  # decided where rows are scored
    # Resuming after the second order: nothing before it is reported again.
    later = seg.membership_timeline(events, FeatureSettings(), rules, events[1].timestamp, as_of)
    assert later and all(at > events[1].timestamp for at, _, _ in later)
    # A dense profile (past DENSE_EVENTS) is evaluated at the last event of each day.
    from cdpflow.core import features as feature_module
    calls = []
    real = feature_module.features

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    many = [ev(f"v{i}", 10 + (i % 3) + 0.0001 * i) for i in range(seg.DENSE_EVENTS + 10)]
    feature_module.features = counted
    try:
        seg.membership_timeline(many, FeatureSettings(), rules, None, as_of)
    finally:
        feature_module.features = real
    days = {t // US_PER_DAY for t in calls}
    assert len(calls) == len(set(calls)) and len(calls) < 40 and len(days) >= 3  # per day and edge, not per event
    few = many[:50]
    calls.clear()
    feature_module.features = counted
    try:
        seg.membership_timeline(few, FeatureSettings(), rules, None, as_of)
    finally:
        feature_module.features = real
    assert len(calls) >= 50  # below the threshold: at every event
