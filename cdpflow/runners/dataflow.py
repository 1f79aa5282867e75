"""Dataflow: the flex template's launcher, and what submitting a job to Dataflow takes.

Two ways to Dataflow (deploy/dataflow/README.md has the whole recipe):

Direct submission, from a checkout with `pip install -c constraints.txt '.[gcp]'`: the graph is
built here, `--setup_file` stages cdpflow as an sdist, and the workers install it:

    cdpflow run --input DIR --warehouse URI --runner DataflowRunner -- \\
        --project P --region R --temp_location gs://B/tmp --setup_file ./setup.py \\
        --sdk_container_image apache/beam_python3.11_sdk:2.73.0

The flex template (deploy/dataflow/Dockerfile, metadata.json): Google's launcher runs
deploy/dataflow/main.py, which calls `main` here with every template parameter as
`--name=value`, followed by the job's pipeline options (runner, project, region, staging and
temp locations, `--setup_file` from FLEX_TEMPLATE_PYTHON_SETUP_FILE). The same by hand:

    python deploy/dataflow/main.py --input=DIR --warehouse=URI --project=P --region=R ...

`template_args` takes the template's parameters (TEMPLATE_PARAMETERS, the names in
metadata.json) and leaves every other flag to Beam. Without `--bootstrap` the job is the batch
pipeline over `--input`; with it, the stream from Kafka (`cdpflow.pipelines.live`), which writes
only to Kafka and resolves identities against `--identity_store` (Redis, reachable by every
worker); a `cdpflow load` beside the warehouse loads what it writes. Both take the warehouse as a URI; on Dataflow that is to be
`bigquery://PROJECT/DATASET`, a backend still to come (see the README for what else a working
Dataflow job lacks).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence, Tuple

from cdpflow.errors import BadInput
from cdpflow.io.kafka_source import STARTS

# The flex template's parameters, as metadata.json names them (tests/deploy checks the two agree).
TEMPLATE_PARAMETERS = ("input", "warehouse", "bootstrap", "from", "identity_store")

_LOG = logging.getLogger(__name__)


def template_parser() -> argparse.ArgumentParser:
    """The template's parameters; every other flag is a Beam pipeline option."""
    # No abbreviations: an unknown Beam flag must never be taken for a prefix of one of ours.
    parser = argparse.ArgumentParser(prog="cdpflow-dataflow", allow_abbrev=False,
                                     description="cdpflow's Dataflow launcher (the flex template's entry point)")
    parser.add_argument("--input", help="the batch job: JSON-lines files, a folder or a glob of them")
    parser.add_argument("--warehouse", required=True,
                        help="the warehouse URI (on Dataflow: bigquery://PROJECT/DATASET, a backend still to come)")
    parser.add_argument("--bootstrap", help="the stream job: Kafka brokers HOST:PORT[,HOST:PORT...] (default: none, the batch job)")
    parser.add_argument("--from", dest="start", choices=STARTS, default="committed",
                        help="the stream job: where it starts reading cdp.events.raw (default: the group's committed offsets)")
    parser.add_argument("--identity_store", help="the stream job: redis://HOST:PORT/DB, the identity store every "
                                                 "worker resolves against")
    parser.add_argument("--runner", default="DataflowRunner",
                        help="the Beam runner (default DataflowRunner; the template launcher passes it too)")
    return parser


def template_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """Splits a launcher command line into the template's parameters and Beam's options.

    Returns:
      The parsed parameters, and the remaining arguments (Beam pipeline options) in their order.

    Raises:
      BadInput: neither or both of `--input` and `--bootstrap`.
    """
    args, beam_args = template_parser().parse_known_args(argv)
    if bool(args.input) == bool(args.bootstrap):
        raise BadInput("give --input (the batch job) or --bootstrap (the stream job), and only one of them")
    return args, [a for a in beam_args if a != "--"]


def run(argv: Optional[Sequence[str]] = None):
    """Runs the template's job: the batch pipeline, or with `--bootstrap` the stream, on Dataflow.

    Returns:
      The batch run's `RunSummary` (None for the stream, which runs until cancelled).
    """
    from cdpflow.config import load_config
    from cdpflow.pipelines.batch import run_batch
    args, beam_args = template_args(argv)
    if args.bootstrap:
        from cdpflow.pipelines.live import run_stream
        run_stream(args.bootstrap, args.warehouse, load_config(None), runner=args.runner, start=args.start,
                   identity_store=args.identity_store, loader=False, pipeline_args=beam_args)
        return None
    return run_batch([args.input], args.warehouse, load_config(None), runner=args.runner, pipeline_args=beam_args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`run`, with a refusal said in words and exit code 2, as `cdpflow` does."""
    from cdpflow.core.governance import GovernanceError
    from cdpflow.warehouse import WarehouseError
    try:
        summary = run(argv)
    except (BadInput, FileNotFoundError, GovernanceError, WarehouseError) as err:
        _LOG.error("cdpflow on Dataflow: %s", err)
        return 2
    if summary is None:
        return 0
    _LOG.info("read %d, accepted %d, dead letters %d, duplicates %d", summary.read, summary.accepted,
              summary.dead_lettered, summary.deduplicated)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
