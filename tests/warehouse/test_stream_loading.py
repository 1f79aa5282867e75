"""`DuckDBWarehouse.load_stream_batch`: what the loader commits from the stream's topics, without Kafka.

Records are given as the loader builds them; the identity read-out is a fixed one.
"""
from cdpflow.schemas.topics import PROFILE_CHANGES, SEGMENT_CHANGES, WAREHOUSE_ROWS
from cdpflow.warehouse import DuckDBWarehouse

T = 1_790_000_000_000_000


def identity(*profiles):
    links = [{"identifier_type": "user_id", "identifier_value": p, "profile_id": p, "first_seen": T, "last_seen": T,
              "quarantined": False} for p in profiles]
    return {"links": links, "merges": [], "conflicts": [], "profiles": set(profiles), "final": lambda ids: {}}


class Feed:
    def __init__(self):
        self.offset = 0

    def __call__(self, topic, key, value, order=(0, 0, 0)):
        self.offset += 1
        return {"topic": topic, "partition": 0, "offset": self.offset, "key": key, "value": value, "order": order}


def row(pid, as_of, updated_at, **more):
    return {"profile_id": pid, "as_of": as_of, "updated_at": updated_at, "event_count": 1, **more}


def test_newest_profile_row_wins_and_an_overtaken_tombstone_deletes_nothing(tmp_path):
    feed = Feed()
    with DuckDBWarehouse(str(tmp_path / "w.duckdb")) as wh:
        wh.load_stream_batch([feed(PROFILE_CHANGES.name, "p", row("p", T + 2, 5, event_count=9), (T + 2, 0, 5)),
                              feed(PROFILE_CHANGES.name, "p", row("p", T + 1, 4), (T + 1, 0, 4))], identity("p"), T)
        assert wh.query("SELECT event_count FROM profiles")[0]["event_count"] == 9
        # a tombstone older than the stored row (it overtook it on the way) leaves it
        wh.load_stream_batch([feed(PROFILE_CHANGES.name, "p", None, (T + 1, 1, 0))], identity("p"), T)
        assert wh.count("profiles") == 1
        # an older row in a later batch does not overwrite a newer one
        wh.load_stream_batch([feed(PROFILE_CHANGES.name, "p", row("p", T + 1, 9, event_count=3), (T + 1, 0, 9))],
                             identity("p"), T)
        assert wh.query("SELECT event_count FROM profiles")[0]["event_count"] == 9
        # a newer tombstone deletes; a profile the store no longer knows goes whatever its rows say
        wh.load_stream_batch([feed(PROFILE_CHANGES.name, "p", None, (T + 3, 1, 0)),
                              feed(PROFILE_CHANGES.name, "q", row("q", T + 3, 1), (T + 3, 0, 1))], identity("p"), T)
        assert wh.count("profiles") == 0
        # a batch read again (a loader that crashed after its commit) is skipped by offset
        assert wh.load_stream_batch([{**feed(PROFILE_CHANGES.name, "p", row("p", T + 9, 1), (T + 9, 0, 1)),
                                      "offset": 1}], identity("p"), T)["skipped"] == 1


def change(pid, segment, direction, ordinal, at="2026-09-21T12:00:00.000Z"):
    from cdpflow.core.segments import idempotency_key
    return {"idempotency_key": idempotency_key(pid, segment, direction, f"#{ordinal}"), "profile_id": pid,
            "segment": segment, "source": "rule", "direction": direction, "at": at, "cause_message_id": "m",
            "model_version": "r1", "ordinal": ordinal}


def test_segment_changes_apply_once_and_an_exit_with_nothing_open_is_not_recorded(tmp_path):
    feed = Feed()
    with DuckDBWarehouse(str(tmp_path / "w.duckdb")) as wh:
        enter = feed(SEGMENT_CHANGES.name, "p", change("p", "big", "enter", 1))
        wh.load_stream_batch([enter, feed(SEGMENT_CHANGES.name, "p", change("p", "big", "enter", 1))], identity("p"), T)
        assert wh.open_segment_sizes() == {"big": 1} and wh.count("outbox") == 1
        wh.load_stream_batch([feed(SEGMENT_CHANGES.name, "p", change("p", "big", "exit", 1))], identity("p"), T)
        assert wh.open_segment_sizes() == {}
        # an exit of a profile with nothing open (forgotten: the forget closed it) changes nothing
        wh.load_stream_batch([feed(SEGMENT_CHANGES.name, "gone", change("gone", "big", "exit", 1))], identity("p"), T)
        assert wh.count("outbox") == 2 and wh.count("segment_memberships") == 1


def test_a_transition_is_taken_back_even_under_the_id_of_a_profile_a_merge_absorbed(tmp_path):
    feed = Feed()
    transition = {"profile_id": "b", "from_stage": None, "to_stage": "new", "transitioned_at": T, "as_of": T,
                  "source": "stream"}
    with DuckDBWarehouse(str(tmp_path / "w.duckdb")) as wh:
        wh.load_stream_batch([feed(WAREHOUSE_ROWS.name, "lifecycle_transitions:b",
                                   {"table": "lifecycle_transitions", "row": transition})], identity("a", "b"), T)
        assert wh.count("lifecycle_transitions") == 1
        wh.load_stream_batch([feed(WAREHOUSE_ROWS.name, "lifecycle_transitions:b",
                                   {"table": "lifecycle_transitions", "row": dict(transition, as_of=T + 1, retracted=True)})],
                             identity("a"), T)  # b was absorbed into a
        assert wh.count("lifecycle_transitions") == 0
