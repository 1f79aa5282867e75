"""A generic webhook destination: one signed POST per segment change, retried until it lands.

Each change is POSTed as JSON to the destination's URL with these headers:

    Content-Type: application/json
    Idempotency-Key: <the change's idempotency key>      (the same on every retry: dedupe on it)
    X-Cdpflow-Signature: sha256=<hex HMAC-SHA256 of the raw body with the destination's secret>
    X-Cdpflow-Destination: <the destination's name>

A receiver verifies the signature over the bytes it received (`verify_signature`) and keeps the
idempotency keys it has processed: a delivery whose answer was lost (a timeout) is sent again.

A 2xx is delivered. 429, 408, 5xx, a refused connection or a timeout are retried with
exponential backoff and full jitter (`backoff_seconds` doubling up to `max_backoff_seconds`),
waiting at least what `Retry-After` says (seconds or an HTTP date; at most
`max_retry_after_seconds`), for at most `max_attempts` attempts. Any other 4xx fails at once: the
receiver refuses the change itself, and retrying would only delay the changes behind it.
"""
from __future__ import annotations

import email.utils
import hashlib
import hmac
import random
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import orjson

from cdpflow.activation.destinations import (RETRY_SETTINGS, Delivery, Destination, Outcome, http_url,
                                              positive_numbers, refuse_unknown, secret_from)
from cdpflow.activation.policy import FieldPolicy

SIGNATURE_HEADER = "X-Cdpflow-Signature"
RETRYABLE = {408, 425, 429, 500, 502, 503, 504}


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: Optional[str]) -> bool:
    """Whether a received body carries this secret's signature (constant-time comparison)."""
    return bool(header) and hmac.compare_digest(sign(secret, body), header)


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """`Retry-After` in seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class WebhookDestination(Destination):
    """POSTs each change, signed, to `url` (see the module docstring)."""

    def __init__(self, name: str, url: str, secret: bytes, policy: FieldPolicy,
                 segments: Optional[Sequence[str]] = None, timeout_seconds: float = 5.0, max_attempts: int = 8,
                 backoff_seconds: float = 0.2, max_backoff_seconds: float = 30.0,
                 max_retry_after_seconds: float = 300.0, sleep: Callable[[float], None] = time.sleep):
        super().__init__(name, policy, segments)
        self.url, self.secret = url, secret
        self.timeout_seconds, self.max_attempts = timeout_seconds, max_attempts
        self.backoff_seconds, self.max_backoff_seconds = backoff_seconds, max_backoff_seconds
        self.max_retry_after_seconds = max_retry_after_seconds
        self._sleep = sleep

    @classmethod
    def from_config(cls, name: str, settings: Mapping[str, Any], policy: FieldPolicy,
                    segments: Optional[Sequence[str]], where: str) -> "WebhookDestination":
        url = http_url(settings, "url", where)
        numbers = positive_numbers(settings, RETRY_SETTINGS, where)
        refuse_unknown(settings, {"type", "url", "secret", "secret_env", "segments", "fields", *numbers}, where)
        return cls(name, url, secret_from(settings, where), policy, segments, **numbers)

    def _post(self, delivery: Delivery, url: Optional[str] = None, raw: Optional[bytes] = None,
              auth: Optional[bytes] = None) -> Tuple[Optional[int], Optional[str], str]:
        """(status or None, Retry-After, what happened) of one attempt."""
        body = orjson.dumps(delivery.body) if raw is None else raw
        headers = {"Content-Type": "application/json", "Idempotency-Key": delivery.key,
                   SIGNATURE_HEADER: sign(self.secret, body), "X-Cdpflow-Destination": self.name,
                   "User-Agent": "cdpflow-sidecar"}
        if auth is not None:
            headers["Authorization"] = auth.decode("utf-8")
        request = urllib.request.Request(url or self.url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as answer:
                answer.read()
                return answer.status, None, f"HTTP {answer.status}"
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Retry-After"), f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
            reason = getattr(err, "reason", err)
            return None, None, f"{type(reason).__name__}: {reason}"

    def deliver_one(self, delivery: Delivery, url: Optional[str] = None, raw: Optional[bytes] = None,
                    auth: Optional[bytes] = None) -> Outcome:
        """Sends one request until it lands or fails for good (`url`, `raw`, `auth`: another
        endpoint, body or Authorization header, for destinations that reuse these rules)."""
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            status, retry_after, error = self._post(delivery, url, raw, auth)
            if status is not None and 200 <= status < 300:
                return Outcome(delivery.key, True, attempt)
            if status is not None and status not in RETRYABLE:
                return Outcome(delivery.key, False, attempt, f"refused: {error}")
            if attempt == self.max_attempts:
                break
            # full jitter over an exponentially growing cap; Retry-After is a floor
            wait = random.uniform(0, min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 1)))
            asked = retry_after_seconds(retry_after)
            if asked is not None:
                wait = max(wait, min(asked, self.max_retry_after_seconds))
            self._sleep(wait)
        return Outcome(delivery.key, False, self.max_attempts, f"gave up after {self.max_attempts} attempts: {error}")

    def delete_member(self, profile: Mapping[str, Any], segments: Sequence[str]) -> Outcome:
        """A signed `{"type": "delete_member", ...}` POST, with what the field policy allows of the person."""
        body: Dict[str, Any] = {"type": "delete_member", "profile_id": profile.get("profile_id"),
                                "destination": self.name}
        view = self.policy.profile_view(profile)
        if view:
            body["profile"] = view
        key = hashlib.sha256(f"delete_member\x00{profile.get('profile_id')}".encode()).hexdigest()[:32]
        return self.deliver_one(Delivery(key, str(profile.get("profile_id")), body))

    def deliver(self, deliveries: Sequence[Delivery]) -> List[Outcome]:
        outcomes: List[Outcome] = []
        for delivery in deliveries:
            if outcomes and not outcomes[-1].delivered:
                outcomes.append(Outcome(delivery.key, False, 0, f"held behind {outcomes[-1].key}"))
                continue
            outcomes.append(self.deliver_one(delivery))
        return outcomes
