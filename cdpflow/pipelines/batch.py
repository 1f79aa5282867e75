"""The batch (backfill, replay, demo) pipeline: raw JSON-lines events -> the warehouse.

    Capture -> ParseAndValidate -> Normalize -> Dedup -> Enrich -> ResolveIdentity
            -> ComputeFeatures -> AssignSegments -> staged tables -> warehouse commit

Run it through the CLI:

    cdpflow run --input out/sample/events --warehouse out/cdp.duckdb \
        --catalog out/sample/catalog.csv --rates out/sample/rates.csv            # FnApiRunner
    cdpflow run ... --runner multiprocess                                          # 2 SDK worker processes
    cdpflow run ... --runner prism                                                 # Prism (make prism)
    cdpflow run ... --runner DataflowRunner -- --project P --region R \
        --temp_location gs://B/tmp --setup_file ./setup.py                         # Dataflow (deploy/dataflow/README.md)

or as a module, with Beam pipeline options after `--`:

    python -m cdpflow.pipelines.batch --input DIR --warehouse FILE [-- --direct_num_workers=2]

A run re-derives every table from the warehouse's accepted events plus the new input (the
warehouse's `events.raw` is replayed through the same stages), so a run is idempotent, a replay
of the same raw events gives the same profiles, and segment changes are computed against the
memberships the warehouse held before the run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import orjson
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from cdpflow.config import load_config
from cdpflow.core.enrich import Rates, load_catalog
from cdpflow.core.features import FeatureSettings
from cdpflow.core.timeutil import parse_ts
from cdpflow.runners.direct import runner_for
from cdpflow.transforms import DEAD_LETTERS
from cdpflow.transforms.capture import ReadEvents, expand_inputs, has_event_lines
from cdpflow.transforms.dedup import UNIQUE, Dedup
from cdpflow.transforms.enrich import Enrich, LoadReferenceData, rates_loader
from cdpflow.transforms.clv import MODELS as CLV_MODELS, PROFILES as CLV_PROFILES, PredictCustomerValue
from cdpflow.transforms.features import PROFILES, TRANSITIONS, ComputeFeatures
from cdpflow.transforms.lateness import ON_TIME, CheckLateness
from cdpflow.core.identity import IdentityRules, SQLiteIdentityStore, sqlite_path
from cdpflow.transforms.identity import CONFLICTS, EVENTS, LINKS, MERGES, ResolveIdentity
from cdpflow.transforms.normalize import NORMALIZED, Normalize
from cdpflow.transforms.segments import CHANGES, MEMBERSHIPS, AssignSegments
from cdpflow.transforms.sinks import DeadLetterRows, WriteStaged, event_row
from cdpflow.transforms.validate import VALID, ParseAndValidate
from cdpflow import faults
from cdpflow.core import governance
from cdpflow.errors import BadInput
from cdpflow.core.segments import outbox_message
from cdpflow.outbox import JsonLinesPublisher, changes_file_for, publish_pending
from cdpflow.warehouse import open_warehouse, warehouse_path

REPLACED_TABLES = ("events", "identity_links", "profile_merges", "identity_conflicts", "profiles", "segment_memberships",
                   "lifecycle_transitions")
IDENTITY_STORE = "identity.sqlite"
PREVIOUS_MEMBERSHIPS = "previous_memberships.jsonl"


def build_pipeline(pipeline: beam.Pipeline, inputs: Sequence[str], staging_dir: str,
                   config: Dict[str, Any], as_of: Optional[int] = None,
                   previous_memberships: Optional[str] = None, identity_store: Optional[str] = None,
                   *, identity_rules: IdentityRules, cluster_model: Optional[Dict[str, Any]] = None,
                   previous_as_of: Optional[int] = None) -> Dict[str, beam.PCollection]:
    """Wires the batch graph into `pipeline`.

    Args:
      pipeline: the Beam pipeline to add to.
      inputs: JSON-lines files, folders or globs.
      staging_dir: where the tables are staged (`<staging>/<table>/*.jsonl`).
      config: see `cdpflow/config/default.yaml`.
      as_of: time features are computed at (UTC microseconds); default the newest event time.
      previous_memberships: JSON-lines file of the warehouse's segment_memberships before the run.
      identity_store: the identity store's SQLite file (default: `identity.sqlite` in staging_dir).
      identity_rules: from `cdpflow.core.governance.identity_rules` (the configuration with the
        warehouse's forgotten identifiers and separations; no default, so no path forgets them).
      cluster_model: the promoted cluster model's portable form, or None (no cluster segments).
      previous_as_of: the as-of time of the run the previous memberships are from (None: a new
        warehouse); memberships are extended in event time from there.

    Returns:
      The main PCollections by table name (for tests).
    """
    enrichment = config.get("enrichment") or {}
    lines = pipeline | "ReadEvents" >> ReadEvents(inputs)
    parsed = lines | "ParseAndValidate" >> ParseAndValidate()
    normalized = parsed[VALID] | "Normalize" >> Normalize(config["default_region"])
    # Lateness before dedup: it depends on the copy alone, so a copy refused as late never
    # takes a messageId from an on-time copy of the same event.
    settings = FeatureSettings.from_config(config)
    on_time = normalized[NORMALIZED] | "CheckLateness" >> CheckLateness(settings.allowed_lateness_us,
                                                                        settings.max_future_skew_us)
    unique = on_time[ON_TIME] | "Dedup" >> Dedup(config["dedup"]["horizon_hours"])
    catalog = pipeline | "LoadCatalog" >> LoadReferenceData(enrichment.get("catalog"), load_catalog)
    rates = pipeline | "LoadRates" >> LoadReferenceData(enrichment.get("rates"), rates_loader(config["reporting_currency"]))
    enriched = unique[UNIQUE] | "Enrich" >> Enrich(catalog, rates)
    rules = identity_rules
    identity = enriched | "ResolveIdentity" >> ResolveIdentity(
        identity_store or os.path.join(staging_dir, IDENTITY_STORE), rules,
        ordered=config["identity"].get("mode", "ordered") == "ordered")

    if as_of is None:
        as_of_pc = (identity[EVENTS]
                    | "EventTimes" >> beam.Map(lambda e: e.timestamp)
                    | "NewestEventTime" >> beam.CombineGlobally(lambda ts: max(ts, default=0)))
    else:
        as_of_pc = pipeline | "AsOf" >> beam.Create([as_of])
    features = identity[EVENTS] | "ComputeFeatures" >> ComputeFeatures(identity[LINKS], as_of_pc, config)
    predicted = features[PROFILES] | "PredictCustomerValue" >> PredictCustomerValue(as_of_pc)
    profiles = predicted[CLV_PROFILES]
    if previous_memberships:
        previous = (pipeline
                    | "ReadPreviousMemberships" >> beam.io.ReadFromText(previous_memberships)
                    | "ParsePrevious" >> beam.Map(orjson.loads))
    else:
        previous = pipeline | "NoPreviousMemberships" >> beam.Create([])
    segments = profiles | "AssignSegments" >> AssignSegments(
        config["segments"], previous, as_of_pc, config["lifecycle"], cluster_model,
        events=identity[EVENTS], settings=settings, since=previous_as_of)

    dead_letters = ((parsed[DEAD_LETTERS], normalized[DEAD_LETTERS], unique[DEAD_LETTERS], on_time[DEAD_LETTERS],
                     identity[DEAD_LETTERS])
                    | "AllDeadLetters" >> beam.Flatten())
    outputs = {
        "events": identity[EVENTS] | "EventRows" >> beam.Map(event_row),
        "identity_links": identity[LINKS],
        "profile_merges": identity[MERGES],
        "identity_conflicts": identity[CONFLICTS],
        "profiles": profiles,
        "segment_memberships": segments[MEMBERSHIPS],
        "segment_changes": segments[CHANGES],
        "clv_models": predicted[CLV_MODELS],
        "lifecycle_transitions": features[TRANSITIONS],
        "dead_letters": dead_letters | "DeadLetterRows" >> DeadLetterRows(config["default_region"], rules),
    }
    for name, rows in outputs.items():
        _ = rows | f"Stage_{name}" >> WriteStaged(staging_dir, name)
    _ = as_of_pc | "StageAsOf" >> beam.Map(lambda t: {"as_of": t}) | "Stage_as_of" >> WriteStaged(staging_dir, "as_of")
    return outputs


@dataclass
class RunSummary:
    """What a batch run did: the pipeline's counters and the rows committed."""

    counters: Dict[str, int]
    written: Dict[str, int]
    seconds: float
    replayed: int
    as_of: Optional[int]
    segment_sizes: Dict[str, int] = field(default_factory=dict)
    changes_file: Optional[str] = None
    dead_letter_rows: int = 0  # rows of the dead_letters table after the commit (every run's)

    def counter(self, step: str, name: str) -> int:
        return sum(v for k, v in self.counters.items() if k.endswith(f"{step}:{name}"))

    @property
    def read(self) -> int:
        return self.counter("_ParseAndValidateFn", "received")

    @property
    def dead_lettered(self) -> int:
        return sum(self.counter(s, "dead_lettered")
                   for s in ("_ParseAndValidateFn", "_NormalizeFn", "_PickFirstFn", "_CheckLatenessFn", "_AttachProfileFn")
                   ) - self.counter("_DeadLetterRowFn", "suppressed")

    @property
    def deduplicated(self) -> int:
        return self.counter("_PickFirstFn", "deduplicated")

    @property
    def suppressed(self) -> int:
        """Records of forgotten identifiers (events and dead letters): dropped on purpose, counted, stored nowhere."""
        return self.counter("_AttachProfileFn", "suppressed") + self.counter("_DeadLetterRowFn", "suppressed")

    @property
    def accepted(self) -> int:
        return self.counter("_AttachProfileFn", "succeeded")


def collect_counters(result) -> Dict[str, int]:
    """Every user counter of a finished pipeline as {"<DoFn class>:<name>": committed value}."""
    counters: Dict[str, int] = {}
    for metric in result.metrics().query(MetricsFilter())["counters"]:
        key = f"{metric.key.metric.namespace.rsplit('.', 1)[-1]}:{metric.key.metric.name}"
        value = metric.committed if metric.committed is not None else metric.attempted
        counters[key] = counters.get(key, 0) + (value or 0)
    return counters


def run_batch(inputs: Sequence[str], warehouse: str, config: Dict[str, Any], as_of: Optional[int] = None,
              runner: str = "direct", pipeline_args: Sequence[str] = (),
              changes_out: Optional[str] = None, replay: bool = True,
              before_commit: Optional[Callable[[], None]] = None) -> RunSummary:
    """Runs the batch pipeline and commits its tables and segment changes to the warehouse.

    The warehouse's version is read before the pipeline starts and checked by the commit: if
    another command (a forget, a split, another run) committed meanwhile, nothing is written
    and `ConcurrentWriteError` says so. The segment changes go to the outbox in the same
    transaction and are published after it (`cdpflow.outbox`); the identity store kept beside
    the warehouse is replaced only after the commit, stamped with the version it agrees with.

    Args:
      inputs: JSON-lines files, folders or globs.
      warehouse: the warehouse URI (`duckdb:///path`, or a file path).
      config: the merged configuration.
      as_of: UTC microseconds, or None for the newest event time.
      runner: direct | multiprocess | prism | a Beam runner name.
      pipeline_args: extra Beam pipeline options.
      changes_out: JSON-lines file the segment changes are published to (default: beside the
        warehouse, `<name>.segment_changes.jsonl`).
      replay: re-read the warehouse's accepted events (off only for tests of a single input).
      before_commit: called after the pipeline, before the commit (tests race other commands here).

    Raises:
      GovernanceError: no suppression secret outside the demo, or hashes of an unknown key.
      ConcurrentWriteError: another command committed after this run read the warehouse.
    """
    started = time.time()
    check_reference_data(config)
    # The inputs and the runner too, before the warehouse is opened (or created).
    if inputs and not has_event_lines(expand_inputs(inputs)):
        raise BadInput(f"no event lines in {', '.join(inputs)}")
    runner_obj, options = pipeline_options(runner, pipeline_args)
    local = warehouse_path(warehouse)
    if local:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    changes_file = changes_out or changes_file_for(warehouse)
    staging = tempfile.mkdtemp(prefix="cdpflow-staging-")
    try:
        all_inputs = list(inputs)
        replayed = 0
        previous_path = os.path.join(staging, PREVIOUS_MEMBERSHIPS)
        # The warehouse is opened, read and closed before the pipeline starts: DuckDB allows one
        # writer, and the commit below reopens it once the workers are done.
        with open_warehouse(warehouse) as wh:
            # Changes a crashed command committed but never published go out first, in order.
            publish_pending(wh, JsonLinesPublisher(changes_file))
            version = wh.version()
            rules = governance.identity_rules(config, wh.governance(),
                                              governance.suppression_key(config, wh.demo_key_file()))
            if replay:
                replay_path = os.path.join(staging, "replay.jsonl")
                replayed = wh.write_replay(replay_path)
                if replayed:
                    all_inputs.append(replay_path)
            previous = wh.memberships()
            previous_as_of = wh.latest_as_of() if previous else None
            kept_store = wh.default_identity_store()
        with open(previous_path, "wb") as handle:
            for row in previous:
                handle.write(orjson.dumps(row) + b"\n")
        pipeline = beam.Pipeline(runner=runner_obj, options=options)
        store_path = os.path.join(staging, IDENTITY_STORE)
        from cdpflow.models.registry import promoted_document, registry_for
        build_pipeline(pipeline, all_inputs, os.path.join(staging, "tables"), config, as_of,
                       previous_path if previous else None, store_path, identity_rules=rules,
                       cluster_model=promoted_document(registry_for(config, warehouse)), previous_as_of=previous_as_of)
        result = pipeline.run()
        result.wait_until_finish()
        counters = collect_counters(result)
        tables = os.path.join(staging, "tables")
        changes = sorted((orjson.loads(line) for line in _staged_lines(tables, "segment_changes")),
                         key=lambda c: (c["profile_id"], c["at"], c["direction"] == "enter", c["segment"]))
        if before_commit is not None:
            before_commit()
        faults.fault_point("before-commit")
        with open_warehouse(warehouse) as wh:
            written = wh.commit(tables, REPLACED_TABLES, {"dead_letters": "dead_letter_id", "clv_models": "model_id"},
                                outbox=[outbox_message(c) for c in changes], expected_version=version,
                                suppressed=rules.is_suppressed)
            committed = wh.version()
            faults.fault_point("after-commit")
            if kept_store:
                keep_identity_store(store_path, sqlite_path(kept_store), committed)
            publish_pending(wh, JsonLinesPublisher(changes_file))
            sizes = wh.open_segment_sizes()
            dead_letter_rows = wh.count("dead_letters")
        staged_as_of = [orjson.loads(line) for line in _staged_lines(tables, "as_of")]
        return RunSummary(counters, written, time.time() - started, replayed,
                          staged_as_of[0]["as_of"] if staged_as_of else as_of, sizes, changes_file, dead_letter_rows)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_reference_data(config: Dict[str, Any]) -> None:
    """Reads the catalog and the rates once, before the workers read them (and before a command
    records anything): a missing or broken file is a clear error now, not a failure deep inside
    the pipeline or after a split was recorded."""
    enrichment = config.get("enrichment") or {}
    load_catalog(enrichment.get("catalog"))
    Rates.load(enrichment.get("rates"), config["reporting_currency"])


def pipeline_options(runner: str, pipeline_args: Sequence[str]) -> Tuple[Any, PipelineOptions]:
    """The runner (an object, or a Beam runner's name) and the options a run's pipeline is given.

    Args:
      runner: direct | multiprocess | prism | a Beam runner name (`cdpflow.runners.direct.runner_for`).
      pipeline_args: Beam pipeline options, as after `--` on the command line.
    """
    runner_obj, args = runner_for(runner, list(pipeline_args))
    if isinstance(runner_obj, str):
        # Checked now (Beam would refuse an unknown name only when the pipeline is built); the
        # name itself is what the pipeline is given.
        from apache_beam.runners.runner import create_runner
        try:
            create_runner(runner_obj)
        except (ValueError, ImportError) as err:
            raise BadInput(f"--runner {runner!r}: direct, multiprocess, prism, or a Beam runner such as "
                           f"DataflowRunner ({err})") from None
    return runner_obj, PipelineOptions(args)


def identity_store_path(warehouse: str) -> str:
    """Where the identity graph of a warehouse's latest run is kept (beside the warehouse)."""
    from cdpflow.warehouse.base import companion_path
    return companion_path(warehouse, ".identity.sqlite")


def keep_identity_store(store_path: str, destination: str, version: int) -> None:
    """Copies the run's identity store beside the warehouse (SQLite's online backup, WAL included).

    The copy is stamped with the warehouse version it agrees with, so a reader can tell a store
    left behind by a crash from a current one.
    """
    source = SQLiteIdentityStore(store_path)
    try:
        source.stamp_warehouse_version(version)
        target = sqlite3.connect(destination + ".tmp")
        source.db.backup(target)
        target.close()
        os.replace(destination + ".tmp", destination)
    finally:
        source.close()


def _staged_lines(tables: str, name: str) -> List[bytes]:
    folder = os.path.join(tables, name)
    lines = []
    for part in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, part), "rb") as handle:
            lines.extend(line for line in handle if line.strip())
    return lines


def reference_overrides(catalog: Optional[str], rates: Optional[str]) -> Optional[Dict[str, str]]:
    """Configuration override for the enrichment files given on the command line (None if none)."""
    found = {k: v for k, v in (("catalog", catalog), ("rates", rates)) if v}
    return found or None


def add_rederive_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags any command that re-derives the warehouse needs (run, identity split)."""
    parser.add_argument("--warehouse", required=True, help="the warehouse: duckdb:///path/cdp.duckdb or a file path")
    parser.add_argument("--runner", default="direct", help="direct (default) | multiprocess | prism | a Beam runner name")
    parser.add_argument("--config", help="YAML configuration merged over the defaults")
    parser.add_argument("--catalog", help="product catalog CSV for enrichment")
    parser.add_argument("--rates", help="currency rates CSV for enrichment")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a batch run, shared by `cdpflow run` and this module's launcher."""
    parser.add_argument("--input", nargs="+", required=True, help="JSON-lines files, folders or globs")
    add_rederive_arguments(parser)
    parser.add_argument("--as-of", help="ISO-8601 time features are computed at (default: newest event time)")
    parser.add_argument("--changes-out", help="JSON-lines file segment changes are published to")
    parser.add_argument("beam_args", nargs=argparse.REMAINDER, help="after --: Beam pipeline options")


def run_from_args(args: argparse.Namespace) -> RunSummary:
    """Runs the batch pipeline from parsed `add_run_arguments` flags."""
    config = load_config(args.config, enrichment=reference_overrides(args.catalog, args.rates))
    try:
        as_of = parse_ts(args.as_of) if args.as_of else None
    except ValueError as err:
        raise BadInput(f"--as-of {args.as_of!r}: {err}") from None
    return run_batch(args.input, args.warehouse, config, as_of, args.runner, beam_args(args), args.changes_out)


def beam_args(args: argparse.Namespace) -> List[str]:
    """The Beam pipeline options of parsed `add_run_arguments` flags (what follows `--`, without it)."""
    return [a for a in args.beam_args if a != "--"]


def run(argv: Optional[Sequence[str]] = None) -> RunSummary:
    """Module launcher: `python -m cdpflow.pipelines.batch --input ... --warehouse ... [-- beam args]`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    summary = run()
    print(f"read {summary.read}, accepted {summary.accepted}, dead letters {summary.dead_lettered}, "
          f"duplicates {summary.deduplicated}, profiles {summary.written.get('profiles', 0)}")
