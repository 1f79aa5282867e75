"""An email platform's audiences: members added and removed in batches, as the list APIs of email tools take them.

Each segment maps to an audience (`audiences: {segment: audience id}`; a segment not listed is
its own audience id), and a batch of changes becomes, per audience, one request (or more, of at
most `batch_size` members each):

    POST {base_url}/lists/{audience}/members:batch
    Authorization: Bearer <api key>
    Idempotency-Key: <SHA-256 of the body>
    {"add": [{"email": "ann@example.org", "fields": {"first_name": "Ann"}}], "remove": [{"email": "bob@example.org"}]}

- **Order.** Within a batch the last change of a member and audience wins (an enter then an
  exit is a remove); batches go in the order the topic holds them.
- **Consent** (`cdpflow.activation.consent`): an enter of a profile that unsubscribed or
  withdrew marketing consent is sent as a remove, never an add, until consent returns; and when
  a profile withdraws consent the sidecar removes it from the audiences of all its segments.
- **Email.** The member is the profile's email, so the destination's field policy must let the
  email through in clear (`fields.identifiers: [email]`); other fields it allows go in `fields`.
  A profile without an email is not an audience member: its changes count as done.
- **Rate limits.** At most `requests_per_second`; 429 and 5xx are retried with backoff, never
  sooner than `Retry-After` (as the webhook destination does); other 4xx fail the request, and
  every change in it is dead-lettered (holding its profile).
"""
from __future__ import annotations

import hashlib
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import orjson

from cdpflow.activation.consent import CONSENT_TRAITS, email_consent
from cdpflow.activation.destinations import (RETRY_SETTINGS, Delivery, Destination, Outcome, http_url,
                                              positive_numbers, refuse_unknown, secret_from)
from cdpflow.activation.destinations.webhook import WebhookDestination
from cdpflow.activation.policy import FieldPolicy
from cdpflow.errors import BadInput


class EmailAudienceDestination(Destination):
    batched = True
    email = True

    def __init__(self, name: str, base_url: str, api_key: bytes, policy: FieldPolicy,
                 segments: Optional[Sequence[str]] = None, audiences: Optional[Mapping[str, str]] = None,
                 batch_size: int = 500, requests_per_second: float = 10.0, consent_traits: Sequence[str] = CONSENT_TRAITS,
                 **retries: Any):
        super().__init__(name, policy, segments)
        self.base_url, self.api_key = base_url.rstrip("/"), api_key
        self.audiences = dict(audiences or {})
        self.batch_size, self.interval = batch_size, 1.0 / requests_per_second
        self.consent_traits = tuple(consent_traits)
        # the HTTP attempts, backoff and Retry-After rules are the webhook's
        self._http = WebhookDestination(name, base_url, api_key, policy, **retries)
        self._lock, self._next_at = threading.Lock(), 0.0

    @classmethod
    def from_config(cls, name: str, settings: Mapping[str, Any], policy: FieldPolicy,
                    segments: Optional[Sequence[str]], where: str) -> "EmailAudienceDestination":
        url = http_url(settings, "base_url", where)
        if "email" not in policy.identifiers or "email" in policy.hashed:
            raise BadInput(f"{where}.fields.identifiers must include email (in clear): an audience member is an email")
        audiences = settings.get("audiences") or {}
        if not isinstance(audiences, Mapping) or not all(isinstance(v, str) for v in audiences.values()):
            raise BadInput(f"{where}.audiences must map segment names to audience ids")
        numbers = positive_numbers(settings, (("batch_size", 500, True), ("requests_per_second", 10.0, False),
                                              *RETRY_SETTINGS), where)
        refuse_unknown(settings, {"type", "base_url", "api_key", "api_key_env", "segments", "fields", "audiences",
                                  "consent_traits", *numbers}, where)
        traits = settings.get("consent_traits", list(CONSENT_TRAITS))
        key = secret_from({"secret_env": settings.get("api_key_env"), "secret": settings.get("api_key")}, where)
        return cls(name, url, key, policy, segments, audiences, consent_traits=traits, **numbers)

    def audience_of(self, segment: str) -> str:
        return self.audiences.get(segment, segment)

    def body(self, change: Mapping[str, Any], profile: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        body = super().body(change, profile)
        body["consented"] = email_consent(profile, self.consent_traits)
        return body

    # ------------------------------------------------------------------ requests
    def _pace(self) -> None:
        with self._lock:
            now = time.monotonic()
            wait = self._next_at - now
            self._next_at = max(now, self._next_at) + self.interval
        if wait > 0:
            time.sleep(wait)

    def _request(self, audience: str, add: List[Dict[str, Any]], remove: List[Dict[str, Any]]) -> Outcome:
        payload = orjson.dumps({"add": add, "remove": remove})
        self._pace()
        request = Delivery(hashlib.sha256(audience.encode() + b"\x00" + payload).hexdigest()[:32], "", {})
        url = f"{self.base_url}/lists/{urllib.parse.quote(audience, safe='')}/members:batch"
        return self._http.deliver_one(request, url=url, raw=payload,
                                      auth=b"Bearer " + self.api_key)

    def deliver(self, deliveries: Sequence[Delivery]) -> List[Outcome]:
        return self.deliver_many([list(deliveries)])[0]

    def deliver_many(self, per_profile: Sequence[Sequence[Delivery]]) -> List[List[Outcome]]:
        """One batch of several profiles' changes: the net add/remove per audience and member."""
        ops: "OrderedDict[str, OrderedDict[str, Tuple[str, Dict[str, Any]]]]" = OrderedDict()
        members: Dict[str, List[Tuple[str, str]]] = {}
        outcomes: Dict[str, Outcome] = {}
        for deliveries in per_profile:
            for delivery in deliveries:
                profile = delivery.body.get("profile") or {}
                email = profile.get("email")
                if not email:
                    outcomes[delivery.key] = Outcome(delivery.key, True, 0, "no email: not an audience member")
                    continue
                audience = self.audience_of(delivery.body["segment"])
                add = delivery.body["direction"] == "enter" and delivery.body.get("consented")
                fields = {k: v for k, v in (profile.get("traits") or {}).items()}
                per_audience = ops.setdefault(audience, OrderedDict())
                per_audience.pop(email, None)  # the last change of the member wins, in its place
                per_audience[email] = ("add" if add else "remove", fields)
                members.setdefault(audience, []).append((delivery.key, email))
        for audience, entries in ops.items():
            items = list(entries.items())
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                add = [{"email": e, "fields": f} for e, (op, f) in chunk if op == "add"]
                remove = [{"email": e} for e, (op, _) in chunk if op == "remove"]
                result = self._request(audience, add, remove)
                emails = {e for e, _ in chunk}
                for key, email in members[audience]:
                    if email in emails:
                        outcomes[key] = Outcome(key, result.delivered, result.attempts, result.error)
        return [[outcomes[d.key] for d in deliveries] for deliveries in per_profile]

    def delete_member(self, profile: Mapping[str, Any], segments: Sequence[str]) -> Outcome:
        """Removes a forgotten person's email from the audiences of every segment they were in."""
        email = self.policy.profile_view(profile).get("email")
        audiences = {self.audience_of(s): [email] for s in segments if self.wants({"segment": s})}
        key = f"delete:{profile.get('profile_id')}"
        if not email or not audiences:
            return Outcome(key, True, 0, "not in any audience")
        ok = self.remove_everywhere(audiences)
        return Outcome(key, ok, 1, None if ok else "an audience request failed")

    def remove_everywhere(self, emails_by_audience: Mapping[str, Sequence[str]]) -> bool:
        """Removes members from audiences (a consent withdrawal); True when every request succeeded."""
        ok = True
        for audience, emails in emails_by_audience.items():
            for start in range(0, len(emails), self.batch_size):
                chunk = list(emails[start:start + self.batch_size])
                ok &= self._request(audience, [], [{"email": e} for e in chunk]).delivered
        return ok
