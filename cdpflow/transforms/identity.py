"""ResolveIdentity (batch): attributes every event to a unified profile.

Input: PCollection[NormalizedEvent]. Outputs (a dict of PCollections):
  `events`: the events with `profile_id` set to the profile's final survivor,
  `identity_links`: one row per identifier (type, value, profile_id, first_seen, last_seen),
  `profile_merges`: one row per merge (survivor_id, absorbed_id, cause_message_id, reason, merged_at).

Why one worker resolves the whole batch: the identity graph is global while Beam's state is per
key, and a batch must be resolved in event-time order (timestamp, then messageId) to give the
same profile ids and merge records on every replay. Only the small (time, messageId,
identifiers) tuples travel to that worker; the events themselves are joined back by messageId.
A union-find over a few million identifiers fits one worker's memory; the streaming job
resolves per bundle against a shared store instead.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from cdpflow.core.identity import DEFAULT_PRIORITY, IdentityGraph
from cdpflow.schemas.records import Identifier, NormalizedEvent

EVENTS, LINKS, MERGES = "events", "identity_links", "profile_merges"
_RESOLVED = "resolved"

_Key = Tuple[int, str, Tuple[Identifier, ...]]


class _ResolveInOrderFn(beam.DoFn):
    def __init__(self, priority: Sequence[str]):
        self.priority = tuple(priority)
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.merges = Metrics.counter(self.__class__, "merges")
        self.profiles = Metrics.counter(self.__class__, "profiles")

    def process(self, keys: List[_Key]):
        graph = IdentityGraph(self.priority)
        anchors = []
        # Event-time order, ties by messageId: the order a replay will see again.
        for timestamp, message_id, identifiers in sorted(keys):
            self.received.inc()
            anchors.append((message_id, graph.resolve(message_id, timestamp, identifiers).anchor_id))
        for message_id, anchor in anchors:
            self.succeeded.inc()
            yield pvalue.TaggedOutput(_RESOLVED, (message_id, graph.find(anchor)))
        roots = set()
        for id_type, value, profile_id, first_seen, last_seen in graph.links():
            roots.add(profile_id)
            yield pvalue.TaggedOutput(LINKS, {
                "identifier_type": id_type, "identifier_value": value, "profile_id": profile_id,
                "first_seen": first_seen, "last_seen": last_seen})
        for merge in graph.merges:
            self.merges.inc()
            yield pvalue.TaggedOutput(MERGES, merge._asdict())
        self.profiles.inc(len(roots))


def _attach(element):
    message_id, grouped = element
    profiles = list(grouped["profile"])
    for event in grouped["event"]:
        yield event.replace(profile_id=profiles[0])


class ResolveIdentity(beam.PTransform):
    """PCollection[NormalizedEvent] -> {'events', 'identity_links', 'profile_merges'}.

    Args:
      priority: identifier types, most trusted first (names new profiles).
    """

    def __init__(self, priority: Sequence[str] = DEFAULT_PRIORITY):
        super().__init__()
        self.priority = tuple(priority)

    def expand(self, events):
        resolved = (events
                    | "IdentityKeys" >> beam.Map(lambda e: (e.timestamp, e.message_id, e.identifiers))
                    | "CollectKeys" >> beam.combiners.ToList()
                    | "ResolveInOrder" >> beam.ParDo(_ResolveInOrderFn(self.priority))
                    .with_outputs(_RESOLVED, LINKS, MERGES))
        with_profiles = (
            {"event": events | "KeyEvents" >> beam.Map(lambda e: (e.message_id, e)),
             "profile": resolved[_RESOLVED]}
            | "JoinProfiles" >> beam.CoGroupByKey()
            | "AttachProfile" >> beam.FlatMap(_attach).with_output_types(NormalizedEvent))
        return {EVENTS: with_profiles, LINKS: resolved[LINKS], MERGES: resolved[MERGES]}
