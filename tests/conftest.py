"""Shared fixtures: a local Beam runner, a small generated sample, the CDNOW data, and real services."""
from __future__ import annotations

import importlib.util
import os
from datetime import date

import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline

from cdpflow.models.clv import calibration_summary

# Services started through `cdpflow stack` (redis_url, ...), for every test module.
pytest_plugins = ["tests.services"]

# The suite runs as the embedded demo does: a suppression key generated beside each warehouse.
# Tests of the production rule (no secret, no start) take this away for themselves.
os.environ.setdefault("CDPFLOW_DEMO", "1")


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


def cdnow_file(name):
    # Found without importing lifetimes (whose own imports are not installed): `make test`
    # installs the wheel with --no-deps only for its data.
    spec = importlib.util.find_spec("lifetimes")
    assert spec is not None, "the Lifetimes wheel is missing: make test installs it (pip install --no-deps lifetimes==0.11.3)"
    return os.path.join(spec.submodule_search_locations[0], "datasets", name)


@pytest.fixture(scope="session")
def cdnow():
    """The CDNOW sample's 39-week calibration summary (2,357 customers)."""
    transactions = []
    with open(cdnow_file("CDNOW_sample.txt")) as handle:
        for line in handle:
            customer, _, day, _, amount = line.split()
            transactions.append((customer, date(int(day[:4]), int(day[4:6]), int(day[6:])), float(amount)))
    # Fader, Hardie & Lee: a 39-week calibration period, 1997-01-01 .. 1997-09-30
    return calibration_summary(transactions, end=date(1997, 9, 30))
