"""ResolveIdentity: attributes every event to a unified profile through the shared identity store.

Input: PCollection[NormalizedEvent]. Outputs (a dict of PCollections):
  `events`: the accepted events with `profile_id` set to their profile after the whole input,
  `identity_links`, `profile_merges`, `identity_conflicts`: rows of those tables,
  `dead_letters`: events whose every identifier is a blocked value (stage `identity`).
Events that carry a forgotten identifier are dropped and counted (`suppressed`), never stored.

Two ways to feed the store (`cdpflow.core.identity.IdentityStore`, opened by URI: a SQLite file shared by
every worker process):
  ordered (batch default): the (time, messageId, identifiers) keys are sorted into event-time
      order on one worker and resolved in transactions of `batch_size`, so a backfill or a replay
      gives exactly the sequential result, profile ids included;
  parallel: each worker resolves its own batches of events (BatchElements) in arrival order, as a
      stream does; unions are still atomic (one transaction per batch) and idempotent by
      messageId, so a retried bundle or a restarted job changes nothing.
Either way the events learn their final profile only after every event has been resolved: the
count of resolved events is a singleton side input, which Beam computes completely first.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, List, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from cdpflow.core.control import LEFT, REFUSED, apply_for_stream
from cdpflow.core.identity import BLOCKED, OK, SUPPRESSED, IdentityRules, open_identity_store
from cdpflow.schemas.records import DeadLetter, Identifier, NormalizedEvent
from cdpflow.transforms import DEAD_LETTERS

EVENTS, LINKS, MERGES, CONFLICTS = "events", "identity_links", "profile_merges", "identity_conflicts"

log = logging.getLogger(__name__)

_Key = Tuple[int, str, Tuple[Identifier, ...]]


class _StoreFn(beam.DoFn):
    """A DoFn holding one connection to the identity store per worker (`store_path`: a path or URI)."""

    def __init__(self, store_path: str, rules: IdentityRules):
        self.store_path = store_path
        self.rules = rules
        self.store = None

    def setup(self):
        self.store = open_identity_store(self.store_path, self.rules)

    def teardown(self):
        if self.store is not None:
            self.store.close()


class _ResolveFn(_StoreFn):
    def __init__(self, store_path, rules, batch_size: int, governance=None, refresh_s: float = 10.0):
        super().__init__(store_path, rules)
        self.batch_size = batch_size
        self.governance, self.refresh_s = governance, refresh_s
        self.refreshed = 0.0
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.batch = Metrics.distribution(self.__class__, "batch_size")

    def process(self, keys: List[_Key]) -> Iterable[int]:
        # Ordered: the whole input in event-time order (ties by messageId), as a replay sees it.
        # Parallel: within a batch, still in event-time order, to stay close to the batch result.
        keys = sorted(keys)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start:start + self.batch_size]
            self.received.inc(len(chunk))
            self.batch.update(len(chunk))
            self.store.resolve_batch((mid, ts, ids) for ts, mid, ids in chunk)
            self.succeeded.inc(len(chunk))
        yield len(keys)


class _AttachProfileFn(_StoreFn):
    def __init__(self, store_path, rules):
        super().__init__(store_path, rules)
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.dead_lettered = Metrics.counter(self.__class__, "dead_lettered")
        self.suppressed = Metrics.counter(self.__class__, "suppressed")

    def process(self, events: List[NormalizedEvent], resolved: int):
        # One store read per batch of events, not per event.
        decided = self.store.final_profiles([e.message_id for e in events])
        for event in events:
            self.received.inc()
            status, profile_id = decided[event.message_id]
            if status == OK:
                self.succeeded.inc()
                yield event.replace(profile_id=profile_id)
            elif status == SUPPRESSED:
                # A forgotten person's event: counted, never written anywhere (not even as a dead letter).
                self.suppressed.inc()
            else:
                assert status == BLOCKED, status
                self.dead_lettered.inc()
                yield pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(
                    event.raw, "identity",
                    "every identifier is a blocked value: " + ", ".join(f"{t}={v!r}" for t, v in event.identifiers),
                    event.schema_version, event.received_at))


class _ReadGraphFn(_StoreFn):
    def process(self, _, resolved: int):
        for link in self.store.links():
            yield pvalue.TaggedOutput(LINKS, link)
        for merge in self.store.merges():
            yield pvalue.TaggedOutput(MERGES, merge)
        for conflict in self.store.conflicts():
            yield pvalue.TaggedOutput(CONFLICTS, conflict)


class ResolveIdentity(beam.PTransform):
    """PCollection[NormalizedEvent] -> {'events', 'identity_links', 'profile_merges', 'identity_conflicts', 'dead_letters'}.

    Args:
      store_path: the identity store's SQLite file, reachable by every worker.
      rules: merge protection (`IdentityRules.from_config`).
      ordered: resolve in event-time order on one worker (True) or in parallel batches.
      batch_size: events per store transaction.
    """

    def __init__(self, store_path: str, rules: IdentityRules = IdentityRules(), ordered: bool = True,
                 batch_size: int = 500):
        super().__init__()
        self.store_path = store_path
        self.rules = rules
        self.ordered = ordered
        self.batch_size = batch_size

    def expand(self, events):
        keys = events | "IdentityKeys" >> beam.Map(lambda e: (e.timestamp, e.message_id, e.identifiers))
        if self.ordered:
            batches = keys | "CollectKeys" >> beam.combiners.ToList()
        else:
            batches = keys | "BatchKeys" >> beam.BatchElements(min_batch_size=self.batch_size // 5,
                                                                max_batch_size=self.batch_size)
        resolved = (batches
                    | "Resolve" >> beam.ParDo(_ResolveFn(self.store_path, self.rules, self.batch_size))
                    | "CountResolved" >> beam.CombineGlobally(sum))
        barrier = beam.pvalue.AsSingleton(resolved)
        attached = (events
                    | "BatchEvents" >> beam.BatchElements(min_batch_size=min(100, self.batch_size), max_batch_size=self.batch_size)
                    | "AttachProfile" >> beam.ParDo(_AttachProfileFn(self.store_path, self.rules), barrier)
                    .with_outputs(DEAD_LETTERS, main=EVENTS))
        tables = (events.pipeline
                  | "GraphReadout" >> beam.Create([None])
                  | "ReadGraph" >> beam.ParDo(_ReadGraphFn(self.store_path, self.rules), barrier)
                  .with_outputs(LINKS, MERGES, CONFLICTS))
        return {EVENTS: attached[EVENTS], DEAD_LETTERS: attached[DEAD_LETTERS],
                LINKS: tables[LINKS], MERGES: tables[MERGES], CONFLICTS: tables[CONFLICTS]}



# ------------------------------------------------------------------------------------ streaming
ROUTED, MOVES = "routed", "moves"


class _ResolveStreamFn(_StoreFn):
    """Resolves a stream's events in small batches (one store transaction each).

    Emits, keyed by the node key of the identifier an event is attributed to:
      ROUTED: (key, (event with profile_id as decided, epoch the decision was taken at)),
      MOVES: (key, (profile_id, epoch)) for every identifier whose profile the batch changed;
    both stamped with the causing event's time.
    """

    def __init__(self, store_path, rules, batch_size: int, governance=None, refresh_s: float = 10.0):
        super().__init__(store_path, rules)
        self.batch_size = batch_size
        self.governance, self.refresh_s = governance, refresh_s
        self.refreshed = 0.0
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.dead_lettered = Metrics.counter(self.__class__, "dead_lettered")
        self.suppressed = Metrics.counter(self.__class__, "suppressed")
        self.moved = Metrics.counter(self.__class__, "moves")
        self.pending = []

    def start_bundle(self):
        self.pending = []

    def process(self, event: NormalizedEvent, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        self.received.inc()
        self.pending.append((event, timestamp, window))
        if len(self.pending) >= self.batch_size:
            for out in self._flush():
                yield out

    def finish_bundle(self):
        for out in self._flush():
            yield out

    def _flush(self):
        # Outputs keep the timestamp and window of the event they come from, so the features
        # stage's event-time timers fire when the watermark passes that event.
        pending, self.pending = self.pending, []
        if not pending:
            return
        if self.governance is not None and time.monotonic() - self.refreshed > self.refresh_s:
            # A live stream follows the warehouse's governance: someone forgotten while it runs
            # is suppressed from the next batch on, not from the next restart.
            self.refreshed = time.monotonic()
            rules = self.governance()
            if rules is not None:
                if rules.suppressed != self.rules.suppressed:
                    self.store.purge(rules)  # whoever was forgotten leaves the graph now
                self.rules = self.store.rules = rules
        decisions, epoch, moves = self.store.resolve_batch_with_moves(
            (e.message_id, e.timestamp, e.identifiers) for e, _, _ in pending)
        taken = epoch - 1 if moves else epoch
        latest = max(pending, key=lambda p: p[1])
        for (event, ts, window), decision in zip(pending, decisions):
            if decision.status == OK:
                self.succeeded.inc()
                routed = (decision.key, (event.replace(profile_id=decision.profile_id), taken))
                yield WindowedValue(routed, ts, [window])
            elif decision.status == SUPPRESSED:
                self.suppressed.inc()
            else:
                self.dead_lettered.inc()
                yield pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(DeadLetter(
                    event.raw, "identity",
                    "every identifier is a blocked value: " + ", ".join(f"{t}={v!r}" for t, v in event.identifiers),
                    event.schema_version, event.received_at), ts, [window]))
        repeated = [(key, (profile_id, moved_at)) for moved_at, key, profile_id in self.store.replayed_moves]
        for key, value in sorted(moves.items()):
            repeated.append((key, (value, epoch)))
        for move in repeated:
            self.moved.inc()
            yield pvalue.TaggedOutput(MOVES, WindowedValue(move, latest[1], [latest[2]]))


class ResolveIdentityStream(beam.PTransform):
    """Streaming identity: PCollection[NormalizedEvent] -> {'routed', 'moves', 'dead_letters'}.

    Each bundle is resolved in batches of `batch_size` against the shared store; `governance`
    (a callable returning the warehouse's current IdentityRules, or None when it cannot tell
    now; `WarehouseGovernance`) is asked again every 10 s. The outputs feed `StreamFeatures`, which keeps feature state per identifier and moves it when the
    store merges or splits profiles.
    """

    def __init__(self, store_path: str, rules: IdentityRules = IdentityRules(), batch_size: int = 200,
                 governance=None):
        super().__init__()
        self.store_path = store_path
        self.rules = rules
        self.batch_size = batch_size
        self.governance = governance

    def expand(self, events):
        results = events | "Resolve" >> beam.ParDo(
            _ResolveStreamFn(self.store_path, self.rules, self.batch_size, self.governance)
        ).with_outputs(MOVES, DEAD_LETTERS, main=ROUTED)
        return {ROUTED: results[ROUTED], MOVES: results[MOVES], DEAD_LETTERS: results[DEAD_LETTERS]}


class _ApplyControlFn(_StoreFn):
    """Applies `split` commands from `cdp.control` to the live graph; emits the moves they make.

    A split re-derives the profile in the identity store with the new separations in force
    (`IdentityStore.split`, idempotent by the command's id: the loader applies it too, and a
    restarted stream re-reads the topic), and its moves go to `StreamFeatures` like a merge's, so
    the parts' feature state, rows and segments follow at once, with or without new events.
    A `forget` is the loader's (it needs the warehouse): the store holds the forgotten hashes it
    writes, so the next batch refuses the person. A record that is not a command is logged and
    counted (`refused`); nothing is dropped silently.
    """

    def __init__(self, store_path, rules, default_region: str):
        super().__init__(store_path, rules)
        self.default_region = default_region
        self.received = Metrics.counter(self.__class__, "received")
        self.applied = Metrics.counter(self.__class__, "splits")
        self.left = Metrics.counter(self.__class__, "left_to_the_loader")
        self.refused = Metrics.counter(self.__class__, "refused")
        self.moved = Metrics.counter(self.__class__, "moves")

    def process(self, value: bytes, timestamp=beam.DoFn.TimestampParam):
        self.received.inc()
        applied = apply_for_stream(self.store, value, self.default_region, timestamp.micros)
        if applied.outcome == REFUSED:
            self.refused.inc()
            log.error("cdp.control record refused by the stream: %s: %r", applied.error, value[:200])
        elif applied.outcome == LEFT:
            self.left.inc()
        else:
            self.applied.inc()
        for move in applied.moves:
            self.moved.inc()
            yield move


class ApplyControl(beam.PTransform):
    """PCollection[bytes] (`cdp.control` values) -> PCollection[(node key, (profile_id, epoch))] moves.

    Args:
      store_path: the identity store the stream resolves against.
      rules: the stream's identity rules.
      default_region: for phone numbers named in commands.
    """

    def __init__(self, store_path: str, rules: IdentityRules, default_region: str):
        super().__init__()
        self.store_path, self.rules, self.default_region = store_path, rules, default_region

    def expand(self, commands):
        return commands | "Apply" >> beam.ParDo(_ApplyControlFn(self.store_path, self.rules, self.default_region))
