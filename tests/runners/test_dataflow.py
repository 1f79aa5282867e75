"""Submitting to Dataflow: the options a command line gives the pipeline, built without a network.

The pipeline itself is not constructed: with DataflowRunner, `beam.Pipeline` validates its
options against Google Cloud (the temp bucket's soft-delete policy), so these tests stop at the
`PipelineOptions` a run would hand it (`cdpflow.pipelines.batch.pipeline_options`).
"""
import argparse
import os

import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions, StandardOptions, WorkerOptions

from cdpflow.errors import BadInput
from cdpflow.pipelines.batch import add_run_arguments, beam_args, pipeline_options
from cdpflow.runners.dataflow import template_args
from cdpflow.runners.direct import submission_args

SDK_IMAGE = "apache/beam_python3.11_sdk:2.73.0"
DATAFLOW = ["--project", "cdpflow-test", "--region", "europe-west1", "--temp_location", "gs://cdpflow-test/tmp",
            "--sdk_container_image", SDK_IMAGE]


def run_args(argv):
    """`cdpflow run`'s flags parsed as the command parses them."""
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(argv)


def assert_dataflow_options(options, setup_file):
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == ("cdpflow-test", "europe-west1", "gs://cdpflow-test/tmp")
    assert options.view_as(SetupOptions).setup_file == setup_file
    assert options.view_as(WorkerOptions).sdk_container_image == SDK_IMAGE
    assert options.view_as(StandardOptions).runner == "DataflowRunner"


@pytest.mark.parametrize("setup_flag", [["--setup_file", "./setup.py"], ["--setup_file=setup.py"]])
def test_cdpflow_run_hands_the_dataflow_options_to_the_pipeline(tmp_path, monkeypatch, setup_flag):
    monkeypatch.chdir(tmp_path)
    args = run_args(["--input", "events", "--warehouse", "cdp.duckdb", "--runner", "DataflowRunner",
                     "--", *DATAFLOW, *setup_flag])
    runner, options = pipeline_options(args.runner, beam_args(args))
    assert runner == "DataflowRunner"
    # Absolute, whichever way it was written: Beam's stager changes into the file's folder.
    assert_dataflow_options(options, str(tmp_path / "setup.py"))


def test_the_template_launcher_splits_its_parameters_from_beams(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # As the flex-template launcher passes them: parameters and job options alike as --name=value.
    argv = ["--input=gs://b/events/*.jsonl", "--warehouse=bigquery://cdpflow-test/cdp", "--runner=DataflowRunner",
            *(f"{flag}={value}" for flag, value in zip(DATAFLOW[::2], DATAFLOW[1::2])), "--setup_file=/template/setup.py"]
    args, rest = template_args(argv)
    assert (args.input, args.warehouse, args.bootstrap, args.runner) == (
        "gs://b/events/*.jsonl", "bigquery://cdpflow-test/cdp", None, "DataflowRunner")
    assert not any(a.startswith(("--input", "--warehouse")) for a in rest)
    runner, options = pipeline_options(args.runner, rest)
    assert_dataflow_options(options, "/template/setup.py")


def test_the_launcher_takes_the_batch_or_the_stream_job_not_both():
    with pytest.raises(BadInput):
        template_args(["--warehouse=bigquery://p/d"])
    with pytest.raises(BadInput):
        template_args(["--warehouse=bigquery://p/d", "--input=gs://b/e", "--bootstrap=k:9092"])
    args, _ = template_args(["--warehouse=bigquery://p/d", "--bootstrap=k:9092", "--from=earliest"])
    assert (args.bootstrap, args.start) == ("k:9092", "earliest")


def test_the_stream_job_on_a_remote_runner_needs_an_identity_store_every_worker_reaches(tmp_path):
    from cdpflow.config import load_config
    from cdpflow.pipelines.live import run_stream
    for store in (None, f"sqlite://{tmp_path}/identity.sqlite"):
        with pytest.raises(BadInput, match="redis://"):
            run_stream("127.0.0.1:1", str(tmp_path / "w.duckdb"), load_config(None), runner="DataflowRunner",
                       identity_store=store)


def test_a_runner_named_twice_must_agree():
    assert submission_args("DataflowRunner", ["--runner", "dataflowrunner"]) == ["--runner=dataflowrunner"]
    with pytest.raises(BadInput):
        submission_args("DataflowRunner", ["--runner=FlinkRunner"])


def test_other_options_pass_through_in_order():
    args = ["--project=p", "--experiments=a", "--experiments", "b", "--setup_file", "setup.py"]
    assert submission_args("DataflowRunner", args) == [
        "--project=p", "--experiments=a", "--experiments", "b", f"--setup_file={os.path.abspath('setup.py')}",
        "--runner=DataflowRunner"]
