"""A pandas oracle for the profile features of docs/features.md, written from that page alone.

The batch and streaming jobs compute the feature columns of `profiles` and the rows of
`lifecycle_transitions` incrementally (day buckets, session intervals, timers). This module
computes the same values the plain way, from the full list of a profile's accepted events, so
the end-to-end tests can compare the two. On purpose it imports nothing from cdpflow's feature,
transform or model code: a shared helper would make a shared bug invisible.

It is not run on its own; the tests use it:

    python -m pytest tests/core/test_feature_oracle.py          # the oracle's own tests
    python -m pytest tests/pipelines/test_features_oracle.py    # the batch job against it

API:
- `events_from_warehouse(path)`: the warehouse's accepted events as the frame the oracle reads;
- `oracle_profiles(events, as_of, config)`: every feature column, per profile, as of a time;
- `oracle_transitions(events, since, until, config)`: the lifecycle stage changes in (since, until];
- `lifecycle_stage(order_times, as_of, lifecycle)`: the stage rules on their own.
"""
from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd

DAY_US = 86_400_000_000
MINUTE_US = 60_000_000
WINDOWS = (7, 30, 90, 365)

DEFAULT_FEATURES = {"allowed_lateness_hours": 72, "session_timeout_minutes": 30}
DEFAULT_ENGAGEMENT = {"open_weight": 1, "click_weight": 3, "scale": 5}
DEFAULT_LIFECYCLE = {"new_days": 30, "active_days": 90, "at_risk_days": 180, "churned_days": 365}

ORDER = "Order Completed"
EMAIL_OPEN = "Email Opened"
EMAIL_CLICK = "Email Link Clicked"
UNSUBSCRIBED = "Unsubscribed"
SUBSCRIBED = ("Subscribed", "Email Subscribed")
PRODUCT_VIEW = "Product Viewed"
SIGNAL_EVENTS = ("Product Viewed", "Product Added", "Order Completed")
PAGE_TYPES = ("page", "screen")
INTERACTIVE_CHANNELS = ("web", "mobile", "client", "browser")

# Window columns counted from one event class each: column stem -> flag column of _classify.
COUNTED = {
    "orders": "is_order",
    "email_opens": "is_open",
    "email_clicks": "is_click",
    "unsubscribes": "is_unsubscribe",
    "page_views": "is_page_view",
    "product_views": "is_product_view",
    "sessions": "is_session_start",
}

EVENT_COLUMNS = ("message_id", "profile_id", "type", "event", "timestamp", "channel",
                 "revenue_reporting", "categories")

AsOf = Union[int, Mapping[str, int]]


# ---------------------------------------------------------------------------------- config
def feature_settings(config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The `features` section with the documented defaults filled in."""
    section = dict((config or {}).get("features") or {})
    settings = {**DEFAULT_FEATURES, **section}
    settings["engagement"] = {**DEFAULT_ENGAGEMENT, **(section.get("engagement") or {})}
    return settings


def lifecycle_settings(config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The `lifecycle` section with the documented defaults filled in."""
    return {**DEFAULT_LIFECYCLE, **((config or {}).get("lifecycle") or {})}


# ---------------------------------------------------------------------------------- rounding
def round_ratio(numerator: int, denominator: int, places: int) -> float:
    """numerator / denominator rounded half-even to `places`, from the exact quotient.

    Ratios of integers (microseconds to days, counts to shares) can land exactly on a half
    (e.g. 1/160 = 0.00625); rounding the binary float instead would settle such ties by the
    float's representation error, so the oracle rounds the exact value.
    """
    with localcontext() as ctx:
        ctx.prec = 60
        exact = Decimal(numerator) / Decimal(denominator)
        return float(exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN))


def average_money(total: Decimal, count: int) -> Optional[Decimal]:
    """total / count rounded half-even to 4 places (null without orders), as the doc says."""
    if not count:
        return None
    with localcontext() as ctx:
        ctx.prec = 60
        return (Decimal(total) / Decimal(count)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN)


def engagement_score(opens_30d: int, clicks_30d: int, unsubscribed: bool,
                     engagement: Optional[Mapping[str, Any]] = None) -> float:
    """100 * (1 - exp(-(open_weight * opens + click_weight * clicks) / scale)), 2 places; 0 if unsubscribed."""
    if unsubscribed:
        return 0.0
    weights = {**DEFAULT_ENGAGEMENT, **(engagement or {})}
    weighted = weights["open_weight"] * opens_30d + weights["click_weight"] * clicks_30d
    return round(100 * (1 - math.exp(-weighted / weights["scale"])), 2)


# ---------------------------------------------------------------------------------- lifecycle
def lifecycle_stage(order_times: Iterable[int], as_of: int, lifecycle: Optional[Mapping[str, Any]] = None) -> str:
    """The first of the seven documented rules that holds, over the orders at or before as_of."""
    limits = {**DEFAULT_LIFECYCLE, **(lifecycle or {})}
    orders = sorted(t for t in order_times if t <= as_of)
    if not orders:
        return "prospect"
    first, last = orders[0], orders[-1]
    if as_of - first < limits["new_days"] * DAY_US:
        return "new"
    active = limits["active_days"] * DAY_US
    if as_of - last < active:
        # an order within the active span that came at least at_risk_days after the order before it
        comeback = any(as_of - later < active and later - earlier >= limits["at_risk_days"] * DAY_US
                       for earlier, later in zip(orders, orders[1:]))
        return "reactivated" if comeback else "active"
    if as_of - last < limits["at_risk_days"] * DAY_US:
        return "at_risk"
    if as_of - last < limits["churned_days"] * DAY_US:
        return "lapsed"
    return "churned"


def stage_change_times(first_event: int, order_times: Sequence[int], lifecycle: Mapping[str, Any]) -> List[int]:
    """Every time at which a stage can change: each order, and each order plus each threshold.

    The rules compare `as_of - order` with thresholds using strict '<', so a stage holds up to
    just before `order + threshold` and the next one holds from that instant: evaluating the
    rules at these times (and the first event) sees every stage the profile goes through.
    """
    thresholds = [0] + [lifecycle[k] * DAY_US for k in ("new_days", "active_days", "at_risk_days", "churned_days")]
    times = {first_event} | {o + t for o in order_times for t in thresholds}
    return sorted(t for t in times if t >= first_event)


# ---------------------------------------------------------------------------------- inputs
def _check_columns(events: pd.DataFrame) -> None:
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events lack columns {missing}")


def _limit_to_as_of(events: pd.DataFrame, as_of: AsOf) -> pd.DataFrame:
    """The events at or before their profile's as_of, with that as_of as a column."""
    _check_columns(events)
    df = events.copy()
    if isinstance(as_of, Mapping):
        # a profile not named has no as_of, hence no features
        df = df[df["profile_id"].isin(list(as_of))].copy()
        df["as_of"] = df["profile_id"].map(dict(as_of)).astype("int64")
    else:
        df["as_of"] = int(as_of)
    df["timestamp"] = df["timestamp"].astype("int64")
    return df[df["timestamp"] <= df["as_of"]].copy()


def _classify(df: pd.DataFrame) -> pd.DataFrame:
    """Adds the event-class flags of the doc's table, day numbers and session starts."""
    track = df["type"] == "track"
    name = df["event"]
    df["is_order"] = track & (name == ORDER)
    df["is_open"] = track & (name == EMAIL_OPEN)
    df["is_click"] = track & (name == EMAIL_CLICK)
    df["is_unsubscribe"] = track & (name == UNSUBSCRIBED)
    df["is_page_view"] = df["type"].isin(PAGE_TYPES)
    df["is_product_view"] = track & (name == PRODUCT_VIEW)
    # Read as "page, screen, or (track whose channel is one of these)": page and screen views
    # are interactions whatever their channel.
    df["is_interaction"] = df["type"].isin(PAGE_TYPES) | (track & df["channel"].isin(INTERACTIVE_CHANNELS))
    df["is_signal"] = track & name.isin(SIGNAL_EVENTS)
    # floor division: day(t) = floor(t / 1 day) also for times before 1970
    df["day"] = df["timestamp"] // DAY_US
    # In a window of w days iff day(as_of) - w + 1 <= day(ts) (ts <= as_of is already given).
    df["age_days"] = df["as_of"] // DAY_US - df["day"]
    df["is_session_start"] = False
    return df


def _mark_session_starts(df: pd.DataFrame, timeout_minutes: int) -> None:
    """A session starts at a profile's first interaction and at one more than the timeout after the previous."""
    interactions = df[df["is_interaction"]].sort_values(["profile_id", "timestamp"], kind="stable")
    gap = interactions.groupby("profile_id")["timestamp"].diff()
    starts = gap.isna() | (gap > timeout_minutes * MINUTE_US)
    df.loc[interactions.index[starts.to_numpy()], "is_session_start"] = True


def _money(value: Any) -> Decimal:
    """revenue_reporting as Decimal; a null amount counts 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return Decimal(0)
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _decimal_sum(values: Iterable[Decimal]) -> Decimal:
    return sum(values, Decimal(0))


# ---------------------------------------------------------------------------------- features
def oracle_profiles(events: pd.DataFrame, as_of: AsOf, config: Optional[Mapping[str, Any]] = None
                    ) -> Dict[str, Dict[str, Any]]:
    """Every feature column of docs/features.md, per profile, as of `as_of`.

    Args:
      events: one row per accepted event, columns EVENT_COLUMNS (timestamp in UTC microseconds,
        revenue_reporting Decimal or None, categories the list of the event's product categories).
      as_of: one time for all profiles, or {profile_id: time} (a profile not named is left out).
      config: a configuration with `features` and `lifecycle` sections (defaults for what is missing).

    Returns:
      {profile_id: {column: value}} for every profile with an event at or before its as_of; money
      as Decimal, times as int microseconds, category_affinity as {category: share}.
    """
    settings, lifecycle = feature_settings(config), lifecycle_settings(config)
    df = _classify(_limit_to_as_of(events, as_of))
    _mark_session_starts(df, settings["session_timeout_minutes"])
    df["money"] = df["revenue_reporting"].map(_money)
    by_profile = df.groupby("profile_id", sort=True)
    profiles = list(by_profile.groups)
    out: Dict[str, Dict[str, Any]] = {p: {} for p in profiles}

    def put(column: str, series: pd.Series, default: Any, convert=lambda v: v) -> None:
        values = series.to_dict()
        for p in profiles:
            out[p][column] = convert(values[p]) if p in values else default

    # windows: counts of each class, order revenue, average order value
    orders = df[df["is_order"]]
    for w in WINDOWS:
        inside = df["age_days"] < w
        for stem, flag in COUNTED.items():
            put(f"{stem}_{w}d", (df[flag] & inside).groupby(df["profile_id"]).sum(), 0, int)
        put(f"revenue_{w}d", orders[orders["age_days"] < w].groupby("profile_id")["money"].agg(_decimal_sum), Decimal(0))
        for p in profiles:
            out[p][f"avg_order_value_{w}d"] = average_money(out[p][f"revenue_{w}d"], out[p][f"orders_{w}d"])

    # lifetime and point features
    as_of_of = by_profile["as_of"].first().to_dict()
    put("event_count", by_profile.size(), 0, int)
    put("first_seen", by_profile["timestamp"].min(), None, int)
    put("last_seen", by_profile["timestamp"].max(), None, int)
    put("orders_total", orders.groupby("profile_id").size(), 0, int)
    put("revenue_total", orders.groupby("profile_id")["money"].agg(_decimal_sum), Decimal(0))
    put("last_order_at", orders.groupby("profile_id")["timestamp"].max(), None, int)
    order_times = orders.groupby("profile_id")["timestamp"].agg(lambda s: sorted(int(t) for t in s)).to_dict()

    # the latest subscription event by (event time, messageId) decides `unsubscribed`
    subscription = df[(df["type"] == "track") & df["event"].isin((UNSUBSCRIBED,) + SUBSCRIBED)]
    latest = subscription.sort_values(["timestamp", "message_id"]).groupby("profile_id")["event"].last()
    put("unsubscribed", latest == UNSUBSCRIBED, False, bool)

    # category signals of the 90-day window: one per product with a category
    signals = df[df["is_signal"] & (df["age_days"] < 90)][["profile_id", "categories"]].explode("categories")
    signals = signals.loc[signals["categories"].map(lambda c: isinstance(c, str) and c != "").astype(bool)]
    counts: Dict[str, Dict[str, int]] = {}
    for (p, category), n in signals.groupby(["profile_id", "categories"]).size().items():
        counts.setdefault(p, {})[category] = int(n)

    for p in profiles:
        row, when = out[p], int(as_of_of[p])
        row["avg_order_value"] = average_money(row["revenue_total"], row["orders_total"])
        row["recency_days"] = (round_ratio(when - row["last_order_at"], DAY_US, 4)
                               if row["last_order_at"] is not None else None)
        row["tenure_days"] = round_ratio(when - row["first_seen"], DAY_US, 4)
        row["engagement_score"] = engagement_score(row["email_opens_30d"], row["email_clicks_30d"],
                                                   row["unsubscribed"], settings["engagement"])
        mine = counts.get(p, {})
        total = sum(mine.values())
        row["category_affinity"] = {c: round_ratio(n, total, 4) for c, n in sorted(mine.items())}
        # most signals first, then the smallest name
        row["top_category"] = min(mine, key=lambda c: (-mine[c], c)) if mine else None
        row["lifecycle_stage"] = lifecycle_stage(order_times.get(p, []), when, lifecycle)
    return out


def oracle_transitions(events: pd.DataFrame, since: Optional[int], until: AsOf,
                       config: Optional[Mapping[str, Any]] = None
                       ) -> Dict[str, List[Tuple[int, Optional[str], str]]]:
    """The lifecycle stage changes of each profile with since < transitioned_at <= until.

    A profile's first row is (first event time, None, its starting stage) when that time is in
    range. Profiles without a change in range are left out.
    """
    lifecycle = lifecycle_settings(config)
    df = _limit_to_as_of(events, until)
    is_order = (df["type"] == "track") & (df["event"] == ORDER)
    out: Dict[str, List[Tuple[int, Optional[str], str]]] = {}
    for profile, group in df.groupby("profile_id", sort=True):
        horizon = int(group["as_of"].iloc[0])
        order_times = sorted(int(t) for t in group.loc[is_order.loc[group.index], "timestamp"])
        rows, previous = [], None
        for t in stage_change_times(int(group["timestamp"].min()), order_times, lifecycle):
            if t > horizon:
                break
            stage = lifecycle_stage(order_times, t, lifecycle)
            if stage != previous:
                rows.append((t, previous, stage))
                previous = stage
        rows = [r for r in rows if since is None or r[0] > since]
        if rows:
            out[profile] = rows
    return out


# ---------------------------------------------------------------------------------- warehouse
def _categories(enrichment: Any) -> List[str]:
    """Categories of the enrichment's products, one per product that has one."""
    if enrichment is None:
        return []
    data = json.loads(enrichment) if isinstance(enrichment, (str, bytes)) else enrichment
    products = (data or {}).get("products") or []
    return [p["category"] for p in products if isinstance(p, Mapping) and p.get("category")]


def events_from_warehouse(warehouse_path: str) -> pd.DataFrame:
    """The `events` table of a DuckDB warehouse as the frame oracle_profiles reads.

    Read with duckdb directly (not through cdpflow's warehouse class). Rows are fetched as Python
    values, not through DuckDB's pandas conversion, which would turn DECIMAL into float.
    """
    import duckdb

    con = duckdb.connect(warehouse_path, read_only=True)
    try:
        rows = con.execute(
            "SELECT message_id, profile_id, type, event, epoch_us(timestamp) AS timestamp, channel, "
            "revenue_reporting, enrichment::VARCHAR AS enrichment FROM events ORDER BY message_id").fetchall()
    finally:
        con.close()
    frame = pd.DataFrame(rows, columns=["message_id", "profile_id", "type", "event", "timestamp", "channel",
                                        "revenue_reporting", "enrichment"])
    frame["timestamp"] = frame["timestamp"].astype("int64")
    frame["revenue_reporting"] = frame["revenue_reporting"].astype(object).where(frame["revenue_reporting"].notna(), None)
    frame["categories"] = frame["enrichment"].map(_categories)
    return frame[list(EVENT_COLUMNS)]
