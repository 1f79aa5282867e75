"""Profile features from events: RFM, engagement, browsing, tenure, traits and lifecycle stage.

The definitions are in docs/features.md. Events are folded into a `ProfileState`:
  * additive per-day buckets (orders, revenue, opens, clicks, unsubscribes, page and product
    views, category signals), so windows of any length can be read off as of any time;
  * the interaction runs (session intervals), merged exactly when histories interleave;
  * the order times (lifecycle needs the gaps between orders);
  * the latest value of each trait.
`merge` is associative and commutative, so two profiles' states merge into what folding all
their events into one state gives. `features(state, as_of)` turns a state into the profile row;
`lifecycle_transitions` lists the stage changes between two times and `next_change` the next
time any feature changes with no new event (the stream sets its timers there).

Plain Python, no Beam: used by the batch and streaming transforms and by the benchmark reference.
"""
from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cdpflow.core.timeutil import US_PER_DAY, US_PER_SECOND, epoch_day, to_datetime
from cdpflow.schemas.records import NormalizedEvent

WINDOWS = (7, 30, 90, 365)
# Bucket slots, one list per day; the last slot is a {category: count} dict or None.
ORDERS, REVENUE, OPENS, CLICKS, UNSUBSCRIBES, PAGE_VIEWS, PRODUCT_VIEWS, CATEGORIES = range(8)
_COUNTS = 7
# (column prefix, slot) of the windowed counts and sums: columns are f"{prefix}_{w}d".
WINDOWED = (("orders", ORDERS), ("revenue", REVENUE), ("email_opens", OPENS), ("email_clicks", CLICKS),
            ("unsubscribes", UNSUBSCRIBES), ("page_views", PAGE_VIEWS), ("product_views", PRODUCT_VIEWS))
AFFINITY_WINDOW = 90
ENGAGEMENT_WINDOW = 30

ORDER_EVENTS = frozenset({"Order Completed"})
CATEGORY_EVENTS = frozenset({"Order Completed", "Product Viewed", "Product Added"})
SUBSCRIPTION_EVENTS = {"Unsubscribed": False, "Subscribed": True, "Email Subscribed": True}
INTERACTION_CHANNELS = frozenset({"web", "mobile", "client", "browser"})

DEFAULT_LIFECYCLE = {"new_days": 30, "active_days": 90, "at_risk_days": 180, "churned_days": 365}
STAGES = ("prospect", "new", "reactivated", "active", "at_risk", "lapsed", "churned")
DEFAULT_SESSION_TIMEOUT_US = 30 * 60 * US_PER_SECOND

_Stamp = Tuple[int, str]  # (event time, messageId): a total order, ties broken by messageId
_FOUR = Decimal("0.0001")


@dataclass(frozen=True)
class FeatureSettings:
    """The tunable parts of the definitions (configuration sections `features` and `lifecycle`)."""

    lifecycle: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIFECYCLE))
    session_timeout_us: int = DEFAULT_SESSION_TIMEOUT_US
    open_weight: float = 1.0
    click_weight: float = 3.0
    engagement_scale: float = 5.0
    allowed_lateness_us: int = 72 * 3600 * US_PER_SECOND
    max_future_skew_us: int = 24 * 3600 * US_PER_SECOND

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FeatureSettings":
        section = config.get("features") or {}
        engagement = section.get("engagement") or {}
        return cls(lifecycle={**DEFAULT_LIFECYCLE, **(config.get("lifecycle") or {})},
                   session_timeout_us=int(section.get("session_timeout_minutes", 30) * 60 * US_PER_SECOND),
                   open_weight=float(engagement.get("open_weight", 1)),
                   click_weight=float(engagement.get("click_weight", 3)),
                   engagement_scale=float(engagement.get("scale", 5)),
                   allowed_lateness_us=int(section.get("allowed_lateness_hours", 72) * 3600 * US_PER_SECOND),
                   max_future_skew_us=int(section.get("max_future_skew_hours", 24) * 3600 * US_PER_SECOND))


def slim_for_features(event: NormalizedEvent) -> NormalizedEvent:
    """The event with only what `ProfileState.add` reads (for a shuffle of events per profile):
    no raw line, properties or context, the user id alone of its identifiers, and only the
    products' categories of its enrichment."""
    products = event.enrichment.get("products") if event.event in CATEGORY_EVENTS else None
    return dataclasses.replace(
        event, raw="", properties={}, context={}, schema_version="",
        identifiers=tuple(i for i in event.identifiers if i[0] == "user_id"),
        enrichment={"products": [{"category": p.get("category")} for p in products]} if products else {})


def is_interaction(event: NormalizedEvent) -> bool:
    return event.type in ("page", "screen") or (event.type == "track" and event.channel in INTERACTION_CHANNELS)


@dataclass
class ProfileState:
    """What a profile's features are computed from; `merge` is associative and commutative."""

    session_timeout_us: int = DEFAULT_SESSION_TIMEOUT_US
    first_seen: Optional[int] = None
    last_seen: Optional[int] = None
    last_event: Optional[_Stamp] = None
    event_count: int = 0
    days: Dict[int, List[Any]] = field(default_factory=dict)
    orders: List[int] = field(default_factory=list)  # order event times, sorted
    runs: List[List[int]] = field(default_factory=list)  # interaction runs [start, end], sorted, gaps > timeout
    traits: Dict[str, Tuple[int, str, Any]] = field(default_factory=dict)
    user_id: Optional[Tuple[int, str, str]] = None
    subscribed: Optional[Tuple[int, str, bool]] = None

    @property
    def first_order(self) -> Optional[int]:
        return self.orders[0] if self.orders else None

    @property
    def last_order(self) -> Optional[int]:
        return self.orders[-1] if self.orders else None

    def _bucket(self, day: int) -> List[Any]:
        bucket = self.days.get(day)
        if bucket is None:
            bucket = self.days[day] = [0, Decimal(0), 0, 0, 0, 0, 0, None]
        return bucket

    def add(self, event: NormalizedEvent) -> "ProfileState":
        """Folds one event in; returns self."""
        ts, stamp = event.timestamp, (event.timestamp, event.message_id)
        self.first_seen = ts if self.first_seen is None else min(self.first_seen, ts)
        self.last_seen = ts if self.last_seen is None else max(self.last_seen, ts)
        self.last_event = stamp if self.last_event is None else max(self.last_event, stamp)
        self.event_count += 1
        bucket = self._bucket(epoch_day(ts))
        name = event.event
        if event.type == "track":
            if name in ORDER_EVENTS:
                bucket[ORDERS] += 1
                if event.revenue_reporting is not None:
                    bucket[REVENUE] += event.revenue_reporting
                bisect.insort(self.orders, ts)
            elif name == "Email Opened":
                bucket[OPENS] += 1
            elif name == "Email Link Clicked":
                bucket[CLICKS] += 1
            elif name == "Product Viewed":
                bucket[PRODUCT_VIEWS] += 1
            elif name == "Unsubscribed":
                bucket[UNSUBSCRIBES] += 1
            if name in SUBSCRIPTION_EVENTS:
                self.subscribed = _latest(self.subscribed, (ts, event.message_id, SUBSCRIPTION_EVENTS[name]))
            if name in CATEGORY_EVENTS:
                for product in event.enrichment.get("products") or ():
                    category = product.get("category")
                    if category:
                        counts = bucket[CATEGORIES] = bucket[CATEGORIES] or {}
                        counts[category] = counts.get(category, 0) + 1
        elif event.type in ("page", "screen"):
            bucket[PAGE_VIEWS] += 1
        if is_interaction(event):
            self._add_interaction(ts)
        for key, value in event.traits.items():
            if value is not None:
                candidate = (ts, event.message_id, value)
                current = self.traits.get(key)
                if current is None or candidate[:2] > current[:2]:
                    self.traits[key] = candidate
        for id_type, value in event.identifiers:
            if id_type == "user_id":
                self.user_id = _latest(self.user_id, (ts, event.message_id, value))
        return self

    def _add_interaction(self, ts: int):
        runs, gap = self.runs, self.session_timeout_us
        i = bisect.bisect_right(runs, [ts, math.inf])  # runs[:i] start at or before ts
        if i and ts <= runs[i - 1][1] + gap:
            run = runs[i - 1]
            run[1] = max(run[1], ts)
        else:
            run = [ts, ts]
            runs.insert(i, run)
            i += 1
        # The grown run may now reach the next one.
        while i < len(runs) and runs[i][0] <= run[1] + gap:
            run[1] = max(run[1], runs.pop(i)[1])

    def merge(self, other: "ProfileState") -> "ProfileState":
        """Adds another profile's state into this one; returns self."""
        if other.first_seen is None:
            return self
        if self.session_timeout_us != other.session_timeout_us:
            raise ValueError("cannot merge profile states with different session timeouts")
        if self.first_seen is None:
            self.__dict__.update(copy_state(other).__dict__)
            return self
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.last_event = max(self.last_event, other.last_event)
        self.event_count += other.event_count
        for day, values in other.days.items():
            mine = self.days.get(day)
            if mine is None:
                self.days[day] = _copy_bucket(values)
                continue
            for i in range(_COUNTS):
                mine[i] += values[i]
            if values[CATEGORIES]:
                counts = mine[CATEGORIES] = mine[CATEGORIES] or {}
                for category, n in values[CATEGORIES].items():
                    counts[category] = counts.get(category, 0) + n
        self.orders = sorted(self.orders + other.orders)
        self.runs = _merge_runs(self.runs + [list(r) for r in other.runs], self.session_timeout_us)
        for key, value in other.traits.items():
            current = self.traits.get(key)
            if current is None or value[:2] > current[:2]:
                self.traits[key] = value
        self.user_id = _latest(self.user_id, other.user_id)
        self.subscribed = _latest(self.subscribed, other.subscribed)
        return self


def _copy_bucket(values):
    copied = list(values)
    if copied[CATEGORIES]:
        copied[CATEGORIES] = dict(copied[CATEGORIES])
    return copied


def copy_state(state: ProfileState) -> ProfileState:
    return ProfileState(
        state.session_timeout_us, state.first_seen, state.last_seen, state.last_event, state.event_count,
        {d: _copy_bucket(v) for d, v in state.days.items()}, list(state.orders), [list(r) for r in state.runs],
        dict(state.traits), state.user_id, state.subscribed)


def _merge_runs(runs: List[List[int]], gap: int) -> List[List[int]]:
    # Two runs whose spans come within the timeout of each other are one run in the union of
    # their interactions: every gap inside each span is already within the timeout.
    runs.sort()
    merged: List[List[int]] = []
    for run in runs:
        if merged and run[0] <= merged[-1][1] + gap:
            merged[-1][1] = max(merged[-1][1], run[1])
        else:
            merged.append(run)
    return merged


def ratio(numerator: int, denominator: int, places: int = 4) -> float:
    """numerator / denominator rounded half-even to `places` from the exact quotient (a binary
    float would settle exact halves such as 1/160 by its representation error)."""
    exact = Decimal(numerator) / Decimal(denominator)
    return float(exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN))


def _latest(a, b):
    return b if a is None else a if b is None else max(a, b, key=lambda v: v[:2])


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


def stage_at(orders: List[int], as_of: int, thresholds: Mapping[str, int] = DEFAULT_LIFECYCLE) -> str:
    """The lifecycle stage as of a time, from the sorted order times (those after as_of are ignored)."""
    n = bisect.bisect_right(orders, as_of)
    if n == 0:
        return "prospect"
    day = US_PER_DAY
    if as_of - orders[0] < thresholds["new_days"] * day:
        return "new"
    since_last = as_of - orders[n - 1]
    active = thresholds["active_days"] * day
    if since_last < active:
        lapse = thresholds["at_risk_days"] * day
        i = n - 1
        while i >= 1 and as_of - orders[i] < active:
            if orders[i] - orders[i - 1] >= lapse:
                return "reactivated"
            i -= 1
        return "active"
    if since_last < thresholds["at_risk_days"] * day:
        return "at_risk"
    if since_last < thresholds["churned_days"] * day:
        return "lapsed"
    return "churned"


def lifecycle_stage(state: ProfileState, as_of: int, thresholds: Mapping[str, int] = DEFAULT_LIFECYCLE) -> str:
    return stage_at(state.orders, as_of, thresholds)


def _stage_offsets(thresholds: Mapping[str, int]) -> List[int]:
    """How long after an order the lifecycle stage can change: at the order and at each threshold."""
    return sorted({0, *(thresholds[k] * US_PER_DAY for k in ("new_days", "active_days", "at_risk_days", "churned_days"))})


def _stage_points(state: ProfileState, thresholds: Mapping[str, int]) -> List[int]:
    offsets = _stage_offsets(thresholds)
    return sorted({o + offset for o in state.orders for offset in offsets})


def lifecycle_transitions(state: ProfileState, since: Optional[int], until: int,
                          thresholds: Mapping[str, int] = DEFAULT_LIFECYCLE) -> List[Tuple[int, Optional[str], str]]:
    """(time, from stage, to stage) of every stage change in (since, until]; the stage a profile
    starts in at its first event has from stage None."""
    if state.first_seen is None or state.first_seen > until:
        return []
    changes, current = [], None
    for point in [state.first_seen] + [p for p in _stage_points(state, thresholds) if state.first_seen < p <= until]:
        stage = stage_at(state.orders, point, thresholds)
        if stage != current:
            if since is None or point > since:
                changes.append((point, current, stage))
            current = stage
    return changes


def next_change(state: ProfileState, after: int, thresholds: Mapping[str, int] = DEFAULT_LIFECYCLE) -> Optional[int]:
    """The first time after `after` at which a feature changes with no new event: a day with
    data leaving a window, a lifecycle threshold passing, or a birthday. None if nothing will.
    (recency_days and tenure_days grow continuously; they are as of each row.)"""
    best = None
    data_days = set(state.days)
    data_days.update(epoch_day(run[0]) for run in state.runs)
    for day in data_days:
        for w in WINDOWS:
            moment = (day + w) * US_PER_DAY  # the first instant day is outside the w-day window
            if moment > after:
                if best is None or moment < best:
                    best = moment
                break  # longer windows let it go later
    for point in _stage_points(state, thresholds):
        if point > after:
            if best is None or point < best:
                best = point
            break
    return _or_birthday(best, state, after)


def _or_birthday(best: Optional[int], state: ProfileState, after: int) -> Optional[int]:
    """The earlier of `best` and the next birthday after `after` (None: neither)."""
    birthday = _next_birthday(state, after)
    return birthday if birthday is not None and (best is None or birthday < best) else best


class ChangeClock:
    """`next_change` for a state built in event-time order, kept as it grows: a heap of the moments
    the data added so far changes at (each day with data leaving each window, each order passing
    each lifecycle threshold), so asking costs a pop instead of a scan of every day and order.

    `add(ts, is_order)` after each event is folded into the state; `next(state, after)` with
    `after` never decreasing gives what `next_change(state, after, thresholds)` gives.
    """

    def __init__(self, thresholds: Mapping[str, int] = DEFAULT_LIFECYCLE):
        self.offsets = _stage_offsets(thresholds)
        self.days: set = set()
        self.heap: List[int] = []

    def add(self, ts: int, is_order: bool) -> None:
        day = epoch_day(ts)
        if day not in self.days:
            self.days.add(day)
            for w in WINDOWS:
                heapq.heappush(self.heap, (day + w) * US_PER_DAY)
        if is_order:
            for offset in self.offsets:
                heapq.heappush(self.heap, ts + offset)

    def next(self, state: ProfileState, after: int) -> Optional[int]:
        heap = self.heap
        while heap and heap[0] <= after:
            heapq.heappop(heap)
        return _or_birthday(heap[0] if heap else None, state, after)


def _next_birthday(state: ProfileState, after: int) -> Optional[int]:
    """The start (UTC) of the first day after `after` on which `age` (from a birthday trait) grows."""
    age = state.traits.get("age", (None, None, None))[2]
    if isinstance(age, int) and not isinstance(age, bool):
        return None  # an age trait wins over the birthday and does not grow by itself
    birthday = state.traits.get("birthday", (None, None, None))[2]
    if not isinstance(birthday, str):
        return None
    try:
        born = date.fromisoformat(birthday[:10])
    except ValueError:
        return None
    year = to_datetime(after).year
    for candidate_year in (year, year + 1):
        try:
            day = date(candidate_year, born.month, born.day)
        except ValueError:  # 29 February in a common year: age grows on 1 March
            day = date(candidate_year, 3, 1)
        moment = (day - date(1970, 1, 1)).days * US_PER_DAY
        if moment > after:
            return moment
    return None


def features(state: ProfileState, as_of: int, settings: FeatureSettings = FeatureSettings()) -> Dict[str, Any]:
    """The profile's features and main traits as of a time (events after it must not be in the state)."""
    today = epoch_day(as_of)
    # Each day is added to the shortest window holding it, then the windows are summed shortest
    # first (they are nested): a timeline evaluates this at every event, so it is kept lean.
    within = [[0, Decimal(0), 0, 0, 0, 0, 0] for _ in WINDOWS]
    longest = WINDOWS[-1]
    orders_total, revenue_total = 0, Decimal(0)
    categories: Dict[str, int] = {}
    for day, values in state.days.items():
        orders_total += values[ORDERS]
        revenue_total += values[REVENUE]
        age = today - day
        if age < 0:
            continue
        if age < AFFINITY_WINDOW and values[CATEGORIES]:
            for category, n in values[CATEGORIES].items():
                categories[category] = categories.get(category, 0) + n
        if age >= longest:
            continue
        k = 0
        while age >= WINDOWS[k]:
            k += 1
        acc = within[k]
        for i in range(_COUNTS):
            acc[i] += values[i]
    sums, running = {}, [0, Decimal(0), 0, 0, 0, 0, 0]
    for w, acc in zip(WINDOWS, within):
        running = [a + b for a, b in zip(running, acc)]
        sums[w] = running
    session_starts = [epoch_day(run[0]) for run in state.runs if run[0] <= as_of]
    traits = {k: v[2] for k, v in sorted(state.traits.items())}
    interests = traits.get("interests")
    unsubscribed = bool(state.subscribed is not None and not state.subscribed[2])

    def text(key):
        value = traits.get(key)
        return str(value) if value is not None and not isinstance(value, (dict, list)) else None

    row: Dict[str, Any] = {
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
        "orders_total": orders_total,
        "revenue_total": revenue_total,
        "avg_order_value": (revenue_total / orders_total).quantize(_FOUR) if orders_total else None,
        "last_order_at": state.last_order,
        "recency_days": ratio(as_of - state.last_order, US_PER_DAY) if state.orders else None,
        "tenure_days": ratio(as_of - state.first_seen, US_PER_DAY) if state.first_seen is not None else None,
        "unsubscribed": unsubscribed,
    }
    for w in WINDOWS:
        acc = sums[w]
        for prefix, slot in WINDOWED:
            row[f"{prefix}_{w}d"] = acc[slot]
        row[f"avg_order_value_{w}d"] = (acc[REVENUE] / acc[ORDERS]).quantize(_FOUR) if acc[ORDERS] else None
        row[f"sessions_{w}d"] = sum(1 for d in session_starts if today - w < d <= today)
    engaged = settings.open_weight * row[f"email_opens_{ENGAGEMENT_WINDOW}d"] + \
        settings.click_weight * row[f"email_clicks_{ENGAGEMENT_WINDOW}d"]
    row["engagement_score"] = 0.0 if unsubscribed else round(100 * (1 - math.exp(-engaged / settings.engagement_scale)), 2)
    total = sum(categories.values())
    row["category_affinity"] = {c: ratio(n, total) for c, n in sorted(categories.items())}
    row["top_category"] = min(categories.items(), key=lambda kv: (-kv[1], kv[0]))[0] if categories else None
    row["lifecycle_stage"] = stage_at(state.orders, as_of, settings.lifecycle)
    return row
