from decimal import Decimal

from cdpflow.core.dedup import split_copies
from cdpflow.core.enrich import Rates, campaign, parse_user_agent, products
from cdpflow.core.timeutil import US_PER_SECOND, parse_ts
from cdpflow.schemas.records import NormalizedEvent


def test_rates_use_the_event_date_and_fall_back_to_the_latest_earlier_rate(tmp_path):
    path = tmp_path / "rates.csv"
    path.write_text("date,currency,rate\n2026-01-01,EUR,1.10\n2026-01-03,EUR,1.20\n")
    rates = Rates.load(str(path), "USD")
    assert rates.convert(Decimal("10"), "EUR", parse_ts("2026-01-01T23:00:00Z")) == Decimal("11.0000")
    assert rates.convert(Decimal("10"), "EUR", parse_ts("2026-01-02T10:00:00Z")) == Decimal("11.0000")
    assert rates.convert(Decimal("10"), "EUR", parse_ts("2026-01-05T10:00:00Z")) == Decimal("12.0000")
    assert rates.convert(Decimal("10"), "USD", 0) == Decimal("10")
    assert rates.convert(Decimal("10"), "CHF", 0) is None


def test_user_agent_campaign_and_products():
    iphone = parse_user_agent("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
                              "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1")
    assert (iphone["device_type"], iphone["os"], iphone["browser"]) == ("mobile", "iOS", "Mobile Safari")
    desktop = parse_user_agent("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                               "Chrome/120.0.0.0 Safari/537.36")
    assert (desktop["device_type"], desktop["os"], desktop["browser"]) == ("desktop", "Windows", "Chrome")
    assert campaign({"campaign": {"name": "spring", "source": "google", "medium": "cpc"}})["medium"] == "cpc"
    assert campaign({"campaign": {"utm_source": "news"}})["source"] == "news"
    assert campaign({}) is None
    catalog = {"p1": {"category": "running", "brand": "Acme", "name": "Shoe"}}
    assert products({"products": [{"product_id": "p1"}, {"product_id": "zz", "category": "misc"}]}, catalog) == [
        {"product_id": "p1", "category": "running", "brand": "Acme"},
        {"product_id": "zz", "category": "misc", "brand": None}]


def copy(received_s, raw="{}"):
    return NormalizedEvent("m", "track", "x", 0, received_s * US_PER_SECOND, (("user_id", "u"),), {}, {}, {}, raw, "v")


def test_dedup_keeps_the_first_received_and_splits_by_horizon():
    kept, dups, late = split_copies([copy(50, "b"), copy(10, "z"), copy(10, "a"), copy(5000)], horizon_us=100 * US_PER_SECOND)
    assert (kept.received_at, kept.raw) == (10 * US_PER_SECOND, "a")
    assert len(dups) == 2 and [e.received_at for e in late] == [5000 * US_PER_SECOND]
