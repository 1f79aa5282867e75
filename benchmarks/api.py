"""Benchmark: profile API lookups at a fixed request rate (open loop), on loopback.

    .venv/bin/python benchmarks/api.py [--rate 1000] [--seconds 10] [--profiles 10000]

Starts Redis (a free port, a temporary folder), stores `--profiles` profile rows in the profile
store, and runs `cdpflow serve api` as its own process pinned to CPU 0 (`taskset`), the load
generator pinned to CPU 1. The generator is open loop: request i is due at start + i / rate
whether or not earlier answers came (so a slow server shows as latency, not as a lower rate),
and its latency runs from when it was due to when its answer was read. Half the requests read a
profile by id, half look one up by email. Reports p50/p99/max and the rate achieved; results go
to benchmarks/results/api.json.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from cdpflow.activation.profile_store import open_profile_store  # noqa: E402
from cdpflow.stack.base import free_port  # noqa: E402
from cdpflow.stack.redis import Redis  # noqa: E402

KEY = "bench-api-key"


def seed(uri: str, profiles: int) -> list:
    store = open_profile_store(uri)
    now = int(time.time() * 1_000_000)
    emails = []
    for i in range(profiles):
        row = {"profile_id": f"p_bench{i:07d}", "email": f"person{i}@example.org", "user_id": f"u{i}",
               "first_name": f"P{i}", "traits": {"first_name": f"P{i}"}, "lifecycle_stage": "active",
               "event_count": i % 50, "as_of": now, "updated_at": now}
        store.apply_profile(row["profile_id"], row, now, now)
        emails.append(row["email"])
    store.close()
    return emails


def pinned(cpu: int, command: list) -> list:
    return ["taskset", "-c", str(cpu), *command] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else command


async def load(url: str, rate: float, seconds: float, profiles: int, emails: list):
    # aiohttp's client: the generator must outrun the server on its one core (httpx's async client
    # used ~80% of a core at 450 requests/s and became the limit)
    import aiohttp
    total = int(rate * seconds)
    latencies, statuses = [], {}
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout,
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:
        start = time.perf_counter() + 0.5
        pick = random.Random(7)

        async def one(i: int):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                if i % 2:
                    request = client.get(f"/v1/profiles/p_bench{pick.randrange(profiles):07d}")
                else:
                    request = client.get("/v1/profiles", params={"email": emails[pick.randrange(profiles)]})
                async with request as answer:
                    await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:  # a saturated server: counted
                status = type(err).__name__
            latencies.append(time.perf_counter() - due)
            statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(one(i) for i in range(total)))
        elapsed = time.perf_counter() - start
    return latencies, statuses, total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--profiles", type=int, default=10000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cdpflow-bench-api-"))
    redis = Redis(folder / "stack", port=free_port())
    redis.up()
    port = free_port()
    config = folder / "api.yaml"
    config.write_text(f"api:\n  keys:\n    bench: {{secret: {KEY}, scopes: [profiles:read, pii:read], "
                      f"requests_per_second: {args.rate * 10:g}}}\n")
    server = None
    try:
        uri = f"{redis.url()}?prefix=bench-api"
        emails = seed(uri, args.profiles)
        server = subprocess.Popen(pinned(0, [sys.executable, "-m", "cdpflow.cli", "serve", "api", "--config",
                                             str(config), "--profile-store", uri, "--port", str(port)]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import requests
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the API did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})  # the generator on the other core
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, min(args.rate, 200), 2, args.profiles, emails))  # warm-up
        latencies, statuses, achieved = asyncio.run(load(url, args.rate, args.seconds, args.profiles, emails))
        ms = sorted(x * 1000 for x in latencies)
        results = {"machine": common.machine(), "rate": args.rate, "seconds": args.seconds,
                   "requests": len(ms), "statuses": statuses, "achieved_rate": round(achieved),
                   "p50_ms": round(statistics.median(ms), 2), "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 2),
                   "max_ms": round(ms[-1], 2)}
        print(results)
        print("saved to", common.save_results("api", results))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        redis.down()


if __name__ == "__main__":
    main()
