"""Values a running job follows (a rules file, the promoted model) and the membership machine using them."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from cdpflow.core.clusters import Cluster, PortableModel
from cdpflow.core.follow import Followed
from cdpflow.core.segments import MembershipMachine, RuleError, follow_rules

LIFECYCLE = {"new_days": 30, "active_days": 90, "at_risk_days": 180, "churned_days": 365}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_followed_value_is_re_read_after_its_interval_and_a_broken_version_keeps_the_last_good(caplog):
    source = {"key": 1, "broken": False}
    loads = []

    def load(key):
        if source["broken"]:
            raise ValueError(f"version {key} is broken")
        loads.append(key)
        return f"value {key}"

    clock = Clock()
    followed = Followed(lambda: source["key"], load, 5.0, "the test source", clock=clock)
    assert followed.get() == "value 1"
    source["key"] = 2
    clock.now = 4.9
    assert followed.get() == "value 1"  # not looked at again yet
    clock.now = 5.0
    assert followed.get() == "value 2"
    source.update(key=3, broken=True)
    with caplog.at_level(logging.ERROR):
        for step in range(3):
            clock.now += 5
            assert followed.get() == "value 2"  # the broken version 3 never replaces it
    assert followed.failures == 3
    assert sum("version 3 is broken" in r.message for r in caplog.records) == 1  # said once, not every look
    source["broken"] = False
    clock.now += 5
    assert followed.get() == "value 3"
    assert loads == [1, 2, 3]


def test_a_source_unreadable_before_anything_was_loaded_raises():
    def probe():
        raise OSError("registry unreachable")

    with pytest.raises(OSError, match="unreachable"):
        Followed(probe, lambda k: k, 1.0, "nothing yet").get()


def _rules(version, *names_and_conditions):
    return {"version": version, "segments": [{"name": n, "when": w} for n, w in names_and_conditions]}


def test_a_rules_file_is_followed_an_edit_applies_and_a_broken_edit_keeps_the_rules_in_force(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("version: r1\nsegments:\n  - name: buyers\n    when: {orders_365d: {gte: 1}}\n")
    document = {"file": str(path), "reload_seconds": 0, **_rules("r1", ("buyers", {"orders_365d": {"gte": 1}}))}
    followed = follow_rules(document)
    assert followed.get().version == "r1"
    path.write_text("version: r2\nsegments:\n  - name: big_buyers\n    when: {orders_365d: {gte: 5}}\n")
    rules = followed.get()
    assert rules.version == "r2" and rules.evaluate({"orders_365d": 6}) == ["big_buyers"]
    path.write_text("version: r3\nsegments:\n  - name: broken\n    when: {orders_365d: {greater: 5}}\n")
    assert followed.get().version == "r2" and followed.failures == 1
    path.write_text("not: [valid")
    assert followed.get().version == "r2"
    with pytest.raises(RuleError):
        follow_rules({"segments": [{"name": "x"}]})


def _row(profile_id, as_of, **features):
    return {"profile_id": profile_id, "as_of": as_of, "updated_at": as_of, "lifecycle_stage": "active",
            "_cause_message_id": f"m{as_of}", **features}


def _model(version, names, centers, margin=0.1):
    return PortableModel(version, "kmeans", ("share_running",), np.array([False]), np.array([0.0]), np.array([1.0]),
                         np.array([[c] for c in centers]),
                         tuple(Cluster(i, n, "") for i, n in enumerate(names)), margin=margin)


def _scored(model, x, shadow=None):
    scored = model.scored(model.scores([[x]])[0])
    if shadow is not None:
        scored["shadow"] = shadow.scored(shadow.scores([[x]])[0])
    return scored


def test_the_membership_machine_assigns_the_scored_cluster_with_its_version_and_hysteresis_by_name():
    machine = MembershipMachine(_rules("r1"), LIFECYCLE)
    v1 = _model("v1", ["walkers", "runners"], [0.0, 1.0])
    held, changes = machine.on_row("p", dict(_row("p", 1), _clusters=_scored(v1, 0.2)), None)
    enters = {c["segment"]: c["model_version"] for c in changes if c["direction"] == "enter"}
    assert enters["cluster:walkers"] == "v1"
    # just past the boundary: kept in walkers by the margin
    held, changes = machine.on_row("p", dict(_row("p", 2), _clusters=_scored(v1, 0.52)), held)
    assert not [c for c in changes if c["segment"].startswith("cluster:")]
    # a new version whose clusters keep their names: the profile stays, by name
    v2 = _model("v2", ["runners", "walkers", "cyclists"], [1.0, 0.05, 0.5])
    held, changes = machine.on_row("p", dict(_row("p", 3), _clusters=_scored(v2, 0.27)), held)
    assert not [c for c in changes if c["segment"].startswith("cluster:")]
    # clearly elsewhere under v2: exit walkers, enter cyclists with v2's version
    held, changes = machine.on_row("p", dict(_row("p", 4), _clusters=_scored(v2, 0.5)), held)
    moves = [(c["direction"], c["segment"], c["model_version"]) for c in changes if c["segment"].startswith("cluster:")]
    assert moves == [("exit", "cluster:walkers", "v1"), ("enter", "cluster:cyclists", "v2")]
    # a row with no scores (no model promoted any more) leaves the cluster
    held, changes = machine.on_row("p", _row("p", 5), held)
    assert [(c["direction"], c["segment"]) for c in changes] == [("exit", "cluster:cyclists")]


def test_rules_in_force_replace_the_machines_own_and_the_shadow_verdict_says_who_would_move():
    machine = MembershipMachine(_rules("r1", ("buyers", {"orders_365d": {"gte": 1}})), LIFECYCLE)
    held, changes = machine.on_row("p", _row("p", 1, orders_365d=2), None)
    assert "buyers" in {c["segment"] for c in changes}
    edited = follow_rules(_rules("r2", ("loyal", {"orders_365d": {"gte": 2}}))).get()
    held, changes = machine.on_row("p", _row("p", 2, orders_365d=2), held, edited)
    assert {(c["direction"], c["segment"], c["model_version"]) for c in changes} == {
        ("exit", "buyers", "r1"), ("enter", "loyal", "r2")}
    v1 = _model("v1", ["walkers", "runners"], [0.0, 1.0])
    shadow = _model("v2", ["walkers", "runners"], [0.0, 0.3])
    held, _ = machine.on_row("p", dict(_row("p", 3), _clusters=_scored(v1, 0.2, shadow)), held, edited)
    assert MembershipMachine.shadow_would_move(dict(_row("p", 3), _clusters=_scored(v1, 0.2, shadow)), held) is True
    assert MembershipMachine.shadow_would_move(dict(_row("p", 3), _clusters=_scored(v1, 0.05, shadow)), held) is False
    assert MembershipMachine.shadow_would_move(dict(_row("p", 3), _clusters=_scored(v1, 0.2)), held) is None
