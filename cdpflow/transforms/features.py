"""ComputeFeatures (batch): per-profile RFM, engagement, browsing, tenure, traits and lifecycle as of a time.

Input: PCollection[NormalizedEvent] with profile_id set, plus the identity_links rows (for the
identifier count) and the as-of time as a singleton PCollection (UTC microseconds). Outputs
(tags): PROFILES, one profile row per profile with at least one event up to as_of (columns of
the `profiles` table, plus `_cause_message_id`: the latest event, which names the cause of any
segment change, and `_history`: its purchase history for the CLV models); TRANSITIONS, the
`lifecycle_transitions` rows of each profile's whole history up to as_of (the batch re-derives
everything, so the history is re-derived too, merges included). Definitions: docs/features.md.

Events are folded with a CombineFn into additive per-day buckets, so Beam lifts the combine
before the shuffle and only one small state per profile crosses it.
"""
from __future__ import annotations

import time
from typing import Union

import apache_beam as beam
from apache_beam.metrics import Metrics

from cdpflow.core.features import ORDERS, REVENUE, FeatureSettings, ProfileState, features, lifecycle_transitions
from cdpflow.core.timeutil import epoch_day
from cdpflow.models.clv import history_from_days
from cdpflow.schemas.records import NormalizedEvent


PROFILES = "profiles"
TRANSITIONS = "lifecycle_transitions"


def _settings(value: Union[FeatureSettings, dict]) -> FeatureSettings:
    # A plain mapping is the whole configuration (or just its lifecycle thresholds).
    if isinstance(value, FeatureSettings):
        return value
    return FeatureSettings.from_config(value if "lifecycle" in value or "features" in value else {"lifecycle": value})


class ProfileStateFn(beam.CombineFn):
    """Folds a profile's events into a ProfileState."""

    def __init__(self, session_timeout_us: int):
        super().__init__()
        self.session_timeout_us = session_timeout_us

    def create_accumulator(self):
        return ProfileState(self.session_timeout_us)

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
    def __init__(self, settings: FeatureSettings):
        self.settings = settings
        self.profiles = Metrics.counter(self.__class__, "profiles")
        self.transitions = Metrics.counter(self.__class__, "lifecycle_transitions")

    def process(self, element, as_of: int):
        profile_id, grouped = element
        # No state: every event of this profile is after as_of, so it does not exist yet then.
        for state in grouped["state"]:
            self.profiles.inc()
            row = features(state, as_of, self.settings)
            row.update(profile_id=profile_id, identifier_count=sum(grouped["ids"]), as_of=as_of,
                       updated_at=int(time.time() * 1_000_000), _cause_message_id=state.last_event[1],
                       _history=history_from_days({d: v[REVENUE] for d, v in state.days.items() if v[ORDERS]},
                                                  epoch_day(as_of)))
            yield row
            for at, before, after in lifecycle_transitions(state, None, as_of, self.settings.lifecycle):
                self.transitions.inc()
                yield beam.pvalue.TaggedOutput(TRANSITIONS, {
                    "profile_id": profile_id, "from_stage": before, "to_stage": after, "transitioned_at": at,
                    "as_of": as_of, "source": "batch"})


class ComputeFeatures(beam.PTransform):
    """PCollection[NormalizedEvent] -> {PROFILES: profile rows, TRANSITIONS: lifecycle_transitions rows}.

    Args:
      links: the identity_links rows.
      as_of: singleton PCollection, UTC microseconds; events after it are left out.
      settings: FeatureSettings, or the configuration (its `features` and `lifecycle` sections).
    """

    def __init__(self, links, as_of, settings: Union[FeatureSettings, dict] = FeatureSettings()):
        super().__init__()
        self.links = links
        self.as_of = as_of
        self.settings = _settings(settings)

    def expand(self, events):
        as_of = beam.pvalue.AsSingleton(self.as_of)
        states = (events
                  | "UpToAsOf" >> beam.Filter(lambda e, t: e.timestamp <= t, as_of).with_input_types(NormalizedEvent, int)
                  | "KeyByProfile" >> beam.Map(lambda e: (e.profile_id, e))
                  | "FoldEvents" >> beam.CombinePerKey(ProfileStateFn(self.settings.session_timeout_us)))
        identifier_counts = (self.links
                             | "LinkPerProfile" >> beam.Map(lambda r: (r["profile_id"], 1))
                             | "CountIdentifiers" >> beam.CombinePerKey(sum))
        return ({"state": states, "ids": identifier_counts}
                | "JoinIdentifiers" >> beam.CoGroupByKey()
                | "ProfileRows" >> beam.ParDo(_ProfileRowFn(self.settings), as_of).with_outputs(TRANSITIONS, main=PROFILES))
