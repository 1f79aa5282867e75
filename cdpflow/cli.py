"""The `cdpflow` command.

    cdpflow generate --customers 2000 --days 180 --seed 7 --out out/sample
    cdpflow run --input out/sample/events --warehouse out/cdp.duckdb \
        --catalog out/sample/catalog.csv --rates out/sample/rates.csv [--as-of TIME] [--runner R] [--config FILE]
    cdpflow export TABLE --warehouse out/cdp.duckdb --format jsonl|csv|parquet [--out FILE]
    cdpflow profile IDENTIFIER --warehouse out/cdp.duckdb
    cdpflow replay --input out/sample/events --out out/stream [--warehouse out/cdp.duckdb] [--runner direct|prism]

    cdpflow forget IDENTIFIER --warehouse out/cdp.duckdb
    cdpflow publish --warehouse out/cdp.duckdb

    cdpflow stack up|down|status [COMPONENT ...] [--timeout SECONDS]

Exit codes: 0 done, 2 bad arguments, input or configuration, 3 another command committed to the
warehouse meanwhile (nothing was written; run again), 1 the run failed (for `stack status`: a
started component is unhealthy).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime
from decimal import Decimal
from typing import Optional, Sequence

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdpflow", description="Real-time customer data platform pipeline on Apache Beam.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write synthetic multi-channel events with ground truth")
    gen.add_argument("--customers", type=int, default=2000, help="how many real persons (default 2000)")
    gen.add_argument("--days", type=int, default=180, help="days of history (default 180)")
    gen.add_argument("--seed", type=int, default=7, help="random seed: same seed, same files (default 7)")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--end", help="ISO date the history ends at (default 2026-11-01)")
    gen.add_argument("--noise", type=float, default=1.0, help="multiply every noise rate by this (default 1)")

    from cdpflow.pipelines.batch import add_rederive_arguments, add_run_arguments
    run = sub.add_parser("run", help="the batch/backfill pipeline: events -> warehouse")
    add_run_arguments(run)

    rep = sub.add_parser("replay", help="play recorded events through the streaming graph, as they arrived")
    rep.add_argument("--input", nargs="+", required=True, help="JSON-lines files, folders or globs")
    rep.add_argument("--out", required=True, help="folder for profiles/, lifecycle_transitions/, dead_letters/ (JSON lines)")
    rep.add_argument("--warehouse", help="start from this warehouse's history, identity graph and CLV models")
    rep.add_argument("--runner", default="direct", choices=("direct", "prism"), help="direct (default) or prism")
    rep.add_argument("--identity-store", help="sqlite:///FILE (new) or redis://HOST:PORT/DB (empty) to build the "
                                              "replay's identity store in and keep (default: a private temporary one)")
    rep.add_argument("--config", help="YAML configuration merged over the defaults")
    rep.add_argument("--catalog", help="product catalog CSV for enrichment")
    rep.add_argument("--rates", help="currency rates CSV for enrichment")

    live = sub.add_parser("stream", help="the live stream: cdp.events.raw -> change topics (and the warehouse)")
    live.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka brokers HOST:PORT (default 127.0.0.1:9092)")
    live.add_argument("--warehouse", required=True, help="the warehouse: duckdb:///path/cdp.duckdb or a file path")
    live.add_argument("--runner", default="prism", choices=("prism",),
                      help="prism (default; the DirectRunner cannot run the Kafka source)")
    live.add_argument("--from", dest="start", default="earliest", choices=("earliest", "latest", "committed"),
                      help="where to start reading cdp.events.raw (default earliest: the warehouse's events "
                           "are recognised and counted once)")
    live.add_argument("--until", help="ISO-8601 time (to the millisecond): stop at records received after it, with every "
                                       "profile as of it")
    live.add_argument("--identity-store", help="sqlite:///FILE or redis://HOST:PORT/DB the stream resolves against "
                                               "(default: a SQLite file beside the warehouse, kept across runs)")
    live.add_argument("--no-loader", action="store_true", help="write only to Kafka; a `cdpflow load` loads the warehouse")
    live.add_argument("--config", help="YAML configuration merged over the defaults")
    live.add_argument("--catalog", help="product catalog CSV for enrichment")
    live.add_argument("--rates", help="currency rates CSV for enrichment")
    live.add_argument("beam_args", nargs=argparse.REMAINDER, help="after --: Beam pipeline options")

    load = sub.add_parser("load", help="the warehouse's single writer: the stream's topics -> the warehouse")
    load.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka brokers HOST:PORT (default 127.0.0.1:9092)")
    load.add_argument("--warehouse", required=True, help="the warehouse: duckdb:///path/cdp.duckdb or a file path")
    load.add_argument("--identity-store", help="the identity store the stream resolves against "
                                               "(default: the SQLite file beside the warehouse)")
    load.add_argument("--until-caught-up", action="store_true", help="stop once the topics are loaded to their end")
    load.add_argument("--config", help="YAML configuration merged over the defaults")

    exp = sub.add_parser("export", help="write a warehouse table to a file")
    from cdpflow.schemas.tables import ALL_TABLES
    exp.add_argument("table", choices=list(ALL_TABLES), metavar="TABLE",
                     help=f"one of the warehouse's tables: {', '.join(ALL_TABLES)}")
    exp.add_argument("--warehouse", required=True)
    exp.add_argument("--format", default="jsonl", choices=("jsonl", "csv", "parquet"),
                     help="jsonl (default), csv (with a header) or parquet")
    exp.add_argument("--out", help="output file (default TABLE.FORMAT in the working folder; its folder must exist)")

    prof = sub.add_parser("profile", help="show one unified profile")
    prof.add_argument("identifier", help="an email, phone, user id, 'type:value', or a profile id")
    prof.add_argument("--warehouse", required=True)
    prof.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ident = sub.add_parser("identity", help="identity resolution: quality report")
    ident_sub = ident.add_subparsers(dest="identity_command", required=True)
    report = ident_sub.add_parser("report", help="pairwise precision/recall against a ground-truth file")
    report.add_argument("--truth", required=True, help="identities.csv: person_id,identifier_type,identifier_value")
    report.add_argument("--warehouse", required=True)
    report.add_argument("--json", action="store_true", help="print JSON")
    split = ident_sub.add_parser("split", help="undo a wrong merge; the split holds in every later run")
    split.add_argument("profile", help="the profile (its id, or any of its identifiers)")
    add_rederive_arguments(split)
    split.add_argument("--merge", help="undo only the merge that absorbed this profile id (default: every merge)")
    split.add_argument("--reason", default="manual split", help="recorded with the split")

    forget = sub.add_parser("forget", help="delete a person (profile, links, events) and keep replays from bringing them back")
    forget.add_argument("identifier", help="any identifier of the person, or the profile id")
    forget.add_argument("--warehouse", required=True)
    forget.add_argument("--config", help="YAML configuration merged over the defaults (its governance section)")
    forget.add_argument("--identity-store", action="append", default=[], metavar="URI",
                        help="another identity store to forget them in (sqlite:///FILE or redis://HOST:PORT/DB; "
                             "repeatable); the one kept with the warehouse always is")
    forget.add_argument("--changes-out", help="JSON-lines file the segment exits are published to")
    forget.add_argument("--profile-store", action="append", default=[], metavar="URI",
                        help="a Redis profile store (the sidecar's) to remove them from, for good (repeatable)")
    forget.add_argument("--bootstrap", help="Kafka brokers HOST:PORT: also write the profile's tombstone to the "
                                            "compacted cdp.profiles.changes, so its rows are compacted away")

    pub = sub.add_parser("publish", help="deliver segment changes committed but not yet published (after a crash)")
    pub.add_argument("--warehouse", required=True)
    pub.add_argument("--changes-out", help="JSON-lines file the segment changes are published to")

    imp = sub.add_parser("import", help="CRM exports and point-of-sale files as tracking events")
    imp.add_argument("kind", choices=("crm", "pos"))
    imp.add_argument("file", help="CSV (with a header) or JSON lines")
    imp.add_argument("--mapping", required=True, help="YAML: which columns are identifiers, traits, the time")
    imp.add_argument("--to", required=True, help="kafka (cdp.events.raw), or a JSON-lines file to write")
    imp.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka brokers for --to kafka")
    imp.add_argument("--dead-letters", help="JSON-lines file for refused rows (default: beside --to FILE; "
                                            "with --to kafka: the cdp.events.deadletter topic)")
    imp.add_argument("--config", help="YAML configuration merged over the defaults (its default_region)")

    snd = sub.add_parser("send", help="send recorded or generated events through a collector, at a set pace")
    snd.add_argument("--input", nargs="+", required=True, help="JSON-lines files, folders or globs")
    snd.add_argument("--collector", required=True, help="the collector's URL, e.g. http://127.0.0.1:8088")
    snd.add_argument("--write-key", required=True, help="a write key the collector knows")
    snd.add_argument("--rate", type=float, help="events per second at most (default: as fast as accepted)")
    snd.add_argument("--batch-size", type=int, default=100, help="events per request (default 100)")
    snd.add_argument("--live", action="store_true", help="move each event's times to the moment it is sent")

    serve = sub.add_parser("serve", help="run a service: the tracking-API collector, the activation sidecar, "
                                         "the profile API")
    serve.add_argument("service", choices=("collector", "sidecar", "api"))
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8088 for the collector, 8090 for the API)")
    serve.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka brokers HOST:PORT (default 127.0.0.1:9092)")
    serve.add_argument("--config", help="YAML configuration merged over the defaults (collector, activation sections)")
    _activation_arguments(serve)
    serve.add_argument("--registry", help="api: the model registry whose promoted model classify assigns clusters "
                                          "with (default: models.registry, else <warehouse>.models if it exists)")
    serve.add_argument("--destination", action="append", default=[], metavar="NAME",
                       help="sidecar: deliver to this configured destination only (repeatable; default all)")
    serve.add_argument("--send-forgets", action="store_true",
                       help="api: a DELETE also sends the forget to the pipeline on cdp.control (via --bootstrap)")
    serve.add_argument("--until-idle", type=float, metavar="SECONDS",
                       help="sidecar: stop once nothing new has come for this long (a catch-up run; default: run until stopped)")

    dest = sub.add_parser("destinations", help="the activation destinations: list them, replay their dead letters")
    dest.add_argument("action", choices=("list", "replay"))
    dest.add_argument("name", nargs="?", help="replay: the destination whose dead letters to resend")
    dest.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka brokers HOST:PORT (default 127.0.0.1:9092)")
    dest.add_argument("--config", help="YAML configuration merged over the defaults (its activation section)")
    _activation_arguments(dest)

    bq = sub.add_parser("bq", help="BigQuery as the warehouse: create or evolve its dataset and tables")
    bq_sub = bq.add_subparsers(dest="bq_command", required=True)
    bq_init = bq_sub.add_parser("init", help="create the dataset and every table (idempotent); add columns a "
                                             "newer cdpflow has")
    bq_init.add_argument("--warehouse", required=True,
                         help="bigquery://PROJECT/DATASET[?endpoint=URL] (an emulator's URL, or CDPFLOW_BIGQUERY_ENDPOINT)")

    flink = sub.add_parser("flink", help="the stream as a native PyFlink job: submit, list, cancel, savepoint")
    flink_sub = flink.add_subparsers(dest="flink_command", required=True)
    fsub = flink_sub.add_parser("submit", help="submit the job to a Flink cluster")
    fsub.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka brokers HOST:PORT (default 127.0.0.1:9092)")
    fsub.add_argument("--warehouse", required=True, help="the warehouse whose governance the job starts with")
    fsub.add_argument("--identity-store", default="redis://127.0.0.1:6379/0",
                      help="redis://HOST:PORT/DB every TaskManager reaches (default redis://127.0.0.1:6379/0)")
    fsub.add_argument("--parallelism", type=int, default=2, help="the job's parallelism (default 2)")
    fsub.add_argument("--from-savepoint", help="restore the job's state from this savepoint (or checkpoint) path")
    fsub.add_argument("--checkpoint-ms", type=int, default=5000, help="checkpoint interval (default 5000 ms)")
    fsub.add_argument("--catalog", help="catalog.csv for enrichment (sent to the workers in the job's spec)")
    fsub.add_argument("--rates", help="rates.csv for revenue in the reporting currency (sent in the spec)")
    fsub.add_argument("--until", help="ISO-8601 time: no profile row after it, and a last row as of it for every "
                                      "profile once the watermark passes it (a replay's or a test's end)")
    fsub.add_argument("--bounded", action="store_true", help="read the topic as it is now to its end, then finish")
    fsub.add_argument("--spec-out", help="where to keep the job's spec (default: .stack/flink/specs/<time>.json)")
    fsub.add_argument("--config", help="YAML configuration merged over the defaults")
    for name, text in (("list", "the cluster's jobs"), ("cancel", "cancel a job"),
                       ("savepoint", "take a savepoint of a job (--stop: stop-with-savepoint)")):
        action = flink_sub.add_parser(name, help=text)
        if name != "list":
            action.add_argument("job_id", help="the job's id (`cdpflow flink list`)")
        if name == "savepoint":
            action.add_argument("--stop", action="store_true", help="stop the job with the savepoint")
            action.add_argument("--dir", help="target directory URI (default: the cluster's savepoint directory)")
    for action in flink_sub.choices.values():
        action.add_argument("--jobmanager", default="127.0.0.1:8081", help="the JobManager's REST address "
                                                                           "(default 127.0.0.1:8081)")

    from cdpflow.stack import COMPONENTS, DEFAULT_COMPONENTS
    train = sub.add_parser("train", help="fit the customer clusters (a batch Beam pipeline) and store a model version")
    train.add_argument("--warehouse", required=True, help="the warehouse whose profiles to train on")
    train.add_argument("--registry", help="model registry: a folder or gs://... (default: models.registry in the "
                                          "configuration, else <warehouse>.models beside the warehouse)")
    train.add_argument("--algorithm", choices=("kmeans", "gmm"), default="kmeans",
                       help="kmeans (k by silhouette) or gmm (a Gaussian mixture, k by BIC); default kmeans")
    train.add_argument("--k", default="3..10", help="clusters: a range LOW..HIGH to choose from, or one number "
                                                    "(default 3..10)")
    train.add_argument("--seed", type=int, default=0, help="random seed of the fit (default 0)")
    train.add_argument("--margin", type=float, default=0.1,
                       help="hysteresis: how much nearer another cluster must be before a profile moves "
                            "(kmeans: a fraction of the distance; gmm: of probability; default 0.1)")
    train.add_argument("--promote", action="store_true", help="promote the new version at once")
    train.add_argument("--schedule", choices=("daily", "weekly", "monthly"),
                       help="train only when due: no model promoted, the promoted one older than the period, or "
                            "its features drifted (for cron: run it daily, it retrains weekly or on drift)")
    train.add_argument("--drift-threshold", type=float, default=0.25,
                       help="with --schedule: the population stability index that makes a retrain due (default 0.25)")
    train.add_argument("--config", help="YAML configuration merged over the defaults (its models section)")
    train.add_argument("--runner", default="direct", help="direct (default), multiprocess, prism, or a Beam runner")

    models = sub.add_parser("models", help="the model registry: list, show, promote, rollback, shadow")
    models.add_argument("action", choices=("list", "show", "promote", "rollback", "shadow", "compare", "drift"),
                        help="compare: how many profiles the shadowed model would move; drift: population stability "
                             "of today's profiles against the promoted model's training data")
    models.add_argument("version", nargs="?", help="the version (show, promote, shadow; show defaults to the "
                                                   "promoted one; `shadow off` stops shadowing)")
    models.add_argument("--registry", help="model registry (default: models.registry in the configuration, else "
                                           "<warehouse>.models)")
    models.add_argument("--warehouse", help="find the registry beside this warehouse")
    models.add_argument("--config", help="YAML configuration merged over the defaults (its models section)")
    models.add_argument("--json", action="store_true", help="print JSON")

    report = sub.add_parser("report", help="a self-contained HTML page about the segments, for marketers")
    report.add_argument("what", choices=("segments",))
    report.add_argument("--warehouse", required=True)
    report.add_argument("--out", required=True, help="the HTML file to write")
    report.add_argument("--registry", help="model registry whose promoted model's centroids to show (default: "
                                           "models.registry, else <warehouse>.models if it exists)")
    report.add_argument("--config", help="YAML configuration merged over the defaults (its models section)")

    stack = sub.add_parser("stack", help="start, stop or check the local services (data under .stack/)")
    stack.add_argument("action", choices=("up", "down", "status"))
    stack.add_argument("components", nargs="*", metavar="COMPONENT",
                       help=f"any of: {', '.join(COMPONENTS)} (default: {', '.join(DEFAULT_COMPONENTS)} "
                            f"for up, every component for down and status)")
    stack.add_argument("--timeout", type=float, help="seconds `up` waits for each component's health check "
                                                     "(default: the component's own)")
    return parser


def identity_report(warehouse: str, truth_path: str):
    """The IdentityReport of a warehouse against a truth file."""
    from cdpflow.core.evaluation import evaluate, load_truth
    from cdpflow.warehouse import open_warehouse
    with open_warehouse(warehouse, read_only=True) as wh:
        links = {(r["identifier_type"], r["identifier_value"]): r["profile_id"] for r in wh.identity_links()}
    return evaluate(links, load_truth(truth_path))


def cmd_identity(args) -> int:
    if args.identity_command == "split":
        return cmd_split(args)
    import dataclasses
    import orjson
    report = identity_report(args.warehouse, args.truth)
    if args.json:
        console.print_json(orjson.dumps(dataclasses.asdict(report), option=orjson.OPT_NON_STR_KEYS).decode())
        return 0
    table = Table(title="identity resolution against the truth")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in (("pairwise precision", f"{report.precision:.4f}"), ("pairwise recall", f"{report.recall:.4f}"),
                       ("identifiers compared", report.identifiers), ("persons", report.persons),
                       ("profiles", report.profiles), ("pairs predicted", report.predicted_pairs),
                       ("pairs true", report.true_pairs), ("pairs correct", report.correct_pairs),
                       ("shared identifiers (left out of the pairs)", report.shared_identifiers),
                       ("  of which in a profile of one of their owners", report.shared_with_an_owner)):
        table.add_row(key, str(value))
    console.print(table)
    spread = Table(title="profiles per person")
    spread.add_column("profiles holding one person's identifiers", justify="right")
    spread.add_column("persons", justify="right")
    for n, persons in report.profiles_per_person.items():
        spread.add_row(str(n), str(persons))
    console.print(spread)
    biggest = Table(title="biggest profiles")
    for column in ("profile_id", "identifiers", "persons"):
        biggest.add_column(column)
    for row in report.biggest:
        biggest.add_row(*(str(v) for v in row))
    console.print(biggest)
    return 0


def _now_us() -> int:
    import time
    return int(time.time() * 1_000_000)


def cmd_split(args) -> int:
    from cdpflow.config import load_config
    from cdpflow.pipelines.batch import reference_overrides
    from cdpflow.split import split_in_warehouse
    config = load_config(args.config, enrichment=reference_overrides(args.catalog, args.rates))
    done = split_in_warehouse(args.warehouse, args.profile, config, merge=args.merge, reason=args.reason,
                              runner=args.runner)
    profile_id = done.profile_id
    if done.rederived_first:
        console.print("the identity graph kept with the warehouse was older than the warehouse: re-derived it first")
    console.print(f"recorded {len(done.separations)} separation(s) of {profile_id}"
                  + (f" and {len(done.names)} name(s), so the part marketers know keeps {profile_id}" if done.names else "")
                  + "; re-derived the warehouse")
    written = done.summary.written
    console.print(f"profiles now: {written.get('profiles', 0)}, merges: {written.get('profile_merges', 0)}")
    # Which id each part has now: a marketer looks the person up by their user id or email.
    console.print(f"the parts of {profile_id} now:")
    for pid, held in sorted(done.parts.items(), key=lambda part: part[0] != profile_id):
        users = sorted(v for t, v in held if t == "user_id")
        # One line each, never wrapped: the ids are what a user copies from here.
        console.print(f"  {pid}{' (the id it had)' if pid == profile_id else ''}: {len(held)} identifier(s), "
                      f"user id {', '.join(users) or '-'}", soft_wrap=True, highlight=False)
    return 0


def cmd_forget(args) -> int:
    from cdpflow.activation.forget import forget_in_activation
    from cdpflow.config import load_config
    from cdpflow.forget import forget_person
    config = load_config(args.config)
    done = forget_person(args.warehouse, args.identifier, config, args.identity_store, args.changes_out)
    if done is None:
        err_console.print(f"no profile or dead letter holds {args.identifier!r}")
        return 2
    console.print(f"forgot {done['profile_id'] or args.identifier}: {len(done['identifiers'])} identifier(s) suppressed, "
                  f"deleted {done['deleted']}, {done['identity_removed']} identifier(s) removed from the identity store, "
                  f"{done['exits']} segment exit(s) published to {done['changes_file']} ({done['published']} message(s))")
    if not done["profile_id"]:
        return 0
    profile_id = done["profile_id"]
    gone = forget_in_activation(profile_id, config, args.profile_store, args.bootstrap, done["profile"], done["segments"])
    for name in gone.asked:
        console.print(f"asked {name} to delete {profile_id}")
    for uri in gone.stores:
        console.print(f"removed {profile_id} from the profile store {uri}")
    if gone.tombstone:
        console.print(f"wrote {profile_id}'s tombstone to cdp.profiles.changes and over its "
                      f"{gone.dead_letters_purged} dead letter(s) on cdp.destinations.deadletter")
    if gone.unconfirmed:
        err_console.print(f"[red]not confirmed by {'; '.join(gone.unconfirmed)}: ask them again or delete the member "
                          "there[/red]")
        return 1
    return 0


def cmd_publish(args) -> int:
    from cdpflow.outbox import JsonLinesPublisher, changes_file_for, publish_pending
    from cdpflow.warehouse import open_warehouse
    changes_file = args.changes_out or changes_file_for(args.warehouse)
    with open_warehouse(args.warehouse, must_exist=True) as wh:
        done = publish_pending(wh, JsonLinesPublisher(changes_file))
    console.print(f"{done['pending']} pending segment change(s); {done['published']} published to {changes_file}")
    return 0


def cmd_generate(args) -> int:
    from cdpflow.synthetic import NoiseRates, generate
    from cdpflow.core.timeutil import parse_ts, to_datetime
    from cdpflow.errors import BadInput
    if args.customers < 1 or args.days < 1:
        raise BadInput(f"--customers and --days must be at least 1 (got {args.customers} and {args.days})")
    if args.noise < 0:
        raise BadInput(f"--noise must be 0 or more (got {args.noise})")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BadInput(f"--out {args.out} is a file; give a folder (new, or one to write the sample into)")
    kwargs = {}
    if args.end:
        try:
            kwargs["end"] = to_datetime(parse_ts(args.end if "T" in args.end else args.end + "T00:00:00Z"))
        except ValueError:
            raise BadInput(f"--end {args.end!r}: an ISO date such as 2026-11-01 (or a time, 2026-11-01T12:00:00Z)") from None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console) as progress:
        progress.add_task(f"generating {args.customers} customers x {args.days} days", total=None)
        manifest = generate(args.out, customers=args.customers, days=args.days, seed=args.seed,
                            noise=NoiseRates().scale(args.noise), **kwargs)
    table = Table(title=f"generated into {args.out}")
    table.add_column("what")
    table.add_column("count", justify="right")
    counts = {"events": manifest.get("events", {}), "noise": manifest.get("noise", {})}
    for key, value in _flatten(counts):
        table.add_row(key, str(value))
    console.print(table)
    return 0


def _flatten(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def cmd_run(args) -> int:
    from cdpflow.core.timeutil import format_ts
    from cdpflow.pipelines.batch import run_from_args
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console) as progress:
        progress.add_task(f"running the batch pipeline on {args.runner}", total=None)
        summary = run_from_args(args)
    table = Table(title=f"cdpflow run -> {args.warehouse}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rate = summary.read / summary.seconds if summary.seconds else 0
    rows = [
        ("events read", summary.read),
        ("  of which replayed from the warehouse", summary.replayed),
        ("accepted", summary.accepted),
        # A line is refused each time it is read; the table keeps one row per distinct refused
        # line (its dead_letter_id), so identical bad lines, and a re-run's, add no row.
        ("dead letters (lines refused)", summary.dead_lettered),
        ("  new rows in dead_letters", summary.written.get("dead_letters", 0)),
        ("  rows in dead_letters (every run)", summary.dead_letter_rows),
        ("duplicates dropped", summary.deduplicated),
        ("profiles", summary.written.get("profiles", 0)),
        ("identifiers", summary.written.get("identity_links", 0)),
        ("merges", summary.written.get("profile_merges", 0)),
        ("identity conflicts (links refused, quarantines)", summary.written.get("identity_conflicts", 0)),
        ("lifecycle transitions (whole history)", summary.written.get("lifecycle_transitions", 0)),
        ("events of forgotten identifiers (suppressed)", summary.suppressed),
        ("as of", format_ts(summary.as_of) if summary.as_of else "-"),
        ("seconds", f"{summary.seconds:.1f}"),
        ("events/s", f"{rate:,.0f}"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    if summary.dead_lettered != summary.written.get("dead_letters", 0):
        console.print("dead_letters keeps one row per distinct refused line: identical lines, and lines a "
                      "run before this one refused, add no row")
    seg = Table(title="segment sizes (open memberships)")
    seg.add_column("segment")
    seg.add_column("profiles", justify="right")
    for name, size in summary.segment_sizes.items():
        seg.add_row(name, str(size))
    console.print(seg)
    console.print(f"segment changes published to {summary.changes_file}")
    return 0


def cmd_replay(args) -> int:
    import time
    from cdpflow.config import load_config
    from cdpflow.pipelines.batch import reference_overrides
    from cdpflow.pipelines.replay import run_replay
    config = load_config(args.config, enrichment=reference_overrides(args.catalog, args.rates))
    started = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console) as progress:
        progress.add_task(f"replaying the events as a stream on {args.runner}", total=None)
        written = run_replay(args.input, args.out, config, args.warehouse, args.runner, args.identity_store)
    seconds = time.perf_counter() - started
    table = Table(title=f"cdpflow replay -> {args.out}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in (("lines replayed", written["lines"]), ("events preloaded from the warehouse", written["preloaded"]),
                       ("profile rows emitted", written["profiles"]),
                       ("lifecycle transitions", written["lifecycle_transitions"]),
                       ("dead letters", written["dead_letters"]), ("seconds", f"{seconds:.1f}")):
        table.add_row(key, str(value))
    console.print(table)
    return 0


def cmd_stream(args) -> int:
    from cdpflow.config import load_config
    from cdpflow.core.timeutil import parse_ts
    from cdpflow.errors import BadInput
    from cdpflow.pipelines.batch import reference_overrides
    from cdpflow.pipelines.live import run_stream
    config = load_config(args.config, enrichment=reference_overrides(args.catalog, args.rates))
    try:
        until = parse_ts(args.until) if args.until else None
    except ValueError as err:
        raise BadInput(f"--until {args.until!r}: {err}") from None
    err_console.print(f"stream: Kafka {args.bootstrap} -> {args.warehouse} on {args.runner}"
                      + ("" if until is None else f", until {args.until}") + " (Ctrl-C stops it)")
    try:
        loaded = run_stream(args.bootstrap, args.warehouse, config, args.runner, args.start, until,
                            args.identity_store, loader=not args.no_loader,
                            pipeline_args=[a for a in args.beam_args if a != "--"])
    except KeyboardInterrupt:
        return 130
    _print_loaded(f"cdpflow stream -> {args.warehouse}", loaded)
    return 0


def _print_loaded(title, loaded) -> None:
    table = Table(title=title)
    table.add_column("loaded")
    table.add_column("rows", justify="right")
    for key, value in sorted(loaded.items()):
        if isinstance(value, int):
            table.add_row(key, str(value))
    console.print(table)


def cmd_load(args) -> int:
    from cdpflow.config import load_config
    from cdpflow.loader import run_loader
    config = load_config(args.config)
    err_console.print(f"loader: Kafka {args.bootstrap} -> {args.warehouse}"
                      + ("" if args.until_caught_up else " (Ctrl-C stops it)"))
    loaded = run_loader(args.bootstrap, args.warehouse, config, args.identity_store, args.until_caught_up)
    _print_loaded(f"cdpflow load -> {args.warehouse}", loaded)
    return 0


def cmd_bq(args) -> int:
    from cdpflow.warehouse.base import WarehouseError
    from cdpflow.warehouse.bigquery import BigQueryWarehouse
    if not str(args.warehouse).startswith("bigquery://"):
        raise WarehouseError(f"--warehouse {args.warehouse}: `cdpflow bq` takes bigquery://PROJECT/DATASET")
    warehouse = BigQueryWarehouse(args.warehouse, read_only=True)
    done = warehouse.init()
    for name in done["created"]:
        console.print(f"created {warehouse.project}.{warehouse.dataset}.{name}")
    for column in done["evolved"]:
        console.print(f"added column {column}")
    if not done["created"] and not done["evolved"]:
        console.print(f"{warehouse.project}.{warehouse.dataset}: every table as the contract says; nothing to do")
    return 0


def cmd_export(args) -> int:
    from cdpflow.errors import BadInput
    from cdpflow.warehouse import open_warehouse
    out = args.out or f"{args.table}.{args.format}"
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise BadInput(f"--out {out} is a folder; give a file, e.g. {os.path.join(out, args.table + '.' + args.format)}")
    if not os.path.isdir(folder):
        raise BadInput(f"--out {out}: the folder {os.path.dirname(out) or folder} does not exist; create it first")
    with open_warehouse(args.warehouse, read_only=True) as wh:
        count = wh.export(args.table, args.format, out)
    console.print(f"wrote {count} rows of {args.table} to {out}")
    return 0


def _show(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value.normalize()) if value == value.to_integral() else str(value.quantize(Decimal("0.01")))
    return "" if value is None else str(value)


def cmd_profile(args) -> int:
    import orjson
    from cdpflow.warehouse import open_warehouse
    with open_warehouse(args.warehouse, read_only=True) as wh:
        found = wh.profile(args.identifier)
    if found is None:
        err_console.print(f"no profile holds {args.identifier!r}")
        return 2
    if args.json:
        console.print_json(orjson.dumps(found, default=_show).decode())
        return 0
    profile = Table(title=f"profile {found['profile']['profile_id']}")
    profile.add_column("field")
    profile.add_column("value")
    for key, value in found["profile"].items():
        if key != "traits":
            profile.add_row(key, _show(value))
    console.print(profile)
    for title, rows in (("identifiers", found["identifiers"]), ("segments", found["segments"]), ("merges", found["merges"])):
        table = Table(title=title)
        for column in (rows[0].keys() if rows else ["(none)"]):
            table.add_column(column)
        for row in rows:
            table.add_row(*(_show(v) for v in row.values()))
        console.print(table)
    return 0


def cmd_stack(args) -> int:
    from rich.markup import escape
    from cdpflow import stack
    if args.action == "up":
        for name, started in stack.up(args.components, timeout=args.timeout).items():
            console.print(f"{name}: {'started' if started else 'already running'}")
    elif args.action == "down":
        for name, stopped in stack.down(args.components).items():
            console.print(f"{name}: {'stopped' if stopped else 'not running'}")
    found = stack.status(args.components or (stack.DEFAULT_COMPONENTS if args.action == "up" else None))
    table = Table(title=escape(f"cdpflow stack ({stack.stack_dir()})"))
    for column in ("component", "state", "address", "pid", "data folder"):
        table.add_column(column)
    colours = {stack.RUNNING: "green", stack.STOPPED: "dim", stack.UNHEALTHY: "red"}
    for one in found:
        state = f"[{colours[one.state]}]{one.state}[/]" + (f" ({one.detail})" if one.detail else "")
        table.add_row(one.name, state, one.address, str(one.pid or "-"), escape(str(one.folder)))
    console.print(table)
    # Only a started component can be unhealthy: a stopped one is what `down` leaves, not a fault.
    unhealthy = [one.name for one in found if one.state == stack.UNHEALTHY]
    if unhealthy:
        err_console.print(f"[red]cdpflow stack: started but unhealthy: {', '.join(unhealthy)}[/red]")
        return 1
    return 0


def collector_from_config(config, bootstrap: str):
    """The collector of the configuration's `collector` section, storing into Kafka at `bootstrap`."""
    from cdpflow.collector.app import Collector
    from cdpflow.collector.sink import KafkaSink
    section = config.get("collector") or {}
    if not section.get("write_keys"):
        from cdpflow.errors import BadInput
        raise BadInput("no write keys: set collector.write_keys (write key: source name) in a --config file")
    sink = KafkaSink(bootstrap, timeout_s=float(section.get("store_timeout_seconds", 10)))
    return Collector(sink, section["write_keys"], int(float(section.get("max_in_flight_mb", 8)) * 1024 * 1024))


def cmd_import(args) -> int:
    import orjson
    from cdpflow.config import load_config
    from cdpflow.connectors.convert import convert, load_mapping
    config = load_config(args.config)
    mapping = load_mapping(args.mapping, args.kind)
    result = convert(args.file, mapping, config["default_region"])
    if args.to == "kafka":
        from cdpflow.collector.sink import KafkaSink, SinkUnavailable
        from cdpflow.connectors.convert import dead_letter_key
        from cdpflow.schemas.topics import DEAD_LETTERS, RAW_EVENTS, raw_event_key
        events = KafkaSink(args.bootstrap, RAW_EVENTS.name)
        letters = None if args.dead_letters else KafkaSink(args.bootstrap, DEAD_LETTERS.name)
        try:
            events.send([((raw_event_key(e) or "").encode() or None, orjson.dumps(e)) for e in result.events])
            if letters is not None:
                letters.send([(dead_letter_key(d).encode(), orjson.dumps(d)) for d in result.dead_letters])
        except SinkUnavailable as err:
            err_console.print(f"[red]cdpflow import: {err}; nothing was acknowledged, import again[/red]")
            return 1
        finally:
            events.close()
            if letters is not None:
                letters.close()
        where = f"Kafka {args.bootstrap} ({RAW_EVENTS.name})"
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.to)), exist_ok=True)
        with open(args.to, "wb") as handle:
            handle.writelines(orjson.dumps(e) + b"\n" for e in result.events)
        where = args.to
    letters_to = args.dead_letters or (None if args.to == "kafka" else os.path.splitext(args.to)[0] + ".deadletters.jsonl")
    if letters_to:
        with open(letters_to, "wb") as handle:
            handle.writelines(orjson.dumps(d) + b"\n" for d in result.dead_letters)
    console.print(f"{args.kind} import of {args.file}: {len(result.events)} event(s) to {where}, "
                  f"{len(result.dead_letters)} dead letter(s)"
                  + (f" in {letters_to}" if letters_to else " to cdp.events.deadletter"))
    for letter in result.dead_letters[:10]:
        err_console.print(f"  row {letter['row']}: {letter['stage']}: {letter['error']}")
    return 0


def cmd_send(args) -> int:
    from cdpflow.collector.send import SendFailed, send
    from cdpflow.errors import BadInput
    from cdpflow.pipelines.replay import arrival_order
    if args.batch_size < 1 or (args.rate is not None and args.rate <= 0):
        raise BadInput("--batch-size and --rate must be above 0")
    lines = [line for _, line in arrival_order(args.input)]
    if not lines:
        raise BadInput(f"no event lines in {', '.join(args.input)}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console) as progress:
        progress.add_task(f"sending {len(lines)} events to {args.collector}", total=None)
        try:
            report = send(lines, args.collector, args.write_key, args.rate, args.batch_size, args.live)
        except SendFailed as err:
            err_console.print(f"[red]cdpflow send: {err}[/red]")
            return 1
    table = Table(title=f"cdpflow send -> {args.collector}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in (("events sent", report.sent), ("accepted (200: stored in Kafka)", report.accepted),
                       ("refused (4xx)", len(report.refused)), ("not JSON objects (not sent)", report.unsendable),
                       ("retries after 503/429", report.retries), ("seconds", f"{report.seconds:.1f}"),
                       ("accepted events/s", f"{report.rate:,.0f}")):
        table.add_row(key, str(value))
    console.print(table)
    for message_id, status, reason in report.refused[:10]:
        err_console.print(f"  refused {message_id}: {status} {reason}")
    return 0


DEFAULT_PROFILE_STORE = "redis://127.0.0.1:6379/0"


def _activation_arguments(parser) -> None:
    parser.add_argument("--profile-store", help="sidecar, api: the Redis profile store (redis://HOST:PORT/DB[?prefix=P]; "
                                                 f"default the stack's, {DEFAULT_PROFILE_STORE})")
    parser.add_argument("--identity-store", help="sidecar, api: the identity store whose forgets it honours while it "
                                                 "runs (the api also answers anonymous_id and loyalty_id lookups from it)")
    parser.add_argument("--warehouse", help="sidecar, and api with --profile-store: the warehouse whose governance "
                                            "(forgotten identifiers) it starts from; api without --profile-store: serve "
                                            "this DuckDB warehouse (the embedded demo, no Redis or Kafka; DELETE runs "
                                            "the forget on it)")


def cmd_destinations(args) -> int:
    from cdpflow.activation.destinations import destinations_from_config
    from cdpflow.config import load_config
    config = load_config(args.config)
    if args.action == "list":
        table = Table(title="destinations")
        for column in ("name", "type", "segments", "fields"):
            table.add_column(column)
        for name, destination in destinations_from_config(config).items():
            policy = destination.policy
            fields = ", ".join([*sorted(policy.identifiers - policy.hashed), *(f"{h} (hashed)" for h in sorted(policy.hashed)),
                                *(f"traits.{t}" for t in sorted(policy.traits))]) or "profile id only"
            table.add_row(name, type(destination).__name__, ", ".join(sorted(destination.segments or ())) or "all", fields)
        console.print(table)
        return 0
    if not args.name:
        from cdpflow.errors import BadInput
        raise BadInput("destinations replay: name the destination whose dead letters to resend")
    from cdpflow.activation.service import replay
    counts = replay(config, args.name, args.bootstrap, args.profile_store or DEFAULT_PROFILE_STORE, args.identity_store,
                    args.warehouse)
    console.print(_counts_table(f"replayed dead letters of {args.name}", counts))
    return 0


def _counts_table(title, counts):
    table = Table(title=title)
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key.replace("_", " "), str(value))
    return table


def cmd_serve(args) -> int:
    from cdpflow.config import load_config
    config = load_config(args.config)
    if args.service == "sidecar":
        from cdpflow.activation.service import SidecarFailed, serve_sidecar
        try:
            results = serve_sidecar(config, args.bootstrap, args.profile_store or DEFAULT_PROFILE_STORE,
                                    args.identity_store, args.warehouse,
                                    args.destination, args.until_idle,
                                    on_start=lambda d: err_console.print(
                                        f"sidecar: {', '.join(d)} <- Kafka {args.bootstrap} (Ctrl-C stops it)"))
        except SidecarFailed as err:
            err_console.print(f"[red]cdpflow serve sidecar stopped: {err} (its batch in flight is delivered again "
                              "on restart)[/red]")
            return 1
        for name, counts in results.items():
            console.print(_counts_table(f"sidecar: {name}", counts))
        return 0
    import uvicorn
    if args.service == "api":
        from cdpflow.activation import api
        identity = governance = None
        if args.warehouse and not args.profile_store:
            # the embedded demo: the warehouse is the store, and a forget runs `cdpflow forget`'s work
            from cdpflow.activation.warehouse_store import WarehouseProfileStore
            keys = api.keys_from_config(config, api.demo_key_file(args.warehouse))
            store = WarehouseProfileStore(args.warehouse, config)
            forget = lambda profile_id: store.forget(profile_id)["unconfirmed"]  # noqa: E731
            over = f"the warehouse {args.warehouse}"
        else:
            from cdpflow.activation.profile_store import open_profile_store
            keys = api.keys_from_config(config)
            store = open_profile_store(args.profile_store or DEFAULT_PROFILE_STORE)
            if args.identity_store:
                from cdpflow.core.identity import open_identity_store
                identity = open_identity_store(args.identity_store)
            control = api.control_sender(args.bootstrap) if args.send_forgets else None
            forget = api.redis_forgetter(store, config, control, args.bootstrap if args.send_forgets else None)
            over = f"the profile store {args.profile_store or DEFAULT_PROFILE_STORE}"
            if args.warehouse or args.identity_store:
                # the sidecar's governance: forgotten people stay out of every answer
                from cdpflow.activation.service import governance_view
                governance = governance_view(config, args.warehouse, args.identity_store)
        from cdpflow.models.registry import PromotedModel, registry_for
        registry = args.registry or registry_for(config, args.warehouse)
        models = PromotedModel(registry) if registry else None
        app = api.create_api(store, keys, config, identity, forget, governance, models)
        port = args.port or 8090
        err_console.print(f"profile API on http://{args.host}:{port} (OpenAPI: /openapi.json, docs: /docs) over {over}")
        if any(k.name == "demo" for k in keys):
            err_console.print(f"demo API key (every scope): {api.demo_key_file(args.warehouse)}")
        try:
            uvicorn.run(app, host=args.host, port=port, log_level="warning")
        finally:
            store.close()
            if identity is not None:
                identity.close()
        return 0
    from cdpflow.collector.app import create_app
    collector = collector_from_config(config, args.bootstrap)
    app = create_app(collector, (config.get("collector") or {}).get("cors_origins") or ())
    args.port = args.port or 8088
    err_console.print(f"collector on http://{args.host}:{args.port} -> Kafka {args.bootstrap}")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        collector.sink.close()
    return 0


def _k_range(text: str):
    from cdpflow.errors import BadInput
    try:
        low, _, high = text.partition("..")
        k_range = (int(low), int(high or low))
    except ValueError:
        raise BadInput(f"--k {text!r}: a number (6) or a range (3..10)") from None
    if not 2 <= k_range[0] <= k_range[1] <= 50:
        raise BadInput(f"--k {text!r}: between 2 and 50, low <= high")
    return k_range


def cmd_train(args) -> int:
    from cdpflow.config import load_config
    from cdpflow.models.registry import default_registry, registry_for
    from cdpflow.pipelines.train import run_training
    config = load_config(args.config)
    k_range = _k_range(args.k)
    registry = args.registry or registry_for(config, args.warehouse) or default_registry(args.warehouse)
    if args.schedule:
        from cdpflow.pipelines.train import due
        train_now, why = due(args.warehouse, registry, args.schedule, args.drift_threshold)
        console.print(why)
        if not train_now:
            return 0
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console) as progress:
        progress.add_task(f"training {args.algorithm}, k in {k_range[0]}..{k_range[1]}, on {args.runner}", total=None)
        meta = run_training(args.warehouse, registry, args.algorithm, k_range, args.seed, args.margin, args.runner)
    console.print(_model_table(meta))
    if args.promote:
        from cdpflow.models.registry import ModelRegistry
        ModelRegistry(registry).promote(meta["version"])
        console.print(f"promoted {meta['version']}: the next run, stream and API assign with it")
    else:
        console.print(f"stored {meta['version']} in {registry}; promote it with "
                      f"`cdpflow models promote {meta['version']} --registry {registry}`")
    return 0


def _model_table(meta):
    metrics = meta["metrics"]
    table = Table(title=f"model {meta['version']} ({meta['algorithm']}, k={meta['k']}, {metrics['criterion']} "
                        f"{metrics['chosen']:.3f}, {meta['training_window']['profiles']} profiles)")
    for column in ("label", "segment", "profiles", "description"):
        table.add_column(column, justify="right" if column in ("label", "profiles") else "left")
    for cluster in meta["clusters"]:
        table.add_row(str(cluster["label"]), cluster["segment"], str(cluster["size"]), cluster["description"])
    return table


def cmd_models(args) -> int:
    import orjson

    from cdpflow.config import load_config
    from cdpflow.errors import BadInput
    from cdpflow.models.registry import ModelRegistry, registry_for
    config = load_config(args.config)
    root = args.registry or registry_for(config, args.warehouse)
    if not root:
        raise BadInput("no model registry: give --registry (or --warehouse with a <warehouse>.models beside it, or "
                       "models.registry in the configuration)")
    registry = ModelRegistry(root)
    promoted, shadow = registry.promoted(), registry.shadow()
    if args.action == "list":
        metas = registry.versions()
        if args.json:
            print(orjson.dumps([{**m, "promoted": bool(promoted and promoted["version"] == m["version"]),
                                 "shadow": bool(shadow and shadow["version"] == m["version"])}
                                for m in metas]).decode())
            return 0
        table = Table(title=f"models in {root}")
        for column in ("version", "trained", "algorithm", "k", "profiles", "criterion", "status"):
            table.add_column(column)
        for m in metas:
            status = ("promoted" if promoted and promoted["version"] == m["version"] else
                      "shadow" if shadow and shadow["version"] == m["version"] else "")
            table.add_row(m["version"], m["trained_at"], m["algorithm"], str(m["k"]),
                          str(m["training_window"]["profiles"]),
                          f"{m['metrics']['criterion']} {m['metrics']['chosen']:.3f}", status)
        console.print(table)
        return 0
    if args.action in ("compare", "drift"):
        if not args.warehouse:
            raise BadInput(f"models {args.action}: give --warehouse (the profiles to score)")
        from cdpflow.pipelines import train as training
        if args.action == "drift":
            report = training.drift_report(args.warehouse, root)
            if report is None:
                raise BadInput("no model is promoted: nothing to measure drift against")
            if args.json:
                print(orjson.dumps(report).decode())
                return 0
            table = Table(title=f"population stability of {report['profiles']} profiles against {report['version']} "
                                f"(trained {report['trained_at']})")
            table.add_column("feature")
            table.add_column("PSI", justify="right")
            table.add_column("")
            for name, value in sorted(report["psi"].items(), key=lambda kv: -kv[1]):
                table.add_row(name, f"{value:.3f}", "drifted" if value >= 0.25 else "moving" if value >= 0.1 else "")
            console.print(table)
            return 0
        compared = training.shadow_comparison(args.warehouse, root)
        if args.json:
            print(orjson.dumps({**compared, "moves": [{"from": a, "to": b, "profiles": n}
                                                      for (a, b), n in compared["moves"].items()]}).decode())
            return 0
        table = Table(title=f"{compared['shadow']} beside {compared['promoted']}: {compared['would_move']} of "
                            f"{compared['profiles']} profiles would move")
        for column in ("from", "to", "profiles"):
            table.add_column(column, justify="right" if column == "profiles" else "left")
        for (a, b), n in sorted(compared["moves"].items(), key=lambda kv: -kv[1]):
            table.add_row(a, b, str(n))
        console.print(table)
        return 0
    if args.action == "rollback":
        pointer = registry.rollback()
        console.print(f"rolled back from {pointer['rolled_back_from']} to {pointer['version']}")
        return 0
    if args.action == "show":
        version = args.version or (promoted or {}).get("version")
        if not version:
            raise BadInput("no model promoted yet: name the version to show")
        meta = registry.metadata(version)
        if args.json:
            print(orjson.dumps(meta).decode())
        else:
            console.print(_model_table(meta))
            console.print(f"features: {', '.join(meta['features'])}")
            console.print(f"libraries: {', '.join(f'{k} {v}' for k, v in meta['libraries'].items())}")
            console.print(f"trained on: {meta['training_window']}; parent: {meta.get('parent') or '-'}")
        return 0
    if not args.version:
        raise BadInput(f"models {args.action}: name the version")
    if args.action == "promote":
        registry.promote(args.version)
        console.print(f"promoted {args.version} (was {(promoted or {}).get('version') or 'none'})")
        return 0
    if args.version == "off":
        registry.set_shadow(None)
        console.print("no model is shadowed now")
        return 0
    registry.set_shadow(args.version)
    console.print(f"{args.version} is scored in shadow beside {(promoted or {}).get('version') or 'no promoted model'}")
    return 0


def cmd_report(args) -> int:
    from cdpflow.config import load_config
    from cdpflow.errors import BadInput
    from cdpflow.models.registry import registry_for
    from cdpflow.report import write_report
    config = load_config(args.config)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise BadInput(f"--out {args.out}: the folder {folder} does not exist")
    done = write_report(args.warehouse, args.out, args.registry or registry_for(config, args.warehouse))
    console.print(f"wrote {done['out']}: {done['plots']} plots, {done['segments']} segments, {done['profiles']} profiles")
    return 0


def cmd_flink(args) -> int:
    from cdpflow import flink
    if args.flink_command == "submit":
        import time

        from cdpflow.config import load_config
        from cdpflow.core.timeutil import parse_ts
        from cdpflow.errors import BadInput
        from cdpflow.pipelines.batch import reference_overrides
        from cdpflow.stack import stack_dir
        config = load_config(args.config, enrichment=reference_overrides(args.catalog, args.rates))
        try:
            until = parse_ts(args.until) if args.until else None
        except ValueError as err:
            raise BadInput(f"--until {args.until!r}: {err}") from None
        spec = flink.job_spec(args.bootstrap, args.warehouse, config, args.identity_store, args.parallelism,
                              args.checkpoint_ms, until, args.bounded)
        spec_path = args.spec_out or str(stack_dir() / "flink" / "specs" / f"job-{int(time.time() * 1000)}.json")
        job_id = flink.submit(spec, spec_path, args.jobmanager, args.from_savepoint)
        console.print(f"submitted {job_id} to {args.jobmanager} (spec {spec_path}); "
                      f"dashboard: http://{args.jobmanager}/#/job/running/{job_id}/overview")
        print(job_id)
    elif args.flink_command == "list":
        table = Table(title=f"Flink jobs at {args.jobmanager}")
        # the id whole, whatever the terminal's width: it is what cancel and savepoint take
        table.add_column("job id", no_wrap=True, min_width=32)
        for column in ("name", "state", "started"):
            table.add_column(column, overflow="fold")
        from cdpflow.core.timeutil import format_ts
        for job in flink.list_jobs(args.jobmanager):
            table.add_row(job["jid"], job["name"], job["state"], format_ts(job["start-time"] * 1000))
        console.print(table)
    elif args.flink_command == "cancel":
        flink.cancel(args.job_id, args.jobmanager)
        console.print(f"cancelled {args.job_id}")
    else:
        location = flink.savepoint(args.job_id, args.jobmanager, args.dir, stop=args.stop)
        console.print(f"savepoint of {args.job_id}{' (job stopped)' if args.stop else ''}:")
        print(location)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=os.environ.get("CDPFLOW_LOG", "WARNING"))
    args = _parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "run": cmd_run, "replay": cmd_replay, "export": cmd_export,
                "profile": cmd_profile, "identity": cmd_identity, "forget": cmd_forget, "publish": cmd_publish,
                "stack": cmd_stack, "serve": cmd_serve, "import": cmd_import, "send": cmd_send,
                "stream": cmd_stream, "load": cmd_load, "flink": cmd_flink, "bq": cmd_bq,
                "destinations": cmd_destinations, "train": cmd_train, "models": cmd_models, "report": cmd_report}
    from kafka.errors import KafkaTimeoutError
    from cdpflow.core.governance import GovernanceError
    from cdpflow.errors import BadInput
    from cdpflow.stack import StackError
    from cdpflow.warehouse import ConcurrentWriteError, WarehouseError
    try:
        return handlers[args.command](args)
    except ConcurrentWriteError as err:
        # Lost a race with another command: nothing of this one was written; it can simply run again.
        err_console.print(f"[red]cdpflow {args.command}: {err}[/red]")
        return 3
    except (FileNotFoundError, BadInput, WarehouseError, GovernanceError) as err:
        err_console.print(f"[red]cdpflow {args.command}: {err}[/red]")
        return 2
    except KafkaTimeoutError as err:
        # kafka-python's words for brokers that never answered the first request.
        if "bootstrap" not in str(err).lower():
            raise
        err_console.print(f"[red]cdpflow {args.command}: no Kafka broker answers at {getattr(args, 'bootstrap', None)}: "
                          f"is it running (`cdpflow stack up kafka`) and is --bootstrap right? ({err})[/red]")
        return 2
    except StackError as err:
        # A service that would not start or stop: said in words, with its log, not as a traceback.
        # Escaped: a log line may hold brackets that rich would take for markup.
        from rich.markup import escape
        err_console.print(f"[red]cdpflow {args.command}: {escape(str(err))}[/red]")
        return 1


if __name__ == "__main__":
    sys.exit(main())
