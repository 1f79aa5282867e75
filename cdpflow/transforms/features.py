"""ComputeFeatures (batch): per-profile RFM, engagement, browsing, traits and lifecycle as of a time.

Input: PCollection[NormalizedEvent] with profile_id set, plus the identity_links rows (for the
identifier count) and the as-of time as a singleton PCollection (UTC microseconds). Output:
PCollection[dict], one profile row per profile with at least one event up to as_of (columns of
the `profiles` table, plus `_cause_message_id`: the latest event, which names the cause of any
segment change, and `_history`: its purchase history for the CLV models).

Events are folded with a CombineFn into additive per-day buckets, so Beam lifts the combine
before the shuffle and only one small state per profile crosses it.
"""
from __future__ import annotations

import time
from typing import Mapping

import apache_beam as beam
from apache_beam.metrics import Metrics

from cdpflow.core.features import DEFAULT_LIFECYCLE, ORDERS, REVENUE, ProfileState, features
from cdpflow.core.timeutil import epoch_day
from cdpflow.models.clv import history_from_days
from cdpflow.schemas.records import NormalizedEvent


class ProfileStateFn(beam.CombineFn):
    """Folds a profile's events into a ProfileState."""

    def create_accumulator(self):
        return ProfileState()

    def add_input(self, state, event):
        return state.add(event)

    def merge_accumulators(self, states):
        states = iter(states)
        merged = next(states)
        for state in states:
            merged.merge(state)
        return merged

    def extract_output(self, state):
        return state


class _ProfileRowFn(beam.DoFn):
    def __init__(self, lifecycle: Mapping[str, int]):
        self.lifecycle = dict(lifecycle)
        self.profiles = Metrics.counter(self.__class__, "profiles")

    def process(self, element, as_of: int):
        profile_id, grouped = element
        # No state: every event of this profile is after as_of, so it does not exist yet then.
        for state in grouped["state"]:
            self.profiles.inc()
            row = features(state, as_of, self.lifecycle)
            row.update(profile_id=profile_id, identifier_count=sum(grouped["ids"]), as_of=as_of,
                       updated_at=int(time.time() * 1_000_000), _cause_message_id=state.last_event[1],
                       _history=history_from_days({d: v[REVENUE] for d, v in state.days.items() if v[ORDERS]},
                                                  epoch_day(as_of)))
            yield row


class ComputeFeatures(beam.PTransform):
    """PCollection[NormalizedEvent] -> PCollection[dict] (profile rows).

    Args:
      links: the identity_links rows.
      as_of: singleton PCollection, UTC microseconds; events after it are left out.
      lifecycle: thresholds (new_days, active_days, at_risk_days).
    """

    def __init__(self, links, as_of, lifecycle: Mapping[str, int] = DEFAULT_LIFECYCLE):
        super().__init__()
        self.links = links
        self.as_of = as_of
        self.lifecycle = lifecycle

    def expand(self, events):
        as_of = beam.pvalue.AsSingleton(self.as_of)
        states = (events
                  | "UpToAsOf" >> beam.Filter(lambda e, t: e.timestamp <= t, as_of).with_input_types(NormalizedEvent, int)
                  | "KeyByProfile" >> beam.Map(lambda e: (e.profile_id, e))
                  | "FoldEvents" >> beam.CombinePerKey(ProfileStateFn()))
        identifier_counts = (self.links
                             | "LinkPerProfile" >> beam.Map(lambda r: (r["profile_id"], 1))
                             | "CountIdentifiers" >> beam.CombinePerKey(sum))
        return ({"state": states, "ids": identifier_counts}
                | "JoinIdentifiers" >> beam.CoGroupByKey()
                | "ProfileRows" >> beam.ParDo(_ProfileRowFn(self.lifecycle), as_of))
