"""Hand-computed cases for the pandas feature oracle (tests/feature_oracle.py).

The end-to-end test trusts the oracle to be docs/features.md; these cases pin it to the page at
the places where an implementation typically slips: window and session boundaries, the strict
'<' of the lifecycle rules, ties, rounding, and the transition list. Run them with

    python -m pytest tests/core/test_feature_oracle.py
"""
from __future__ import annotations

import math
from decimal import Decimal
from itertools import count

import duckdb
import pandas as pd
import pytest

from tests.feature_oracle import (DAY_US, MINUTE_US, WINDOWS, events_from_warehouse, lifecycle_stage,
                                  oracle_profiles, oracle_transitions, round_ratio)

D = DAY_US
DAY_T = 20_000                      # day(T)
T = DAY_T * D + 12 * 60 * MINUTE_US  # as_of: noon of that day
_ids = count()


def ev(profile="p1", kind="page", name=None, ts=T, channel="web", revenue=None, categories=(), message_id=None):
    """One accepted event row."""
    return {"message_id": message_id or f"m{next(_ids):05d}", "profile_id": profile, "type": kind, "event": name,
            "timestamp": ts, "channel": channel, "revenue_reporting": revenue, "categories": list(categories)}


def order(ts, revenue=Decimal("10"), profile="p1", categories=()):
    return ev(profile, "track", "Order Completed", ts, "web", revenue, categories)


def frame(*rows):
    return pd.DataFrame(list(rows))


def features(*rows, as_of=T, config=None):
    return oracle_profiles(frame(*rows), as_of, config or {})


# ------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("w", WINDOWS)
def test_a_window_starts_at_the_first_microsecond_of_day_T_minus_w_plus_1(w):
    first_inside = (DAY_T - w + 1) * D
    last_outside = first_inside - 1  # the last microsecond of day(T) - w
    row = features(order(first_inside, Decimal("7.5")), order(last_outside, Decimal("100")))["p1"]
    assert row[f"orders_{w}d"] == 1
    assert row[f"revenue_{w}d"] == Decimal("7.5")
    assert row[f"avg_order_value_{w}d"] == Decimal("7.5000")
    assert row["orders_total"] == 2


def test_events_after_as_of_do_not_count_even_on_the_same_day():
    row = features(order(T - 1), order(T + 1), ev(ts=T + 1), ev(ts=T))["p1"]
    assert row["event_count"] == 2 and row["orders_total"] == 1 and row["orders_7d"] == 1
    assert row["last_seen"] == T and row["last_order_at"] == T - 1
    assert row["page_views_7d"] == 1


def test_each_event_class_is_counted_in_its_column():
    rows = [ev(kind="track", name="Email Opened", channel="server"),
            ev(kind="track", name="Email Link Clicked", channel="server"),
            ev(kind="track", name="Email Link Clicked", channel="server"),
            ev(kind="track", name="Unsubscribed", channel="server"),
            ev(kind="page", name="Home"), ev(kind="screen", name="Home", channel="mobile"),
            ev(kind="track", name="Product Viewed"),
            ev(kind="identify"),
            order(T)]
    row = features(*rows)["p1"]
    for w in WINDOWS:
        assert (row[f"email_opens_{w}d"], row[f"email_clicks_{w}d"], row[f"unsubscribes_{w}d"], row[f"page_views_{w}d"],
                row[f"product_views_{w}d"], row[f"orders_{w}d"]) == (1, 2, 1, 2, 1, 1)
    assert row["event_count"] == 9


def test_a_profile_without_orders_has_zero_revenue_and_null_averages():
    row = features(ev(ts=T - D // 2))["p1"]
    assert row["orders_total"] == 0 and row["revenue_total"] == 0 and row["revenue_30d"] == 0
    assert row["avg_order_value"] is None and row["avg_order_value_365d"] is None
    assert row["last_order_at"] is None and row["recency_days"] is None
    assert row["tenure_days"] == 0.5
    assert row["lifecycle_stage"] == "prospect"
    assert row["category_affinity"] == {} and row["top_category"] is None


def test_money_is_decimal_null_amounts_count_zero_and_averages_round_half_even():
    row = features(order(T - 3, None), order(T - 2, Decimal("0.0001")), order(T - 1, Decimal("0.0002")))["p1"]
    assert row["revenue_total"] == Decimal("0.0003") and isinstance(row["revenue_total"], Decimal)
    assert row["avg_order_value"] == Decimal("0.0001")   # 0.0001 exactly
    # 0.00015 and 0.00025 are ties: half-even gives 0.0002 both times (half-up would give 0.0003 for the second)
    assert features(order(T - 2, Decimal("0.0001")), order(T - 1, Decimal("0.0002")))["p1"]["avg_order_value"] == Decimal("0.0002")
    assert features(order(T, Decimal("0.00025")))["p1"]["avg_order_value_7d"] == Decimal("0.0002")
    assert features(order(T, Decimal("0.00035")))["p1"]["avg_order_value"] == Decimal("0.0004")


def test_recency_and_tenure_are_days_rounded_to_four_places():
    row = features(ev(ts=T - 10 * D - D // 4), order(T - 2 * D - D // 8))["p1"]
    assert row["tenure_days"] == 10.25 and row["recency_days"] == 2.125
    assert features(order(T - 4_320_000))["p1"]["recency_days"] == 0.0         # 0.00005 -> 0.0000
    assert features(order(T - 3 * 4_320_000))["p1"]["recency_days"] == 0.0002  # 0.00015 -> 0.0002
    assert features(order(T - 8_640_000 + 1))["p1"]["recency_days"] == 0.0001


# ------------------------------------------------------------------------------------ sessions
def test_a_gap_of_exactly_the_timeout_continues_the_session_one_microsecond_more_splits():
    t0 = T - 5 * 60 * MINUTE_US
    rows = [ev(ts=t0), ev(ts=t0 + 30 * MINUTE_US),                       # one session
            ev(ts=t0 + 60 * MINUTE_US + 1),                               # 30 min + 1 us later: a second
            ev(kind="track", name="Email Opened", channel="server", ts=t0 + 75 * MINUTE_US),  # not an interaction
            ev(kind="identify", ts=t0 + 80 * MINUTE_US),                  # nor this
            ev(kind="track", name="Product Viewed", ts=t0 + 91 * MINUTE_US + 2)]  # 31 min + 1 us: a third
    assert features(*rows)["p1"]["sessions_7d"] == 3
    # the email open does not bridge the gap: without it the count is the same
    assert features(*[r for i, r in enumerate(rows) if i != 3])["p1"]["sessions_7d"] == 3
    # moved 1 us earlier, the third page view is exactly 30 minutes after the second: it continues
    rows[2] = ev(ts=t0 + 60 * MINUTE_US)
    assert features(*rows)["p1"]["sessions_7d"] == 2


def test_a_track_event_is_an_interaction_only_on_an_interactive_channel():
    rows = [ev(kind="track", name="Product Viewed", channel=c, ts=T - i * 60 * MINUTE_US)
            for i, c in enumerate(["web", "mobile", "client", "browser", "server", "pos", None])]
    assert features(*rows)["p1"]["sessions_7d"] == 4


def test_sessions_are_counted_in_the_window_they_start_in():
    start = (DAY_T - 6) * D - 1  # last microsecond of day(T) - 7: outside the 7-day window
    rows = [ev(ts=start + i * 20 * MINUTE_US) for i in range(5)]  # continues well into day(T) - 6
    rows.append(ev(ts=T - 60 * MINUTE_US))  # a session starting inside
    row = features(*rows)["p1"]
    assert (row["sessions_7d"], row["sessions_30d"]) == (1, 2)
    assert row["page_views_7d"] == 5


def test_profiles_are_sessionised_apart_and_each_as_of_its_own_time():
    rows = [ev("a", ts=T - 10 * MINUTE_US), ev("b", ts=T - 5 * MINUTE_US), ev("a", ts=T + 2 * D),
            ev("b", ts=T + 2 * D)]
    got = oracle_profiles(frame(*rows), {"a": T + 2 * D, "b": T}, {})
    assert got["a"]["sessions_7d"] == 2 and got["a"]["event_count"] == 2
    assert got["b"]["sessions_7d"] == 1 and got["b"]["event_count"] == 1
    assert got["a"]["tenure_days"] == round(2 + 10 / 1440, 4)
    assert set(oracle_profiles(frame(*rows), {"a": T}, {})) == {"a"}


# ------------------------------------------------------------------------------------ engagement
def test_engagement_score_formula_and_window():
    rows = [ev(kind="track", name="Email Opened", channel="server", ts=T - i) for i in range(2)]
    rows += [ev(kind="track", name="Email Link Clicked", channel="server", ts=T - 29 * D)]
    rows += [ev(kind="track", name="Email Opened", channel="server", ts=(DAY_T - 30) * D)]  # outside 30 days
    row = features(*rows)["p1"]
    assert (row["email_opens_30d"], row["email_clicks_30d"]) == (2, 1)
    assert row["engagement_score"] == 63.21 == round(100 * (1 - math.exp(-1)), 2)
    weighted = features(*rows, config={"features": {"engagement": {"click_weight": 5, "scale": 10}}})["p1"]
    assert weighted["engagement_score"] == round(100 * (1 - math.exp(-0.7)), 2) == 50.34
    assert features(ev())["p1"]["engagement_score"] == 0.0


def sub(name, ts, message_id=None):
    return ev(kind="track", name=name, channel="server", ts=ts, message_id=message_id)


def test_unsubscribed_is_the_latest_subscription_event_and_zeroes_engagement():
    opens = [ev(kind="track", name="Email Opened", channel="server", ts=T - 5)]
    row = features(*opens, sub("Unsubscribed", T - 10))["p1"]
    assert row["unsubscribed"] is True and row["engagement_score"] == 0.0
    assert features(*opens, sub("Unsubscribed", T - 10), sub("Email Subscribed", T - 9))["p1"]["unsubscribed"] is False
    assert features(*opens, sub("Subscribed", T - 10), sub("Unsubscribed", T - 9))["p1"]["unsubscribed"] is True
    # a later event after as_of does not count
    assert features(*opens, sub("Unsubscribed", T - 10), sub("Subscribed", T + 1))["p1"]["unsubscribed"] is True
    # same event time: the larger messageId is the later one
    assert features(sub("Subscribed", T, "m-a"), sub("Unsubscribed", T, "m-b"))["p1"]["unsubscribed"] is True
    assert features(sub("Subscribed", T, "m-b"), sub("Unsubscribed", T, "m-a"))["p1"]["unsubscribed"] is False
    assert features(*opens)["p1"]["unsubscribed"] is False


# ------------------------------------------------------------------------------------ categories
def test_category_affinity_counts_products_of_signal_events_in_90_days_and_ties_go_to_the_smaller_name():
    rows = [ev(kind="track", name="Product Viewed", categories=["shoes", "bags"]),
            order(T - D, categories=["bags"]),
            ev(kind="track", name="Product Added", categories=["shoes"], ts=(DAY_T - 89) * D),
            ev(kind="track", name="Product Viewed", categories=["zzz", "zzz"], ts=(DAY_T - 89) * D - 1),  # outside 90 days
            ev(kind="page", name="Product", categories=["zzz"]),                # not a category signal
            ev(kind="track", name="Checkout Started", categories=["zzz"])]      # nor this
    row = features(*rows)["p1"]
    assert row["category_affinity"] == {"bags": 0.5, "shoes": 0.5}
    assert row["top_category"] == "bags"
    rows.append(ev(kind="track", name="Product Viewed", categories=["shoes"]))
    row = features(*rows)["p1"]
    assert row["category_affinity"] == {"bags": 0.4, "shoes": 0.6} and row["top_category"] == "shoes"


def test_affinity_shares_are_rounded_to_four_places():
    row = features(ev(kind="track", name="Product Viewed", categories=["a", "b", "b"]))["p1"]
    assert row["category_affinity"] == {"a": 0.3333, "b": 0.6667}
    assert round_ratio(1, 160, 4) == 0.0062 and round_ratio(3, 160, 4) == 0.0188 and round_ratio(1, 32, 4) == 0.0312


# ------------------------------------------------------------------------------------ lifecycle
@pytest.mark.parametrize("orders_before_as_of, stage", [
    ([], "prospect"),
    ([30 * D - 1], "new"),
    ([30 * D], "active"),
    ([300 * D, 150 * D, 30 * D], "active"),              # gaps of 150 and 120 days: active...
    ([400 * D, 89 * D], "reactivated"),                  # ...unless it is the gap before a recent order
    ([400 * D, 220 * D, 40 * D], "reactivated"),         # 180 days exactly after the order before it
    ([400 * D, 220 * D - 1, 40 * D], "active"),          # one microsecond short of 180 days
    ([400 * D, 90 * D - 1], "reactivated"),              # the comeback order within 90 days (strict)...
    ([400 * D, 90 * D, 10 * D], "active"),               # ...exactly 90 days ago it no longer counts
    ([500 * D, 95 * D, 5 * D], "active"),                # comeback order 95 days ago: no longer counts
    ([400 * D, 90 * D], "at_risk"),
    ([180 * D - 1], "at_risk"),
    ([180 * D], "lapsed"),
    ([365 * D - 1], "lapsed"),
    ([365 * D], "churned"),
    ([1000 * D, 365 * D], "churned"),
])
def test_lifecycle_stages_and_their_strict_boundaries(orders_before_as_of, stage):
    order_times = [T - back for back in orders_before_as_of]
    assert lifecycle_stage(order_times, T) == stage
    rows = [order(t) for t in order_times] + [ev(ts=T - 1000 * D)]
    assert features(*rows)["p1"]["lifecycle_stage"] == stage


def test_lifecycle_thresholds_come_from_the_configuration():
    config = {"lifecycle": {"new_days": 10, "active_days": 20, "at_risk_days": 40, "churned_days": 60}}
    stages = [features(order(T - back * D), config=config)["p1"]["lifecycle_stage"] for back in (9, 10, 20, 40, 60)]
    assert stages == ["new", "active", "at_risk", "lapsed", "churned"]


def test_orders_after_as_of_do_not_change_the_stage():
    assert lifecycle_stage([T - 100 * D, T + 1], T) == "at_risk"


# ------------------------------------------------------------------------------------ transitions
def test_transitions_list_every_stage_change_at_its_exact_time():
    t0, t1 = T, T + D
    rows = [ev(ts=t0), order(t1), order(t1 + 400 * D), ev(ts=t1 + 600 * D)]
    expected = [(t0, None, "prospect"), (t1, "prospect", "new"), (t1 + 30 * D, "new", "active"),
                (t1 + 90 * D, "active", "at_risk"), (t1 + 180 * D, "at_risk", "lapsed"),
                (t1 + 365 * D, "lapsed", "churned"), (t1 + 400 * D, "churned", "reactivated"),
                (t1 + 490 * D, "reactivated", "at_risk"), (t1 + 580 * D, "at_risk", "lapsed")]
    assert oracle_transitions(frame(*rows), None, t1 + 600 * D, {}) == {"p1": expected}
    # (since, until]: the first row is kept only when the first event is in range
    assert oracle_transitions(frame(*rows), t1, t1 + 180 * D, {}) == {"p1": expected[2:5]}
    assert oracle_transitions(frame(*rows), None, t1 + 30 * D - 1, {}) == {"p1": expected[:2]}
    assert oracle_transitions(frame(*rows), t1 + 30 * D, t1 + 90 * D - 1, {}) == {}


def test_a_profile_whose_first_event_is_an_order_starts_as_new_and_a_second_order_while_new_changes_nothing():
    rows = [order(T), order(T + 5 * D)]
    assert oracle_transitions(frame(*rows), None, T + 200 * D, {}) == {"p1": [
        (T, None, "new"), (T + 30 * D, "new", "active"), (T + 95 * D, "active", "at_risk"),
        (T + 185 * D, "at_risk", "lapsed")]}


def test_transitions_per_profile_until_and_an_order_after_until_is_ignored():
    rows = [ev("a", ts=T), order(T + D, profile="a"), ev("b", ts=T), order(T + 2 * D, profile="b")]
    got = oracle_transitions(frame(*rows), None, {"a": T + D, "b": T + D}, {})
    assert got == {"a": [(T, None, "prospect"), (T + D, "prospect", "new")], "b": [(T, None, "prospect")]}


# ------------------------------------------------------------------------------------ warehouse
def test_events_are_read_from_the_warehouse_with_exact_times_and_money(tmp_path):
    path = str(tmp_path / "w.duckdb")
    con = duckdb.connect(path)
    con.execute("""CREATE TABLE events (message_id VARCHAR, profile_id VARCHAR, type VARCHAR, event VARCHAR,
                   "timestamp" TIMESTAMPTZ, received_at TIMESTAMPTZ, channel VARCHAR, revenue_reporting DECIMAL(38, 9),
                   enrichment JSON)""")
    con.execute("""INSERT INTO events VALUES
        ('m1', 'p1', 'track', 'Order Completed', '2023-11-14 22:13:20.123456+00', '2023-11-14 22:13:21+00',
         'web', 12.345678901, '{"products": [{"category": "shoes"}, {"brand": "x"}, {"category": null}, {"category": "bags"}]}'),
        ('m2', 'p1', 'page', 'Home', '2023-11-14 22:13:20.000001+00', '2023-11-14 22:13:21+00', 'web', NULL, NULL)""")
    con.close()
    got = events_from_warehouse(path).set_index("message_id")
    assert got.loc["m1", "timestamp"] == 1700000000123456 and got.loc["m2", "timestamp"] == 1700000000000001
    assert got.loc["m1", "revenue_reporting"] == Decimal("12.345678901")
    assert got.loc["m2", "revenue_reporting"] is None
    assert got.loc["m1", "categories"] == ["shoes", "bags"] and got.loc["m2", "categories"] == []
    row = oracle_profiles(got.reset_index(), 1700000000123456, {})["p1"]
    assert row["revenue_total"] == Decimal("12.345678901") and row["avg_order_value"] == Decimal("12.3457")
