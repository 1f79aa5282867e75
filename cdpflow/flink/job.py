"""cdpflow's stream as a native PyFlink job: `cdp.events.raw` in, the stream's topics out.

Submitted by `cdpflow flink submit` (which runs `flink run -py` with this file in the Flink
venv); it can also be run by hand:

    flink run -m 127.0.0.1:8081 -py cdpflow/flink/job.py -pyexec .cache/flink-venv/bin/python \
        -pyclientexec .cache/flink-venv/bin/python -- --spec SPEC.json

    KafkaSource(cdp.events.raw, event-time watermarks: bounded out-of-orderness + idleness)
      -> Ingest        parse, validate, normalise, lateness and future checks   (cdpflow.core.ingest)
      -> key by messageId -> Dedup   first copy passes; keyed state with a TTL   (cdpflow.core.dedup)
      -> Enrich        catalog, currency, user agent, campaign                  (cdpflow.core.enrich)
      -> key by bucket -> ResolveIdentity   batched against the shared identity store (Redis)
      -> key by node key -> IdentifierState   an identifier's events, handed over on merges
      -> key by profile -> ProfileFeatures    rows on event-time timers    (cdpflow.core.stream_state)
      -> PredictCustomerValue   the CLV model, each row as it comes            (cdpflow.models.clv)
      -> key by bucket -> ScoreClusters   the promoted cluster model, in batches, followed
                                                              (cdpflow.models.registry)
      -> key by profile -> AssignSegments   enters and exits; rules followed (cdpflow.core.segments)
      -> one exactly-once Kafka sink: cdp.warehouse.rows (events with their profile, lifecycle
         transitions), cdp.profiles.changes (keyed by profile; a tombstone for a profile that is
         gone), cdp.segments.changes (keyed by profile, idempotency key header),
         cdp.events.deadletter (every refused record)

Every function is a thin adapter over `cdpflow.core` (the Beam stream's DoFns use the same
functions and write the same records), so both engines accept, refuse, attribute, compute and
segment alike. The warehouse is written by `cdpflow load` only, never by the job's workers.

State and restarts: dedup state is keyed by messageId with a TTL of the dedup horizon plus the
allowed lateness; the identity stage buffers in keyed list state until a batch is full, a
processing-time timer fires or the watermark passes it (or, should its timers be lost with a
restore, until the next element finds the batch overdue), so a batch restored from a checkpoint
is resolved again, and the identity store gives back the decisions (and the moves) its first
attempt recorded by messageId. Profile rows are scored one by one as they come: nothing after
the features stage waits in a buffer (a drain drops processing-time timers, and rows the
features stage has recorded as sent would never be sent again).
Feature and membership state is the core's versioned encoding (`encode_state`), not pickle.
Operator uids are fixed (savepoints find state by them). The state backend is RocksDB: state
lives on local disk, so it is not bounded by the TaskManager's heap and checkpoints are
incremental.

The job reads its settings from a JSON spec (`--spec`): bootstrap servers, topics, the identity
store URI, the configuration, the CLV model the warehouse last fitted, an optional `until` (no
row after it, and a last row as of it for every profile once the watermark passes it), `bounded`
(read the topic to its end at submit time, then finish), and the identity rules' governance as the warehouse held it at submit time
(forgets and splits made later reach the workers through the identity store itself, which holds
their hashes and separations). A first submit starts with empty feature state (the Beam stream
preloads the warehouse's history; here state comes from checkpoints and savepoints).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time
import zlib
from typing import Any, Dict

import orjson

# Imported once per process (the functions below run per record on the workers): the core only,
# never Beam or PyFlink, which `build` imports for the client.
from cdpflow.core.dedup import DUPLICATE, FIRST, classify_copy, repeat_too_late
from cdpflow.core.enrich import Rates, enrich_event, read_catalog
from cdpflow.core.governance import identifiers_of_raw
from cdpflow.core.identity import OK, SUPPRESSED
from cdpflow.core.ingest import normalize, parse_line, time_refusal
from cdpflow.core.normalize import event_time
from cdpflow.core.rows import (dead_letter_record, dead_letter_row, event_record, profile_record, segment_record,
                               transition_record)
from cdpflow.core.stream_state import IdentifierMachine, ProfileMachine, decode_state, encode_state, timer_ms
from cdpflow.models.clv import score_rows
from cdpflow.schemas.records import DeadLetter

BUCKETS = 16  # keys of the batching stages: batches form per key, spread over the subtasks
DEAD_LETTER_TAG_NAME, TRANSITIONS_TAG_NAME = "dead-letters", "transitions"
TRANSACTION_TIMEOUT_MS = 10 * 60 * 1000  # no longer than the broker's transaction.max.timeout.ms (15 min)


def _decoded(state):
    value = state.value()
    return decode_state(value) if value is not None else None


class _Counts:
    """What a function counts, kept in Python and reported as gauges of the `cdpflow` group.

    PyFlink 2.2.1 reports nothing a counter counts inside `on_timer` (the identity stage's
    `succeeded`, the features' `rows` never showed over REST), so the totals live here and each
    gauge reads its total whenever the worker reports, whichever callback changed it.
    """

    def __init__(self, runtime_context, *names):
        group = runtime_context.get_metrics_group().add_group("cdpflow")
        self.values = dict.fromkeys(names, 0)
        for name in names:
            group.gauge(name, lambda name=name: self.values[name])
        self.group = group

    def inc(self, name: str, n: int = 1) -> None:
        self.values[name] += n

    def set(self, name: str, value: int) -> None:
        self.values[name] = value


def _rules(spec: Dict[str, Any]):
    from cdpflow.core.governance import SuppressionKey, identity_rules, GovernanceState, LEGACY_KEY_ID
    gov = spec["governance"]
    state = GovernanceState(frozenset((k or LEGACY_KEY_ID, h) for k, h in gov["suppressed"]),
                            frozenset((tuple(a), tuple(b)) for a, b in gov["separations"]),
                            frozenset((tuple(i), pid, int(at)) for i, pid, at in gov.get("names", ())))
    secret = spec.get("suppression_secret")
    key = SuppressionKey.from_secret(secret) if secret else SuppressionKey(LEGACY_KEY_ID)
    return identity_rules(spec["config"], state, key)


def build(env, spec: Dict[str, Any]):
    """Wires the job into `env` (a StreamExecutionEnvironment) from the spec."""
    from pyflink.common import Duration, Types, WatermarkStrategy
    from pyflink.common.serialization import SimpleStringSchema
    from pyflink.common.watermark_strategy import TimestampAssigner
    from pyflink.datastream import OutputTag
    from pyflink.datastream.connectors.kafka import KafkaOffsetsInitializer, KafkaSource
    from pyflink.datastream.functions import KeyedProcessFunction, ProcessFunction
    from pyflink.datastream.state import ListStateDescriptor, StateTtlConfig, ValueStateDescriptor
    from pyflink.common.time import Time

    config = spec["config"]
    bootstrap = spec["bootstrap"]
    from cdpflow.core.features import FeatureSettings
    PICKLED, BYTES = Types.PICKLED_BYTE_ARRAY(), Types.PRIMITIVE_ARRAY(Types.BYTE())
    dead_tag = OutputTag(DEAD_LETTER_TAG_NAME, PICKLED)
    transitions_tag = OutputTag(TRANSITIONS_TAG_NAME, PICKLED)
    settings = FeatureSettings.from_config(config)
    features = config.get("features") or {}
    allowed_us = int(float(features.get("allowed_lateness_hours", 72)) * 3600 * 1_000_000)
    future_us = int(float(features.get("max_future_skew_hours", 24)) * 3600 * 1_000_000)
    horizon_us = int(float(config["dedup"]["horizon_hours"]) * 3600 * 1_000_000)
    region = config["default_region"]

    class EventTime(TimestampAssigner):
        """The event's own time (skew-corrected as normalising does), else its Kafka timestamp."""

        def extract_timestamp(self, value, record_timestamp):
            try:
                return event_time(orjson.loads(value))[0] // 1000
            except Exception:  # noqa: BLE001 (a broken record: Ingest dead-letters it)
                return record_timestamp

    class Ingest(ProcessFunction):
        def open(self, runtime_context):
            from cdpflow.schemas import EventValidator
            self.validator = EventValidator()
            self.counts = _Counts(runtime_context, "received", "succeeded", "dead_lettered")

        def process_element(self, value, ctx):
            self.counts.inc("received")
            result = parse_line(value, self.validator)
            if not isinstance(result, DeadLetter):
                result = normalize(result, region)
            if not isinstance(result, DeadLetter):
                result = time_refusal(result, allowed_us, future_us) or result
            if isinstance(result, DeadLetter):
                self.counts.inc("dead_lettered")
                yield dead_tag, dead_letter_row(result, identifiers_of_raw(result.raw, region))
                return
            self.counts.inc("succeeded")
            yield result

    class Dedup(KeyedProcessFunction):
        def open(self, runtime_context):
            descriptor = ValueStateDescriptor("first_received_at", Types.LONG())
            # forgotten once no copy within the horizon can still arrive in time (as the Beam stream)
            descriptor.enable_time_to_live(StateTtlConfig.new_builder(
                Time.milliseconds((horizon_us + allowed_us) // 1000)).build())
            self.first = runtime_context.get_state(descriptor)
            self.counts = _Counts(runtime_context, "received", "succeeded", "deduplicated", "dead_lettered")

        def process_element(self, event, ctx):
            self.counts.inc("received")
            seen = self.first.value()
            decision = classify_copy(seen, event, horizon_us)
            if decision == FIRST:
                self.first.update(event.received_at)
                self.counts.inc("succeeded")
                yield event
            elif decision == DUPLICATE:
                self.counts.inc("deduplicated")
            else:
                self.counts.inc("dead_lettered")
                letter = repeat_too_late(event, seen, horizon_us)
                yield dead_tag, dead_letter_row(letter, list(event.identifiers))

    class Enrich(ProcessFunction):
        """Catalog, reporting-currency revenue, user agent, campaign (`cdpflow.core.enrich`).

        The catalog and rates files travel in the spec (read at submit time), so TaskManagers on
        other machines need no shared file system; each worker parses them once.
        """

        def open(self, runtime_context):
            reference = spec.get("reference") or {}
            self.catalog = read_catalog(io.StringIO(reference.get("catalog") or ""))
            self.rates = Rates.read(io.StringIO(reference.get("rates") or ""), config["reporting_currency"])
            self.counts = _Counts(runtime_context, "revenue_without_rate", "products_not_in_catalog")

        def process_element(self, event, ctx):
            enriched, unknown, no_rate = enrich_event(event, self.catalog, self.rates)
            self.counts.inc("products_not_in_catalog", unknown)
            self.counts.inc("revenue_without_rate", int(no_rate))
            yield enriched

    class Batching(KeyedProcessFunction):
        """Keyed by bucket: elements buffered in list state and handled `batch_size` at a time, or
        `wait_ms` after the first, or when the watermark passes them (`handle`, per subclass).
        A batch restored from a checkpoint is handled again."""

        def __init__(self, state_name: str, batch_size: int = 200, wait_ms: int = 200):
            self.state_name, self.batch_size, self.wait_ms = state_name, batch_size, wait_ms

        def open_buffer(self, runtime_context, *counted):
            self.pending = runtime_context.get_list_state(ListStateDescriptor(self.state_name,
                                                                              Types.PICKLED_BYTE_ARRAY()))
            self.count = runtime_context.get_state(ValueStateDescriptor(f"{self.state_name}_count", Types.INT()))
            self.since = runtime_context.get_state(ValueStateDescriptor(f"{self.state_name}_since", Types.LONG()))
            self.counts = _Counts(runtime_context, "received", *counted, "batches", "last_batch_size")

        def process_element(self, element, ctx):
            self.counts.inc("received")
            self.pending.add(element)
            count = (self.count.value() or 0) + 1
            self.count.update(count)
            now = ctx.timer_service().current_processing_time()
            if count > 1 and now - (self.since.value() or now) > 2 * self.wait_ms:
                # The batch should have been handled by its timer already (a timer can be lost
                # with a restore or a drain): handled now, with this element, rather than never.
                yield from self._flush()
                return
            if count == 1:
                self.since.update(now)
                # after wait_ms, or once the watermark passes the element (which is also what
                # flushes it when a bounded input ends: Flink drops processing-time timers then
                # and fires every event-time timer)
                timers = ctx.timer_service()
                timers.register_processing_time_timer(now + self.wait_ms)
                timers.register_event_time_timer(max(ctx.timestamp() or 0, 0))
            if count >= self.batch_size:
                yield from self._flush()

        def on_timer(self, timestamp, ctx):
            yield from self._flush()

        def _flush(self):
            items = list(self.pending.get() or [])
            self.pending.clear()
            self.count.clear()
            self.since.clear()
            if items:
                self.counts.inc("batches")
                self.counts.set("last_batch_size", len(items))
                yield from self.handle(items)

        def handle(self, items):
            raise NotImplementedError

    class ResolveIdentity(Batching):
        """Resolves a bucket's events in one store transaction per batch."""

        def __init__(self, store_uri: str):
            super().__init__("pending")
            self.store_uri = store_uri

        def open(self, runtime_context):
            from cdpflow.core.identity import open_identity_store
            self.store = open_identity_store(self.store_uri, _rules(spec))
            self.open_buffer(runtime_context, "succeeded", "dead_lettered", "suppressed", "profiles_moved")
            # which Python process works for this subtask (the tests read it back over REST)
            self.counts.group.gauge("python_pid", lambda: os.getpid())

        def close(self):
            self.store.close()

        def handle(self, items):
            events = sorted(items, key=lambda e: (e.timestamp, e.message_id))
            decisions, epoch, moves = self.store.resolve_batch_with_moves(
                (e.message_id, e.timestamp, e.identifiers) for e in events)
            self.counts.inc("profiles_moved", len(moves))
            # As the Beam stream: decisions were taken before this batch's moves (epoch - 1 when it
            # made any), and the moves are stamped with the batch's latest event time.
            taken = epoch - 1 if moves else epoch
            latest = max(e.timestamp for e in events)
            for event, decision in zip(events, decisions):
                if decision.status == OK:
                    self.counts.inc("succeeded")
                    yield "event", decision.key, event.replace(profile_id=decision.profile_id), taken
                elif decision.status == SUPPRESSED:
                    self.counts.inc("suppressed")  # a forgotten person's event: counted, written nowhere
                else:
                    self.counts.inc("dead_lettered")
                    letter = DeadLetter(event.raw, "identity", "every identifier is a blocked value: " + ", ".join(
                        f"{t}={v!r}" for t, v in event.identifiers), event.schema_version, event.received_at)
                    yield dead_tag, dead_letter_row(letter, list(event.identifiers))
            # a retried batch tells the features again about the moves its events made the first time
            repeated = [(key, profile_id, moved_at) for moved_at, key, profile_id in self.store.replayed_moves]
            repeated += [(key, profile_id, epoch) for key, profile_id in sorted(moves.items())]
            for key, profile_id, at_epoch in repeated:
                yield "move", key, (profile_id, at_epoch), latest

    class IdentifierState(KeyedProcessFunction):
        """Keyed by node key: `cdpflow.core.stream_state.IdentifierMachine` over Flink state."""

        def open(self, runtime_context):
            self.machine = IdentifierMachine(settings.session_timeout_us)
            self.state = runtime_context.get_state(ValueStateDescriptor("state", BYTES))
            self.owner = runtime_context.get_state(ValueStateDescriptor("owner", BYTES))
            self.seen = runtime_context.get_state(ValueStateDescriptor("seen", BYTES))
            self.counts = _Counts(runtime_context, "events", "handovers", "redelivered")

        def process_element(self, message, ctx):
            kind, key, payload, extra = message
            if kind == "event":
                event, epoch, when = payload, extra, payload.timestamp
                now_seen = IdentifierMachine.first_delivery(_decoded(self.seen), event.message_id)
                if now_seen is None:
                    self.counts.inc("redelivered")  # a batch resolved again after a restore: folded once
                    return
                self.seen.update(encode_state(now_seen))
                self.counts.inc("events")
                owner, held, out, moved = self.machine.on_event(key, _decoded(self.owner), _decoded(self.state),
                                                                event, epoch)
                self.state.update(encode_state(held))
            else:
                (profile_id, epoch), when = payload, extra
                owner, out, moved = self.machine.on_move(key, _decoded(self.owner), _decoded(self.state),
                                                         profile_id, epoch)
            if moved:
                self.counts.inc("handovers")
            self.owner.update(encode_state(owner))
            for profile_id, body in out:
                yield profile_id, body, when

    class ProfileFeatures(KeyedProcessFunction):
        """Keyed by profile: `cdpflow.core.stream_state.ProfileMachine` over Flink state and timers.

        One event-time timer at a time (a sooner one replaces it), as on Beam. A message behind
        the watermark is applied at once (Flink fires a timer set behind the watermark only when
        the watermark next moves, and an idle stream's does not).

        The timer the state says is due (`pending`) is a floor, not an identity: PyFlink can lose
        the timer operations a worker sent just before a stop-with-savepoint while the state it
        wrote with them is kept (seen: the replaced timer fired after the resume, the new one
        never did). So any timer at or after the due time fires the profile, and a message that
        finds the due time already behind the watermark fires it first.
        """

        def open(self, runtime_context):
            from cdpflow.core.identity import open_identity_store
            self.machine = ProfileMachine(settings, spec.get("until"))
            self.store = open_identity_store(spec["identity_store"])  # read only: identifier counts
            self.members = runtime_context.get_state(ValueStateDescriptor("members", BYTES))
            self.emitted = runtime_context.get_state(ValueStateDescriptor("emitted", BYTES))
            self.pending = runtime_context.get_state(ValueStateDescriptor("pending", Types.LONG()))
            self.counts = _Counts(runtime_context, "updates", "rows", "stale_messages", "retracted_transitions",
                                  "overdue_timers")

        def close(self):
            self.store.close()

        def process_element(self, message, ctx):
            profile_id, (kind, key, seq, payload), when = message
            held = self.machine.receive(_decoded(self.members), kind, key, seq, payload)
            if held is None:
                self.counts.inc("stale_messages")
                return
            self.counts.inc("updates")
            timers = ctx.timer_service()
            due, watermark = self.pending.value(), timers.current_watermark()
            if due is not None and watermark is not None and due <= watermark:
                # its timer should have fired before this message: lost (see the class docstring)
                self.counts.inc("overdue_timers")
                self.pending.clear()
                yield from self._fire(profile_id, due, timers)
            self.members.update(encode_state(held))
            at = timer_ms(when)
            if watermark is not None and at <= watermark:
                yield from self._fire(profile_id, at, timers)
            else:
                self._schedule(at, timers)

        def on_timer(self, timestamp, ctx):
            due = self.pending.value()
            if due is None or timestamp < due:
                return  # a replaced timer, or one left from before a later one was set
            self.pending.clear()
            yield from self._fire(ctx.get_current_key(), timestamp, ctx.timer_service())

        def _schedule(self, at, timers):
            """The one timer of the profile at `at` (ms), unless it is set sooner already."""
            due = self.pending.value()
            if due is None or at < due:
                if due is not None:
                    timers.delete_event_time_timer(due)
                timers.register_event_time_timer(at)
                self.pending.update(at)

        def _fire(self, profile_id, at_ms, timers):
            count = self.store.identifier_count(profile_id)
            row, transitions, now_emitted, following = self.machine.on_timer(
                profile_id, at_ms * 1000, _decoded(self.members), _decoded(self.emitted),
                int(time.time() * 1_000_000), count)
            if count == 0:
                self.members.clear()  # forgotten or absorbed: what its identifiers sent is dropped
            self.emitted.update(encode_state(now_emitted))
            if row is not None:
                self.counts.inc("rows")
                yield row
            for transition in transitions:
                if transition.get("retracted"):
                    self.counts.inc("retracted_transitions")
                yield transitions_tag, transition
            if following is not None:
                self._schedule(timer_ms(following), timers)

    class ScoreRows(ProcessFunction):
        """Each profile row scored with the CLV model as it comes (`cdpflow.models.clv.score_rows`).

        Not buffered: a buffer of rows waiting for a timer lost its rows when the job was drained
        (stop-with-savepoint --drain drops processing-time timers) or after a restore, and the
        features stage has already recorded them as emitted, so nothing would send them again.
        """

        def __init__(self, model):
            self.model = model

        def open(self, runtime_context):
            self.counts = _Counts(runtime_context, "rows", "scored")

        def process_element(self, row, ctx):
            self.counts.inc("rows")
            if row.get("deleted"):
                yield row
                return
            (out,), scored = score_rows(self.model, [row])
            self.counts.inc("scored", scored)
            yield out

    class ScoreClusters(Batching):
        """Keyed by profile bucket: rows scored in batches by the registry's promoted model, followed.

        The model is loaded once per worker in its portable form (NumPy arrays; this venv's
        scikit-learn is not the one it was trained with, and nothing here is unpickled), checked
        from the registry's pointer down, and the pointer re-read every `models.reload_seconds`:
        a promotion or a rollback reaches the running job. A row is buffered until its batch
        fills, 200 ms pass or the watermark passes it (`Batching`, checkpointed list state);
        rows of one profile stay in one bucket, in order. Deletion rows pass unscored.
        """

        def __init__(self, registry: str, every_s: float):
            super().__init__("rows", batch_size=500)
            self.registry, self.every_s = registry, every_s

        def open(self, runtime_context):
            from cdpflow.models.registry import follow_models
            self.models = follow_models(self.registry, self.every_s)
            self.open_buffer(runtime_context, "scored", "shadow_scored")

        def handle(self, items):
            from cdpflow.models.registry import score_rows
            live = [i for i, row in enumerate(items) if not row.get("deleted")]
            models = self.models.get()
            scored = score_rows(models, [items[i] for i in live]) if live else None
            if scored is not None:
                for i, one in zip(live, scored):
                    items[i] = dict(items[i], _clusters=one)
                self.counts.inc("scored", len(live))
                if models[1] is not None:
                    self.counts.inc("shadow_scored", len(live))
            yield from items

    class Memberships(KeyedProcessFunction):
        """Keyed by profile: `cdpflow.core.segments.MembershipMachine` over Flink state, with the
        rules followed (a rules file named by `segments.file` is re-read every
        `segments.reload_seconds` on each worker)."""

        def open(self, runtime_context):
            from cdpflow.config import rules_reader
            from cdpflow.core.segments import MembershipMachine, follow_rules
            self.machine = MembershipMachine(config["segments"], config["lifecycle"])
            self.rules = follow_rules(config["segments"], rules_reader(config["segments"]))
            self.held = runtime_context.get_state(ValueStateDescriptor("memberships", BYTES))
            self.counts = _Counts(runtime_context, "entered", "exited", "shadow_would_move", "rules_refused")

        def process_element(self, row, ctx):
            held, changes = self.machine.on_row(row["profile_id"], row, _decoded(self.held), self.rules.get())
            self.held.update(encode_state(held))
            self.counts.set("rules_refused", self.rules.failures)
            if self.machine.shadow_would_move(row, held):
                self.counts.inc("shadow_would_move")
            for change in changes:
                self.counts.inc("entered" if change["direction"] == "enter" else "exited")
                yield change

    def kafka_source(topic: str):
        builder = (KafkaSource.builder().set_bootstrap_servers(bootstrap).set_topics(topic)
                   .set_group_id(spec.get("group", "cdpflow-flink"))
                   .set_starting_offsets(KafkaOffsetsInitializer.earliest())
                   .set_value_only_deserializer(SimpleStringSchema())
                   .set_property("isolation.level", "read_committed"))
        if spec.get("bounded"):
            # The topic as it is at submit time, then the job finishes (the end of input fires
            # every timer: with `until`, every profile's last row is as of it).
            builder = builder.set_bounded(KafkaOffsetsInitializer.latest())
        return builder.build()

    watermarks = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_seconds(spec.get("out_of_order_s", 5)))
                  .with_idleness(Duration.of_seconds(spec.get("idle_s", 10)))
                  .with_timestamp_assigner(EventTime()))
    lines = env.from_source(kafka_source(spec["raw_topic"]), watermarks, "ReadRaw").uid("read-raw")
    checked = lines.process(Ingest(), output_type=PICKLED).uid("ingest").name("Ingest")
    unique = (checked.key_by(lambda e: e.message_id, key_type=Types.STRING())
              .process(Dedup(), output_type=PICKLED).uid("dedup").name("Dedup"))
    enriched = unique.process(Enrich(), output_type=PICKLED).uid("enrich").name("Enrich")
    resolved = (enriched.key_by(lambda e: zlib.crc32(e.message_id.encode()) % BUCKETS, key_type=Types.INT())
                .process(ResolveIdentity(spec["identity_store"]), output_type=PICKLED)
                .uid("resolve-identity").name("ResolveIdentity"))
    to_profiles = (resolved.key_by(lambda m: m[1], key_type=Types.STRING())
                   .process(IdentifierState(), output_type=PICKLED).uid("identifier-state").name("IdentifierState"))
    features = (to_profiles.key_by(lambda m: m[0], key_type=Types.STRING())
                .process(ProfileFeatures(), output_type=PICKLED).uid("profile-features").name("ProfileFeatures"))
    profiles = (features.process(ScoreRows(spec.get("clv_model") or {"status": "no model", "model_id": None}),
                                 output_type=PICKLED).uid("score-clv").name("PredictCustomerValue"))
    if spec.get("registry"):
        profiles = (profiles.key_by(lambda r: zlib.crc32(r["profile_id"].encode()) % BUCKETS, key_type=Types.INT())
                    .process(ScoreClusters(spec["registry"], float(config["models"]["reload_seconds"])),
                             output_type=PICKLED).uid("score-clusters").name("ScoreClusters"))
    changes = (profiles.key_by(lambda r: r["profile_id"], key_type=Types.STRING())
               .process(Memberships(), output_type=PICKLED).uid("segments").name("AssignSegments"))
    dead = checked.get_side_output(dead_tag).union(unique.get_side_output(dead_tag),
                                                   resolved.get_side_output(dead_tag))

    from pyflink.common import Row

    def kafka_row(record):
        """A (topic, key, value, headers) record as the Row the Kafka table sink takes."""
        topic, key, value, headers = record
        return Row(topic, key, value, dict(headers) if headers else None)

    record = Types.ROW_NAMED(["topic", "k", "v", "headers"],
                             [Types.STRING(), BYTES, BYTES, Types.MAP(Types.STRING(), BYTES)])
    records = (resolved.filter(lambda m: m[0] == "event").map(lambda m: kafka_row(event_record(m[2])),
                                                                 output_type=record).name("EventRecords")
               .union(profiles.map(lambda r: kafka_row(profile_record(r)), output_type=record).name("ProfileRecords"),
                      changes.map(lambda c: kafka_row(segment_record(c)), output_type=record).name("SegmentRecords"),
                      features.get_side_output(transitions_tag).map(lambda t: kafka_row(transition_record(t)),
                                                                    output_type=record).name("TransitionRecords"),
                      dead.map(lambda d: kafka_row(dead_letter_record(d)), output_type=record)
                      .name("DeadLetterRecords")))
    write_to_kafka(env, records, bootstrap, f"{spec.get('transactional_prefix', 'cdpflow')}-out",
                   [spec["rows_topic"], spec["dead_letter_topic"], spec["profiles_topic"], spec["segments_topic"]])


def write_to_kafka(env, records, bootstrap: str, transactional_prefix: str, topics):
    """One exactly-once Kafka sink for every output: each record names its topic, key, value
    (None: a tombstone) and headers.

    PyFlink's DataStream `KafkaRecordSerializationSchema` sets one topic and serialises keys from
    the whole element, so the records go through the Table API's Kafka connector, whose `topic`
    and `headers` are writable metadata columns, with the raw format for key and value; the
    insert is attached to this job's graph, so it checkpoints (and commits) with the rest.
    """
    from pyflink.table import DataTypes, Schema, StreamTableEnvironment
    t_env = StreamTableEnvironment.create(env)
    table = t_env.from_data_stream(records, Schema.new_builder()
                                   .column("topic", DataTypes.STRING()).column("k", DataTypes.BYTES())
                                   .column("v", DataTypes.BYTES())
                                   .column("headers", DataTypes.MAP(DataTypes.STRING(), DataTypes.BYTES())).build())
    t_env.execute_sql(f"""
        CREATE TEMPORARY TABLE cdpflow_out (
            `topic` STRING METADATA,
            `k` BYTES,
            `v` BYTES,
            `headers` MAP<STRING, BYTES> METADATA
        ) WITH (
            'connector' = 'kafka',
            'topic' = '{";".join(topics)}',
            'properties.bootstrap.servers' = '{bootstrap}',
            'key.format' = 'raw',
            'key.fields' = 'k',
            'value.format' = 'raw',
            'value.fields-include' = 'EXCEPT_KEY',
            'sink.delivery-guarantee' = 'exactly-once',
            'sink.transactional-id-prefix' = '{transactional_prefix}',
            'properties.transaction.timeout.ms' = '{TRANSACTION_TIMEOUT_MS}'
        )""")
    statements = t_env.create_statement_set()
    statements.add_insert("cdpflow_out", table)
    statements.attach_as_datastream()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the job's JSON spec (written by `cdpflow flink submit`)")
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as handle:
        spec = json.load(handle)
    from pyflink.common import Configuration
    from pyflink.datastream import CheckpointingMode, StreamExecutionEnvironment
    settings = Configuration()
    settings.set_string("state.backend.type", "rocksdb")
    settings.set_string("execution.checkpointing.incremental", "true")
    settings.set_string("python.executable", spec["python"])
    env = StreamExecutionEnvironment.get_execution_environment(settings)
    env.add_jars(*[f"file://{jar}" for jar in spec["jars"]])
    env.set_parallelism(int(spec.get("parallelism", 2)))
    env.enable_checkpointing(int(spec.get("checkpoint_ms", 5000)), CheckpointingMode.EXACTLY_ONCE)
    build(env, spec)
    env.execute_async(spec.get("name", "cdpflow-stream"))


if __name__ == "__main__":
    main()
