"""Identity rules: what an identifier is, how profiles are named, and the merge protection.

Shared by every identity-store backend (`cdpflow.core.identity.sqlite`, `.redis`): the rules and
the graph algorithm (`cdpflow.core.identity.graph`) exist once, in Python; a backend only stores.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import FrozenSet, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

from cdpflow.schemas.records import Identifier

DEFAULT_PRIORITY = ("user_id", "email", "phone", "loyalty_id", "device_id", "anonymous_id")
DEFAULT_LIMITS = {"user_id": 1, "email": 5, "phone": 5, "loyalty_id": 1, "device_id": 20, "anonymous_id": 100}
NULL_LIKE = r"(?i)^(null|none|nil|undefined|unknown|n/?a|-|0|test|anonymous|\[object object\])$"
DEFAULT_BLOCKED = {
    "*": [NULL_LIKE],
    "email": [r"(?i)^(test|noreply|no-reply|donotreply|example|none|null)@", r"(?i)@(example\.(com|org|net)|test\.com|mailinator\.com)$"],
    "phone": [r"^\+?\d?0{6,}$", r"^\+?1?(\d)\1{9}$"],
}

US_PER_DAY = 86_400 * 1_000_000

OK, SUPPRESSED, BLOCKED = "ok", "suppressed", "blocked"


def node_key(identifier: Identifier) -> str:
    return f"{identifier[0]}\x00{identifier[1]}"


def key_identifier(key: str) -> Identifier:
    id_type, value = key.split("\x00", 1)
    return id_type, value


def profile_id_for(identifier: Identifier) -> str:
    """The deterministic id of a profile founded by this identifier."""
    digest = hashlib.sha256(node_key(identifier).encode("utf-8")).hexdigest()
    return "p_" + digest[:20]


def identifier_hash(identifier: Identifier, key=None) -> str:
    """How a forgotten identifier is remembered: only as a hash, so that it can be recognised, not read.

    Args:
      key: a `cdpflow.core.governance.SuppressionKey` (default: the legacy constant salt).
    """
    from cdpflow.core.governance import LEGACY_KEY
    return (key or LEGACY_KEY).hash(tuple(identifier))


@dataclass(frozen=True)
class IdentityRules:
    """Merge protection. Build with `from_config` from the `identity` section of the configuration."""

    priority: Tuple[str, ...] = DEFAULT_PRIORITY
    max_per_profile: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    blocked: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_BLOCKED))
    quarantine_max_profiles: int = 3
    quarantine_window_days: float = 90
    separations: FrozenSet[Tuple[Identifier, Identifier]] = frozenset()
    # (identifier, profile id, recorded at µs): the id a founder names once a split gave the
    # part marketers know the surviving id; the latest entry for an identifier wins.
    names: FrozenSet[Tuple[Identifier, str, int]] = frozenset()
    suppressed: FrozenSet[str] = frozenset()  # identifier_hash values
    suppression_keys: Tuple = ()  # SuppressionKeys the hashes were made with (default: the legacy salt)

    @classmethod
    def from_config(cls, section: Optional[Mapping] = None, separations=(), suppressed=(),
                    suppression_keys: Tuple = (), names=()) -> "IdentityRules":
        section = dict(section or {})
        quarantine = section.get("quarantine") or {}
        return cls(
            priority=tuple(section.get("priority") or DEFAULT_PRIORITY),
            # null in the configuration lifts a default limit
            max_per_profile={t: n for t, n in {**DEFAULT_LIMITS, **(section.get("max_per_profile") or {})}.items()
                             if n is not None},
            blocked={**DEFAULT_BLOCKED, **(section.get("blocked") or {})},
            quarantine_max_profiles=int(quarantine.get("max_profiles", 3)),
            quarantine_window_days=float(quarantine.get("window_days", 90)),
            separations=frozenset((tuple(a), tuple(b)) for a, b in separations),
            names=frozenset((tuple(i), pid, int(at)) for i, pid, at in names),
            suppressed=frozenset(suppressed),
            suppression_keys=tuple(suppression_keys),
        )

    def __post_init__(self):
        if not self.suppression_keys:
            from cdpflow.core.governance import LEGACY_KEY
            object.__setattr__(self, "suppression_keys", (LEGACY_KEY,))
        compiled = {t: [re.compile(p) for p in patterns] for t, patterns in self.blocked.items()}
        object.__setattr__(self, "_blocked", compiled)
        object.__setattr__(self, "_rank", {t: i for i, t in enumerate(self.priority)})
        named = {}
        for identifier, pid, _ in sorted(self.names, key=lambda n: (n[2], n[1], n[0])):
            named[node_key(tuple(identifier))] = pid
        object.__setattr__(self, "_named", named)

    def profile_id(self, identifier: Identifier) -> str:
        """The id of a profile this identifier founds: its name if a split gave it one, else its hash."""
        return self._named.get(node_key(tuple(identifier))) or profile_id_for(identifier)

    def name_of_key(self, key: str) -> str:
        """`profile_id` for a node key."""
        return self._named.get(key) or profile_id_for(key_identifier(key))

    def rank(self, identifier: Identifier):
        """Sort key: priority of the type, then type and value (a total, deterministic order)."""
        return self._rank.get(identifier[0], len(self._rank)), identifier[0], identifier[1]

    def is_blocked(self, identifier: Identifier) -> bool:
        value = identifier[1]
        for pattern in self._blocked.get("*", []) + self._blocked.get(identifier[0], []):
            if pattern.search(value):
                return True
        return False

    def is_suppressed(self, identifiers: Iterable[Identifier]) -> bool:
        """True if any of the identifiers was forgotten (its hash under any known key is suppressed)."""
        if not self.suppressed:
            return False
        return any(key.hash(tuple(i)) in self.suppressed for i in identifiers for key in self.suppression_keys)

    def limit(self, id_type: str) -> Optional[int]:
        return self.max_per_profile.get(id_type)

    @property
    def account_types(self) -> Tuple[str, ...]:
        """Types limited to one per profile: what fan-out quarantine counts."""
        return tuple(sorted(t for t, n in self.max_per_profile.items() if n == 1))

    @property
    def window_us(self) -> int:
        return int(self.quarantine_window_days * US_PER_DAY)


class Decision(NamedTuple):
    """What the store decided for one event."""

    message_id: str
    status: str  # ok | suppressed | blocked
    key: Optional[str]  # node key of the identifier the event is attributed to
    profile_id: Optional[str]  # its profile when decided, or now for an event decided before

