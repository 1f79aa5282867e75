"""Governance: forgotten identifiers, manual separations, and how every path learns of them.

What a warehouse says about governance (its `identity_suppressions` and `identity_separations`
tables) is read into one `GovernanceState`; `identity_rules` turns that state and the
configuration into the `IdentityRules` that every path resolves with: the batch run, the
replay, and every stream. A path that built its rules from the configuration alone would let a
forgotten person back in through old raw events, so no path does.

Forgotten identifiers are kept only as keyed hashes: HMAC-SHA256 over the identifier with a
per-deployment secret, so that the table cannot be reversed by hashing a list of known emails.
Each hash records the id of the key that made it. Hashes written before keys existed (the
release that salted with a constant) carry the legacy key id, and are still matched: the
legacy scheme is always among the keys tried, so an upgrade never lets a forgotten person back.

Where the secret comes from, in order: the environment (`CDPFLOW_SUPPRESSION_SECRET`), the
configuration (`governance.suppression_secret`), or, for the embedded demo only
(`CDPFLOW_DEMO=1`), a random key kept in a file beside the warehouse. Anything else is a clear
start-up error (`GovernanceError`).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import orjson

from cdpflow.schemas.records import Identifier

LEGACY_KEY_ID = "legacy-sha256"
SECRET_ENV = "CDPFLOW_SUPPRESSION_SECRET"
DEMO_ENV = "CDPFLOW_DEMO"

Separation = Tuple[Identifier, Identifier]


class GovernanceError(RuntimeError):
    """Governance cannot be applied as configured (no secret, or hashes of an unknown key)."""


def _node_text(identifier: Identifier) -> str:
    return f"{identifier[0]}\x00{identifier[1]}"


@dataclass(frozen=True)
class SuppressionKey:
    """A key that suppression hashes are made with; `secret=None` is the legacy constant salt."""

    key_id: str
    secret: Optional[bytes] = None

    @classmethod
    def from_secret(cls, secret: str) -> "SuppressionKey":
        raw = secret.encode("utf-8")
        # The id names the key without revealing it: a hash of the secret, domain-separated.
        return cls("k_" + hashlib.sha256(b"cdpflow-suppression-key-id\x00" + raw).hexdigest()[:16], raw)

    def hash(self, identifier: Identifier) -> str:
        """The suppression hash of one identifier (type, normalised value)."""
        text = _node_text(identifier).encode("utf-8")
        if self.secret is None:
            return hashlib.sha256(b"forget\x00" + text).hexdigest()
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()


LEGACY_KEY = SuppressionKey(LEGACY_KEY_ID)


def suppression_key(config: Optional[Mapping[str, Any]] = None, demo_key_file: Optional[str] = None) -> SuppressionKey:
    """The deployment's current suppression key.

    Args:
      config: the merged configuration (its `governance.suppression_secret`, if any).
      demo_key_file: where the embedded demo keeps a generated key (beside its warehouse).

    Raises:
      GovernanceError: no secret is configured and this is not the demo.
    """
    secret = os.environ.get(SECRET_ENV) or ((config or {}).get("governance") or {}).get("suppression_secret")
    if secret:
        return SuppressionKey.from_secret(str(secret))
    if os.environ.get(DEMO_ENV) == "1" and demo_key_file:
        return SuppressionKey.from_secret(demo_secret(demo_key_file))
    raise GovernanceError(
        f"no suppression secret: set {SECRET_ENV} (or governance.suppression_secret in the configuration) "
        f"to a long random string kept for this deployment; for the embedded demo, set {DEMO_ENV}=1 "
        "to keep a generated key beside the warehouse")


def demo_secret(path: str) -> str:
    """A random secret the embedded demo keeps in `path`: made once, owner-only (it is what keeps
    the demo's hashes from being reversed, or its API from being called by anyone), then read."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


@dataclass(frozen=True)
class GovernanceState:
    """What a warehouse's governance tables hold.

    Attributes:
      suppressed: (key id, hash) of every forgotten identifier.
      separations: pairs of identifiers that manual splits keep apart.
      names: (identifier, profile id, at µs): the ids manual splits gave founding identifiers.
    """

    suppressed: FrozenSet[Tuple[str, str]] = frozenset()
    separations: FrozenSet[Separation] = frozenset()
    names: FrozenSet[Tuple[Tuple[str, str], str, int]] = frozenset()

    @property
    def key_ids(self) -> FrozenSet[str]:
        return frozenset(k for k, _ in self.suppressed)


def identity_rules(config: Mapping[str, Any], state: GovernanceState, key: SuppressionKey):
    """The identity rules every path resolves with: the configuration plus the warehouse's governance.

    Raises:
      GovernanceError: the warehouse holds hashes made with a key that is neither the current one
        nor the legacy one (a rotated secret): matching them is impossible, so nothing runs.
    """
    from cdpflow.core.identity import IdentityRules
    unknown = state.key_ids - {key.key_id, LEGACY_KEY_ID}
    if unknown:
        raise GovernanceError(
            f"the warehouse holds suppressions made with key(s) {', '.join(sorted(unknown))}, but the configured "
            f"suppression secret is key {key.key_id}: configure the secret those hashes were made with")
    return IdentityRules.from_config(
        config["identity"], state.separations, frozenset(h for _, h in state.suppressed),
        suppression_keys=(LEGACY_KEY, key) if key.key_id != LEGACY_KEY_ID else (LEGACY_KEY,), names=state.names)


def identifiers_of_raw(raw: str, default_region: str) -> List[Identifier]:
    """The normalised identifiers a raw record carries, as far as it can be read (for dead letters).

    A record refused before normalisation (bad JSON, a schema error) still names its person
    when its fields can be read, so a forget finds its dead letters by exact identifier, never
    by searching the raw text.
    """
    from cdpflow.core.normalize import NormalizationError, extract_identifiers
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(event, dict):
        return []
    try:
        return [tuple(i) for i in extract_identifiers(event, default_region)]
    except (NormalizationError, TypeError, AttributeError, ValueError):
        pass
    # Some field has the wrong shape (why it was refused): read each identifier's field on its
    # own, so a broken `context` does not hide the email in `traits`.
    context = event.get("context") if isinstance(event.get("context"), dict) else {}
    views = [{"userId": event.get("userId")}, {"anonymousId": event.get("anonymousId")},
             {"type": event.get("type"), "previousId": event.get("previousId")}, {"traits": event.get("traits")},
             {"context": {"traits": context.get("traits")}}, {"context": {"device": context.get("device")}}]
    views += [{"context": {"externalIds": [e]}} for e in (context.get("externalIds") or [])
              if isinstance(context.get("externalIds"), list)]
    found = set()
    for view in views:
        try:
            found.update(tuple(i) for i in extract_identifiers(view, default_region))
        except (NormalizationError, TypeError, AttributeError, ValueError):
            continue
    return sorted(found)


def matches(identifiers: Iterable[Sequence[str]], forgotten: Iterable[Sequence[str]]) -> bool:
    """True if any identifier is one of the forgotten ones (exact type and normalised value)."""
    wanted = {tuple(i) for i in forgotten}
    return any(tuple(i) in wanted for i in identifiers)


class WarehouseGovernance:
    """A callable that reads a warehouse's governance as IdentityRules (for a stream that runs on).

    Picklable (a URI and the configuration), so a runner's workers can call it. Returns None
    when the warehouse cannot be read right now (its writer holds it): the caller keeps the
    rules it has and asks again later.
    """

    def __init__(self, warehouse: str, config: Mapping[str, Any]):
        self.warehouse, self.config = warehouse, dict(config)

    def __call__(self):
        from cdpflow.warehouse import open_warehouse
        try:
            with open_warehouse(self.warehouse, read_only=True, lock_timeout=1.0) as wh:
                return identity_rules(self.config, wh.governance(), suppression_key(self.config, wh.demo_key_file()))
        except Exception as err:  # noqa: BLE001 (a busy or moved warehouse: keep the rules in force)
            import logging
            logging.getLogger(__name__).info("governance refresh from %s skipped: %s", self.warehouse, err)
            return None
