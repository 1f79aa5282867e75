"""cdpflow's stream as a native PyFlink job: `cdp.events.raw` in, the warehouse's topics out.

Submitted by `cdpflow flink submit` (which runs `flink run -py` with this file in the Flink
venv); it can also be run by hand:

    flink run -m 127.0.0.1:8081 -py cdpflow/flink/job.py -pyexec .cache/flink-venv/bin/python \
        -pyclientexec .cache/flink-venv/bin/python -- --spec SPEC.json

    KafkaSource(cdp.events.raw, event-time watermarks: bounded out-of-orderness + idleness)
      -> Ingest        parse, validate, normalise, lateness and future checks   (cdpflow.core.ingest)
      -> key by messageId -> Dedup   first copy passes; keyed state with a TTL   (cdpflow.core.dedup)
      -> key by bucket -> ResolveIdentity   batched against the shared identity store (Redis)
      -> KafkaSink(cdp.warehouse.rows: accepted events with their profile), EXACTLY_ONCE
      -> KafkaSink(cdp.events.deadletter: every refused record), EXACTLY_ONCE

Every function is a thin adapter over `cdpflow.core` (the Beam stream's DoFns use the same
functions), so both engines accept, refuse and attribute the same records. The warehouse is
written by `cdpflow load` only, never by the job's workers. The features, segments and change
topics of the Beam stream are still to come here, on the same core state machines.

State and restarts: dedup state is keyed by messageId with a TTL of the dedup horizon plus the
allowed lateness; the identity stage buffers events in keyed list state until a batch is full
or a processing-time timer fires, so a batch restored from a checkpoint is resolved again, and
the identity store gives back the decisions its first attempt recorded by messageId. Operator
uids are fixed (savepoints find state by them). The state backend is RocksDB: state lives on
local disk, so it is not bounded by the TaskManager's heap and checkpoints are incremental.

The job reads its settings from a JSON spec (`--spec`): bootstrap servers, the identity store
URI, the configuration and the identity rules' governance as the warehouse held it at submit
time (forgets and splits made later reach the workers through the identity store itself, which
holds their hashes and separations).
"""
from __future__ import annotations

import argparse
import json
import os
import zlib
from typing import Any, Dict

import orjson

# Imported once per process (the functions below run per record on the workers): the core only,
# never Beam or PyFlink, which `build` imports for the client.
from cdpflow.core.dedup import DUPLICATE, FIRST, classify_copy, repeat_too_late
from cdpflow.core.governance import identifiers_of_raw
from cdpflow.core.identity import OK, SUPPRESSED
from cdpflow.core.ingest import normalize, parse_line, time_refusal
from cdpflow.core.normalize import event_time
from cdpflow.core.rows import dead_letter_row, event_row, to_json_line
from cdpflow.schemas.records import DeadLetter

BUCKETS = 16  # keys of the identity stage: batches form per key, spread over the subtasks
DEAD_LETTER_TAG_NAME = "dead-letters"


def _rules(spec: Dict[str, Any]):
    from cdpflow.core.governance import SuppressionKey, identity_rules, GovernanceState, LEGACY_KEY_ID
    gov = spec["governance"]
    state = GovernanceState(frozenset((k or LEGACY_KEY_ID, h) for k, h in gov["suppressed"]),
                            frozenset((tuple(a), tuple(b)) for a, b in gov["separations"]))
    secret = spec.get("suppression_secret")
    key = SuppressionKey.from_secret(secret) if secret else SuppressionKey(LEGACY_KEY_ID)
    return identity_rules(spec["config"], state, key)


def build(env, spec: Dict[str, Any]):
    """Wires the job into `env` (a StreamExecutionEnvironment) from the spec."""
    from pyflink.common import Duration, Types, WatermarkStrategy
    from pyflink.common.serialization import SimpleStringSchema
    from pyflink.common.watermark_strategy import TimestampAssigner
    from pyflink.datastream import OutputTag
    from pyflink.datastream.connectors.base import DeliveryGuarantee
    from pyflink.datastream.connectors.kafka import (KafkaOffsetsInitializer, KafkaRecordSerializationSchema,
                                                     KafkaSink, KafkaSource)
    from pyflink.datastream.functions import KeyedProcessFunction, ProcessFunction
    from pyflink.datastream.state import ListStateDescriptor, StateTtlConfig, ValueStateDescriptor
    from pyflink.common.time import Time

    config = spec["config"]
    bootstrap = spec["bootstrap"]
    dead_tag = OutputTag(DEAD_LETTER_TAG_NAME, Types.STRING())
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
            metrics = runtime_context.get_metrics_group().add_group("cdpflow")
            self.received, self.succeeded, self.dead_lettered = (
                metrics.counter("received"), metrics.counter("succeeded"), metrics.counter("dead_lettered"))

        def process_element(self, value, ctx):
            self.received.inc()
            result = parse_line(value, self.validator)
            if not isinstance(result, DeadLetter):
                result = normalize(result, region)
            if not isinstance(result, DeadLetter):
                result = time_refusal(result, allowed_us, future_us) or result
            if isinstance(result, DeadLetter):
                self.dead_lettered.inc()
                yield dead_tag, to_json_line(dead_letter_row(result, identifiers_of_raw(result.raw, region)))
                return
            self.succeeded.inc()
            yield result

    class Dedup(KeyedProcessFunction):
        def open(self, runtime_context):
            descriptor = ValueStateDescriptor("first_received_at", Types.LONG())
            # forgotten once no copy within the horizon can still arrive in time (as the Beam stream)
            descriptor.enable_time_to_live(StateTtlConfig.new_builder(
                Time.milliseconds((horizon_us + allowed_us) // 1000)).build())
            self.first = runtime_context.get_state(descriptor)
            metrics = runtime_context.get_metrics_group().add_group("cdpflow")
            self.received, self.succeeded, self.deduplicated, self.dead_lettered = (
                metrics.counter("received"), metrics.counter("succeeded"), metrics.counter("deduplicated"),
                metrics.counter("dead_lettered"))

        def process_element(self, event, ctx):
            self.received.inc()
            seen = self.first.value()
            decision = classify_copy(seen, event, horizon_us)
            if decision == FIRST:
                self.first.update(event.received_at)
                self.succeeded.inc()
                yield event
            elif decision == DUPLICATE:
                self.deduplicated.inc()
            else:
                self.dead_lettered.inc()
                letter = repeat_too_late(event, seen, horizon_us)
                yield dead_tag, to_json_line(dead_letter_row(letter, list(event.identifiers)))

    class ResolveIdentity(KeyedProcessFunction):
        """Buffers a bucket's events and resolves them in one store transaction per batch."""

        def __init__(self, store_uri: str, batch_size: int = 200, wait_ms: int = 200):
            self.store_uri, self.batch_size, self.wait_ms = store_uri, batch_size, wait_ms

        def open(self, runtime_context):
            from cdpflow.core.identity import open_identity_store
            self.store = open_identity_store(self.store_uri, _rules(spec))
            self.pending = runtime_context.get_list_state(ListStateDescriptor("pending", Types.PICKLED_BYTE_ARRAY()))
            self.count = runtime_context.get_state(ValueStateDescriptor("pending_count", Types.INT()))
            metrics = runtime_context.get_metrics_group().add_group("cdpflow")
            self.received, self.succeeded, self.dead_lettered, self.suppressed, self.merges = (
                metrics.counter("received"), metrics.counter("succeeded"), metrics.counter("dead_lettered"),
                metrics.counter("suppressed"), metrics.counter("profiles_moved"))
            self.batch = metrics.distribution("batch_size")
            # which Python process works for this subtask (the tests read it back over REST)
            metrics.gauge("python_pid", lambda: os.getpid())

        def close(self):
            self.store.close()

        def process_element(self, event, ctx):
            self.received.inc()
            self.pending.add(event)
            count = (self.count.value() or 0) + 1
            self.count.update(count)
            if count == 1:
                ctx.timer_service().register_processing_time_timer(
                    ctx.timer_service().current_processing_time() + self.wait_ms)
            if count >= self.batch_size:
                yield from self._flush()

        def on_timer(self, timestamp, ctx):
            yield from self._flush()

        def _flush(self):
            events = sorted(self.pending.get() or [], key=lambda e: (e.timestamp, e.message_id))
            self.pending.clear()
            self.count.clear()
            if not events:
                return
            self.batch.update(len(events))
            decisions, _, moves = self.store.resolve_batch_with_moves(
                (e.message_id, e.timestamp, e.identifiers) for e in events)
            self.merges.inc(len(moves))
            for event, decision in zip(events, decisions):
                if decision.status == OK:
                    self.succeeded.inc()
                    yield to_json_line({"table": "events",
                                        "row": event_row(event.replace(profile_id=decision.profile_id))})
                elif decision.status == SUPPRESSED:
                    self.suppressed.inc()  # a forgotten person's event: counted, written nowhere
                else:
                    self.dead_lettered.inc()
                    letter = DeadLetter(event.raw, "identity", "every identifier is a blocked value: " + ", ".join(
                        f"{t}={v!r}" for t, v in event.identifiers), event.schema_version, event.received_at)
                    yield dead_tag, to_json_line(dead_letter_row(letter, list(event.identifiers)))

    source_builder = (KafkaSource.builder().set_bootstrap_servers(bootstrap).set_topics(spec["raw_topic"])
                      .set_group_id(spec.get("group", "cdpflow-flink"))
                      .set_starting_offsets(KafkaOffsetsInitializer.earliest())
                      .set_value_only_deserializer(SimpleStringSchema())
                      .set_property("isolation.level", "read_committed"))
    watermarks = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_seconds(spec.get("out_of_order_s", 5)))
                  .with_idleness(Duration.of_seconds(spec.get("idle_s", 10)))
                  .with_timestamp_assigner(EventTime()))
    lines = env.from_source(source_builder.build(), watermarks, "ReadRaw").uid("read-raw")
    checked = lines.process(Ingest(), output_type=Types.PICKLED_BYTE_ARRAY()).uid("ingest").name("Ingest")
    unique = (checked.key_by(lambda e: e.message_id, key_type=Types.STRING())
              .process(Dedup(), output_type=Types.PICKLED_BYTE_ARRAY()).uid("dedup").name("Dedup"))
    resolved = (unique.key_by(lambda e: zlib.crc32(e.message_id.encode()) % BUCKETS, key_type=Types.INT())
                .process(ResolveIdentity(spec["identity_store"]), output_type=Types.STRING())
                .uid("resolve-identity").name("ResolveIdentity"))
    dead = checked.get_side_output(dead_tag).union(unique.get_side_output(dead_tag),
                                                   resolved.get_side_output(dead_tag))

    def sink(topic: str, prefix: str):
        return (KafkaSink.builder().set_bootstrap_servers(bootstrap)
                .set_record_serializer(KafkaRecordSerializationSchema.builder().set_topic(topic)
                                       .set_value_serialization_schema(SimpleStringSchema()).build())
                .set_delivery_guarantee(DeliveryGuarantee.EXACTLY_ONCE)
                .set_transactional_id_prefix(f"{spec.get('transactional_prefix', 'cdpflow')}-{prefix}")
                # no longer than the broker's transaction.max.timeout.ms (15 min by default)
                .set_property("transaction.timeout.ms", str(10 * 60 * 1000))
                .build())

    resolved.sink_to(sink(spec["rows_topic"], "rows")).uid("write-rows").name("WriteWarehouseRows")
    dead.sink_to(sink(spec["dead_letter_topic"], "dead")).uid("write-dead-letters").name("WriteDeadLetters")


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
