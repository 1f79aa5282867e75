"""StreamFeatures: live profile features over event-time windows, kept in Beam state.

Input: the outputs of `ResolveIdentityStream`: `routed` events keyed by the node key of the
identifier each is attributed to, and `moves` (node key -> its profile after a merge or split).
Outputs (tags): PROFILES, a profile row (the `profiles` columns, definitions in
docs/features.md) each time the watermark passes a change of a profile, scored with the CLV
models the batch job last fitted (`clv_model`: a `clv_models` row), and a row
`{"profile_id": ..., "deleted": True}` when a profile stops existing (absorbed by a merge);
TRANSITIONS, the `lifecycle_transitions` rows of the profile's history not emitted before.

Two stateful stages, because Beam state belongs to one key and a pipeline cannot loop: a
profile cannot read the state of the profile it merges with.
  IdentifierState (keyed by node key) folds the events attributed to one identifier into a
      ProfileState and knows which profile owns the identifier. After each event it sends its
      whole state to the owner; when the store moves the identifier (a newer epoch), it
      retracts its state from the old profile and sends it to the new one.
  ProfileFeatures (keyed by profile) holds the states of its identifiers. An event-time timer
      fires when the watermark passes a change (an event's time, a hand-over) and again at
      `next_change`: the next moment a day leaves a window or a lifecycle threshold passes,
      so features fall as time passes with no new event. A row is as of the latest of the timer
      time, the profile's newest event and its previous row, so rows never go back in time.
Messages from an identifier carry a sequence number and the identifier's whole state, so
ProfileFeatures keeps the newest it has seen per identifier and the order in which the runner
delivers them does not matter (runners do not keep order across a shuffle). The lifecycle
transitions sent are remembered per profile, so a late event or a merge that changes the stage
history before the previous row sends the changed transitions, and nothing is sent twice.
State size: each event is counted in both stages' per-day buckets, sessions and order times.

Run in a streaming pipeline (`cdpflow.pipelines.stream`); tests drive it with TestStream.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from cdpflow.core.features import (ORDERS, REVENUE, FeatureSettings, ProfileState, copy_state, features,
                                   lifecycle_transitions, next_change)
from cdpflow.core.timeutil import US_PER_DAY, epoch_day
from cdpflow.models.clv import history_from_days
from cdpflow.transforms.clv import _ScoreFn
from cdpflow.transforms.features import PROFILES, TRANSITIONS, _settings

_PUT, _RETRACT = "put", "retract"


def _micros(ts: Timestamp) -> int:
    return ts.micros


def _timer_time(micros: int) -> Timestamp:
    # Runners keep timers in milliseconds: round up, so a timer never fires before its moment
    # (firing early would find nothing changed and set the same timer again).
    return Timestamp(micros=-(-micros // 1000) * 1000)


class _IdentifierStateFn(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("state", PickleCoder())
    OWNER = ReadModifyWriteStateSpec("owner", PickleCoder())  # (profile_id, epoch, seq)

    def __init__(self, session_timeout_us: int):
        self.session_timeout_us = session_timeout_us
        self.events = Metrics.counter(self.__class__, "events")
        self.handovers = Metrics.counter(self.__class__, "handovers")

    def process(self, element, state=beam.DoFn.StateParam(STATE), owner=beam.DoFn.StateParam(OWNER)):
        key, (kind, payload) = element
        profile, version, seq = owner.read() or (None, -1, 0)
        held = state.read()
        if kind == "event":
            event, epoch = payload
            self.events.inc()
            held = held or ProfileState(self.session_timeout_us)
            held.add(event)
            state.write(held)
            out = []
            if profile is None or (epoch > version and event.profile_id != profile):
                # First event, or the store's decision is newer than what this identifier knew.
                out = list(self._hand_over(key, profile, event.profile_id, held, seq + 1))
                profile = event.profile_id
            else:
                out = [(profile, (_PUT, key, seq + 1, copy_state(held)))]
            owner.write((profile, max(epoch, version), seq + 1))
        else:
            new_profile, epoch = payload
            out = []
            if epoch > version:  # else an older move than one already applied
                if held is not None and new_profile != profile:
                    out = list(self._hand_over(key, profile, new_profile, held, seq + 1))
                    seq += 1
                owner.write((new_profile, epoch, seq))
        yield from out

    def _hand_over(self, key, old, new, held, seq):
        if old is not None:
            self.handovers.inc()
            yield old, (_RETRACT, key, seq, None)
        yield new, (_PUT, key, seq, copy_state(held))


class _ProfileFeaturesFn(beam.DoFn):
    MEMBERS = ReadModifyWriteStateSpec("members", PickleCoder())  # {node key: (seq, ProfileState or None)}
    EMITTED = ReadModifyWriteStateSpec("emitted", PickleCoder())  # (as_of of the last row, exists, transitions sent)
    PENDING = ReadModifyWriteStateSpec("pending", PickleCoder())  # when the timer is set for
    TICK = TimerSpec("tick", TimeDomain.WATERMARK)

    def __init__(self, settings: FeatureSettings, until: Optional[int] = None):
        self.settings = settings
        self.until = until
        self.updates = Metrics.counter(self.__class__, "updates")
        self.rows = Metrics.counter(self.__class__, "rows")
        self.stale = Metrics.counter(self.__class__, "stale_messages")

    def process(self, element, timestamp=beam.DoFn.TimestampParam, members=beam.DoFn.StateParam(MEMBERS),
                pending=beam.DoFn.StateParam(PENDING), tick=beam.DoFn.TimerParam(TICK)):
        _, (kind, key, seq, payload) = element
        held: Dict[str, Tuple[int, Any]] = members.read() or {}
        last_seq, _ = held.get(key, (0, None))
        if seq <= last_seq:
            # Overtaken by a newer message from the same identifier (its state already includes
            # this one's): the order between the two stages does not matter.
            self.stale.inc()
            return
        self.updates.inc()
        held[key] = (seq, payload if kind == _PUT else None)
        members.write(held)
        when = _micros(timestamp)
        due = pending.read()
        if due is None or when < due:
            tick.set(_timer_time(when))
            pending.write(when)

    @on_timer(TICK)
    def on_tick(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam, members=beam.DoFn.StateParam(MEMBERS),
                emitted=beam.DoFn.StateParam(EMITTED), pending=beam.DoFn.StateParam(PENDING),
                tick=beam.DoFn.TimerParam(TICK)):
        pending.clear()
        if self.until is None and _micros(fired) > time.time() * 1_000_000 + US_PER_DAY:
            # A live stream being drained: the runner moves the watermark to the end of time and
            # fires every window and lifecycle timer, for times that have not come yet.
            return
        held = members.read() or {}
        merged = ProfileState(self.settings.session_timeout_us)
        for _, state in held.values():
            if state is not None:
                merged.merge(state)
        last_as_of, exists, sent = emitted.read() or (None, False, frozenset())
        if merged.first_seen is None:
            if exists:
                emitted.write((last_as_of, False, sent))
                yield {"profile_id": key, "deleted": True, "as_of": max(_micros(fired), last_as_of or 0)}
            return
        as_of = max(_micros(fired), merged.last_seen, last_as_of if last_as_of is not None else merged.last_seen)
        row = features(merged, as_of, self.settings)
        row.update(profile_id=key, identifier_count=None, as_of=as_of, updated_at=int(time.time() * 1_000_000),
                   _cause_message_id=merged.last_event[1],
                   _history=history_from_days({d: v[REVENUE] for d, v in merged.days.items() if v[ORDERS]},
                                              epoch_day(as_of)))
        self.rows.inc()
        yield row
        # The whole stage history as it now stands, less what was already sent: a late order or a
        # merge can change the stage at a time before the previous row, and that change is sent too.
        history = lifecycle_transitions(merged, None, as_of, self.settings.lifecycle)
        new = [t for t in history if t not in sent]
        for at, before, after in new:
            yield beam.pvalue.TaggedOutput(TRANSITIONS, {
                "profile_id": key, "from_stage": before, "to_stage": after, "transitioned_at": at,
                "as_of": as_of, "source": "stream"})
        emitted.write((as_of, True, sent | frozenset(new)))
        following = next_change(merged, as_of, self.settings.lifecycle)
        if following is not None and (self.until is None or following <= self.until):
            tick.set(_timer_time(following))
            pending.write(following)


class StreamFeatures(beam.PTransform):
    """{routed, moves} (from ResolveIdentityStream) -> {PROFILES: rows and deletions, TRANSITIONS: rows}.

    Args:
      routed: PCollection[(node key, (event, epoch))].
      moves: PCollection[(node key, (profile_id, epoch))].
      settings: FeatureSettings, or the configuration.
      clv_model: the `clv_models` row to score rows with (none: CLV columns stay null).
      until: a replay's end: no window or lifecycle timer is set past it. None (a live stream):
        timers more than a day past the wall clock (a drain) emit nothing.
    """

    def __init__(self, settings: Union[FeatureSettings, dict] = FeatureSettings(), clv_model: Optional[dict] = None,
                 until: Optional[int] = None):
        super().__init__()
        self.settings = _settings(settings)
        self.clv_model = clv_model or {"status": "no model", "model_id": None}
        self.until = until

    def expand(self, inputs):
        routed, moves = inputs
        tagged = ((routed | "TagEvents" >> beam.MapTuple(lambda key, value: (key, ("event", value))),
                   moves | "TagMoves" >> beam.MapTuple(lambda key, value: (key, ("move", value))))
                  | "IdentifierInputs" >> beam.Flatten())
        to_profiles = tagged | "IdentifierState" >> beam.ParDo(
            _IdentifierStateFn(self.settings.session_timeout_us)).with_input_types(Tuple[str, Any])
        results = to_profiles | "ProfileFeatures" >> beam.ParDo(
            _ProfileFeaturesFn(self.settings, self.until)).with_input_types(Tuple[str, Any]).with_outputs(TRANSITIONS, main=PROFILES)
        # The models the batch job fitted over the warehouse, applied to the rows in batches
        # (fixed in the DoFn, not a side input: a stream may start before a side input is ready).
        scored = (results[PROFILES]
                  | "BatchRows" >> beam.BatchElements(min_batch_size=1, max_batch_size=500)
                  | "PredictCustomerValue" >> beam.ParDo(_ScoreFn(self.clv_model)))
        return {PROFILES: scored, TRANSITIONS: results[TRANSITIONS]}
