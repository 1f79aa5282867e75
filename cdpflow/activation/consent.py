"""Whether a profile may receive marketing email: the consent rule every email destination applies.

A profile has withdrawn consent when its `unsubscribed` feature is true (its latest subscription
event is `Unsubscribed`), or when one of the consent traits (default `marketing_consent`,
`email_opt_in`) is explicitly false (`false`, `no`, `0`, `withdrawn`, `opted_out`). Consent
returns with a later `Subscribed` event or the trait set true again. A profile the store does not
hold (yet) has not consented: nothing is added to an audience without a known, consenting person.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

CONSENT_TRAITS = ("marketing_consent", "email_opt_in")
_NO = {"false", "no", "0", "withdrawn", "opted_out", "opt_out", "unsubscribed", "denied"}


def withdrawn(value: Any) -> bool:
    """Whether a consent trait's value says no."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value == 0
    return isinstance(value, str) and value.strip().lower() in _NO


def email_consent(profile: Optional[Mapping[str, Any]], traits: Sequence[str] = CONSENT_TRAITS) -> bool:
    if not profile:
        return False
    if profile.get("unsubscribed"):
        return False
    held = profile.get("traits") or {}
    return not any(name in held and withdrawn(held[name]) for name in traits)
