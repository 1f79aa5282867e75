"""Destinations: where segment changes go, behind one interface (`Destination`).

    webhook         a generic signed webhook, one change per request (`webhook.WebhookDestination`)
    email_audience  an email platform's audiences, members added and removed in batches, consent
                    applied (`email_audience.EmailAudienceDestination`)

A destination is named in the configuration (`activation.destinations.<name>`), with its type,
its field policy (`cdpflow.activation.policy`) and the segments it receives:

    activation:
      destinations:
        crm:
          type: webhook
          url: https://crm.example.com/hooks/cdp
          secret_env: CRM_WEBHOOK_SECRET      # the HMAC secret, from the environment
          segments: [high_value, lifecycle:at_risk]   # default: every segment
          fields: {identifiers: [email], traits: [first_name]}
"""
from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from cdpflow.activation.policy import FieldPolicy
from cdpflow.errors import BadInput


@dataclasses.dataclass
class Delivery:
    """One change to deliver: its idempotency key, the profile it concerns, and the body to send."""

    key: str
    profile_id: str
    body: Dict[str, Any]


@dataclasses.dataclass
class Outcome:
    """What became of one delivery: delivered, or failed for good (with why) after its attempts."""

    key: str
    delivered: bool
    attempts: int
    error: Optional[str] = None


class Destination(abc.ABC):
    """Receives segment changes. Implementations retry what is worth retrying themselves.

    `deliver` is given one profile's changes in their order and must keep it: when one fails
    for good, the ones after it are not attempted (they are returned as not delivered, held
    behind it), so a receiver never sees a profile's exit before its enter.
    """

    batched = False  # True: takes a whole batch of profiles at once (`deliver_many`)
    email = False    # True: an email destination, which the consent rule applies to

    def __init__(self, name: str, policy: FieldPolicy, segments: Optional[Sequence[str]] = None):
        self.name, self.policy = name, policy
        self.segments = frozenset(segments) if segments else None

    def wants(self, change: Mapping[str, Any]) -> bool:
        return self.segments is None or change.get("segment") in self.segments

    def body(self, change: Mapping[str, Any], profile: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """The change as this destination receives it: the change, and what the policy allows of the profile."""
        body = {k: change.get(k) for k in ("idempotency_key", "profile_id", "segment", "source", "direction", "at",
                                           "model_version")}
        body["destination"] = self.name
        view = self.policy.profile_view(profile)
        if view:
            body["profile"] = view
        return body

    @abc.abstractmethod
    def deliver(self, deliveries: Sequence[Delivery]) -> List[Outcome]:
        """Delivers one profile's changes in order; an outcome per delivery, in the same order."""

    def delete_member(self, profile: Mapping[str, Any], segments: Sequence[str]) -> Outcome:
        """Asks the destination to delete a forgotten person (`profile`: their row before the
        forget; `segments`: the segments they were in). Sent by `cdpflow forget` before the profile
        store drops them."""
        return Outcome(f"delete:{profile.get('profile_id')}", True, 0, "nothing held to delete")

    def deliver_many(self, per_profile: Sequence[Sequence[Delivery]]) -> List[List[Outcome]]:
        """Several profiles' changes (each profile's in order) at once; `batched` destinations
        send them together, others one profile after another."""
        return [self.deliver(deliveries) for deliveries in per_profile]

    def close(self) -> None:
        """Releases connections."""


def secret_from(config: Mapping[str, Any], where: str) -> bytes:
    """A destination's secret: from the environment variable `secret_env` names, or `secret`."""
    env = config.get("secret_env")
    if env:
        value = os.environ.get(env)
        if not value:
            raise BadInput(f"{where}.secret_env: the environment variable {env} is not set")
        return value.encode("utf-8")
    if config.get("secret"):
        return str(config["secret"]).encode("utf-8")
    raise BadInput(f"{where}: give secret_env (the environment variable holding the signing secret) or secret")


def http_url(settings: Mapping[str, Any], key: str, where: str) -> str:
    url = settings.get(key)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise BadInput(f"{where}.{key} must be an http:// or https:// URL, got {url!r}")
    return url


def positive_numbers(settings: Mapping[str, Any], spec: Sequence[tuple], where: str) -> Dict[str, Any]:
    """The settings named in `spec` ((key, default, whole number?) each), checked to be above 0."""
    numbers: Dict[str, Any] = {}
    for key, default, integer in spec:
        value = settings.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)) or value <= 0:
            raise BadInput(f"{where}.{key} must be a {'whole ' if integer else ''}number above 0, got {value!r}")
        numbers[key] = value
    return numbers


def refuse_unknown(settings: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    known = set(known)
    unknown = set(settings) - known
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")


RETRY_SETTINGS = (("timeout_seconds", 5.0, False), ("max_attempts", 8, True), ("backoff_seconds", 0.2, False),
                  ("max_backoff_seconds", 30.0, False), ("max_retry_after_seconds", 300.0, False))


def destinations_from_config(config: Mapping[str, Any], names: Optional[Sequence[str]] = None) -> Dict[str, Destination]:
    """The configured destinations (all, or those named), built and checked.

    Raises:
      BadInput: an unknown destination or type, or a setting that is missing or wrong.
    """
    configured = ((config.get("activation") or {}).get("destinations") or {})
    if not isinstance(configured, Mapping):
        raise BadInput("activation.destinations must be a mapping of destination names to settings")
    wanted = list(names) if names else sorted(configured)
    out: Dict[str, Destination] = {}
    for name in wanted:
        if name not in configured:
            raise BadInput(f"no destination {name!r} in activation.destinations "
                           f"(configured: {', '.join(sorted(configured)) or 'none'})")
        settings = configured[name] or {}
        where = f"activation.destinations.{name}"
        kind = settings.get("type")
        policy = FieldPolicy.from_config(settings.get("fields"), where)
        segments = settings.get("segments")
        if segments is not None and (not isinstance(segments, list) or not all(isinstance(s, str) for s in segments)):
            raise BadInput(f"{where}.segments must be a list of segment names")
        if kind == "webhook":
            from cdpflow.activation.destinations.webhook import WebhookDestination
            out[name] = WebhookDestination.from_config(name, settings, policy, segments, where)
        elif kind == "email_audience":
            from cdpflow.activation.destinations.email_audience import EmailAudienceDestination
            out[name] = EmailAudienceDestination.from_config(name, settings, policy, segments, where)
        else:
            raise BadInput(f"{where}.type: {kind!r} is not a destination type (webhook, email_audience)")
    return out
