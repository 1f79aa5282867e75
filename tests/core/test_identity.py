from hypothesis import given, settings
from hypothesis import strategies as st

from cdpflow.core.identity import IdentityGraph, profile_id_for
from tests.oracles import components_of

TYPES = ("user_id", "email", "phone", "anonymous_id", "loyalty_id", "device_id")
identifier = st.tuples(st.sampled_from(TYPES), st.integers(0, 12).map(str))
events = st.lists(st.lists(identifier, min_size=1, max_size=4), min_size=1, max_size=40)


def partition(graph, all_ids):
    groups = {}
    for item in all_ids:
        groups.setdefault(graph.profile_of(item), set()).add(item)
    return {frozenset(g) for g in groups.values()}


@settings(max_examples=200, deadline=None)
@given(events=events, order=st.randoms(use_true_random=False))
def test_partition_equals_union_find_in_any_arrival_order(events, order):
    arrival = list(enumerate(events))
    order.shuffle(arrival)
    graph = IdentityGraph()
    for index, ids in arrival:
        graph.resolve(f"m{index}", index, ids)
    all_ids = {i for ids in events for i in ids}
    assert partition(graph, all_ids) == components_of(events)


@settings(max_examples=100, deadline=None)
@given(events=events)
def test_replayed_messages_change_nothing_and_same_order_gives_same_ids(events):
    first, second = IdentityGraph(), IdentityGraph()
    for index, ids in enumerate(events):
        first.resolve(f"m{index}", index, ids)
        second.resolve(f"m{index}", index, ids)
        # a retried bundle: the same message again, maybe with its identifiers listed differently
        assert second.resolve(f"m{index}", index, list(reversed(ids))) == second.resolve(f"m{index}", index, ids)
    assert list(first.links()) == list(second.links())
    assert first.merges == second.merges


def test_merge_keeps_the_smaller_id_and_records_the_cause():
    graph = IdentityGraph()
    a = graph.resolve("m1", 10, [("email", "a@x.com")]).profile_id
    b = graph.resolve("m2", 20, [("user_id", "u1")]).profile_id
    assert a == profile_id_for(("email", "a@x.com")) and b == profile_id_for(("user_id", "u1"))
    joined = graph.resolve("m3", 30, [("email", "a@x.com"), ("user_id", "u1")])
    assert joined.profile_id == min(a, b)
    (merge,) = joined.merges
    assert (merge.survivor_id, merge.absorbed_id, merge.cause_message_id, merge.merged_at) == (min(a, b), max(a, b), "m3", 30)
    assert merge.reason == "shared email+user_id"
    links = {(t, v): (p, f, l) for t, v, p, f, l in graph.links()}
    assert links[("email", "a@x.com")] == (min(a, b), 10, 30)


def test_new_profile_is_named_by_the_highest_priority_identifier():
    graph = IdentityGraph(priority=("user_id", "email"))
    resolution = graph.resolve("m", 1, [("anonymous_id", "c1"), ("email", "e@x.com"), ("user_id", "u9")])
    assert resolution.profile_id == profile_id_for(("user_id", "u9"))
