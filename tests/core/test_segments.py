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
