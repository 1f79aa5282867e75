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
