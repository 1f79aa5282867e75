"""Benchmark: segment changes delivered per second by the activation sidecar, on loopback.

    .venv/bin/python benchmarks/sidecar.py [--profiles 2000] [--changes-per-profile 5]

Starts a Kafka broker and Redis (free ports, a temporary folder), writes profile rows to
`cdp.profiles.changes` and `--profiles` x `--changes-per-profile` enter/exit changes to
`cdp.segments.changes`, then runs `cdpflow serve sidecar --until-idle 3` (its own process) once
per destination type against a receiver in another process that answers 200 at once:
- webhook: one signed POST per change, 8 profiles delivered side by side;
- email_audience: members added and removed in batches of up to 500 per audience request.
Deliveries per second = changes / (time from the sidecar's start until the receiver has every
change's key or member operation). The sidecar's start-up (imports, consumer group join) is in
the time. Results go to benchmarks/results/sidecar.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import requests
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from cdpflow.core.rows import profile_record, segment_record  # noqa: E402
from cdpflow.core.segments import segment_change  # noqa: E402
from cdpflow.io.kafka_producer import producer, send_all  # noqa: E402
from cdpflow.stack.base import free_port  # noqa: E402
from cdpflow.stack.kafka import Kafka  # noqa: E402
from cdpflow.stack.redis import Redis  # noqa: E402

RECEIVER = r'''
import sys, threading, orjson
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
seen, ops, lock = set(), [0], threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        body = orjson.dumps({"keys": len(seen), "ops": ops[0]})
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        body = orjson.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with lock:
            if "add" in body:
                ops[0] += len(body["add"]) + len(body["remove"])
            else:
                seen.add(self.headers.get("Idempotency-Key"))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
server.daemon_threads = True
server.serve_forever()
'''


def seed(bootstrap: str, profiles: int, per_profile: int):
    rows, changes = [], []
    now = int(time.time() * 1_000_000)
    for i in range(profiles):
        pid = f"p_bench{i:06d}"
        rows.append({"profile_id": pid, "email": f"person{i}@example.org", "user_id": f"u{i}",
                     "traits": {"first_name": f"P{i}"}, "unsubscribed": False, "as_of": now, "updated_at": now})
        for j in range(per_profile):
            changes.append(segment_change(pid, f"segment_{i % 7}", "rule", "enter" if j % 2 == 0 else "exit",
                                          "2026-12-01T00:00:00Z", f"bench-{j}"))
    client = producer(bootstrap)
    try:
        send_all(client, [profile_record(r) for r in rows] + [segment_record(c) for c in changes])
    finally:
        client.close()
    return changes


def run(folder: Path, bootstrap: str, store: str, kind: str, total: int, expected, port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    settings = ({"type": "webhook", "url": url + "/hook", "secret": "bench"} if kind == "webhook" else
                {"type": "email_audience", "base_url": url, "api_key": "bench", "requests_per_second": 1000,
                 "fields": {"identifiers": ["email"]}})
    config = folder / f"{kind}.yaml"
    config.write_text(yaml.safe_dump({"activation": {"destinations": {kind: settings}}}))
    warehouse = folder / "governance.duckdb"
    started = time.monotonic()
    sidecar = subprocess.Popen([sys.executable, "-m", "cdpflow.cli", "serve", "sidecar", "--config", str(config),
                                "--bootstrap", bootstrap, "--profile-store", store, "--warehouse", str(warehouse),
                                "--until-idle", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, CDPFLOW_DEMO="1"))
    while True:
        counts = requests.get(url, timeout=5).json()
        if counts["keys" if kind == "webhook" else "ops"] >= expected:
            break
        if sidecar.poll() is not None:
            raise SystemExit(f"the sidecar ended first ({counts}, wanted {expected}): {sidecar.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    seconds = time.monotonic() - started
    sidecar.wait(timeout=120)
    return {"changes": total, "seconds": round(seconds, 2), "deliveries_per_s": round(total / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=2000)
    parser.add_argument("--changes-per-profile", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cdpflow-bench-sidecar-"))
    kafka = Kafka(folder / "stack", port=free_port(), controller_port=free_port())
    redis = Redis(folder / "stack", port=free_port())
    kafka.up()
    redis.up()
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        time.sleep(1.0)
        changes = seed(kafka.bootstrap_servers(), args.profiles, args.changes_per_profile)
        results = {"machine": common.machine(), "profiles": args.profiles}
        # a webhook receives every change; an audience the net operation per member and audience
        # of each batch, at least one per profile and segment
        results["webhook"] = run(folder, kafka.bootstrap_servers(), f"{redis.url()}?prefix=bench-w", "webhook",
                                 len(changes), len(changes), port)
        net = len({(c["profile_id"], c["segment"]) for c in changes})
        results["email_audience"] = run(folder, kafka.bootstrap_servers(), f"{redis.url()}?prefix=bench-e",
                                        "email_audience", len(changes), net, port)
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
        print("saved to", common.save_results("sidecar", results))
    finally:
        receiver.terminate()
        redis.down()
        kafka.down()


if __name__ == "__main__":
    main()
