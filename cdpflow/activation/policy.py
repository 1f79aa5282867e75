"""What a destination may receive of a profile: its field policy, applied before anything leaves.

A destination's configuration names the identifiers and traits it may see; everything else is
left out. Identifiers listed under `hashed` leave as the SHA-256 of their normalised value
(lowercased and trimmed, as ad platforms match them), under `<name>_sha256`, never in clear.

    fields:
      identifiers: [email, user_id]      # of: email, phone, user_id
      traits: [first_name, city]         # names in the profile's traits
      hashed: [email]                    # these leave hashed only

With no `fields`, a destination gets the change and the profile id, nothing about the person.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Dict, FrozenSet, Mapping, Optional

from cdpflow.errors import BadInput

IDENTIFIERS = ("email", "phone", "user_id")


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.strip().lower().encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class FieldPolicy:
    identifiers: FrozenSet[str] = frozenset()
    traits: FrozenSet[str] = frozenset()
    hashed: FrozenSet[str] = frozenset()

    @classmethod
    def from_config(cls, fields: Optional[Mapping[str, Any]], where: str) -> "FieldPolicy":
        fields = fields or {}
        if not isinstance(fields, Mapping):
            raise BadInput(f"{where}.fields must be a mapping of identifiers, traits and hashed")
        unknown = set(fields) - {"identifiers", "traits", "hashed"}
        if unknown:
            raise BadInput(f"{where}.fields: unknown key(s) {', '.join(sorted(unknown))} "
                           "(identifiers, traits, hashed)")
        lists = {}
        for key in ("identifiers", "traits", "hashed"):
            value = fields.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadInput(f"{where}.fields.{key} must be a list of names")
            lists[key] = frozenset(value)
        for key in ("identifiers", "hashed"):
            bad = lists[key] - set(IDENTIFIERS)
            if bad:
                raise BadInput(f"{where}.fields.{key}: {', '.join(sorted(bad))} is not one of {', '.join(IDENTIFIERS)}")
        return cls(lists["identifiers"], lists["traits"], lists["hashed"])

    def profile_view(self, profile: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """What of `profile` (a `profiles` row) this destination may receive."""
        if not profile:
            return {}
        out: Dict[str, Any] = {}
        for name in IDENTIFIERS:
            value = profile.get(name)
            if value is None:
                continue
            if name in self.hashed:
                out[f"{name}_sha256"] = sha256_hex(str(value))
            elif name in self.identifiers:
                out[name] = value
        traits = profile.get("traits") or {}
        allowed = {k: v for k, v in traits.items() if k in self.traits}
        # a trait that is also an identifier (traits.email) follows the identifier's rule
        for name in IDENTIFIERS:
            allowed.pop(name, None)
        if allowed:
            out["traits"] = allowed
        return out
