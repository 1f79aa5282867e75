"""Kafka consumers that keep their own place, without Beam: assigned partitions, committed offsets.

`assigned` gives a read_committed consumer of a group, assigned every partition of the topics and
placed at the group's committed offsets (the start where it has none, or everywhere with
`from_start`); `commit_positions` commits where it now stands. The profile store's updater and
the sidecar's dead-letter replay read this way.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple


def assigned(bootstrap: str, group: str, topics: Sequence[str], from_start: bool = False) -> Tuple[object, List]:
    """(consumer, partitions) of a group, at its committed offsets (see the module docstring)."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             isolation_level="read_committed")
    partitions = [TopicPartition(topic, p) for topic in topics for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(partitions)
    for tp in partitions:
        committed = None if from_start else consumer.committed(tp)
        if committed is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)
    return consumer, partitions


def commit_positions(consumer, partitions) -> None:
    """Commits, for the consumer's group, the position it has reached in each partition."""
    from kafka import OffsetAndMetadata
    consumer.commit({tp: OffsetAndMetadata(consumer.position(tp), "", -1) for tp in partitions})
