"""The shared core in the Flink job's own venv: it imports and its tests pass there without Beam.

PyFlink pins an older Beam than the Beam pipelines, so the Flink job runs from a venv of its own
(`make flink`: `.cache/flink-venv`, cdpflow installed with --no-deps). The core's whole test
module set runs in that venv with every import of `apache_beam` made to fail (tests/flink/no_beam.py),
against a real Redis, as in the main suite.
"""
import os
import subprocess
import sys

from cdpflow.stack.flink import flink_venv


def test_the_cores_tests_pass_in_the_flink_venv_without_beam():
    python = flink_venv() / "bin" / "python"
    assert python.exists(), "the Flink venv is missing: `make test` builds it (make flink)"
    versions = subprocess.run([str(python), "-c", "import pyflink.version, sys; print(pyflink.version.__version__, "
                               "sys.version_info[:2])"], capture_output=True, text=True, timeout=120)
    assert versions.returncode == 0 and versions.stdout.startswith("2.2.1"), versions.stderr[-2000:]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # --noconftest: the main suite's conftest sets up Beam runners; the services plugin starts a
    # Redis of the child run's own, as the main suite's does.
    # tests/core/test_feature_oracle.py checks the pandas test oracle against a DuckDB file, not the
    # core, and DuckDB is no part of the job's venv: it is left to the main suite.
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                           "-p", "tests.flink.no_beam", "-p", "tests.services",
                           "--ignore", "tests/core/test_feature_oracle.py", "tests/core"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=os.getcwd())
    print(done.stdout[-1500:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout and "error" not in done.stdout.splitlines()[-1]
    assert sys.executable != str(python)
