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

The logic of both stages is `cdpflow.core.stream_state` (IdentifierMachine, ProfileMachine),
shared with the Flink job; these DoFns only move values between Beam's state and timers and
those functions. State is kept with `StateCoder`: the core's explicit, versioned encoding, not
pickle, so state restored after an upgrade still reads.

Run in a streaming pipeline (`cdpflow.pipelines.stream`); tests drive it with TestStream.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.coders import Coder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from cdpflow.core.features import FeatureSettings
from cdpflow.core.identity import open_identity_store
from cdpflow.core.stream_state import IdentifierMachine, ProfileMachine, decode_state, encode_state, timer_ms
from cdpflow.transforms.clv import _ScoreFn
from cdpflow.transforms.features import PROFILES, TRANSITIONS, _settings


class StateCoder(Coder):
    """Beam state through `cdpflow.core.stream_state`'s versioned JSON encoding."""

    def encode(self, value):
        return encode_state(value)

    def decode(self, encoded):
        return decode_state(encoded)

    def is_deterministic(self):
        return True


def _micros(ts: Timestamp) -> int:
    return ts.micros


def _timer_time(micros: int) -> Timestamp:
    # Runners keep timers in milliseconds.
    return Timestamp(micros=timer_ms(micros) * 1000)


class _IdentifierStateFn(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("state", StateCoder())  # ProfileState of the identifier's events
    OWNER = ReadModifyWriteStateSpec("owner", StateCoder())  # (profile_id, epoch, seq)
    SEEN = ReadModifyWriteStateSpec("seen", StateCoder())  # messageIds folded in

    def __init__(self, session_timeout_us: int):
        self.machine = IdentifierMachine(session_timeout_us)
        self.events = Metrics.counter(self.__class__, "events")
        self.handovers = Metrics.counter(self.__class__, "handovers")
        self.redelivered = Metrics.counter(self.__class__, "redelivered")

    def process(self, element, state=beam.DoFn.StateParam(STATE), owner=beam.DoFn.StateParam(OWNER),
                seen=beam.DoFn.StateParam(SEEN)):
        key, (kind, payload) = element
        if kind == "event":
            event, epoch = payload
            now_seen = IdentifierMachine.first_delivery(seen.read(), event.message_id)
            if now_seen is None:
                # The same event delivered again (a runner that repeats elements after dedup, a
                # restarted stream): folded once.
                self.redelivered.inc()
                return
            seen.write(now_seen)
            self.events.inc()
            new_owner, held, out, moved = self.machine.on_event(key, owner.read(), state.read(), event, epoch)
            state.write(held)
        else:
            new_profile, epoch = payload
            new_owner, out, moved = self.machine.on_move(key, owner.read(), state.read(), new_profile, epoch)
        if moved:
            self.handovers.inc()
        owner.write(new_owner)
        yield from out


class _ProfileFeaturesFn(beam.DoFn):
    MEMBERS = ReadModifyWriteStateSpec("members", StateCoder())  # {node key: (seq, ProfileState or None)}
    EMITTED = ReadModifyWriteStateSpec("emitted", StateCoder())  # (as_of of the last row, exists, transitions sent)
    PENDING = ReadModifyWriteStateSpec("pending", StateCoder())  # when the timer is set for
    TICK = TimerSpec("tick", TimeDomain.WATERMARK)

    def __init__(self, settings: FeatureSettings, until: Optional[int] = None, identity_store: Optional[str] = None):
        self.machine = ProfileMachine(settings, until)
        self.identity_store = identity_store
        self.store = None
        self.updates = Metrics.counter(self.__class__, "updates")
        self.rows = Metrics.counter(self.__class__, "rows")
        self.stale = Metrics.counter(self.__class__, "stale_messages")
        self.retracted = Metrics.counter(self.__class__, "retracted_transitions")

    def setup(self):
        if self.identity_store:
            # Read only: how many identifiers a profile holds, for its rows.
            self.store = open_identity_store(self.identity_store)

    def teardown(self):
        if self.store is not None:
            self.store.close()

    def process(self, element, timestamp=beam.DoFn.TimestampParam, members=beam.DoFn.StateParam(MEMBERS),
                pending=beam.DoFn.StateParam(PENDING), tick=beam.DoFn.TimerParam(TICK)):
        _, (kind, key, seq, payload) = element
        held = self.machine.receive(members.read(), kind, key, seq, payload)
        if held is None:
            self.stale.inc()
            return
        self.updates.inc()
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
        count = self.store.identifier_count(key) if self.store is not None else None
        row, transitions, now_emitted, following = self.machine.on_timer(
            key, _micros(fired), members.read(), emitted.read(), int(time.time() * 1_000_000), count)
        if count == 0:
            members.clear()  # forgotten: what the profile's identifiers sent is dropped
        emitted.write(now_emitted)
        if row is not None:
            self.rows.inc()
            yield row
        for transition in transitions:
            if transition.get("retracted"):
                self.retracted.inc()
            yield beam.pvalue.TaggedOutput(TRANSITIONS, transition)
        if following is not None:
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
      identity_store: the identity store's URI, read for each row's `identifier_count` (how
        many identifiers the store says the profile holds when the row is emitted); None: null.
    """

    def __init__(self, settings: Union[FeatureSettings, dict] = FeatureSettings(), clv_model: Optional[dict] = None,
                 until: Optional[int] = None, identity_store: Optional[str] = None):
        super().__init__()
        self.settings = _settings(settings)
        self.clv_model = clv_model or {"status": "no model", "model_id": None}
        self.until = until
        self.identity_store = identity_store

    def expand(self, inputs):
        routed, moves = inputs
        # Typed (str keys), so the stateful steps' keys get a deterministic coder: Beam checks
        # the input collection's type, not the ParDo's declared input.
        tagged = ((routed | "TagEvents" >> beam.MapTuple(lambda key, value: (key, ("event", value))).with_output_types(
                       Tuple[str, Any]),
                   moves | "TagMoves" >> beam.MapTuple(lambda key, value: (key, ("move", value))).with_output_types(
                       Tuple[str, Any]))
                  | "IdentifierInputs" >> beam.Flatten().with_output_types(Tuple[str, Any]))
        to_profiles = tagged | "IdentifierState" >> beam.ParDo(
            _IdentifierStateFn(self.settings.session_timeout_us)).with_input_types(Tuple[str, Any]).with_output_types(
            Tuple[str, Any])
        results = to_profiles | "ProfileFeatures" >> beam.ParDo(
            _ProfileFeaturesFn(self.settings, self.until, self.identity_store)).with_input_types(Tuple[str, Any]).with_outputs(TRANSITIONS, main=PROFILES)
        # The models the batch job fitted over the warehouse, applied to the rows in batches
        # (fixed in the DoFn, not a side input: a stream may start before a side input is ready).
        scored = (results[PROFILES]
                  | "BatchRows" >> beam.BatchElements(min_batch_size=1, max_batch_size=500)
                  | "PredictCustomerValue" >> beam.ParDo(_ScoreFn(self.clv_model)))
        return {PROFILES: scored, TRANSITIONS: results[TRANSITIONS]}
