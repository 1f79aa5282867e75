"""`cdpflow flink`: cdpflow's stream as a native PyFlink job on any Flink cluster.

    cdpflow flink submit --bootstrap HOST:PORT --warehouse URI --identity-store redis://HOST:PORT/DB
                         [--parallelism 2] [--from-savepoint PATH] [--jobmanager HOST:PORT]
    cdpflow flink list [--jobmanager HOST:PORT]
    cdpflow flink cancel JOB_ID [--jobmanager HOST:PORT]
    cdpflow flink savepoint JOB_ID [--stop] [--dir URI] [--jobmanager HOST:PORT]

`submit` writes the job's spec (bootstrap servers, topics, the identity store, the configuration,
and the identity rules' governance as the warehouse holds it now) to a file readable only by its
owner, then runs `flink run -d -py cdpflow/flink/job.py` with the Flink venv's Python on the
client and the workers. The venv (`make flink`, `.cache/flink-venv`, or `CDPFLOW_FLINK_VENV`)
must exist at the same path on every TaskManager: on an existing cluster, build it there from
`deploy/flink/requirements.txt` plus `pip install --no-deps cdpflow` (README, "Flink").

`list`, `cancel` and `savepoint` use the JobManager's REST API (8081 by default).
This module runs in the main (Beam) environment: it reads the warehouse; the job itself runs
in the Flink venv and never imports Beam.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from cdpflow.errors import BadInput

JOB_FILE = Path(__file__).resolve().with_name("job.py")
DEFAULT_JOBMANAGER = "127.0.0.1:8081"


class FlinkError(BadInput):
    """The cluster refused or failed a request; the message says what it answered."""


def rest(jobmanager: str, path: str, method: str = "GET", body: Optional[Dict[str, Any]] = None,
         timeout: float = 10.0) -> Any:
    """One request to the JobManager's REST API; the decoded JSON answer.

    Raises:
      FlinkError: unreachable, or an error status (with the errors the cluster gave).
    """
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{jobmanager}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")[:2000]
        raise FlinkError(f"Flink at {jobmanager} answered {err.code} to {method} {path}: {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise FlinkError(f"no Flink JobManager at {jobmanager} ({err}); is it running (`cdpflow stack up flink`)?") \
            from None
    return json.loads(text) if text else None


def list_jobs(jobmanager: str = DEFAULT_JOBMANAGER) -> List[Dict[str, Any]]:
    """Every job the cluster knows: id, name, state, start time, duration (newest first)."""
    jobs = rest(jobmanager, "/jobs/overview")["jobs"]
    return sorted(jobs, key=lambda j: j.get("start-time", 0), reverse=True)


def cancel(job_id: str, jobmanager: str = DEFAULT_JOBMANAGER) -> None:
    rest(jobmanager, f"/jobs/{job_id}?mode=cancel", method="PATCH")


def savepoint(job_id: str, jobmanager: str = DEFAULT_JOBMANAGER, directory: Optional[str] = None,
              stop: bool = False, timeout: float = 120.0, drain: bool = False) -> str:
    """Takes a savepoint (with `stop`, stop-with-savepoint) and waits for it; returns its location.

    `drain` (with `stop`): the watermark goes to the end of time before the last savepoint, so
    every event-time timer fires (a job stopped for good, not one to resume).

    Raises:
      FlinkError: the cluster refused it, it failed, or it did not complete in `timeout` seconds.
    """
    if stop:
        body: Dict[str, Any] = {"drain": drain}
        if directory:
            body["targetDirectory"] = directory
        trigger = rest(jobmanager, f"/jobs/{job_id}/stop", method="POST", body=body)["request-id"]
    else:
        body = {"cancel-job": False}
        if directory:
            body["target-directory"] = directory
        trigger = rest(jobmanager, f"/jobs/{job_id}/savepoints", method="POST", body=body)["request-id"]
    return _completed(jobmanager, f"/jobs/{job_id}/savepoints/{trigger}", f"savepoint of {job_id}",
                      timeout)["location"]


def checkpoint(job_id: str, jobmanager: str = DEFAULT_JOBMANAGER, timeout: float = 120.0) -> int:
    """Triggers a checkpoint now (besides the periodic ones) and waits for it; returns its id.

    Raises:
      FlinkError: the cluster refused it, it failed, or it did not complete in `timeout` seconds.
    """
    trigger = rest(jobmanager, f"/jobs/{job_id}/checkpoints", method="POST", body={})["request-id"]
    return int(_completed(jobmanager, f"/jobs/{job_id}/checkpoints/{trigger}", f"checkpoint of {job_id}",
                          timeout)["checkpointId"])


def _completed(jobmanager: str, path: str, what: str, timeout: float) -> Dict[str, Any]:
    """Polls an asynchronous operation (a savepoint, a checkpoint) until it completes; its result.

    Raises:
      FlinkError: it failed (with the cluster's cause), or did not complete in `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = rest(jobmanager, path)
        if answer["status"]["id"] == "COMPLETED":
            operation = answer.get("operation") or {}
            if "failure-cause" in operation:
                raise FlinkError(f"{what} failed: {operation['failure-cause'].get('class')}: "
                                 f"{str(operation['failure-cause'].get('stack-trace', ''))[:1500]}")
            return operation
        time.sleep(0.3)
    raise FlinkError(f"{what} did not complete within {timeout:g} s")


def _absolute(path: Optional[str]) -> Optional[str]:
    return path if not path or "://" in path else os.path.abspath(path)


def job_spec(bootstrap: str, warehouse: str, config: Dict[str, Any], identity_store: str, parallelism: int = 2,
             checkpoint_ms: int = 5000, until: Optional[int] = None, bounded: bool = False) -> Dict[str, Any]:
    """What the job runs with, read now from the warehouse and the configuration.

    `until` (UTC µs): no profile row after it, and a last row as of it for every profile once the
    watermark passes it (as `cdpflow stream --until`). `bounded`: the job reads the topic as it is
    at submit time and then finishes (every timer fires at the end of input).
    """
    from cdpflow.core import governance
    from cdpflow.core.identity import sqlite_path
    from cdpflow.models.registry import registry_for
    from cdpflow.schemas.topics import DEAD_LETTERS, PROFILE_CHANGES, RAW_EVENTS, SEGMENT_CHANGES, WAREHOUSE_ROWS
    from cdpflow.stack.flink import connector_jars, flink_venv
    from cdpflow.warehouse import open_warehouse
    if sqlite_path(identity_store) is not None:
        raise BadInput("--identity-store: give redis://HOST:PORT/DB: TaskManagers on other machines cannot share a "
                       "SQLite file")
    with open_warehouse(warehouse) as wh:
        key = governance.suppression_key(config, wh.demo_key_file())
        state = wh.governance()
        rules = governance.identity_rules(config, state, key)  # refuses hashes of a key it cannot match, now
        model = wh.latest_clv_model()
    # As `cdpflow stream` does at its start: the store the job resolves against forgets whoever the
    # warehouse forgot and applies its splits (separations and the names they gave) since it was used.
    from cdpflow.core.identity import open_identity_store
    store = open_identity_store(identity_store, rules)
    try:
        if not store.is_empty():
            store.purge(rules)
            store.separate(rules.separations, "warehouse separations", int(time.time() * 1_000_000), names=rules.names)
    finally:
        store.close()
    enrichment = config.get("enrichment") or {}
    reference = {}
    for name in ("catalog", "rates"):
        path = enrichment.get(name)
        try:
            reference[name] = Path(path).read_text(encoding="utf-8") if path else None
        except OSError as err:
            raise BadInput(f"enrichment {name} {path}: {err.strerror}") from None
    return {
        "name": "cdpflow-stream", "bootstrap": bootstrap, "raw_topic": RAW_EVENTS.name,
        "rows_topic": WAREHOUSE_ROWS.name, "dead_letter_topic": DEAD_LETTERS.name,
        "profiles_topic": PROFILE_CHANGES.name, "segments_topic": SEGMENT_CHANGES.name,
        "clv_model": json.loads(json.dumps(model, default=str)) if model else None, "until": until, "bounded": bounded,
        "reference": reference,
        "identity_store": identity_store, "config": config, "parallelism": parallelism,
        # the cluster models' registry, its promoted pointer followed on the workers (an absolute
        # path or gs://: TaskManagers read it themselves)
        "registry": _absolute(registry_for(config, warehouse)),
        "checkpoint_ms": checkpoint_ms,
        "governance": {"suppressed": sorted(state.suppressed), "separations": sorted(state.separations),
                       "names": sorted(state.names)},
        "suppression_secret": key.secret.decode() if key.secret else None,
        "python": str(flink_venv() / "bin" / "python"), "jars": [str(j) for j in connector_jars()],
    }


def submit(spec: Dict[str, Any], spec_path: str, jobmanager: str = DEFAULT_JOBMANAGER,
           from_savepoint: Optional[str] = None) -> str:
    """Writes the spec (owner-only: it holds the suppression secret) and submits the job; returns its id.

    Raises:
      FlinkError: `flink run` failed (its output is in the message).
    """
    from cdpflow.stack.flink import distribution, flink_venv
    os.makedirs(os.path.dirname(os.path.abspath(spec_path)) or ".", exist_ok=True)
    fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    python = str(flink_venv() / "bin" / "python")
    command = [str(distribution() / "bin" / "flink"), "run", "-d", "-m", jobmanager, "-p", str(spec["parallelism"])]
    if from_savepoint:
        command += ["-s", from_savepoint]
    command += ["-py", str(JOB_FILE), "-pyexec", python, "-pyclientexec", python, "--spec", os.path.abspath(spec_path)]
    env = dict(os.environ, FLINK_HOME=str(distribution()))
    env.pop("FLINK_CONF_DIR", None)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    found = re.search(r"JobID ([0-9a-f]{32})", output)
    if done.returncode != 0 or not found:
        raise FlinkError(f"flink run failed (exit {done.returncode}):\n{output[-3000:]}")
    return found.group(1)


def wait_for(job_id: str, states: Sequence[str], jobmanager: str = DEFAULT_JOBMANAGER, timeout: float = 120.0) -> str:
    """Waits until the job is in one of `states` (RUNNING: with every task running); returns the state.

    Raises:
      FlinkError: it ended in another terminal state, or the time ran out.
    """
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        job = rest(jobmanager, f"/jobs/{job_id}")
        state = job["state"]
        # RUNNING counts once every task runs (after a restart the job is RUNNING before its tasks
        # are, and a savepoint asked for then is refused)
        if state in states and (state != "RUNNING" or all(v["status"] == "RUNNING" for v in job["vertices"])):
            return state
        if state in ("FAILED", "CANCELED", "FINISHED"):
            exceptions = rest(jobmanager, f"/jobs/{job_id}/exceptions")
            root = (exceptions.get("root-exception") or "")[:3000]
            raise FlinkError(f"job {job_id} ended {state}, not {'/'.join(states)}: {root}")
        time.sleep(0.5)
    raise FlinkError(f"job {job_id} is {state} after {timeout:g} s, not {'/'.join(states)}")
