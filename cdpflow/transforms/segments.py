"""AssignSegments: rule, lifecycle and cluster segment memberships, and their enter/exit changes.

Input: PCollection[dict] of profile rows; the previous `segment_memberships` rows (empty on a
new warehouse) and the as-of time (singleton, UTC microseconds). Outputs:
  `segment_memberships`: every membership span, previous history carried over and extended
      in event time: a lifecycle or rule segment is entered and exited at the moment the
      profile's events made it so (the event, or the window edge, lifecycle threshold or
      birthday after it: `cdpflow.core.segments.membership_timeline`), from the previous run's
      as-of time (the whole history on a new warehouse) to this run's; clusters and rules on
      predicted fields (clv_90d, ...) change at the run's as-of time, where rows are scored;
  `segment_changes`: one enter or exit record per change, at the same time, with an idempotency
      key made from the profile, segment, direction and the messageId of the event that caused
      it (with the edge's time for an edge; never from a counter, so a replay of the same run
      produces the same keys).
A previous member that no longer exists (absorbed by a merge) exits at the run's as-of time.

AssignSegmentsStream is the stream's: keyed by profile, it holds the open memberships in state
(`cdpflow.core.segments.MembershipMachine`) and sends an enter or exit the moment a profile row
changes them, with an idempotency key from the entry's ordinal.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from cdpflow.core.clusters import PortableModel, cluster_name, feature_vector
from cdpflow.core.features import slim_for_features
from cdpflow.core.segments import (MembershipMachine, follow_rules, membership_timeline, parse_rules, segment_change,
                                   segments_of)
from cdpflow.core.timeutil import format_ts
from cdpflow.transforms.stream_features import StateCoder

MEMBERSHIPS, CHANGES = "segment_memberships", "segment_changes"


class _ScoreClustersFn(beam.DoFn):
    """A batch of profile rows -> each with its row of cluster scores (`_cluster_scores`)."""

    def __init__(self, model_document: Mapping[str, Any]):
        self.model_document = dict(model_document)
        self.model = None
        self.scored = Metrics.counter(self.__class__, "scored")

    def setup(self):
        self.model = PortableModel.from_dict(self.model_document)

    def process(self, batch):
        scores = self.model.scores([feature_vector(row, self.model.features) for row in batch])
        self.scored.inc(len(batch))
        for row, row_scores in zip(batch, scores):
            yield dict(row, _cluster_scores=row_scores.tolist())


class _DiffMembershipsFn(beam.DoFn):
    def __init__(self, rules_document: Mapping[str, Any], lifecycle: Mapping[str, int],
                 model_document: Optional[Mapping[str, Any]] = None):
        self.rules_document = rules_document
        self.lifecycle = dict(lifecycle)
        self.model_document = dict(model_document) if model_document else None
        self.entered = Metrics.counter(self.__class__, "entered")
        self.exited = Metrics.counter(self.__class__, "exited")
        self.rules = self.model = None

    def setup(self):
        self.rules = parse_rules(self.rules_document)
        self.timed_rules = {s.name for s in self.rules.segments if not s.predicted}
        if self.model_document:
            self.model = PortableModel.from_dict(self.model_document)

    def current(self, profile: Optional[Dict[str, Any]], previous_rows=()):
        found = segments_of(self.rules, self.lifecycle, profile)
        if self.model is not None and found and profile.get("_cluster_scores") is not None:
            # hysteresis: the cluster it is in now (any model version's, by name) may keep it
            held = next((cluster_name(r["segment"]) for r in previous_rows
                         if r["exited_at"] is None and cluster_name(r["segment"])), None)
            cluster, _ = self.model.choose(profile["_cluster_scores"], held)
            found[self.model.segment_of(cluster)] = ("model", self.model.version)
        return found

    def _timed(self, segment: str) -> bool:
        """Whether the profile's event timeline decides this segment (`membership_timeline`)."""
        return segment.startswith("lifecycle:") or segment in self.timed_rules

    def process(self, element, as_of: int):
        profile_id, grouped = element
        profiles = list(grouped["profile"])
        profile = profiles[0] if profiles else None
        previous_rows = list(grouped["previous"])
        timeline = next(iter(grouped["timeline"]), [])
        held = {}  # segment -> its open span
        for row in previous_rows:
            if row["exited_at"] is None:
                held[row["segment"]] = row
            else:
                yield row
        # Lifecycle and rule segments change where the profile's events and window edges changed
        # them (event time); then everything, clusters and rules on predictions included, is
        # decided on the row as of the run's time.
        for moment, now, cause in timeline:
            exits = [s for s in held if self._timed(s) and s not in now]
            enters = {s: v for s, v in now.items() if s not in held}
            yield from self._apply(profile_id, held, exits, enters, moment, cause)
        current = self.current(profile, previous_rows)
        cause = profile["_cause_message_id"] if profile else f"absorbed-or-gone@{format_ts(as_of)}"
        yield from self._apply(profile_id, held, [s for s in held if s not in current],
                               {s: v for s, v in current.items() if s not in held}, as_of, cause)
        for segment in sorted(held):
            yield held[segment]

    def _apply(self, profile_id, held, exits, enters, at, cause):
        for segment in sorted(exits):
            row = dict(held.pop(segment), exited_at=at)
            self.exited.inc()
            yield pvalue.TaggedOutput(CHANGES, self.change(profile_id, row, "exit", cause, at))
            yield row
        for segment, (source, version) in sorted(enters.items()):
            row = {"profile_id": profile_id, "segment": segment, "source": source,
                   "entered_at": at, "exited_at": None, "model_version": version}
            held[segment] = row
            self.entered.inc()
            yield pvalue.TaggedOutput(CHANGES, self.change(profile_id, row, "enter", cause, at))

    @staticmethod
    def change(profile_id, row, direction, cause, at):
        return segment_change(profile_id, row["segment"], row["source"], direction, format_ts(at), cause,
                              row["model_version"])


class _TimelineFn(beam.DoFn):
    """(profile id, its events) -> (profile id, `membership_timeline` of them)."""

    def __init__(self, rules_document: Mapping[str, Any], settings, since: Optional[int]):
        self.rules_document, self.settings, self.since = rules_document, settings, since
        self.rules = None

    def setup(self):
        self.rules = parse_rules(self.rules_document)

    def process(self, element, as_of: int):
        profile_id, events = element
        yield profile_id, membership_timeline(list(events), self.settings, self.rules, self.since, as_of)


class AssignSegments(beam.PTransform):
    """PCollection[dict] (profile rows) -> {'segment_memberships', 'segment_changes'}.

    Args:
      rules_document: the parsed `segments` configuration (version + segments).
      previous: PCollection of the warehouse's segment_memberships rows before this run.
      as_of: singleton PCollection, UTC microseconds.
      lifecycle: thresholds, recorded as the lifecycle segments' model_version.
      model: the promoted cluster model's portable form (`PortableModel.to_dict`), or None: each
        profile is scored in batches and joins `cluster:<name>` (source model, its version).
      events: the profiles' events (NormalizedEvent with profile_id), for the event-time
        timeline; None: every change is at the as-of time.
      settings: the FeatureSettings the timeline recomputes features with (with `events`).
      since: the previous run's as-of time (`Warehouse.latest_as_of`); None: the whole history.
    """

    def __init__(self, rules_document, previous, as_of, lifecycle, model=None, events=None, settings=None,
                 since: Optional[int] = None):
        super().__init__()
        parse_rules(rules_document)  # fail while building the graph, not on a worker
        if model is not None:
            PortableModel.from_dict(model)
        self.rules_document = rules_document
        self.previous = previous
        self.as_of = as_of
        self.lifecycle = dict(lifecycle)
        self.model = model
        self.events, self.settings, self.since = events, settings, since

    def expand(self, profiles):
        if self.model is not None:
            profiles = (profiles
                        | "BatchForClusters" >> beam.BatchElements(min_batch_size=64, max_batch_size=1024)
                        | "ScoreClusters" >> beam.ParDo(_ScoreClustersFn(self.model)))
        if self.events is not None:
            timelines = (self.events
                         # Without what the features never read (the raw line, properties,
                         # context, most identifiers): the shuffle carries a fraction of each event.
                         | "KeyEventsByProfile" >> beam.Map(lambda e: (e.profile_id, slim_for_features(e)))
                         | "EventsPerProfile" >> beam.GroupByKey()
                         | "Timeline" >> beam.ParDo(_TimelineFn(self.rules_document, self.settings, self.since),
                                                    beam.pvalue.AsSingleton(self.as_of)))
        else:
            timelines = profiles.pipeline | "NoTimelines" >> beam.Create([])
        results = ({"profile": profiles | "KeyProfile" >> beam.Map(lambda p: (p["profile_id"], p)),
                    "previous": self.previous | "KeyPrevious" >> beam.Map(lambda r: (r["profile_id"], r)),
                    "timeline": timelines}
                   | "JoinPrevious" >> beam.CoGroupByKey()
                   | "Diff" >> beam.ParDo(_DiffMembershipsFn(self.rules_document, self.lifecycle, self.model),
                                          beam.pvalue.AsSingleton(self.as_of))
                   .with_outputs(CHANGES, main=MEMBERSHIPS))
        return {MEMBERSHIPS: results[MEMBERSHIPS], CHANGES: results[CHANGES]}


# ------------------------------------------------------------------------------------ streaming
class _StreamMembershipsFn(beam.DoFn):
    """Keyed by profile: the open memberships in state, a change out for each enter and exit.

    The rules are followed (`cdpflow.core.segments.follow_rules`): a rules file named by the
    configuration is re-read every `segments.reload_seconds` on each worker.
    """

    HELD = ReadModifyWriteStateSpec("memberships", StateCoder())

    def __init__(self, rules_document: Mapping[str, Any], lifecycle: Mapping[str, int],
                 seeds: Optional[Mapping[str, Any]] = None):
        self.rules_document, self.lifecycle = dict(rules_document), dict(lifecycle)
        self.seeds = dict(seeds or {})
        self.machine = self.rules = None
        self.entered = Metrics.counter(self.__class__, "entered")
        self.exited = Metrics.counter(self.__class__, "exited")
        self.shadow_scored = Metrics.counter(self.__class__, "shadow_scored")
        self.shadow_would_move = Metrics.counter(self.__class__, "shadow_would_move")

    def setup(self):
        self.machine = MembershipMachine(self.rules_document, self.lifecycle)
        from cdpflow.config import rules_reader  # (a gs:// rules file on Dataflow's workers too)
        self.rules = follow_rules(self.rules_document, rules_reader(self.rules_document))

    def process(self, element, held=beam.DoFn.StateParam(HELD)):
        profile_id, row = element
        current = held.read()
        if current is None:
            # A stream that resumes on a warehouse starts from the memberships it holds.
            current = self.seeds.get(profile_id)
        now, changes = self.machine.on_row(profile_id, row, current, self.rules.get())
        held.write(now)
        moved = self.machine.shadow_would_move(row, now)
        if moved is not None:
            self.shadow_scored.inc()
            if moved:
                self.shadow_would_move.inc()
        for change in changes:
            (self.entered if change["direction"] == "enter" else self.exited).inc()
            yield change


class AssignSegmentsStream(beam.PTransform):
    """PCollection[profile rows and deletion rows] -> PCollection[segment changes], as they happen.

    Args:
      rules_document: the parsed `segments` configuration (its rules file, if it names one, is
        followed while the stream runs).
      lifecycle: the lifecycle thresholds.
      seeds: profile id -> `held_from_memberships(...)` of the warehouse the stream resumes on.
      registry: the model registry whose promoted model assigns `cluster:<name>` segments
        (followed every `every_s` seconds), or None for no clusters.
    """

    def __init__(self, rules_document, lifecycle, seeds=None, registry: Optional[str] = None, every_s: float = 10.0):
        super().__init__()
        parse_rules(rules_document)  # fail while building the graph, not on a worker
        self.rules_document, self.lifecycle, self.seeds = rules_document, dict(lifecycle), seeds
        self.registry, self.every_s = registry, every_s

    def expand(self, rows):
        if self.registry:
            from cdpflow.transforms.clusters import ScoreClustersStream  # scikit-learn only when scoring
            rows = rows | "ScoreClusters" >> ScoreClustersStream(self.registry, self.every_s)
        return (rows
                | "KeyByProfile" >> beam.Map(lambda r: (r["profile_id"], r)).with_output_types(Tuple[str, Any])
                | "Memberships" >> beam.ParDo(_StreamMembershipsFn(self.rules_document, self.lifecycle, self.seeds)))
