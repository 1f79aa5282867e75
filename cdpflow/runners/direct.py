"""Local runners: the in-process FnApiRunner, its multi-process mode, and Prism.

Why not plain `DirectRunner`: it tries Prism first, and Prism's binary is downloaded at run
time from a code-hosting site unless `--prism_location` names a local one. cdpflow picks the
engine explicitly instead:
  direct        FnApiRunner in this process (batch; the embedded default)
  multiprocess  FnApiRunner with 2 SDK worker processes (`--direct_num_workers`)
  prism         PrismRunner with a binary built by `go install` (`make prism`); the path comes
                from --prism_location, $CDPFLOW_PRISM or .cache/bin/prism
  anything else is passed to Beam as the runner's name (DataflowRunner, FlinkRunner, ...), with
                `--runner` and an absolute `--setup_file` in its options (`submission_args`);
                cdpflow/runners/dataflow.py is the Dataflow flex template's launcher
Streaming (`streaming_pipeline`): the BundleBased DirectRunner or Prism.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

from cdpflow.errors import BadInput

LOCAL_RUNNERS = ("direct", "multiprocess", "prism")
PRISM_JOB_SERVICE_TIMEOUT_S = 10 * 365 * 86_400  # ten years: gRPC takes it, a stream outlives 300 s


def prism_binary() -> str:
    """The local Prism binary, or a clear error saying how to build it."""
    candidates = [os.environ.get("CDPFLOW_PRISM"), os.path.join(".cache", "bin", "prism")]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise FileNotFoundError(
        "no Prism binary: build it with `make prism` (go install) or set CDPFLOW_PRISM to its path")


def runner_for(name: str, pipeline_args: List[str]) -> Tuple[object, List[str]]:
    """The runner object (or name) and the pipeline arguments to use for a runner choice."""
    args = list(pipeline_args)
    if name in ("direct", "multiprocess"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        if name == "multiprocess" and not any(a.startswith("--direct_num_workers") for a in args):
            args += ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
        return FnApiRunner(), args
    if name == "prism":
        from apache_beam.runners.portability.prism_runner import PrismRunner
        if not any(a.startswith("--prism_location") for a in args):
            args.append(f"--prism_location={prism_binary()}")
        # Prism 2.73 splits a slow bundle and hands its unprocessed rest to a new bundle at once,
        # releasing those elements' keys while the first part, holding the same keys, has not
        # yet saved their state: the new bundle of a stateful stage then starts from the state
        # before it (empty for a new key), and the last bundle to finish overwrites the other's.
        # A stream lost part of a profile's events that way (docs/versions.md). Runner-initiated
        # splits are off; sources still checkpoint themselves (`defer_remainder`).
        args.append("--experiments=prism_disable_sdf_split")
        # Beam opens the job's state and message streams with `--job_server_timeout` (300 s by
        # default) as their gRPC deadline: a job running longer (a stream, a big batch run) ends
        # with DEADLINE_EXCEEDED while Prism still runs it. The job service is our own child
        # process, so its calls get no practical deadline unless the user sets one.
        if not any(a.startswith(("--job_server_timeout", "--job-server-timeout")) for a in args):
            args.append(f"--job_server_timeout={PRISM_JOB_SERVICE_TIMEOUT_S}")
        return PrismRunner(), args
    return name, submission_args(name, args)


def submission_args(runner: str, args: List[str]) -> List[str]:
    """The pipeline arguments of a job handed to a remote runner (Dataflow, Flink, ...).

    Args:
      runner: the Beam runner's name, as given to cdpflow's `--runner`.
      args: Beam pipeline options; every one but these two is kept as it is, in its place.

    - `--runner` is added when absent: the runner given to `beam.Pipeline` runs the job either
      way, but Beam reads the runner's name from the options when it stages the job's files,
      and without one takes the job for a local run.
    - `--setup_file` is made absolute: Beam's stager changes into the file's folder to build
      the sdist, and the folder of a bare `setup.py` is '' (a crash, not the current folder).

    Raises:
      BadInput: `--runner` after `--` names another runner than `--runner` before it.
    """
    out = []
    named = None
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in ("--runner", "--setup_file") and (eq or i + 1 < len(args)):
            if not eq:
                i += 1
                value = args[i]
            if flag == "--runner":
                named = value
            else:
                value = os.path.abspath(value)
            out.append(f"{flag}={value}")
        else:
            out.append(arg)
        i += 1
    if named is None:
        out.append(f"--runner={runner}")
    elif named.lower() != runner.lower():
        raise BadInput(f"the Beam options name runner {named!r}, but --runner is {runner!r}: "
                       f"give the runner once, as cdpflow's --runner")
    return out


STREAM_RUNNERS = ("direct", "prism")


def streaming_pipeline(runner: str, pipeline_args: Sequence[str] = ()):
    """A streaming pipeline on a local runner: `direct` (Beam's BundleBased DirectRunner, the one
    that runs TestStream) or `prism` (its Python workers in this process); `pipeline_args` are
    more Beam options."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    if runner == "prism":
        # One SDK worker: with two, Prism 2.73 let more re-sent copies through the stateful dedup
        # behind a TestStream (docs/versions.md).
        prism, args = runner_for("prism", ["--streaming", "--environment_type=LOOPBACK", "--sdk_worker_parallelism=1",
                                           *pipeline_args])
        return beam.Pipeline(runner=prism, options=PipelineOptions(args))
    if runner != "direct":
        raise BadInput(f"a local stream runs on {' or '.join(STREAM_RUNNERS)}, not {runner!r}")
    return beam.Pipeline(runner="BundleBasedDirectRunner", options=PipelineOptions(list(pipeline_args), streaming=True))
