"""A fake email platform for the tests: audiences behind a list API like those of email tools.

`POST /lists/{audience}/members:batch` with `Authorization: Bearer <key>` and a body
`{"add": [{"email", "fields"}], "remove": [{"email"}]}` adds and removes members. It answers 401
for a wrong key, and 429 with `Retry-After: 1` to a request that comes sooner than
`min_interval_s` after the previous one (its rate limit), or at random (`throttle_rate`).
It keeps each audience's members, every request's time and size, and what was throttled.
"""
from __future__ import annotations

import random
import re
import threading
import time
import urllib.parse
from collections import defaultdict

import orjson

from tests.activation.http_server import LoopbackServer

PATH = re.compile(r"^/lists/([^/]+)/members:batch$")


class EmailPlatform(LoopbackServer):
    def __init__(self, api_key: str, min_interval_s: float = 0.0, throttle_rate: float = 0.0, seed: int = 3):
        self.api_key, self.min_interval_s, self.throttle_rate = api_key, min_interval_s, throttle_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.audiences = defaultdict(dict)  # audience -> email -> fields
        self.requests = []                  # (monotonic time, audience, adds, removes, status)
        self.last_accepted = None
        super().__init__()
        self.url = self.base_url

    def answer(self, path, headers, body):
        status, extra = self._handle(path, headers.get("Authorization"), body)
        return status, extra, 0

    def _handle(self, path, auth, body):
        match = PATH.match(path)
        with self.lock:
            now = time.monotonic()
            if not match:
                return 404, {}
            if auth != f"Bearer {self.api_key}":
                self.requests.append((now, None, 0, 0, 401))
                return 401, {}
            audience, payload = urllib.parse.unquote(match.group(1)), orjson.loads(body)
            adds, removes = payload.get("add") or [], payload.get("remove") or []
            too_soon = self.last_accepted is not None and now - self.last_accepted < self.min_interval_s
            if too_soon or self.random.random() < self.throttle_rate:
                self.requests.append((now, audience, len(adds), len(removes), 429))
                return 429, {"Retry-After": "1"}
            self.last_accepted = now
            for member in adds:
                self.audiences[audience][member["email"]] = member.get("fields") or {}
            for member in removes:
                self.audiences[audience].pop(member["email"], None)
            self.requests.append((now, audience, len(adds), len(removes), 200))
            return 200, {}

    def members(self):
        with self.lock:
            return {a: set(m) for a, m in self.audiences.items() if m}
