"""The identity store against independent references: union-find, and a sequential rules reference.

Every test runs unchanged against each backend: SQLite (the embedded default) and a real Redis
started through `cdpflow stack` (the `redis_url` fixture). `new_store(rules)` opens a fresh,
empty store of the backend under test; `shared_store(rules, worker)` opens one more connection
to the same store, as a second process would.
"""
import dataclasses
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdpflow.core.identity import (BLOCKED, OK, SUPPRESSED, IdentityRules, identifier_hash, node_key,
                                   open_identity_store, profile_id_for)
from tests.oracles import SequentialIdentityReference, components_of

TYPES = ("user_id", "email", "phone", "anonymous_id", "loyalty_id", "device_id")
DAY = 86_400 * 1_000_000
identifier = st.tuples(st.sampled_from(TYPES), st.integers(1, 9).map(lambda n: f"v{n}"))
events = st.lists(st.tuples(st.integers(0, 30), st.lists(identifier, min_size=1, max_size=4)), min_size=1, max_size=40)

UNLIMITED = IdentityRules(max_per_profile={}, blocked={}, quarantine_max_profiles=10 ** 6)
LIMITED = IdentityRules(max_per_profile={"user_id": 1, "loyalty_id": 1, "email": 2, "device_id": 3},
                        blocked={}, quarantine_max_profiles=2, quarantine_window_days=10)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """(new_store, shared_store) for one backend; every store opened is closed (and emptied) after."""
    opened, made = [], []
    if request.param == "sqlite":
        def location():
            return f"sqlite://{tmp_path / uuid.uuid4().hex}.sqlite"
    else:
        url = request.getfixturevalue("redis_url")

        def location():
            return f"{url}?prefix=test:{uuid.uuid4().hex}"

    def new_store(rules=IdentityRules(), worker=None):
        made.append(location())
        return shared_store(rules, worker)

    def shared_store(rules=IdentityRules(), worker=None):
        store = open_identity_store(made[-1], rules, worker)
        opened.append(store)
        return store

    yield new_store, shared_store
    for store in opened:
        if hasattr(store, "flush"):
            store.flush()
        store.close()


# Hypothesis runs many examples inside one test call: each opens its own fresh store, so the
# function-scoped backend fixture is shared on purpose.
many = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def resolve_all(store, ordered_events, chunks=None):
    batch = [(f"m{index}", day * DAY, ids) for index, (day, ids) in ordered_events]
    size = chunks or len(batch)
    for start in range(0, len(batch), size):
        store.resolve_batch(batch[start:start + size])
    return store


@many
@given(events=events, order=st.randoms(use_true_random=False), chunk=st.integers(1, 7))
def test_without_limits_the_partition_is_the_union_find_in_any_arrival_order(backend, events, order, chunk):
    arrival = list(enumerate(events))
    order.shuffle(arrival)
    store = resolve_all(backend[0](UNLIMITED), arrival, chunk)
    assert store.partition() == components_of([ids for _, ids in events])


def ids_of(store):
    return {(link["identifier_type"], link["identifier_value"]): link["profile_id"] for link in store.links()}


def event_time_order(events):
    return sorted(enumerate(events), key=lambda item: (item[1][0] * DAY, f"m{item[0]}"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=events)
def test_with_limits_event_time_order_equals_the_sequential_reference(backend, events):
    ordered = event_time_order(events)
    store = resolve_all(backend[0](LIMITED), ordered)
    reference = SequentialIdentityReference(LIMITED.priority, dict(LIMITED.max_per_profile),
                                            LIMITED.quarantine_max_profiles, LIMITED.window_us)
    for index, (day, ids) in ordered:
        reference.resolve(day * DAY, ids)
    assert store.partition() == reference.partition()
    assert {(l["identifier_type"], l["identifier_value"]) for l in store.links() if l["quarantined"]} == reference.quarantined


def assert_limits_hold(store, rules):
    per_profile = {}
    for link in store.links():
        per_profile.setdefault(link["profile_id"], []).append(link["identifier_type"])
    for types in per_profile.values():
        for id_type, limit in rules.max_per_profile.items():
            assert types.count(id_type) <= limit, (types, id_type)


@many
@given(events=events, order=st.randoms(use_true_random=False), chunk=st.integers(1, 7))
def test_with_limits_every_limit_holds_in_any_arrival_order_and_retries_change_nothing(backend, events, order, chunk):
    arrival = list(enumerate(events))
    order.shuffle(arrival)
    store = resolve_all(backend[0](LIMITED), arrival, chunk)
    assert_limits_hold(store, LIMITED)
    before = (store.partition(), store.merges(), store.conflicts())
    # a retried bundle: the same events again, in another order
    order.shuffle(arrival)
    resolve_all(store, arrival, chunk)
    assert (store.partition(), store.merges(), store.conflicts()) == before


def test_a_family_email_does_not_join_two_accounts(backend):
    store = backend[0](IdentityRules())
    store.resolve("1", 1, [("user_id", "mum"), ("email", "family@x.com")])
    store.resolve("2", 2, [("user_id", "son"), ("anonymous_id", "c-son")])
    decision = store.resolve("3", 3, [("user_id", "son"), ("email", "family@x.com")])
    assert decision.profile_id == store.profile_of(("user_id", "son")) != store.profile_of(("user_id", "mum"))
    assert store.profile_of(("email", "family@x.com")) == store.profile_of(("user_id", "mum"))
    (conflict,) = store.conflicts()
    assert (conflict["rule"], conflict["identifier_value"], conflict["cause_message_id"]) == (
        "max_per_profile:user_id", "family@x.com", "3")
    assert store.merges() == []


def test_a_kiosk_device_is_quarantined_and_its_merges_are_undone(backend):
    rules = IdentityRules(quarantine_max_profiles=3, quarantine_window_days=30)
    store = backend[0](rules)
    for n in range(1, 6):
        store.resolve(f"own{n}", n * DAY, [("loyalty_id", f"L{n}"), ("email", f"p{n}@x.com")])
    # anonymous shoppers at the kiosk: their cookies merge into the kiosk's profile
    store.resolve("anon1", 9 * DAY, [("device_id", "kiosk"), ("anonymous_id", "walk-in-1")])
    store.resolve("anon2", 9 * DAY + 1, [("device_id", "kiosk"), ("anonymous_id", "walk-in-2")])
    # card holders at the kiosk, one after another; two loyalty cards can never merge
    for n in range(1, 6):
        before = {node_key((l["identifier_type"], l["identifier_value"])): l["profile_id"] for l in store.links()}
        _, _, moves = store.resolve_batch_with_moves([(f"kiosk{n}", (10 + n) * DAY, [("loyalty_id", f"L{n}"), ("device_id", "kiosk")])])
        after = {node_key((l["identifier_type"], l["identifier_value"])): l["profile_id"] for l in store.links()}
        # a stream hears of every identifier whose profile changed (merges and the quarantine split)
        changed = {k: p for k, p in after.items() if k in before and before[k] != p}
        assert {k: moves.get(k) for k in changed} == changed
        assert changed or n not in (1, 4)  # 1: the first holder merges with the kiosk; 4: the split
        if n < 4:
            assert not any(c["rule"] == "fan_out_quarantine" for c in store.conflicts())
    (quarantine,) = [c for c in store.conflicts() if c["rule"] == "fan_out_quarantine"]
    assert (quarantine["identifier_value"], quarantine["cause_message_id"]) == ("kiosk", "kiosk4")
    partition = store.partition()
    for n in range(1, 6):
        assert frozenset({("loyalty_id", f"L{n}"), ("email", f"p{n}@x.com")}) in partition
    assert frozenset({("device_id", "kiosk")}) in partition
    assert frozenset({("anonymous_id", "walk-in-1")}) in partition  # the merges it caused are undone
    merges = store.merges()
    assert merges and all(m["undone_at"] is not None and "quarantine of device_id" in m["undone_by"] for m in merges)
    # once quarantined it merges nothing any more
    store.resolve("later", 20 * DAY, [("device_id", "kiosk"), ("anonymous_id", "walk-in-3")])
    assert store.profile_of(("anonymous_id", "walk-in-3")) != store.profile_of(("device_id", "kiosk"))


def test_a_user_id_joining_its_own_cookies_and_a_family_email_are_not_quarantined(backend):
    store = backend[0](IdentityRules(quarantine_max_profiles=2))
    for n in range(6):
        store.resolve(f"c{n}", n, [("anonymous_id", f"cookie{n}")])
        store.resolve(f"l{n}", 100 + n, [("anonymous_id", f"cookie{n}"), ("user_id", "u")])
    store.resolve("mum", 200, [("user_id", "mum"), ("email", "home@x.com")])
    store.resolve("son", 201, [("user_id", "u"), ("email", "home@x.com")])
    assert not any(c["rule"] == "fan_out_quarantine" for c in store.conflicts())
    assert len({store.profile_of(("anonymous_id", f"cookie{n}")) for n in range(6)}) == 1


def test_blocked_values_suppressed_identifiers_and_manual_splits(backend):
    forgotten = ("email", "gone@x.com")
    rules = IdentityRules(separations=frozenset({(("user_id", "a"), ("user_id", "b"))}),
                          suppressed=frozenset({identifier_hash(forgotten)}), max_per_profile={})
    store = backend[0](rules)
    assert store.resolve("1", 1, [("email", "test@example.com"), ("anonymous_id", "undefined")]).status == BLOCKED
    assert store.resolve("2", 2, [forgotten, ("user_id", "z")]).status == SUPPRESSED
    assert store.profile_of(("user_id", "z")) is None
    store.resolve("3", 3, [("user_id", "a"), ("email", "shared@x.com")])
    store.resolve("4", 4, [("user_id", "b"), ("phone", "+15550001")])
    decision = store.resolve("5", 5, [("user_id", "b"), ("email", "shared@x.com")])
    assert decision.status == OK and store.profile_of(("user_id", "a")) != store.profile_of(("user_id", "b"))
    assert [c["rule"] for c in store.conflicts()] == ["manual_split"]


def test_profile_ids_are_deterministic_and_the_smaller_survives(backend):
    def run():
        store = backend[0](IdentityRules())
        store.resolve("1", 1, [("anonymous_id", "c1")])
        store.resolve("2", 2, [("user_id", "u1")])
        store.resolve("3", 3, [("user_id", "u1"), ("anonymous_id", "c1")])
        return store
    first, second = run(), run()
    assert first.links() == second.links() and first.merges() == second.merges()
    ids = sorted([profile_id_for(("anonymous_id", "c1")), profile_id_for(("user_id", "u1"))])
    (merge,) = first.merges()
    assert (merge["survivor_id"], merge["absorbed_id"], merge["cause_message_id"]) == (ids[0], ids[1], "3")
    assert merge["reason"] == "shared anonymous_id+user_id"


def test_the_store_is_shared_between_connections(backend):
    new_store, shared_store = backend
    one = new_store(IdentityRules(), worker=1)
    two = shared_store(IdentityRules(), worker=2)
    one.resolve("1", 1, [("user_id", "u"), ("email", "e@x.com")])
    two.resolve("2", 2, [("email", "e@x.com"), ("phone", "+15550002")])
    assert one.profile_of(("phone", "+15550002")) == two.profile_of(("user_id", "u"))
    assert one.workers() == {1: 1, 2: 1}


def _resolve_in_process(uri, batches, worker, start):
    from cdpflow.core.identity import IdentityRules, open_identity_store
    store = open_identity_store(uri, IdentityRules(max_per_profile={}, blocked={}, quarantine_max_profiles=10 ** 6), worker)
    start.wait(60)  # both processes connected: they begin together
    for batch in batches:
        store.resolve_batch(batch)
    store.close()


def test_two_processes_at_once_give_the_union_find_and_decide_each_event_once(backend):
    import multiprocessing
    import random
    new_store, _ = backend
    store = new_store(UNLIMITED)
    rng = random.Random(5)
    events = [[(rng.choice(TYPES), f"v{rng.randrange(60)}") for _ in range(rng.randrange(1, 4))] for _ in range(600)]
    batch = [(f"m{i}", i, ids) for i, ids in enumerate(events)]
    # Each process resolves its own half (the halves share identifiers, so their unions meet),
    # in its own order and batching, at the same time; then each resolves the other's events
    # again, as a retry would. Each event is decided once, and the graph is the union-find of
    # all of them.
    odd, even = batch[0::2], list(reversed(batch[1::2]))
    plans = [[odd[s:s + 7] for s in range(0, len(odd), 7)] + [even],
             [even[s:s + 11] for s in range(0, len(even), 11)] + [odd]]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    procs = [context.Process(target=_resolve_in_process, args=(store.uri, plan, worker, start))
             for worker, plan in ((1, plans[0]), (2, plans[1]))]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    assert store.partition() == components_of(events)
    # (which process decided what depends on who got the store first: SQLite may let one run ahead)
    assert sum(store.workers().values()) == len(batch) and set(store.workers()) <= {1, 2}


def test_a_cookie_that_reached_the_wrong_account_through_a_family_email_moves_to_its_own(backend):
    store = backend[0](IdentityRules())
    store.resolve("1", 1, [("user_id", "mum"), ("email", "home@x.com")])
    store.resolve("2", 2, [("email", "home@x.com"), ("anonymous_id", "son-laptop")])  # newsletter click, signed out
    assert store.profile_of(("anonymous_id", "son-laptop")) == store.profile_of(("user_id", "mum"))
    store.resolve("3", 3, [("user_id", "son"), ("anonymous_id", "son-laptop")])  # he signs in
    assert store.profile_of(("anonymous_id", "son-laptop")) == store.profile_of(("user_id", "son"))
    assert store.profile_of(("email", "home@x.com")) == store.profile_of(("user_id", "mum"))
    assert any(m["reason"].startswith("rehomed anonymous_id") for m in store.merges())
    # a cookie that an account signed in on stays with that account
    store.resolve("4", 4, [("user_id", "mum"), ("anonymous_id", "family-pc")])
    store.resolve("5", 5, [("user_id", "son"), ("anonymous_id", "family-pc")])
    assert store.profile_of(("anonymous_id", "family-pc")) == store.profile_of(("user_id", "mum"))


@many
@given(events=events, order=st.randoms(use_true_random=False), chunk=st.integers(1, 7))
def test_for_a_stream_the_newest_epoch_names_each_identifiers_final_profile(backend, events, order, chunk):
    # What the streaming features rely on: of all the (profile, epoch) facts a stream hears
    # about an identifier (each event's decision, each move), those with the largest epoch
    # agree, and name the profile the identifier ends up in, whatever the arrival order and
    # batching, with merges, refusals, re-homing and quarantine splits.
    arrival = list(enumerate(events))
    order.shuffle(arrival)
    store = backend[0](LIMITED)
    heard = {}
    batch = [(f"m{index}", day * DAY, ids) for index, (day, ids) in arrival]
    for start in range(0, len(batch), chunk):
        decisions, epoch, moves = store.resolve_batch_with_moves(batch[start:start + chunk])
        taken = epoch - 1 if moves else epoch
        for decision in decisions:
            if decision.status == OK:
                heard.setdefault(decision.key, []).append((taken, decision.profile_id))
        for key, profile in moves.items():
            heard.setdefault(key, []).append((epoch, profile))
    final = {node_key((l["identifier_type"], l["identifier_value"])): l["profile_id"] for l in store.links()}
    for key, facts in heard.items():
        newest = max(epoch for epoch, _ in facts)
        assert {profile for epoch, profile in facts if epoch == newest} == {final[key]}, (key, facts)


def test_a_retried_stream_batch_repeats_the_moves_its_first_attempt_made(backend):
    # The first attempt's outputs die with a failed bundle; its store writes do not. The retry
    # must still tell the stream that the cookie's profile moved.
    store = backend[0](UNLIMITED)
    store.resolve_batch_with_moves([("a", 1, [("anonymous_id", "c1")]), ("b", 2, [("user_id", "u1")])])
    batch = [("m", 3, [("anonymous_id", "c1"), ("user_id", "u1")])]
    _, epoch, moves = store.resolve_batch_with_moves(batch)
    assert moves and store.replayed_moves == []
    _, again, fresh = store.resolve_batch_with_moves(batch)
    assert fresh == {} and again == epoch
    assert sorted((k, p) for e, k, p in store.replayed_moves) == sorted(moves.items())
    assert {e for e, _, _ in store.replayed_moves} == {epoch}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=events, later=events)
# A renaming after the split once re-derived the renamed parts from their link sets, which joined
# an identifier the split had left alone (the link set's first identifier was in a third part).
@example(events=[(0, [("user_id", "v1")]), (0, [("user_id", "v2"), ("user_id", "v3")]),
                 (1, [("user_id", "v1"), ("user_id", "v2"), ("email", "v3")]), (0, [("email", "v3")])],
         later=[(0, [("user_id", "v1")])])
def test_a_split_of_the_live_graph_equals_a_run_with_the_separation_from_the_start(backend, events, later):
    # The live path's split (`cdp.control`): the biggest merged profile is split in the store.
    # The graph must then be what a sequential run with the recorded separations in force from
    # the first event gives (an independent reference), for the events before and after it; a
    # second worker's connection, opened before the split, honours it from its next batch; and
    # repeating the command changes nothing and gives back the moves it made.
    from tests.oracles import SeparatedReference
    new_store, shared_store = backend
    store = new_store(UNLIMITED)
    other = shared_store(UNLIMITED, worker=2)
    ordered = event_time_order(events)
    resolve_all(store, ordered)
    before = {node_key(i): store.profile_of(i) for group in store.partition() for i in group}
    # a profile that exists now (a survivor absorbed later in a chain names its root instead)
    merged = [m["survivor_id"] for m in store.merges() if m["undone_at"] is None and m["survivor_id"] in before.values()]
    if not merged:
        return
    target = max(set(merged), key=merged.count)
    outcome = store.split(target, "cmd-1", 10 ** 9)
    assert outcome.separations and outcome.profiles and target in [store.profile_of(i) for group in store.partition()
                                                                   for i in group]
    # every identifier whose profile changed is among the moves, with its new profile
    after = {node_key(i): store.profile_of(i) for group in store.partition() for i in group}
    assert {k for k in after if after[k] != before[k]} <= set(outcome.moves)
    assert all(after[k] == p for k, p in outcome.moves.items())
    # the id marketers know stays with the part holding the user id (else most identifiers)
    held = {p: [] for p in outcome.profiles}
    for link in store.links():
        if link["profile_id"] in held:
            held[link["profile_id"]].append(link["identifier_type"])
    assert target in held
    assert ("user_id" in held[target], len(held[target])) == max(("user_id" in h, len(h)) for h in held.values())
    # and a run from scratch with the separations and names in force (a batch re-derivation)
    # gives every identifier the same id
    fresh = new_store(dataclasses.replace(UNLIMITED, separations=frozenset(store.separations()),
                                          names=frozenset(store.names())))
    resolve_all(fresh, ordered)
    assert ids_of(fresh) == ids_of(store)
    # more traffic, through the other worker, in time order after the split
    tail = [(f"n{index}", (31 + day) * DAY, ids) for index, (day, ids) in enumerate(later)]
    tail.sort(key=lambda e: (e[1], e[0]))
    other.resolve_batch(tail)
    reference = SeparatedReference(UNLIMITED.priority, outcome.separations)
    for _, (_, ids) in ordered:
        reference.resolve(ids)
    for _, _, ids in tail:
        reference.resolve(ids)
    assert store.partition() == reference.partition()
    again = store.split(target, "cmd-1", 10 ** 9 + 1)
    assert again.moves == {} and sorted((k, p) for _, k, p in again.replayed) == sorted(outcome.moves.items())
    assert store.partition() == reference.partition()
    assert set(store.separations()) == set(outcome.separations)


def test_a_split_names_a_profile_by_an_identifier_or_an_absorbed_id_and_undoes_one_merge(backend):
    store = backend[0](IdentityRules())
    store.resolve("1", 1, [("email", "ann@x.com"), ("anonymous_id", "a1")])
    store.resolve("2", 2, [("email", "bob@x.com"), ("anonymous_id", "b1")])
    store.resolve("3", 3, [("email", "cat@x.com"), ("anonymous_id", "c1")])
    store.resolve("4", 4, [("anonymous_id", "b1"), ("email", "ann@x.com")])  # the family computer
    store.resolve("5", 5, [("anonymous_id", "c1"), ("email", "ann@x.com")])
    assert len(store.partition()) == 1
    absorbed = sorted(m["absorbed_id"] for m in store.merges())
    outcome = store.split(absorbed[0], "only-one", 6, merge=absorbed[0])  # an absorbed id names its survivor
    assert len(outcome.separations) == 1 and len(store.partition()) == 2
    outcome = store.split(("email", "ann@x.com"), "the-rest", 7)
    assert len(store.partition()) == 3
    assert {c["rule"] for c in store.conflicts()} == {"manual_split"}
    assert all(m["undone_at"] is not None for m in store.merges())
    assert store.split(("email", "nobody@x.com"), "unknown", 8).profiles == []


def test_a_forget_with_hashes_is_honoured_by_every_connection_from_its_next_batch(backend):
    new_store, shared_store = backend
    store, other = new_store(IdentityRules()), shared_store(IdentityRules(), worker=2)
    person = [("email", "gone@x.com"), ("anonymous_id", "g1")]
    store.resolve("1", 1, person)
    store.forget(person[:1], hashes=[identifier_hash(person[0])])
    # the other connection's rules never heard of the forget: the store's held hash refuses it
    assert other.resolve("2", 2, [("email", "gone@x.com"), ("anonymous_id", "g2")]).status == SUPPRESSED
    assert other.resolve("3", 3, [("anonymous_id", "g1")]).status == OK  # only what was forgotten
    assert store.profile_of(("anonymous_id", "g2")) is None


def a_cookie_named_before(pid):
    """A cookie whose profile id sorts before `pid` (ids are hashes: found by trying)."""
    return next(("anonymous_id", f"c{n}") for n in range(1000) if profile_id_for(("anonymous_id", f"c{n}")) < pid)


def test_after_a_split_the_part_with_the_user_id_keeps_the_id_on_every_path(backend):
    # A family's cookie founded a profile first (its id is the smaller), then the person's account
    # merged into it. Split, the account's part must keep the id the profile had (the one a
    # marketer knows), and a fresh re-derivation (batch) and an older store that learns the split
    # from the warehouse (stream) must give every identifier the same id.
    new_store, shared_store = backend
    person = [("user_id", "u1"), ("email", "ann@x.com"), ("phone", "+15550001111")]
    cookie = a_cookie_named_before(profile_id_for(person[0]))
    events = [("1", 1, [cookie]), ("2", 2, person), ("3", 3, [cookie, person[0]])]
    store = new_store(IdentityRules())
    for mid, ts, ids in events:
        store.resolve(mid, ts, ids)
    known = store.profile_of(person[0])
    assert known == profile_id_for(cookie) == store.profile_of(cookie)
    stale = new_store(IdentityRules())  # a second store (a stream's) that never saw the split
    for mid, ts, ids in events:
        stale.resolve(mid, ts, ids)
    other = shared_store(IdentityRules(), worker=2)

    outcome = store.split(known, "cmd", 10)
    fragment = store.profile_of(cookie)
    assert [store.profile_of(i) for i in person] == [known] * 3 and fragment != known
    assert sorted(outcome.profiles) == sorted([known, fragment])
    assert sorted(outcome.names) == sorted([(cookie, profile_id_for(person[0]), 10), (person[0], known, 10)])
    assert fragment == profile_id_for(person[0])
    # every identifier that changed profile is among the moves (the cookie left)
    assert outcome.moves[node_key(cookie)] == fragment
    assert all(outcome.moves.get(node_key(i), known) == known for i in person)
    assert store.identifier_count(known) == 3 and store.identifier_count(fragment) == 1
    # the same command again changes nothing
    assert store.split(known, "cmd", 11).moves == {}
    # another worker of the store attributes the person's next event to the known id
    assert other.resolve("4", 20, [("email", "ann@x.com")]).profile_id == known

    links = ids_of(store)
    # batch: a run from scratch with the separation and the names in force from the start
    fresh = new_store(IdentityRules.from_config({}, separations=store.separations(), names=store.names()))
    for mid, ts, ids in events + [("4", 20, [("email", "ann@x.com")])]:
        fresh.resolve(mid, ts, ids)
    assert ids_of(fresh) == links
    # stream: a store that learns the separation and names afterwards renames what it holds
    learned = stale.separate(store.separations(), "warehouse", 30, names=store.names())
    assert {node_key(cookie): fragment}.items() <= learned.moves.items()
    assert ids_of(stale) == links
    assert stale.separate(store.separations(), "warehouse", 31, names=store.names()).moves == {}
    # a later merge of the person still finds its founders by their names: splitting it again works
    store.resolve("5", 40, [("email", "ann@x.com"), ("loyalty_id", "L1")])
    store.resolve("6", 41, [("loyalty_id", "L1"), ("anonymous_id", "zz")])
    assert store.profile_of(("loyalty_id", "L1")) == known

    # forget: the names and separations that hold the person's identifiers go with them (the
    # cookie keeps its name: its profile must not take the forgotten profile's id)
    store.forget(person)
    assert store.separations() == [] and store.names() == [(cookie, fragment, 10)]
    assert store.profile_of(cookie) == fragment


def test_a_split_leaves_the_id_where_the_part_with_most_identifiers_already_holds_it(backend):
    store = backend[0](IdentityRules())
    person = [("email", "bo@x.com"), ("phone", "+15550002222"), ("anonymous_id", "b1")]
    cookie = a_cookie_named_before(min(profile_id_for(i) for i in person))
    # the cookie founds first but the person's identifiers join it one by one: no merge to undo
    # but the one that brought the phone's own profile
    store.resolve("1", 1, person[:1])
    store.resolve("2", 2, [person[1], person[2]])
    store.resolve("3", 3, [person[0], person[1]])
    known = store.profile_of(person[0])
    outcome = store.split(known, "cmd", 10)
    parts = {store.profile_of(i) for i in person}
    assert len(parts) == 2 and known in parts
    biggest = max(parts, key=store.identifier_count)
    assert biggest == known and outcome.names == []
    del cookie
