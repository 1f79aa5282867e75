import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from cdpflow.transforms.identity import EVENTS, LINKS, MERGES, ResolveIdentity
from tests.conftest import local_pipeline
from tests.transforms.helpers import normalized


def test_resolve_identity_joins_profiles_through_shared_identifiers(tmp_path):
    events = [
        normalized(messageId="1", anonymousId="cookie-1", timestamp="2026-03-01T10:00:00Z"),
        normalized(messageId="2", userId="u1", traits={"email": "a@x.com"}, timestamp="2026-03-02T10:00:00Z"),
        normalized(messageId="3", anonymousId="cookie-1", userId="u1", type="identify", timestamp="2026-03-03T10:00:00Z"),
        normalized(messageId="4", userId="u2", timestamp="2026-03-04T10:00:00Z"),
    ]
    p = local_pipeline()
    out = p | beam.Create(events) | ResolveIdentity(str(tmp_path / "graph.sqlite"))

    def groups(links):
        by_profile = {}
        for link in links:
            by_profile.setdefault(link["profile_id"], set()).add((link["identifier_type"], link["identifier_value"]))
        return sorted(sorted(g) for g in by_profile.values())

    assert_that(out[LINKS] | "AllLinks" >> beam.combiners.ToList() | "Groups" >> beam.Map(groups), equal_to([[
        [("anonymous_id", "cookie-1"), ("email", "a@x.com"), ("user_id", "u1")], [("user_id", "u2")]]]), label="Links")
    assert_that(out[MERGES] | "Cause" >> beam.Map(lambda m: m["cause_message_id"]), equal_to(["3"]), label="Merges")
    # Events 1-3 end on one profile (the survivor), event 4 on another.
    assert_that(out[EVENTS] | "Profiles" >> beam.Map(lambda e: (e.message_id, e.profile_id))
                | "AllPairs" >> beam.combiners.ToList()
                | "Check" >> beam.Map(lambda pairs: len({p for m, p in pairs if m in "123"}) == 1 and len({p for _, p in pairs}) == 2),
                equal_to([True]), label="Events")
    p.run().wait_until_finish()


# ---- the parallel mode: several worker processes, retried bundles, a restarted job ----------

import random  # noqa: E402

import pytest  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: E402
from apache_beam.testing import test_pipeline  # noqa: E402

from cdpflow.core.identity import IdentityRules, SQLiteIdentityStore  # noqa: E402
from tests.oracles import components_of  # noqa: E402

OFF = IdentityRules(max_per_profile={}, blocked={}, quarantine_max_profiles=10 ** 9)


def random_events(n, seed):
    rng = random.Random(seed)
    kinds = ("user_id", "email", "phone", "anonymous_id", "device_id")
    events = []
    for i in range(n):
        ids = {(rng.choice(kinds), f"v{rng.randint(0, n // 3)}") for _ in range(rng.randint(1, 3))}
        events.append(normalized(messageId=f"m{i}", anonymousId="x").replace(
            identifiers=tuple(sorted(ids)), timestamp=rng.randint(0, 10 ** 12)))
    return events


def run_parallel(events, store_path, runner=None, args=(), fail_on=None, rules=OFF):
    p = test_pipeline.TestPipeline(runner=runner or FnApiRunner(), options=PipelineOptions(list(args)))
    out = p | beam.Create(events, reshuffle=True) | ResolveIdentity(store_path, rules, ordered=False, batch_size=50)

    def maybe_fail(event):
        if event.message_id == fail_on:
            raise RuntimeError("worker died")
        return event
    _ = out[EVENTS] | beam.Map(maybe_fail)
    p.run().wait_until_finish()


def test_two_worker_processes_resolve_against_one_store(tmp_path):
    events = random_events(3000, seed=1)
    path = str(tmp_path / "graph.sqlite")
    run_parallel(events, path, args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    store = SQLiteIdentityStore(path, OFF)
    workers = store.workers()
    assert len(workers) >= 2 and sum(workers.values()) == len(events), workers
    assert store.partition() == components_of([e.identifiers for e in events])


def test_repeated_bundles_and_a_restart_mid_input_change_nothing(tmp_path):
    events = random_events(1500, seed=2)
    expected = components_of([e.identifiers for e in events])
    repeated = str(tmp_path / "repeat.sqlite")
    run_parallel(events, repeated, runner=FnApiRunner(bundle_repeat=1))
    assert SQLiteIdentityStore(repeated, OFF).partition() == expected

    restarted = str(tmp_path / "restart.sqlite")
    run_parallel(events[:900], restarted)  # the job stopped after 900 events...
    with pytest.raises(Exception, match="worker died"):
        run_parallel(events, restarted, fail_on="m1200")  # ...was restarted from the start and died again...
    run_parallel(events, restarted)  # ...and ran to the end
    store = SQLiteIdentityStore(restarted, OFF)
    assert store.partition() == expected
    assert sum(store.workers().values()) == len(events)  # one decision per event, never two
    absorbed = [m["absorbed_id"] for m in store.merges()]
    assert len(absorbed) == len(set(absorbed))


def test_with_merge_protection_limits_hold_under_repeats_restarts_and_two_workers(tmp_path):
    rules = IdentityRules(max_per_profile={"user_id": 1, "email": 2, "phone": 2}, quarantine_max_profiles=2)
    events = random_events(2000, seed=3)
    path = str(tmp_path / "limited.sqlite")
    run_parallel(events[:700], path, runner=FnApiRunner(bundle_repeat=1), rules=rules)
    run_parallel(events, path, rules=rules, args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    store = SQLiteIdentityStore(path, rules)
    per_profile = {}
    for link in store.links():
        per_profile.setdefault(link["profile_id"], []).append(link["identifier_type"])
    assert store.conflicts()  # the limits were tested, not idle
    for types in per_profile.values():
        assert types.count("user_id") <= 1 and types.count("email") <= 2 and types.count("phone") <= 2
    assert sum(store.workers().values()) == len(events)
