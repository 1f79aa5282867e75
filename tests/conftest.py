"""Shared fixtures: a local Beam runner and a small generated sample."""
from __future__ import annotations

import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline


def local_pipeline() -> TestPipeline:
    # The FnApiRunner, not DirectRunner: DirectRunner would try to download Prism first.
    return TestPipeline(runner=FnApiRunner())


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """A generated sample: 150 persons, 120 days, default noise."""
    from cdpflow.synthetic import generate
    out = tmp_path_factory.mktemp("sample")
    generate(out, customers=150, days=120, seed=11)
    return out
