"""The Kafka topics of cdpflow: each one's name, message key, value and retention, in one place.

The collector, the stream, the publisher and `cdpflow stack` (which creates them) import these
names rather than spelling them. Every value is one JSON document (UTF-8); every key is a UTF-8
string. Keys decide the partition, and Kafka keeps order only within a partition: each topic's
key is chosen so that what must stay in order shares a key. Like the rest of `schemas`, this
module depends on nothing else in cdpflow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

DAY_MS = 24 * 60 * 60 * 1000


@dataclasses.dataclass(frozen=True)
class Topic:
    """One topic: its name, what its keys and values are, and the topic-level configuration it is created with."""

    name: str
    key: str
    value: str
    retention: str
    # Topic configs (`retention.ms`, `cleanup.policy`, ...) given when the topic is created.
    configs: Mapping[str, str]


def _deleted_after(days: int) -> Dict[str, str]:
    # Time-based retention: whole log segments older than this are deleted.
    return {"cleanup.policy": "delete", "retention.ms": str(days * DAY_MS)}


RAW_EVENTS = Topic(
    "cdp.events.raw",
    key="`userId`, else `anonymousId` (`raw_event_key`): one person's events keep their order",
    value="the tracking-API event as the collector received it, with `receivedAt` stamped",
    retention="7 days (the warehouse keeps accepted events for good; this is the replay window)",
    configs=_deleted_after(days=7),
)
DEAD_LETTERS = Topic(
    "cdp.events.deadletter",
    key="the dead letter's id (a hash of the stage and the raw record), so a re-sent refusal lands beside the first",
    value="a dead letter: raw payload, stage, error, schema version, receivedAt",
    retention="30 days, time to fix and replay",
    configs=_deleted_after(days=30),
)
SEGMENT_CHANGES = Topic(
    "cdp.segments.changes",
    key="the profile id: one profile's enters and exits keep their order",
    value="a segment change (enter or exit) with its idempotency key",
    retention="7 days (the warehouse's outbox and memberships are the record)",
    configs=_deleted_after(days=7),
)
PROFILE_CHANGES = Topic(
    "cdp.profiles.changes",
    key="the profile id",
    value="the profile's newest row; a tombstone (no value) when it is absorbed by a merge or forgotten",
    retention="compacted: the newest value per profile is kept; tombstones 1 day",
    # Compacted, so a reader from the start gets every live profile once. Segments roll and are
    # compacted within a day, so a forgotten profile's older rows do not linger for the default week.
    configs={"cleanup.policy": "compact", "segment.ms": str(DAY_MS), "max.compaction.lag.ms": str(DAY_MS),
             "delete.retention.ms": str(DAY_MS)},
)
CONTROL = Topic(
    "cdp.control",
    key="the profile id the command concerns: commands on one profile keep their order",
    value="a command to the pipeline (forget, split) with its arguments",
    retention="7 days",
    configs=_deleted_after(days=7),
)

WAREHOUSE_ROWS = Topic(
    "cdp.warehouse.rows",
    key="the row's table and key (`events:<messageId>`, `lifecycle_transitions:<profile id>`)",
    value="`{\"table\": ..., \"row\": ...}`: an accepted event (with the profile it was attributed to) or a "
          "lifecycle transition, for the warehouse loader (internal to cdpflow; destinations read the change topics)",
    retention="7 days (the loader commits what it read to the warehouse with the offsets)",
    configs=_deleted_after(days=7),
)
DESTINATION_DEAD_LETTERS = Topic(
    "cdp.destinations.deadletter",
    key="`<profile id>|<destination>|<idempotency key>`, one per letter, written to the partition of the profile id "
        "alone: one profile's failed deliveries keep their order (`cdpflow destinations replay` resends them), and a "
        "forget replaces each of the person's letters with a tombstone",
    value="`{\"destination\", \"change\", \"error\", \"attempts\", \"dead_lettered_at\", \"source\"}`: a segment change "
          "a destination refused or never answered, or one held behind such a change of the same profile",
    retention="30 days, time to fix the receiver and replay; compacted too, so a forgotten person's letters go "
              "within a day",
    configs={"cleanup.policy": "compact,delete", "retention.ms": str(30 * DAY_MS), "segment.ms": str(DAY_MS),
             "max.compaction.lag.ms": str(DAY_MS), "delete.retention.ms": str(DAY_MS)},
)

# In the order `cdpflow stack up` creates them.
TOPICS: Tuple[Topic, ...] = (RAW_EVENTS, DEAD_LETTERS, SEGMENT_CHANGES, PROFILE_CHANGES, CONTROL, WAREHOUSE_ROWS,
                             DESTINATION_DEAD_LETTERS)
BY_NAME: Dict[str, Topic] = {topic.name: topic for topic in TOPICS}


def raw_event_key(event: Mapping[str, Any]) -> Optional[str]:
    """The `cdp.events.raw` key of a tracking-API event: its `userId`, else its `anonymousId`.

    An empty or missing identifier does not count. An event with neither has no key (Kafka then
    spreads it over partitions); validation dead-letters it downstream anyway.
    """
    for field in ("userId", "anonymousId"):
        value = event.get(field)
        if value is not None and str(value).strip():
            return str(value)
    return None
