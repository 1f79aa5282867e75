"""deploy/dataflow/ agrees with the code: the template's parameters with the launcher's, the
image's entry point with a file that exists, and the workers' Beam with the one setup.py pins."""
import ast
import json
import re
from pathlib import Path

import pytest

from cdpflow.io.kafka_source import STARTS
from cdpflow.runners.dataflow import TEMPLATE_PARAMETERS, template_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "dataflow"


def beam_version():
    tree = ast.parse((REPO / "setup.py").read_text())
    (value,) = [node.value.value for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "BEAM_VERSION"]
    return value


@pytest.fixture(scope="module")
def parameters():
    spec = json.loads((DEPLOY / "metadata.json").read_text())
    assert spec["name"] and spec["description"]
    return {p["name"]: p for p in spec["parameters"]}


def test_the_template_declares_what_the_launcher_parses(parameters):
    assert tuple(parameters) == TEMPLATE_PARAMETERS
    flags = {a.option_strings[0].lstrip("-") for a in template_parser()._actions if a.option_strings}
    assert set(TEMPLATE_PARAMETERS) <= flags
    for name, parameter in parameters.items():
        assert parameter["label"] and parameter["helpText"], name
        # Only the warehouse is required: a job has either input (batch) or bootstrap (stream).
        assert parameter.get("isOptional", False) == (name != "warehouse"), name


@pytest.mark.parametrize("name, good, bad", [
    ("input", ["gs://b/events/*.jsonl", "gs://b/events/"], ["out/sample/events", "/data/events", ""]),
    ("warehouse", ["bigquery://my-project/cdp", "bigquery://cdpflow-test/cdp_2"],
     ["out/cdp.duckdb", "duckdb:///tmp/cdp.duckdb", "bigquery://P/cdp", "bigquery://my-project"]),
    ("bootstrap", ["kafka-1.internal:9092", "10.0.0.5:9092,10.0.0.6:9092"], ["kafka", "k:9092,", "k:port"]),
    ("from", list(STARTS), ["beginning", "Earliest", ""]),
    ("identity_store", ["redis://10.0.0.7:6379/0", "redis://redis.internal:6379/2?prefix=cdp"],
     ["sqlite:///tmp/identity.sqlite", "redis://host/0", ""]),
])
def test_each_parameter_regex_accepts_and_refuses(parameters, name, good, bad):
    patterns = [re.compile(r) for r in parameters[name]["regexes"]]
    for value in good:
        assert all(p.search(value) for p in patterns), value
    for value in bad:
        assert not all(p.search(value) for p in patterns), value


def test_the_image_runs_the_launcher_and_names_the_workers_beam():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM gcr\.io/dataflow-templates-base/python311-template-launcher-base\b", dockerfile, re.M)
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", dockerfile, re.M))
    copied = dict((dest, src) for src, dest in re.findall(r"^COPY (\S+) (\S+)$", dockerfile, re.M))
    assert env["FLEX_TEMPLATE_PYTHON_PY_FILE"] == "/template/main.py" and (REPO / copied["main.py"]).is_file()
    assert env["FLEX_TEMPLATE_PYTHON_SETUP_FILE"] == "/template/setup.py"
    assert re.search(r'pip install .*-c constraints\.txt "\.\[gcp\]"', dockerfile)
    # The workers' SDK image: Python 3.11 as the launcher base, Beam as setup.py pins it.
    image = f"apache/beam_python3.11_sdk:{beam_version()}"
    for doc in (dockerfile, (DEPLOY / "README.md").read_text()):
        assert image in doc
        assert not set(re.findall(r"apache/beam_python3\.11_sdk:([\d.]+\d)", doc)) - {beam_version()}
