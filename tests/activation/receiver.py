"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that fails on purpose.

It verifies every request's signature, keeps the first body of each idempotency key (what a
receiver deduplicating by the key processes), the order in which each profile's keys were first
processed, and every attempt (time, key, answer). Failures are drawn from a seeded generator:
`fail_rate` of requests get 500, 503 or 429 with `Retry-After: 1` (not processed), `slow_rate`
are processed but answered only after `slow_s` (the sender times out first), and `refuse` can
answer 400 to chosen changes until it is switched off.
"""
from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

import orjson

from cdpflow.activation.destinations.webhook import SIGNATURE_HEADER, verify_signature
from tests.activation.http_server import LoopbackServer


class Receiver(LoopbackServer):
    def __init__(self, secret: bytes, fail_rate=0.0, slow_rate=0.0, slow_s=1.0, seed=7, refuse=None):
        self.secret, self.fail_rate, self.slow_rate, self.slow_s = secret, fail_rate, slow_rate, slow_s
        self.refuse = refuse
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.processed = {}                 # idempotency key -> first body processed
        self.order = defaultdict(list)      # profile id -> keys, in the order first processed
        self.attempts = defaultdict(list)   # key -> [(monotonic time, status)]
        self.bodies = []                    # every signed body received, as bytes
        self.bad_signatures = 0
        self.requests = 0
        super().__init__()
        self.url = self.base_url + "/hooks/cdp"

    def answer(self, path, headers, body):
        status, extra, slow = self._decide(body, headers.get("Idempotency-Key"), headers.get(SIGNATURE_HEADER))
        return status, extra, self.slow_s if slow else 0

    def _decide(self, body, key, signature):
        with self.lock:
            self.requests += 1
            if not verify_signature(self.secret, body, signature):
                self.bad_signatures += 1
                self.attempts[key].append((time.monotonic(), 401))
                return 401, {}, False
            self.bodies.append(body)
            change = orjson.loads(body)
            if self.refuse is not None and self.refuse(change):
                self.attempts[key].append((time.monotonic(), 400))
                return 400, {}, False
            roll = self.random.random()
            if roll < self.fail_rate:
                status = self.random.choice((500, 503, 429))
                self.attempts[key].append((time.monotonic(), status))
                return status, ({"Retry-After": "1"} if status == 429 else {}), False
            if key not in self.processed:
                self.processed[key] = change
                self.order[change["profile_id"]].append(key)
            slow = roll < self.fail_rate + self.slow_rate
            self.attempts[key].append((time.monotonic(), "slow" if slow else 200))
            return 200, {}, slow
