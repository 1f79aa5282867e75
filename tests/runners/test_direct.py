"""The local runners' options: what cdpflow adds to a Prism run, and what it leaves to the user."""
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions

from cdpflow.runners.direct import runner_for


def _timeout(args):
    return PipelineOptions(args).view_as(PortableOptions).job_server_timeout


def test_a_prism_job_outlives_beams_default_job_service_deadline():
    # Beam's default (300 s) is the deadline of the job's state stream: a stream on Prism died
    # with DEADLINE_EXCEEDED after five minutes. cdpflow's default is years; a user's is kept.
    _, args = runner_for("prism", ["--prism_location=/bin/true"])
    assert _timeout(args) >= 365 * 86_400
    assert "--experiments=prism_disable_sdf_split" in args
    _, args = runner_for("prism", ["--prism_location=/bin/true", "--job_server_timeout=42"])
    assert _timeout(args) == 42
    _, args = runner_for("direct", [])
    assert _timeout(args) == 300  # the in-process runner has no job service to wait on
