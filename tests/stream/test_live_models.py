"""A running `cdpflow stream` (Prism, real Kafka) follows the model registry and the rules file.

A batch run fills a warehouse, two cluster models are trained on it, the first is promoted,
and the stream starts on that warehouse with a rules file. While it runs (one process, never
restarted) the second model is promoted and the rules file edited; a new person then arrives.
The stream must assign the first model's clusters before the promotion and the second's after
it, carry the version on every cluster change, apply the edited rules from then on, and end
with every profile in a cluster the promoted model would keep it in (hysteresis), computed here
from the registry's stored arrays and the warehouse's final profile rows.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cdpflow.cli import main
from cdpflow.models.registry import ModelRegistry
from cdpflow.synthetic import generate
from tests.stream.test_live import _crafted, _send_events, broker, changes_on_topic, send_live, stream_args  # noqa: F401
from tests.warehouse.helpers import query

pytestmark = pytest.mark.e2e

RULES_BEFORE = """version: rules-before
segments:
  - name: buyers
    when: {orders_365d: {gte: 1}}
"""
RULES_AFTER = """version: rules-after
segments:
  - name: not_yet_buyers
    description: no order in the last 365 days
    when: {orders_365d: {eq: 0}}
"""


def two_models_and_a_rules_file(tmp_path, sample, second_k, rules_text):
    """A batch run of the sample into live.duckdb, a KMeans model (k=3) trained on it and promoted,
    a Gaussian mixture (`second_k`) trained beside it, and a configuration whose rules file (the
    text given) and registry are looked at every second."""
    warehouse = tmp_path / "live.duckdb"
    reference = ["--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv")]
    assert main(["run", "--input", str(sample / "events"), "--warehouse", str(warehouse), *reference]) == 0
    assert main(["train", "--warehouse", str(warehouse), "--k", "3", "--seed", "1", "--promote"]) == 0
    registry = ModelRegistry(str(tmp_path / "live.models"))
    first = registry.promoted()["version"]
    assert main(["train", "--warehouse", str(warehouse), "--algorithm", "gmm", "--k", str(second_k), "--seed", "2"]) == 0
    second = next(m["version"] for m in registry.versions() if m["version"] != first)
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    config = tmp_path / "config.yaml"
    config.write_text(f"segments:\n  file: {rules}\n  reload_seconds: 1\nmodels:\n  reload_seconds: 1\n")
    return warehouse, registry, first, second, rules, config


def _cluster_changes(changes):
    return [c for c in changes if c["segment"].startswith("cluster:")]


def test_a_promotion_and_a_rules_edit_reach_the_running_stream_without_a_restart(tmp_path, broker):  # noqa: F811
    sample = tmp_path / "sample"
    generate(sample, customers=30, days=120, seed=43)
    warehouse, registry, first, second, rules, config = two_models_and_a_rules_file(tmp_path, sample, 5, RULES_BEFORE)
    profiles = {r[0] for r in query(warehouse, "SELECT profile_id FROM profiles")}
    send_live(sample, broker)

    started = time.monotonic()
    until = (int(time.time() * 1_000_000) + 50_000_000) // 1_000_000 * 1_000_000
    env = dict(os.environ, CDPFLOW_PRISM=os.path.abspath(".cache/bin/prism"))
    log_path = tmp_path / "stream.log"
    with open(log_path, "wb") as log_file:
        stream = subprocess.Popen([sys.executable, "-m", "cdpflow.cli", *stream_args(sample, broker, warehouse, until),
                                   "--config", str(config)],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log_file)

    def tail():
        return log_path.read_text(errors="replace")[-3000:]

    def wait_for(what, check, seconds):
        deadline = time.monotonic() + seconds
        while True:
            changes = changes_on_topic(broker)
            if check(changes):
                return changes
            assert stream.poll() is None, tail()
            assert time.monotonic() < deadline, f"{what}\n{tail()}\n" + "\n".join(
                str(c) for c in changes if c["profile_id"] not in profiles)
            time.sleep(1)

    try:
        # every profile of the warehouse is assigned a cluster by the promoted model as the stream starts
        before = wait_for("the stream did not assign the first model's clusters in time", lambda changes: {
            c["profile_id"] for c in _cluster_changes(changes) if c["direction"] == "enter"} >= profiles, 60)
        before_s = time.monotonic() - started
        assert {c["model_version"] for c in _cluster_changes(before)} == {first}
        assert {c["model_version"] for c in before if c["segment"] == "buyers"} == {"rules-before"}
        assert main(["models", "promote", second, "--registry", registry.root]) == 0
        rules.write_text(RULES_AFTER)
        time.sleep(3)  # both are looked at every second
        now = int(time.time() * 1_000_000)
        _send_events(broker, tmp_path / "new.jsonl", [
            _crafted(now, 0.1, "newcomer-1", "identify", "newcomer-laptop", traits={"email": "newcomer@shop.example"}),
            _crafted(now, 0.05, "newcomer-2", "page", "newcomer-laptop", name="Trail shoes")])
        # the newcomer's profile gets the second model's cluster and the edited rules' segment, while it runs
        during = wait_for("the promotion or the rules edit did not reach the running stream", lambda changes: (
            {c["model_version"] for c in changes if c["profile_id"] not in profiles and c["direction"] == "enter"}
            >= {second, "rules-after"}), 40)
        during_s = time.monotonic() - started
        assert stream.poll() is None  # the same process throughout
        assert stream.wait(240) == 0, tail()
    finally:
        if stream.poll() is None:
            os.killpg(stream.pid, signal.SIGKILL)
            stream.wait(30)
    print(f"{len(before)} changes before the promotion ({before_s:.1f} s after the start), {len(during)} once it "
          f"was seen ({during_s:.1f} s)")

    changes = changes_on_topic(broker)
    clusters = _cluster_changes(changes)
    # every cluster change carries the version of the model that made it; none of the first
    # model's enters after the second was promoted and seen (the newcomer arrived after that)
    assert {c["model_version"] for c in clusters} == {first, second}
    assert all(c["source"] == "model" for c in clusters)
    newcomer = {c["profile_id"] for c in changes if c["profile_id"] not in profiles}
    assert {(c["segment"].startswith("cluster:"), c["model_version"]) for c in changes
            if c["profile_id"] in newcomer and c["direction"] == "enter" and c["source"] != "lifecycle"} == {
        (True, second), (False, "rules-after")}
    # the end: every profile's last row (as of --until) was assigned by the second model; each one
    # is in exactly one cluster, a cluster of the second model, and one that model keeps it in
    promoted = registry.load_portable(second)
    names = [c.name for c in promoted.components]
    rows = {r["profile_id"]: r for r in _profiles(warehouse)}
    held = {}
    for profile_id, segment, version in query(warehouse, "SELECT profile_id, segment, model_version FROM "
                                                         "segment_memberships WHERE source = 'model' AND exited_at IS NULL"):
        assert profile_id not in held, f"{profile_id} is in two clusters"
        held[profile_id] = (segment[len("cluster:"):], version)
    assert set(held) == set(rows)
    from cdpflow.core.clusters import feature_vector
    moved = 0
    for profile_id, (name, version) in held.items():
        assert name in names, (profile_id, name)
        scores = promoted.scores([feature_vector(rows[profile_id], promoted.features)])[0]
        assert promoted.choose(scores, name)[0].name == name, profile_id
        moved += version == second
    assert moved > 0
    # the rules: the removed rule's members have left, the new rule's are exactly the new profiles
    open_rules = query(warehouse, "SELECT profile_id, segment, model_version FROM segment_memberships "
                                  "WHERE source = 'rule' AND exited_at IS NULL")
    assert {s for _, s, _ in open_rules} <= {"not_yet_buyers"}
    assert {p for p, _, _ in open_rules} == {p for p, r in rows.items() if r["orders_365d"] == 0}
    assert {v for _, _, v in open_rules} <= {"rules-after"}


def _profiles(warehouse):
    from cdpflow.warehouse import open_warehouse
    with open_warehouse(str(warehouse), read_only=True) as wh:
        return wh.profiles()
