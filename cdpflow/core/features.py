"""Profile features from events: RFM, engagement, browsing, traits and lifecycle stage.

Events are folded into a `ProfileState` of additive per-day buckets (so that states of two
profiles can be merged, and windows of any length can be read off as of any time), plus the
latest value of each trait. `features(state, as_of)` turns a state into the profile row.
Windows are whole UTC days: "the 30 days up to as_of" is as_of's day and the 29 days before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cdpflow.core.timeutil import US_PER_DAY, epoch_day, to_datetime
from cdpflow.schemas.records import NormalizedEvent

# Bucket slots, one list per day.
ORDERS, REVENUE, OPENS, CLICKS, PAGE_VIEWS, PRODUCT_VIEWS = range(6)
_SLOTS = 6

ORDER_EVENTS = frozenset({"Order Completed"})
SUBSCRIPTION_EVENTS = {"Unsubscribed": False, "Subscribed": True, "Email Subscribed": True}

DEFAULT_LIFECYCLE = {"new_days": 30, "active_days": 90, "at_risk_days": 180}

_Stamp = Tuple[int, str]  # (event time, messageId): a total order, ties broken by messageId


@dataclass
class ProfileState:
    """What a profile's features are computed from; `merge` is associative and commutative."""

    first_seen: Optional[int] = None
    last_seen: Optional[int] = None
    last_event: Optional[_Stamp] = None
    event_count: int = 0
    days: Dict[int, List[Any]] = field(default_factory=dict)
    first_order: Optional[int] = None
    last_order: Optional[int] = None
    traits: Dict[str, Tuple[int, str, Any]] = field(default_factory=dict)
    user_id: Optional[Tuple[int, str, str]] = None
    subscribed: Optional[Tuple[int, str, bool]] = None
    categories: Dict[str, int] = field(default_factory=dict)

    def add(self, event: NormalizedEvent) -> "ProfileState":
        """Folds one event in; returns self."""
        ts, stamp = event.timestamp, (event.timestamp, event.message_id)
        self.first_seen = ts if self.first_seen is None else min(self.first_seen, ts)
        self.last_seen = ts if self.last_seen is None else max(self.last_seen, ts)
        self.last_event = stamp if self.last_event is None else max(self.last_event, stamp)
        self.event_count += 1
        bucket = self.days.get(epoch_day(ts))
        if bucket is None:
            bucket = self.days[epoch_day(ts)] = [0, Decimal(0), 0, 0, 0, 0]
        name = event.event
        if event.type == "track":
            if name in ORDER_EVENTS:
                bucket[ORDERS] += 1
                if event.revenue_reporting is not None:
                    bucket[REVENUE] += event.revenue_reporting
                self.first_order = ts if self.first_order is None else min(self.first_order, ts)
                self.last_order = ts if self.last_order is None else max(self.last_order, ts)
            elif name == "Email Opened":
                bucket[OPENS] += 1
            elif name == "Email Link Clicked":
                bucket[CLICKS] += 1
            elif name == "Product Viewed":
                bucket[PRODUCT_VIEWS] += 1
            if name in SUBSCRIPTION_EVENTS:
                value = (ts, event.message_id, SUBSCRIPTION_EVENTS[name])
                self.subscribed = value if self.subscribed is None else max(self.subscribed, value)
            if name in ORDER_EVENTS or name in ("Product Viewed", "Product Added"):
                for product in event.enrichment.get("products") or ():
                    if product.get("category"):
                        cat = product["category"]
                        self.categories[cat] = self.categories.get(cat, 0) + 1
        elif event.type in ("page", "screen"):
            bucket[PAGE_VIEWS] += 1
        for key, value in event.traits.items():
            if value is None:
                continue
            candidate = (ts, event.message_id, value)
            current = self.traits.get(key)
            if current is None or candidate[:2] > current[:2]:
                self.traits[key] = candidate
        for id_type, value in event.identifiers:
            if id_type == "user_id":
                candidate = (ts, event.message_id, value)
                if self.user_id is None or candidate[:2] > self.user_id[:2]:
                    self.user_id = candidate
        return self

    def merge(self, other: "ProfileState") -> "ProfileState":
        """Adds another profile's state into this one; returns self."""
        if other.first_seen is None:
            return self
        if self.first_seen is None:
            self.__dict__.update(_copy(other).__dict__)
            return self
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.last_event = max(self.last_event, other.last_event)
        self.event_count += other.event_count
        for day, values in other.days.items():
            mine = self.days.get(day)
            if mine is None:
                self.days[day] = list(values)
            else:
                for i in range(_SLOTS):
                    mine[i] += values[i]
        self.first_order = _min_opt(self.first_order, other.first_order)
        self.last_order = _max_opt(self.last_order, other.last_order)
        for key, value in other.traits.items():
            current = self.traits.get(key)
            if current is None or value[:2] > current[:2]:
                self.traits[key] = value
        self.user_id = _latest(self.user_id, other.user_id)
        self.subscribed = _latest(self.subscribed, other.subscribed)
        for cat, count in other.categories.items():
            self.categories[cat] = self.categories.get(cat, 0) + count
        return self


def _copy(state: ProfileState) -> ProfileState:
    return ProfileState(
        state.first_seen, state.last_seen, state.last_event, state.event_count,
        {d: list(v) for d, v in state.days.items()}, state.first_order, state.last_order,
        dict(state.traits), state.user_id, state.subscribed, dict(state.categories))


def _min_opt(a, b):
    return b if a is None else a if b is None else min(a, b)


def _max_opt(a, b):
    return b if a is None else a if b is None else max(a, b)


def _latest(a, b):
    return b if a is None else a if b is None else max(a, b, key=lambda v: v[:2])


def _window(state: ProfileState, as_of_day: int, days: int, slot: int):
    total = Decimal(0) if slot == REVENUE else 0
    first = as_of_day - days + 1
    for day, values in state.days.items():
        if first <= day <= as_of_day:
            total += values[slot]
    return total


def age_at(traits: Mapping[str, Any], as_of: int) -> Optional[int]:
    """The age trait, or the age computed from a YYYY-MM-DD birthday at as_of."""
    age = traits.get("age")
    if isinstance(age, int) and not isinstance(age, bool):
        return age
    birthday = traits.get("birthday")
    if isinstance(birthday, str):
        try:
            born = date.fromisoformat(birthday[:10])
        except ValueError:
            return None
        today = to_datetime(as_of).date()
        return today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    return None


def lifecycle_stage(state: ProfileState, as_of: int, thresholds: Mapping[str, int] = DEFAULT_LIFECYCLE) -> str:
    """prospect (never ordered), new, active, at_risk or lapsed, from order recency and tenure."""
    if state.last_order is None:
        return "prospect"
    if as_of - state.first_order <= thresholds["new_days"] * US_PER_DAY:
        return "new"
    since_last = as_of - state.last_order
    if since_last <= thresholds["active_days"] * US_PER_DAY:
        return "active"
    if since_last <= thresholds["at_risk_days"] * US_PER_DAY:
        return "at_risk"
    return "lapsed"


def features(state: ProfileState, as_of: int,
             lifecycle: Mapping[str, int] = DEFAULT_LIFECYCLE) -> Dict[str, Any]:
    """The profile's features and main traits as of a time (events after it must not be in the state)."""
    day = epoch_day(as_of)
    orders = sum(v[ORDERS] for v in state.days.values())
    revenue = sum((v[REVENUE] for v in state.days.values()), Decimal(0))
    traits = {k: v[2] for k, v in sorted(state.traits.items())}
    interests = traits.get("interests")
    top_category = None
    if state.categories:
        top_category = min(state.categories.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    def text(key):
        value = traits.get(key)
        return str(value) if value is not None and not isinstance(value, (dict, list)) else None

    return {
        "user_id": state.user_id[2] if state.user_id else None,
        "email": text("email"),
        "phone": text("phone"),
        "first_name": text("first_name"),
        "last_name": text("last_name"),
        "age": age_at(traits, as_of),
        "city": text("city"),
        "country": text("country"),
        "interests": list(interests) if isinstance(interests, list) else [],
        "traits": traits,
        "first_seen": state.first_seen,
        "last_seen": state.last_seen,
        "event_count": state.event_count,
        "orders_total": orders,
        "revenue_total": revenue,
        "avg_order_value": (revenue / orders).quantize(Decimal("0.0001")) if orders else None,
        "last_order_at": state.last_order,
        "recency_days": round((as_of - state.last_order) / US_PER_DAY, 4) if state.last_order is not None else None,
        "orders_30d": _window(state, day, 30, ORDERS),
        "orders_90d": _window(state, day, 90, ORDERS),
        "orders_365d": _window(state, day, 365, ORDERS),
        "revenue_30d": _window(state, day, 30, REVENUE),
        "revenue_90d": _window(state, day, 90, REVENUE),
        "revenue_365d": _window(state, day, 365, REVENUE),
        "email_opens_30d": _window(state, day, 30, OPENS),
        "email_clicks_30d": _window(state, day, 30, CLICKS),
        "unsubscribed": bool(state.subscribed is not None and not state.subscribed[2]),
        "page_views_30d": _window(state, day, 30, PAGE_VIEWS),
        "product_views_30d": _window(state, day, 30, PRODUCT_VIEWS),
        "top_category": top_category,
        "lifecycle_stage": lifecycle_stage(state, as_of, lifecycle),
    }
