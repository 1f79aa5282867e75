"""cdpflow as a Dataflow worker gets it: an sdist of setup.py, installed into a fresh environment.

With `--setup_file ./setup.py`, Beam's stager builds an sdist in the file's folder (`python -m
build --sdist`, else `python setup.py sdist`: the project does not install `build`), and each
worker `pip install`s that tarball into an image with Beam already installed. This test does the
same: the sdist, a new venv that sees the project's installed dependencies but not its checkout
or its editable install, `pip install --no-deps --no-build-isolation` of the tarball, then the
CLI and the batch pipeline from the installed copy, in a folder outside the checkout. A module
or a data file that setup.py fails to ship fails here instead of on a worker.
"""
import json
import os
import re
import subprocess
import sys
import sysconfig
from datetime import datetime
from pathlib import Path

import duckdb
import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _env():
    # PYTHONPATH (set when the suite runs against another checkout) would put that checkout ahead
    # of the installed copy.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["CDPFLOW_DEMO"] = "1"
    return env


def _run(argv, cwd):
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv[:3]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the new venv's python, its site-packages, a working folder outside the checkout)."""
    root = tmp_path_factory.mktemp("installed")
    dist, egg = root / "dist", root / "egg"
    egg.mkdir()
    # The stager's fallback command, with the egg-info kept out of the checkout: a SOURCES.txt
    # left there by an earlier build is read back into the next sdist, and could ship files that
    # a fresh clone's build (CI, a release) would not.
    _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", egg, "sdist", "--dist-dir", dist], cwd=REPO)
    (sdist,) = dist.glob("cdpflow-*.tar.gz")

    venv = root / "venv"
    # No pip of its own: pip and setuptools come with the preinstalled environment, as on a worker.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    # Plain path lines: site appends them to sys.path but runs no .pth file found in them, so the
    # project venv's editable finder (its __editable__ .pth) never loads and the checkout stays out.
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "preinstalled.pth").write_text("".join(f"{path}\n" for path in ours))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
          "--no-cache-dir", "--disable-pip-version-check", "--quiet", sdist], cwd=root)
    work = root / "work"
    work.mkdir()
    return python, site, work


def test_cdpflow_is_imported_from_the_installed_copy(installed):
    python, site, work = installed
    where = _run([python, "-c", "import cdpflow; print(cdpflow.__file__)"], cwd=work).strip()
    assert Path(where) == site / "cdpflow" / "__init__.py"


def test_every_schema_and_the_default_config_are_installed(installed):
    _, site, _ = installed
    in_repo = sorted(p.relative_to(REPO / "cdpflow").as_posix() for p in (REPO / "cdpflow/schemas/events").rglob("*.json"))
    shipped = sorted(p.relative_to(site / "cdpflow").as_posix() for p in (site / "cdpflow/schemas/events").rglob("*.json"))
    assert len(in_repo) >= 7 and shipped == in_repo
    for name in in_repo + ["config/default.yaml"]:
        assert (site / "cdpflow" / name).read_bytes() == (REPO / "cdpflow" / name).read_bytes(), name


def _ts(value):
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _event_time(event):
    # Segment's clock-skew rule, as the tracking spec states it (cdpflow/core/normalize.py follows it).
    if all(event.get(k) for k in ("receivedAt", "sentAt", "originalTimestamp")):
        return _ts(event["receivedAt"]) - (_ts(event["sentAt"]) - _ts(event["originalTimestamp"]))
    for key in ("timestamp", "originalTimestamp", "receivedAt"):
        if event.get(key):
            return _ts(event[key])


def expected_message_ids(events_dir, config):
    """The messageIds a run must accept: each event that parses and has one copy on time.

    Schemas are not re-checked here: the generator's manifest says this sample has no schema
    violation, and the test asserts it.
    """
    allowed = config["features"]["allowed_lateness_hours"] * 3600
    future = config["features"]["max_future_skew_hours"] * 3600
    ids, lines = set(), 0
    for path in sorted(events_dir.glob("*.jsonl")):
        for line in path.read_text("utf-8").splitlines():
            if not line.strip():
                continue
            lines += 1
            try:
                event = json.loads(line)
            except ValueError:
                continue
            lateness = _ts(event["receivedAt"]) - _event_time(event)
            if -future <= lateness <= allowed:
                ids.add(event["messageId"])
    return ids, lines


def test_the_installed_cli_and_batch_pipeline_run_outside_the_checkout(installed):
    python, _, work = installed
    sample, warehouse = work / "sample", work / "cdp.duckdb"
    _run([python.parent / "cdpflow", "generate", "--customers", "30", "--days", "20", "--seed", "3",
          "--out", sample], cwd=work)
    printed = _run([python, "-m", "cdpflow.pipelines.batch", "--input", sample / "events",
                    "--warehouse", warehouse], cwd=work)
    duplicates = int(re.search(r"duplicates (\d+)", printed).group(1))

    manifest = json.loads((sample / "manifest.json").read_text())
    assert manifest["events"]["schema_violation"] == 0
    config = yaml.safe_load((REPO / "cdpflow/config/default.yaml").read_text())
    expected, lines = expected_message_ids(sample / "events", config)
    db = duckdb.connect(str(warehouse), read_only=True)
    accepted = [row[0] for row in db.execute("SELECT message_id FROM events").fetchall()]
    dead_letters = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    assert db.execute("SELECT count(*) FROM profiles").fetchone()[0] > 0
    assert len(accepted) == len(set(accepted)) and set(accepted) == expected
    # Every input line is accounted for: accepted, dead-lettered, or dropped as a duplicate.
    assert lines == manifest["events"]["lines"] == len(accepted) + dead_letters + duplicates
