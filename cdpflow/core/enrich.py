"""Enrichment look-ups: product catalog, currency rates, user agents, UTM campaigns.

The catalog and the rates are loaded from CSV files (`catalog.csv`:
product_id,sku,name,category,brand,...; `rates.csv`: date,currency,rate where rate is units of
the reporting currency per unit of `currency`). In the pipeline they are side inputs.
"""
from __future__ import annotations

import bisect
import csv
import functools
from datetime import date
from decimal import Decimal
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ua_parser import parse as parse_ua

from cdpflow.core.timeutil import epoch_day
from cdpflow.errors import BadInput

CatalogEntry = Dict[str, str]


def load_catalog(path: Optional[str]) -> Dict[str, CatalogEntry]:
    """Reads catalog.csv into {product_id: {category, brand, name}}; no path gives an empty catalog."""
    if not path:
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return read_catalog(handle)


def read_catalog(lines: Iterable[str]) -> Dict[str, CatalogEntry]:
    """A catalog from the lines of a catalog.csv (a file, or its text split into lines)."""
    catalog = {}
    for row in csv.DictReader(lines):
        entry = {k: row.get(k) or None for k in ("category", "brand", "name")}
        for key in (row.get("product_id"), row.get("sku")):
            if key:
                catalog[key] = entry
    return catalog


class Rates:
    """Daily currency rates to the reporting currency; a date without a rate uses the latest earlier one."""

    def __init__(self, reporting_currency: str, table: Mapping[str, List[Tuple[int, Decimal]]]):
        self.reporting_currency = reporting_currency
        self._days = {cur: [d for d, _ in rows] for cur, rows in table.items()}
        self._rates = {cur: [r for _, r in rows] for cur, rows in table.items()}

    @classmethod
    def load(cls, path: Optional[str], reporting_currency: str = "USD") -> "Rates":
        if not path:
            return cls.read((), reporting_currency)
        with open(path, newline="", encoding="utf-8") as handle:
            return cls.read(handle, reporting_currency, path)

    @classmethod
    def read(cls, lines: Iterable[str], reporting_currency: str = "USD", source: str = "rates.csv") -> "Rates":
        """Rates from the lines of a rates.csv (a file, or its text split into lines)."""
        table: Dict[str, List[Tuple[int, Decimal]]] = {}
        for line, row in enumerate(csv.DictReader(lines), start=2):
            try:
                day = (date.fromisoformat(row["date"]) - date(1970, 1, 1)).days
                table.setdefault(row["currency"].upper(), []).append((day, Decimal(row["rate"])))
            except (KeyError, AttributeError, ValueError, ArithmeticError) as err:
                raise BadInput(f"{source}:{line}: expected date,currency,rate with an ISO date and a "
                               f"decimal rate ({type(err).__name__}: {err})") from None
        for rows in table.values():
            rows.sort()
        return cls(reporting_currency.upper(), table)

    def convert(self, amount: Decimal, currency: str, timestamp_us: int) -> Optional[Decimal]:
        """amount in the reporting currency at the event date's rate, or None if no rate is known."""
        if currency == self.reporting_currency:
            return amount
        days = self._days.get(currency)
        if not days:
            return None
        index = bisect.bisect_right(days, epoch_day(timestamp_us)) - 1
        if index < 0:
            # Before the first known rate: the earliest rate is the best estimate we have.
            index = 0
        return (amount * self._rates[currency][index]).quantize(Decimal("0.0001"))


@functools.lru_cache(maxsize=4096)
def parse_user_agent(user_agent: str) -> Dict[str, Optional[str]]:
    """Device type, OS and browser from a user agent (ua-parser's maintained regexes).

    Cached: a site sees a few thousand distinct agents and a parse costs about a millisecond.
    """
    result = parse_ua(user_agent)
    ua, os_, device = result.user_agent, result.os, result.device
    family = device.family if device else None
    if family in (None, "Other"):
        device_type = "desktop"
    elif "ipad" in family.lower() or "tablet" in family.lower():
        device_type = "tablet"
    elif family == "Spider":
        device_type = "bot"
    else:
        device_type = "mobile"
    return {
        "device_type": device_type,
        "device_brand": device.brand if device else None,
        "os": os_.family if os_ else None,
        "os_version": os_.major if os_ else None,
        "browser": ua.family if ua else None,
        "browser_version": ua.major if ua else None,
    }


_UTM_KEYS = ("name", "source", "medium", "term", "content")


def campaign(context: Mapping[str, Any]) -> Optional[Dict[str, Optional[str]]]:
    """UTM attribution from context.campaign (Segment's names; utm_-prefixed keys accepted too)."""
    raw = context.get("campaign")
    if not isinstance(raw, dict):
        return None
    found = {}
    for key in _UTM_KEYS:
        value = raw.get(key, raw.get(f"utm_{key}"))
        found[key] = str(value) if value is not None else None
    return found if any(found.values()) else None


def products(properties: Mapping[str, Any], catalog: Mapping[str, CatalogEntry]) -> List[Dict[str, Optional[str]]]:
    """Catalog category and brand for the products an event names (products[] or product_id)."""
    items = properties.get("products")
    if not isinstance(items, list):
        items = [properties] if properties.get("product_id") or properties.get("sku") else []
    found = []
    for item in items:
        if not isinstance(item, dict):
            continue
        key = item.get("product_id") or item.get("sku")
        entry = catalog.get(str(key)) if key is not None else None
        found.append({
            "product_id": str(key) if key is not None else None,
            "category": (entry or {}).get("category") or item.get("category"),
            "brand": (entry or {}).get("brand") or item.get("brand"),
        })
    return found


def enrich_event(event, catalog: Mapping[str, CatalogEntry], rates: Rates):
    """An event with its `enrichment` and `revenue_reporting` set; (event, products not in the
    catalog, whether its revenue had no rate). Engine-free: the Beam DoFns and the Flink job call it.

    A revenue without a rate is kept, not refused: the order is real, only its conversion is unknown.
    """
    enrichment: Dict[str, Any] = {}
    user_agent = event.context.get("userAgent")
    if isinstance(user_agent, str) and user_agent:
        enrichment["user_agent"] = parse_user_agent(user_agent)
    utm = campaign(event.context)
    if utm:
        enrichment["campaign"] = utm
    unknown = 0
    if event.type == "track":
        items = products(event.properties, catalog)
        if items:
            enrichment["products"] = items
            unknown = sum(1 for i in items if i["product_id"] not in catalog)
    reporting = rates.convert(event.revenue, event.currency, event.timestamp) if event.revenue is not None else None
    no_rate = event.revenue is not None and reporting is None
    return event.replace(enrichment=enrichment, revenue_reporting=reporting), unknown, no_rate
