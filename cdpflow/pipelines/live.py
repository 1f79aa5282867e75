"""`cdpflow stream`: the live stream from `cdp.events.raw` to the change topics, on Prism (or Dataflow).

    cdpflow stream --bootstrap 127.0.0.1:9092 --warehouse out/cdp.duckdb [--runner prism]
                   [--from earliest|latest|committed] [--until ISO-TIME] [--no-loader]

    ReadKafkaTopic(cdp.events.raw) -> the streaming graph of `replay` (`build_stream`)
    ReadKafkaTopic(cdp.control) -> ApplyControl (split commands: moves into the feature state)
        -> AssignSegmentsStream (clusters: RunInference with the promoted model; rules) -> WriteToKafka:
             cdp.profiles.changes   profile rows (a tombstone when a profile is absorbed)
             cdp.segments.changes   enter/exit changes, with idempotency keys
             cdp.events.deadletter  dead letters
             cdp.warehouse.rows     accepted events (with their profile) and lifecycle transitions

The stream writes only to Kafka; the warehouse has one writer, `cdpflow load`
(`cdpflow.loader`), which commits what the topics hold together with their offsets. By
default `cdpflow stream` runs that loader in a thread beside the pipeline (the demo's single
command); with `--no-loader` it leaves the loading to a `cdpflow load` of its own.

Where a run starts. The stream's state is rebuilt from the warehouse when it starts: the loader
first catches up with everything already on the output topics, then the warehouse's accepted
events go through the graph before new ones (as in `replay --warehouse`), its memberships seed
the segment state, and its governance (forgotten identifiers, separations) rules identity and
dead letters. The identity store (`--identity-store`, default a SQLite file beside the
warehouse) is kept across runs, so an event resolved before a crash gets back the decision it
had. `--from earliest` (the default) then reads `cdp.events.raw` from the start of its
retention: events the warehouse holds are recognised as repeats by messageId and counted once;
a change re-sent for a re-read event carries the key it had, and the loader skips keys it has.
`latest` skips the backlog; `committed` starts at the offsets the consumer group committed.

`--until` ends a run: the source stops at records received after that time, every profile gets
a last row as of it, and the command returns when the loader has committed everything (a
bounded catch-up run, and how the tests compare the stream with `cdpflow run --as-of`).

Clusters and rules follow their sources while the stream runs: the promoted model of the
registry (`models.registry`, else `<warehouse>.models`) scores each profile row through
RunInference (`cdpflow.transforms.clusters`), its pointer re-read every `models.reload_seconds`,
so `cdpflow models promote|rollback` reaches the running stream; a rules file named by
`segments.file` is re-read every `segments.reload_seconds`. A change applies to each profile
from its next row on (an event, a lifecycle timer, the last row at --until); `cdpflow run`
re-assigns everyone at once.

Runner: Prism (`make prism`); the BundleBased DirectRunner rejects the Kafka source's
splittable DoFn. On Dataflow the same graph is submitted with this source; Beam's
`ReadFromKafka` (or Pub/Sub) could take its place, since what follows takes raw lines.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, Optional

import apache_beam as beam

from cdpflow.core.governance import WarehouseGovernance
from cdpflow.core.identity import open_identity_store, sqlite_path
from cdpflow.core.rows import dead_letter_record, event_record as core_event_record, profile_record, segment_record, \
    transition_record
from cdpflow.core.segments import held_from_memberships
from cdpflow.errors import BadInput
from cdpflow.io.kafka_sink import WriteToKafka
from cdpflow.io.kafka_source import ReadKafkaTopic
from cdpflow.pipelines.replay import read_start, rebuild_identity_store
from cdpflow.pipelines.stream import build_stream
from cdpflow.runners.direct import streaming_pipeline
from cdpflow.schemas.topics import CONTROL, RAW_EVENTS
from cdpflow.transforms import DEAD_LETTERS
from cdpflow.transforms.features import PROFILES, TRANSITIONS
from cdpflow.transforms.identity import ROUTED
from cdpflow.transforms.segments import AssignSegmentsStream
from cdpflow.transforms.sinks import DeadLetterRows
from cdpflow.warehouse import open_warehouse, warehouse_path

log = logging.getLogger(__name__)

STREAM_GROUP = "cdpflow-stream"


def stream_identity_store(warehouse: str) -> str:
    """The stream's identity store kept with the warehouse (across runs of the stream): a SQLite file
    beside an embedded warehouse, or in the local state folder for a remote one (`companion_path`)."""
    from cdpflow.warehouse.base import companion_path
    return "sqlite://" + os.path.abspath(companion_path(warehouse, ".stream-identity.sqlite"))


def event_record(routed):
    _, (event, _) = routed
    return core_event_record(event)


def _lines(record):
    _, value = record
    return value


def build_live(pipeline: beam.Pipeline, bootstrap: str, config: Dict[str, Any], identity_store: str, rules,
               history, model, seeds, start: str, until: Optional[int], group: str = STREAM_GROUP,
               warehouse: Optional[str] = None, registry: Optional[str] = None):
    """Wires the live graph: Kafka in, the streaming graph, segment assignment (clusters by the
    promoted model of `registry`, followed), Kafka out."""
    source = (pipeline
              | "ReadRaw" >> ReadKafkaTopic(bootstrap, RAW_EVENTS.name, start=start, group=group,
                                            stop_after_us=until)
              | "Values" >> beam.Map(_lines))
    # Commands from the start of the topic on every run: each is applied once (by its id in the
    # identity store), and a repeat gives back the moves it made, which a rebuilt state ignores.
    control = (pipeline
               | "ReadControl" >> ReadKafkaTopic(bootstrap, CONTROL.name, start="earliest", group=group,
                                                 stop_after_us=until)
               | "ControlValues" >> beam.Map(_lines))
    preload = pipeline | "WarehouseEvents" >> beam.Create(history) if history else None
    outputs = build_stream(source, config, identity_store, identity_rules=rules, preload=preload,
                           clv_model=model, until=until, routed_out=True,
                           governance=WarehouseGovernance(warehouse, config) if warehouse else None,
                           control=control)
    changes = outputs[PROFILES] | "AssignSegments" >> AssignSegmentsStream(
        config["segments"], config["lifecycle"], seeds, registry=registry,
        every_s=float(config["models"]["reload_seconds"]))
    records = (
        outputs[PROFILES] | "ProfileRecords" >> beam.Map(profile_record),
        changes | "SegmentRecords" >> beam.Map(segment_record),
        (outputs[DEAD_LETTERS] | "DeadLetterRows" >> DeadLetterRows(config["default_region"], rules)
         | "DeadLetterRecords" >> beam.Map(dead_letter_record)),
        outputs[ROUTED] | "EventRecords" >> beam.Map(event_record),
        outputs[TRANSITIONS] | "TransitionRecords" >> beam.Map(transition_record),
    ) | "AllRecords" >> beam.Flatten()
    _ = records | "WriteToKafka" >> WriteToKafka(bootstrap)
    return outputs


def prepare(warehouse: str, config: Dict[str, Any], identity_store: Optional[str], work: str):
    """Reads what a run starts from: governance, the accepted events, the CLV model, the memberships.

    A stream identity store that does not exist yet is built from the warehouse's events (a
    warehouse a batch run wrote); one that exists is kept, with what the warehouse has
    forgotten since purged from it.
    """
    local = warehouse_path(warehouse)
    if local:
        os.makedirs(os.path.dirname(os.path.abspath(local)) or ".", exist_ok=True)
    with open_warehouse(warehouse) as wh:
        start = read_start(wh, config, work)
    rules, history, identity_history, model = start["rules"], start["history"], start["identity"], start["model"]
    memberships = start["memberships"]
    store_uri = identity_store or stream_identity_store(warehouse)
    store_file = sqlite_path(store_uri)
    probe = open_identity_store(store_uri, rules)
    try:
        fresh = probe.is_empty()
        if not fresh:
            probe.purge(rules)  # forgotten since the store was last used: gone from it too
            # split in the warehouse since (`cdpflow identity split`): apart in the store too, and
            # its profiles named as the split named them
            probe.separate(rules.separations, "warehouse separations", int(time.time() * 1_000_000), names=rules.names)
    finally:
        probe.close()
    if fresh and identity_history:
        if store_file and os.path.exists(store_file):
            os.remove(store_file)
        rebuild_identity_store(store_uri, rules, identity_history)
    by_profile: Dict[str, list] = {}
    for row in memberships:
        by_profile.setdefault(row["profile_id"], []).append(row)
    seeds = {pid: held_from_memberships(rows) for pid, rows in by_profile.items()}
    return rules, history, model, seeds, store_uri


def run_stream(bootstrap: str, warehouse: str, config: Dict[str, Any], runner: str = "prism",
               start: str = "earliest", until: Optional[int] = None, identity_store: Optional[str] = None,
               loader: bool = True, pipeline_args=()) -> Dict[str, Any]:
    """Runs the live stream (until interrupted, or until `until`); returns what was loaded.

    `runner`: prism (local; the loader runs in a thread unless `loader` is False), or a Beam
    runner name such as DataflowRunner: the job is submitted with `pipeline_args`, writes only
    to Kafka, and needs a Redis identity store (`cdpflow load` loads the warehouse).

    Raises:
      BadInput: an unknown --from, a runner that cannot run it, or a missing topic.
    """
    from cdpflow.loader import Loader
    if runner == "direct":
        raise BadInput("--runner direct: the BundleBased DirectRunner cannot run the Kafka source "
                       "(a splittable DoFn); use --runner prism")
    if until is not None:
        until = until // 1000 * 1000  # timers keep whole milliseconds: the last rows are as of this
    remote = runner != "prism"
    if remote:
        # Workers on other machines: they cannot share a SQLite file, and the loader runs beside
        # the warehouse, not on them.
        if not identity_store or sqlite_path(identity_store) is not None:
            raise BadInput(f"--runner {runner}: give --identity-store redis://HOST:PORT/DB, an identity store "
                           "every worker reaches")
        loader = False
    work = tempfile.mkdtemp(prefix="cdpflow-stream-")
    stop = threading.Event()
    thread = None
    loaded: Dict[str, Any] = {}
    try:
        store_uri = identity_store or stream_identity_store(warehouse)
        if loader:
            # What the topics hold from an earlier run goes into the warehouse first, so the state
            # this run starts from includes it.
            with Loader(bootstrap, warehouse, config, store_uri) as catch_up:
                loaded["caught_up"] = catch_up.run_until_caught_up()
        rules, history, model, seeds, store_uri = prepare(warehouse, config, identity_store, work)
        log.info("stream: %d events from the warehouse, %d profiles with memberships", len(history), len(seeds))
        if loader:
            def load():
                with Loader(bootstrap, warehouse, config, store_uri) as live:
                    loaded.update(live.run(stop))
            thread = threading.Thread(target=load, name="cdpflow-loader", daemon=True)
            thread.start()
        if remote:
            from apache_beam.options.pipeline_options import PipelineOptions
            from cdpflow.runners.direct import runner_for
            runner_obj, args = runner_for(runner, list(pipeline_args))
            pipeline = beam.Pipeline(runner=runner_obj, options=PipelineOptions(args, streaming=True))
        else:
            pipeline = streaming_pipeline(runner, list(pipeline_args))
        from cdpflow.models.registry import registry_for
        build_live(pipeline, bootstrap, config, store_uri, rules, history, model, seeds, start, until,
                   warehouse=warehouse, registry=registry_for(config, warehouse))
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        shutil.rmtree(work, ignore_errors=True)
    return loaded


def dump_raw(bootstrap: str, out_path: str, timeout_s: float = 10.0) -> int:
    """Writes every record `cdp.events.raw` holds now to a JSON-lines file; returns how many."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=2000)
    try:
        tps = [TopicPartition(RAW_EVENTS.name, p) for p in sorted(consumer.partitions_for_topic(RAW_EVENTS.name))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        written, deadline = 0, time.monotonic() + timeout_s
        with open(out_path, "wb") as handle:
            while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        handle.write(record.value.rstrip(b"\n") + b"\n")
                        written += 1
        return written
    finally:
        consumer.close()


