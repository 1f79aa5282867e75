"""Deterministic synthetic customer events for a retailer, with ground truth.

The pipeline needs realistic input to be developed, tested and benchmarked
against: several collection channels that disagree about who a customer is,
plus the usual transport damage (duplicates, late arrivals, broken lines,
skewed device clocks). This module fabricates such input for a fictional
sporting-goods retailer, in the Segment / RudderStack tracking-API JSON
format, together with the ground truth that a perfect pipeline would recover
(which identifiers belong to which real person).

It is normally run through the command line::

    cdpflow generate --customers N --days D --seed S --out DIR

which calls :func:`generate`. The output directory then holds::

    events/web.jsonl       website events (page, track, identify, alias, group)
    events/mobile.jsonl    app events (screen, track, identify)
    events/email.jsonl     email service provider webhooks (track)
    events/pos.jsonl       in-store point-of-sale receipts and loyalty sign-ups
    catalog.csv            the product catalog
    rates.csv              daily exchange rates into the reporting currency
    truth/identities.csv   every (normalised) identifier each person used
    truth/persons.csv      who the persons really are
    manifest.json          arguments and counts, including injected noise

Event lines are grouped by source but are not sorted by event time: they are
in roughly the order a collector would have received them.

Ground truth lists an identifier for a person when it appears in at least one
of that person's *valid* event lines (valid JSON that keeps the contract), so
identifiers that were only ever sent in broken lines are not expected to be
recovered. Emails are listed stripped and lowercased, phones in E.164, other
identifiers as sent. A shared identifier (a household's email, the store
kiosk's device id) is listed once for every person who used it.

In the manifest, ``files`` counts the lines of each event file (``lines`` =
``valid`` + ``malformed_json`` + ``schema_violation``; ``duplicate`` re-sends
are among the valid lines). ``noise`` counts what was actually injected:
lines for ``malformed_json``, ``schema_violation`` and ``duplicate``; valid
events (re-sends not counted again) for ``late``, ``very_late``,
``clock_skew_events``, ``kiosk_share`` and ``email_typo``; devices for
``clock_skew_devices``; persons for ``shared_family_email`` and
``kiosk_persons``.

The same arguments always give byte-identical output: every random choice
comes from ``random.Random`` streams derived from the seed, and nothing
depends on the wall clock, on set iteration order or on ``hash()``.

Randomness is split on purpose. A *world* stream decides who the customers
are, each person then behaves from a private stream, and a separate *noise*
stream decides how the collection damages it all. Changing only the noise
rates therefore leaves the underlying behaviour (persons, sessions, orders,
messageIds) unchanged, which makes "same data, more noise" comparisons
meaningful. The one exception is by nature: persons paired into a household
share an inbox, so their own email engagement changes.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import os
import random
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType

__all__ = ["NoiseRates", "generate"]

REPORTING_CURRENCY = "USD"
MANIFEST_VERSION = 1

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SITE = "https://shop.example.com"
_APP = {"name": "Example Shop", "version": "5.12.0", "build": "51200", "namespace": "com.example.shop"}

EVENT_FILES = {
    "web": "events/web.jsonl",
    "mobile": "events/mobile.jsonl",
    "email": "events/email.jsonl",
    "pos": "events/pos.jsonl",
}


# --------------------------------------------------------------------------
# Noise configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseRates:
    """How often each kind of mess is injected. All values are fractions.

    Attributes:
        duplicate: Events re-sent with the same messageId (identical payload,
            receivedAt later by 1 s .. 10 min).
        late: Events received 1 h .. 2 days after they happened (offline
            mobile, batch uploads).
        very_late: Events received 4 .. 20 days after they happened.
        malformed_json: Lines that are not valid JSON.
        schema_violation: Valid JSON that breaks the event contract.
        clock_skew_device: Devices whose clock is off by up to +/- 3 h; their
            events carry skewed originalTimestamp/sentAt and no `timestamp`.
        shared_family_email: Persons who share their email with another
            person of the same household.
        kiosk_share: In-store events that carry the shared kiosk device id.
        email_typo: Checkout events whose email has a typo.
    """

    duplicate: float = 0.02
    late: float = 0.03
    very_late: float = 0.003
    malformed_json: float = 0.004
    schema_violation: float = 0.004
    clock_skew_device: float = 0.05
    shared_family_email: float = 0.02
    kiosk_share: float = 0.01
    email_typo: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"NoiseRates.{f.name} must be within [0, 1], got {value!r}")

    def scale(self, factor: float) -> "NoiseRates":
        """Returns a copy with every rate multiplied by ``factor``.

        Rates are capped at 1.0 so that strongly raised noise stays a valid
        fraction.

        Args:
            factor: Non-negative multiplier; 0 switches all noise off.

        Raises:
            ValueError: If ``factor`` is negative.
        """
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor!r}")
        return replace(self, **{f.name: min(1.0, getattr(self, f.name) * factor) for f in fields(self)})


# --------------------------------------------------------------------------
# Static reference data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Country:
    currency: str
    weight: float
    utc_offset_h: int  # rough local time, so that activity peaks in local evenings
    locale: str
    cities: tuple[str, ...]
    runner_cities: tuple[str, ...]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    email_domains: tuple[str, ...]
    tax_rate: float  # 0 where prices include VAT


_EN_FIRST = ("James", "Mary", "Olivia", "Liam", "Emma", "Noah", "Ava", "Ethan", "Sophia", "Mason",
             "Isabella", "Lucas", "Mia", "Oliver", "Amelia", "Harper", "Elijah", "Charlotte", "Aiden",
             "Grace", "Daniel", "Chloe", "Henry", "Zoe", "Jack", "Lily", "Samuel", "Ella")
_EN_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Martinez",
            "Wilson", "Taylor", "Anderson", "Thomas", "Moore", "Clark", "Lewis", "Walker", "Hall",
            "Young", "King", "O'Brien", "Nguyen", "Patel", "Hughes", "Evans", "Wright")
_INTL_DOMAINS = ("gmail.com", "gmail.com", "gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com")

COUNTRIES: dict[str, _Country] = {
    "US": _Country("USD", 0.50, -5, "en-US",
                   ("New York", "Los Angeles", "Chicago", "Austin", "Seattle", "Denver", "Boston", "Portland"),
                   ("Boston", "Portland", "Denver"), _EN_FIRST, _EN_LAST,
                   _INTL_DOMAINS + ("aol.com", "comcast.net"), 0.07),
    "CA": _Country("CAD", 0.10, -5, "en-CA",
                   ("Toronto", "Vancouver", "Montreal", "Calgary"), ("Vancouver",),
                   _EN_FIRST + ("Étienne", "Amélie", "Mathis", "Léa"),
                   _EN_LAST + ("Tremblay", "Gagnon", "Roy", "Côté"), _INTL_DOMAINS + ("shaw.ca",), 0.13),
    "GB": _Country("GBP", 0.14, 0, "en-GB",
                   ("London", "Manchester", "Bristol", "Edinburgh", "Leeds"), ("London", "Bristol"),
                   _EN_FIRST + ("Harry", "Isla", "Alfie", "Freya"), _EN_LAST + ("Roberts", "Cooper", "Ward"),
                   _INTL_DOMAINS + ("btinternet.com", "yahoo.co.uk"), 0.0),
    "DE": _Country("EUR", 0.10, 1, "de-DE",
                   ("Berlin", "Munich", "Hamburg", "Cologne"), ("Berlin",),
                   ("Lukas", "Lena", "Jonas", "Anna", "Felix", "Marie", "Leon", "Sophie", "Paul", "Emilia",
                    "Jürgen", "Jörg", "Käthe", "Maximilian"),
                   ("Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
                    "Schulz", "Hoffmann", "Schäfer", "Koch"),
                   ("gmail.com", "gmx.de", "web.de", "t-online.de", "outlook.com"), 0.0),
    "FR": _Country("EUR", 0.08, 1, "fr-FR",
                   ("Paris", "Lyon", "Marseille", "Bordeaux"), ("Paris",),
                   ("Camille", "Louis", "Léa", "Hugo", "Manon", "Jules", "Chloé", "Gabriel", "Inès", "Théo",
                    "Zoé", "Raphaël"),
                   ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy",
                    "Moreau", "Lefèvre", "Girard"),
                   ("gmail.com", "orange.fr", "free.fr", "laposte.net", "hotmail.fr"), 0.0),
    "JP": _Country("JPY", 0.08, 9, "ja-JP",
                   ("Tokyo", "Osaka", "Yokohama", "Sapporo"), ("Tokyo",),
                   ("Haruto", "Yui", "Sota", "Hina", "Yuto", "Aoi", "Ren", "Sakura", "Riku", "Mei"),
                   ("Sato", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Ito", "Yamamoto", "Nakamura",
                    "Kobayashi", "Kato"),
                   ("gmail.com", "yahoo.co.jp", "docomo.ne.jp", "icloud.com"), 0.0),
}
_COUNTRY_CODES = tuple(COUNTRIES)

INTERESTS = ("running", "cycling", "yoga", "hiking", "football", "tennis", "swimming", "fashion", "outdoors", "gym")

# Which catalog categories an interest pulls a shopper towards.
_INTEREST_CATEGORIES = {
    "running": ("running", "footwear"), "cycling": ("outdoor", "apparel"), "yoga": ("fitness", "apparel"),
    "hiking": ("outdoor", "footwear"), "football": ("footwear", "apparel"), "tennis": ("apparel", "accessories"),
    "swimming": ("fitness", "accessories"), "fashion": ("apparel", "accessories"), "outdoors": ("outdoor", "home"),
    "gym": ("fitness", "apparel"),
}

_CATEGORIES = {
    # category: (number of products, USD price range, nouns)
    "running": (40, (15, 180), ("Running Tee", "Race Shorts", "Running Tights", "Hydration Vest", "Running Jacket",
                                 "Running Socks", "Race Belt", "Windbreaker")),
    "footwear": (35, (60, 220), ("Road Shoe", "Trail Shoe", "Racing Flat", "Walking Shoe", "Hiking Boot",
                                  "Court Shoe", "Slide")),
    "outdoor": (30, (20, 450), ("Tent", "Sleeping Bag", "Daypack", "Trekking Poles", "Headlamp", "Rain Shell",
                                 "Camp Stove")),
    "fitness": (30, (10, 300), ("Yoga Mat", "Kettlebell", "Resistance Bands", "Foam Roller", "Dumbbell Set",
                                 "Jump Rope", "Swim Goggles")),
    "apparel": (35, (15, 150), ("Hoodie", "Training Tee", "Joggers", "Sports Bra", "Fleece", "Polo", "Tank Top")),
    "accessories": (20, (8, 90), ("Water Bottle", "Cap", "Sunglasses", "Gym Bag", "Armband", "Beanie")),
    "home": (10, (12, 120), ("Recovery Pillow", "Gear Rack", "Shoe Dryer", "Massage Ball", "Towel Set")),
}
_ADJECTIVES = ("Aero", "Ultra", "Trail", "Swift", "Core", "Flex", "Storm", "Tempo", "Peak", "Lite", "Pro", "Thermal")
BRANDS = ("Stridelab", "Northpeak", "Kinetiq", "Altura", "Vantage", "Boreal", "Pulse Athletics", "Trailwise",
          "Urban Stride", "Coreform", "Lumen", "Summitline", "Fjellgear", "Tempo Sports", "Harbor & Pine")

# Starting points of the exchange-rate random walks (USD per unit).
_RATE_START = {"CAD": 0.73, "EUR": 1.09, "GBP": 1.27, "JPY": 0.0068}


@dataclass(frozen=True)
class _Persona:
    name: str
    weight: float
    sessions_per_30d: float  # web/app browsing sessions
    buy_prob: float  # chance that a browsing session ends in an order
    views: tuple[int, int]  # products viewed per session
    basket: tuple[int, int]  # distinct products per order
    price_bias: int  # >0 picks the dearest of N candidates, <0 the cheapest, 0 any
    coupon_prob: float
    store_visits_per_30d: float  # only for persons with a loyalty card
    loyalty_prob: float
    email_open: float  # per campaign received
    email_click: float  # given an open
    app_prob: float  # chance that a device is a native app


# The personas differ in rates, not in kind, so they overlap: on the profile's features a
# classifier trained on the true personas gets about 81% of profiles right (adjusted Rand index
# about 0.6; README, "The generator's personas overlap"), which bounds what any clustering can
# recover of them.
PERSONAS = (
    _Persona("bargain_hunter", 0.22, 0.40, 0.45, (1, 3), (1, 2), -3, 0.65, 0.25, 0.12, 0.28, 0.35, 0.30),
    _Persona("loyal_big_spender", 0.13, 0.30, 0.45, (1, 3), (2, 4), 3, 0.05, 0.30, 0.20, 0.36, 0.30, 0.40),
    _Persona("window_shopper", 0.24, 0.48, 0.04, (2, 5), (1, 1), 0, 0.10, 0.20, 0.05, 0.20, 0.25, 0.25),
    _Persona("lapsed", 0.15, 0.75, 0.35, (1, 3), (1, 2), 0, 0.20, 0.30, 0.08, 0.16, 0.25, 0.25),
    _Persona("runner_enthusiast", 0.13, 0.36, 0.30, (2, 4), (1, 2), 2, 0.15, 0.25, 0.15, 0.32, 0.35, 0.35),
    _Persona("in_store_regular", 0.13, 0.10, 0.15, (1, 2), (1, 3), 0, 0.10, 0.90, 1.00, 0.24, 0.20, 0.15),
)
_PERSONA_CUM = tuple(sum(p.weight for p in PERSONAS[: i + 1]) for i in range(len(PERSONAS)))

_DESKTOP_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36 Edg/130.0.2849.68",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
)
_MOBILE_WEB_AGENTS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.6723.102 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.6723.102 Mobile Safari/537.36",
)
_IOS_MODELS = (("iPhone15,2", "17.6.1"), ("iPhone16,1", "18.1"), ("iPhone14,5", "17.5.1"), ("iPhone13,2", "16.7.10"))
_ANDROID_MODELS = (("samsung", "SM-S918B", "14"), ("Google", "Pixel 8", "15"), ("samsung", "SM-A546B", "14"),
                   ("Xiaomi", "2201116SG", "13"))
_IP_PREFIXES = ("192.0.2", "198.51.100", "203.0.113")  # documentation ranges (RFC 5737) only

_LIBRARIES = {
    "web": {"name": "analytics.js", "version": "4.1.0"},
    "ios": {"name": "analytics-ios", "version": "4.1.8"},
    "android": {"name": "analytics-android", "version": "4.11.3"},
    "email": {"name": "esp-webhook", "version": "2.3.0"},
    "pos": {"name": "pos-feed", "version": "1.4.2"},
}

# (source, medium) pairs of paid and owned campaigns, for UTM parameters.
_UTM_SOURCES = (("google", "cpc"), ("facebook", "paid_social"), ("instagram", "paid_social"),
                ("newsletter", "email"), ("partner_blog", "affiliate"), ("bing", "cpc"))
_UTM_CAMPAIGNS = ("spring_running", "summer_trail", "back_to_training", "autumn_layers", "black_friday",
                  "holiday_gifts", "new_season_shoes", "clearance")
_REFERRERS = ("", "", "https://www.google.com/", "https://www.google.com/", "https://duckduckgo.com/",
              "https://www.bing.com/", "https://www.instagram.com/", "https://www.reddit.com/r/running/")
_EMAIL_THEMES = ("New Arrivals", "Weekend Sale", "Running Essentials", "Trail Season", "Members Only",
                 "Gear Guide", "Last Chance", "Training Plans", "Outdoor Escape")
_PEAK_THEMES = ("Black Friday Early Access", "Cyber Week Deals", "Holiday Gift Guide", "Last Shipping Day")
_B2B_GROUPS = (("Running Club", "Sports & Recreation"), ("Fitness Studio", "Health & Fitness"),
               ("High School Athletics", "Education"), ("Corporate Wellness", "Professional Services"))
_STRAY_TEXT = (
    "HTTP/1.1 502 Bad Gateway",
    "<html><body><h1>504 Gateway Time-out</h1></body></html>",
    "[object Object]",
    "undefined",
    "ERROR: batch upload interrupted, retrying",
    "\ufeff{{broken",
)
_TYPE_TYPOS = ("trak", "identfy", "pageview", "event")

# Weekday multipliers, Monday first: shopping leans towards the weekend.
_WEEKDAY_FACTOR = (0.85, 0.90, 0.95, 1.00, 1.10, 1.30, 1.20)
# Local hour-of-day weights for online sessions (lunch and evening peaks).
_WEB_HOURS = (1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 2, 3, 3, 3, 4, 5, 5, 4, 4, 4, 5, 6, 8, 9, 8, 5, 2)
_WEB_HOURS_CUM = tuple(sum(_WEB_HOURS[: i + 1]) for i in range(24))


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _iso(ms: int) -> str:
    """Formats epoch milliseconds as ISO-8601 UTC with milliseconds and 'Z'."""
    d = _EPOCH + timedelta(milliseconds=ms)
    return (f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
            f".{ms % 1000:03d}Z")


def _to_ms(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # Knuth's method gets slow; the normal approximation is plenty here
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _ascii(text: str) -> str:
    """Folds accents and drops anything that cannot be in an email local part."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _holiday_season(day: date) -> bool:
    """Late November to just before Christmas, when retail traffic peaks."""
    return (day.month == 11 and day.day >= 20) or (day.month == 12 and day.day <= 23)


def _age(born: date, today: date) -> int:
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def _dumps(obj: object) -> str:
    # The standard library keeps output identical whether or not faster JSON
    # libraries are installed.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _money(value: float, currency: str) -> float | int:
    return int(round(value)) if currency == "JPY" else round(value, 2)


# --------------------------------------------------------------------------
# World model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Product:
    product_id: str
    sku: str
    name: str
    category: str
    brand: str
    price_usd: float


@dataclass
class _Device:
    kind: str  # desktop | mobile_web | ios | android
    anonymous_id: str
    user_agent: str
    ip: str
    skew_ms: int = 0
    device_id: str | None = None
    manufacturer: str = ""
    model: str = ""
    os_version: str = ""
    logged_in: bool = False
    fresh: bool = True  # no session yet on this cookie / install

    @property
    def source(self) -> str:
        return "mobile" if self.kind in ("ios", "android") else "web"


@dataclass
class _Person:
    index: int
    person_id: str
    persona: _Persona
    country: str
    city: str
    age: int
    birthday: date
    interests: tuple[str, ...]
    never_login: bool
    first_name: str = ""
    last_name: str = ""
    user_id: str | None = None
    email: str | None = None  # normalised (lowercase) address
    email_owner: bool = True  # False for the household member who borrowed it
    phone_forms: tuple[str, ...] = ()
    loyalty_id: str | None = None
    group: tuple[str, str, str] | None = None  # (groupId, name, industry)
    devices: list[_Device] = field(default_factory=list)
    group_sent: bool = False
    seed: int = 0  # of the person's own behaviour stream


@dataclass
class _Pending:
    """An event before transport: the body has no timestamps yet."""

    source: str  # key of EVENT_FILES
    body: dict
    t: int  # true event time, epoch ms
    skew_ms: int
    stamped: bool  # whether the collector sets `timestamp` (trusted clock)
    person: int


class _Rates:
    """Daily exchange rates (USD per unit), as published in rates.csv."""

    def __init__(self, rng: random.Random, first: date, last: date) -> None:
        self.first = first
        self.first_ms = _to_ms(datetime(first.year, first.month, first.day, tzinfo=timezone.utc))
        self.rows: list[tuple[str, str, float]] = []
        self.by_day: list[dict[str, float]] = []
        level = dict(_RATE_START)
        day = first
        while day <= last:
            rates = {"USD": 1.0}
            for cur in sorted(level):
                # A small multiplicative random walk: currencies drift, never jump.
                level[cur] *= math.exp(rng.gauss(0.0, 0.003))
                rates[cur] = round(level[cur], 8)
            self.by_day.append(rates)
            for cur in sorted(rates):
                self.rows.append((day.isoformat(), cur, rates[cur]))
            day += timedelta(days=1)

    def rate(self, currency: str, t_ms: int) -> float:
        index = min(max((t_ms - self.first_ms) // DAY_MS, 0), len(self.by_day) - 1)
        return self.by_day[index][currency]


def _build_catalog(rng: random.Random) -> list[_Product]:
    products = []
    number = 0
    for category in sorted(_CATEGORIES):
        count, (low, high), nouns = _CATEGORIES[category]
        for _ in range(count):
            number += 1
            brand = rng.choice(BRANDS)
            name = f"{brand} {rng.choice(_ADJECTIVES)} {rng.choice(nouns)}"
            if rng.random() < 0.3:
                name += f" {rng.randint(2, 5)}"
            # Retail prices end in .99 or .00 and cluster towards the low end.
            price = low + (high - low) * rng.random() ** 1.7
            price = float(round(price)) if rng.random() < 0.2 else round(price) - 0.01
            sku = f"{category[:3].upper()}-{_ascii(brand)[:3].upper()}-{number:04d}"
            products.append(_Product(f"P{100000 + number * 37}", sku, name, category, brand, max(price, 4.99)))
    return products


class _PhoneBook:
    """Issues unique, valid mobile numbers and the raw spellings people type."""

    def __init__(self, default_region: str) -> None:
        self.default_region = default_region
        self.e164_of: dict[str, str] = {}  # raw spelling -> E.164
        self._taken: set[str] = set()

    def issue(self, rng: random.Random, region: str) -> tuple[str, ...]:
        example = phonenumbers.example_number_for_type(region, PhoneNumberType.MOBILE)
        nsn = phonenumbers.national_significant_number(example)
        for attempt in range(200):
            # Vary the subscriber digits; widen the range if a region fills up.
            width = min(len(nsn) - 3, 5 + attempt // 50)
            digits = nsn[:-width] + "".join(rng.choice("0123456789") for _ in range(width))
            number = phonenumbers.parse(f"+{example.country_code}{digits}", None)
            e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
            if e164 not in self._taken and phonenumbers.is_valid_number(number):
                self._taken.add(e164)
                return self._spellings(number, e164, region)
        raise RuntimeError(f"could not find a free phone number for region {region}")

    def _spellings(self, number: phonenumbers.PhoneNumber, e164: str, region: str) -> tuple[str, ...]:
        intl = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
        head, _, rest = intl.partition(" ")
        candidates = [e164, intl, intl.replace(" ", "-")]
        if number.country_code == 1:
            nsn = phonenumbers.national_significant_number(number)
            candidates += [f"+1 ({nsn[:3]}) {nsn[3:6]}-{nsn[6:]}", f"+1 {rest.replace('-', '.')}"]
        else:
            # The "(0)" habit of European writers, and the 00 dialling prefix.
            candidates += [f"{head} (0) {rest}", f"00{e164[1:]}"]
        if region == self.default_region:
            # National spellings are only unambiguous inside the default region.
            national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
            candidates += [national, national.replace(" ", "-").replace("(", "").replace(")", "")]
        forms = []
        for raw in candidates:
            try:
                parsed = phonenumbers.parse(raw, self.default_region)
            except phonenumbers.NumberParseException:
                continue
            # Keep only spellings that a normaliser can map back to the number.
            if phonenumbers.format_number(parsed, PhoneNumberFormat.E164) == e164 and raw not in forms:
                forms.append(raw)
                self.e164_of[raw] = e164
        return tuple(forms)


# --------------------------------------------------------------------------
# Behaviour simulation
# --------------------------------------------------------------------------


class _Session:
    """Mutable state of one browsing session on one device."""

    def __init__(self, person: _Person, device: _Device, t: int) -> None:
        self.person = person
        self.device = device
        self.t = t
        self.referrer = ""
        self.campaign: dict | None = None


class _World:
    """Creates persons and simulates what they do, as pending events."""

    def __init__(self, customers: int, days: int, end_ms: int, seed: int, noise: NoiseRates,
                 default_region: str) -> None:
        master = random.Random(seed)
        # Independent streams, so that noise settings never alter behaviour.
        self.rng = random.Random(master.getrandbits(64))
        self.nrng = random.Random(master.getrandbits(64))
        rates_rng = random.Random(master.getrandbits(64))
        catalog_rng = random.Random(master.getrandbits(64))

        self.noise = noise
        self.days = days
        self.end_ms = end_ms
        self.start_ms = end_ms - days * DAY_MS
        # Keep true event times clear of `end` so that receipt latency and
        # re-sends cannot push a derived event time past the range.
        self.limit_ms = end_ms - HOUR_MS
        self.default_region = default_region

        start_date = (_EPOCH + timedelta(milliseconds=self.start_ms)).date()
        end_date = (_EPOCH + timedelta(milliseconds=end_ms)).date()
        self.rates = _Rates(rates_rng, start_date - timedelta(days=7), end_date)
        self.catalog = _build_catalog(catalog_rng)
        self.by_category: dict[str, list[_Product]] = {}
        for product in self.catalog:
            self.by_category.setdefault(product.category, []).append(product)
        self.categories = sorted(self.by_category)

        self.day_cum = self._day_weights()
        self.phones = _PhoneBook(default_region)
        self.kiosk_id = "kiosk-" + _uuid4(self.nrng)[:8]
        self.pending: list[_Pending] = []
        self.counts = {"clock_skew_devices": 0, "shared_family_email": 0}
        self._emails_taken: set[str] = set()
        self._typo_owner: dict[str, int] = {}
        self._ids_taken: set[str] = set()
        self.persons = self._build_persons(customers)
        self.campaigns = self._build_campaigns()

    # -- calendar ----------------------------------------------------------

    def _day_weights(self) -> list[float]:
        cum, total = [], 0.0
        for d in range(self.days):
            day = (_EPOCH + timedelta(milliseconds=self.start_ms + d * DAY_MS)).date()
            weight = _WEEKDAY_FACTOR[day.weekday()]
            if _holiday_season(day):
                weight *= 1.8
            if day.month == 11 and 24 <= day.day <= 30:
                weight *= 1.6  # Black Friday / Cyber Monday week on top
            total += weight
            cum.append(total)
        return cum

    def _random_days(self, count: int, within: int | None = None) -> list[int]:
        cum = self.day_cum[: within or self.days]
        return self.rng.choices(range(len(cum)), cum_weights=cum, k=count)

    def _local_time(self, person: _Person, day: int, hour: int) -> int:
        offset = COUNTRIES[person.country].utc_offset_h
        t = self.start_ms + day * DAY_MS + (hour - offset) * HOUR_MS + self.rng.randrange(HOUR_MS)
        # Local days straddle UTC days: move edge sessions a day inwards
        # rather than piling them up on the boundary.
        if t < self.start_ms:
            t += DAY_MS
        elif t > self.limit_ms - 2 * HOUR_MS:
            t -= DAY_MS
        return min(max(t, self.start_ms + MINUTE_MS), self.limit_ms - 2 * HOUR_MS)

    # -- population --------------------------------------------------------

    def _build_persons(self, customers: int) -> list[_Person]:
        persons = [self._base_person(i) for i in range(customers)]
        for person in persons:
            self._name_and_contacts(person)
        self._form_households(persons)
        for person in persons:
            self._devices(person)
        return persons

    def _base_person(self, index: int) -> _Person:
        rng = self.rng
        persona = PERSONAS[bisect.bisect_left(_PERSONA_CUM, rng.random() * _PERSONA_CUM[-1])]
        country = rng.choices(_COUNTRY_CODES, weights=[COUNTRIES[c].weight for c in _COUNTRY_CODES])[0]
        info = COUNTRIES[country]
        interests = rng.sample(INTERESTS, rng.randint(1, 3))
        if persona.name == "runner_enthusiast":
            # Runners cluster: mostly 25-34, in a few running-mad cities.
            age = rng.randint(25, 34) if rng.random() < 0.8 else rng.randint(18, 55)
            city = rng.choice(info.runner_cities)
            if "running" not in interests:
                interests[0] = "running"
        else:
            age = min(80, max(18, round(rng.gauss(40, 13))))
            city = rng.choice(info.cities)
        # persons.csv states the age at the end of the range; derive a birthday
        # that agrees with it.
        end_date = (_EPOCH + timedelta(milliseconds=self.end_ms - 1)).date()
        birthday = end_date - timedelta(days=round(age * 365.25) + rng.randrange(365))
        age = _age(birthday, end_date)
        return _Person(index=index, person_id=f"person_{index + 1:06d}", persona=persona, country=country,
                       city=city, age=age, birthday=birthday,
                       interests=tuple(i for i in INTERESTS if i in interests),
                       never_login=persona.name != "in_store_regular" and rng.random() < 0.14,
                       seed=rng.getrandbits(64))

    def _name_and_contacts(self, person: _Person) -> None:
        rng = self.rng
        info = COUNTRIES[person.country]
        person.first_name = rng.choice(info.first_names)
        person.last_name = rng.choice(info.last_names)
        if person.never_login:
            return  # anonymous-only browsers never hand over an identifier
        person.user_id = self._unique(lambda: f"usr_{rng.getrandbits(40):010x}")
        person.email = self._new_email(person)
        person.phone_forms = self.phones.issue(rng, person.country)
        if rng.random() < person.persona.loyalty_prob:
            person.loyalty_id = self._unique(lambda: f"LY{rng.randrange(10**9, 10**10)}")
        if rng.random() < 0.02:
            name, industry = rng.choice(_B2B_GROUPS)
            person.group = (f"grp_{rng.getrandbits(32):08x}", f"{person.city} {name}", industry)

    def _unique(self, make) -> str:
        """Draws ids until one is new: the truth must not merge persons by accident."""
        value = make()
        while value in self._ids_taken:
            value = make()
        self._ids_taken.add(value)
        return value

    def _new_email(self, person: _Person) -> str:
        rng = self.rng
        first, last = _ascii(person.first_name), _ascii(person.last_name)
        domain = rng.choice(COUNTRIES[person.country].email_domains)
        pattern = rng.randrange(5)
        local = (f"{first}.{last}", f"{first}{last}", f"{first[0]}.{last}", f"{first}_{last}",
                 f"{first}{last[0]}{rng.randint(1, 99)}")[pattern]
        email = f"{local}@{domain}"
        while email in self._emails_taken:
            email = f"{local}{rng.randint(1, 9999)}@{domain}"
        self._emails_taken.add(email)
        return email

    def _form_households(self, persons: list[_Person]) -> None:
        """Makes pairs of persons share one email address (a family inbox)."""
        rate = self.noise.shared_family_email
        candidates = [p for p in persons if p.email is not None]
        pairs = round(rate * len(persons) / 2)
        if rate > 0 and pairs == 0:
            pairs = 1  # keep the phenomenon present in small runs
        # A household lives in one city: pair each person with the previous
        # unpaired candidate from the same city, in a random order.
        waiting: dict[tuple[str, str], _Person] = {}
        made = 0
        for person in self.nrng.sample(candidates, len(candidates)):
            if made == pairs:
                break
            owner = waiting.pop((person.country, person.city), None)
            if owner is None:
                waiting[(person.country, person.city)] = person
                continue
            person.email = owner.email
            person.email_owner = False  # the mailing list knows the address once
            person.last_name = owner.last_name
            self.counts["shared_family_email"] += 2
            made += 1

    def _devices(self, person: _Person) -> None:
        rng, nrng = self.rng, self.nrng
        count = 1 if person.never_login else rng.choices((1, 2, 3), weights=(50, 35, 15))[0]
        for n in range(count):
            # Apps require an account, so never-login persons only have a browser cookie.
            if not person.never_login and rng.random() < person.persona.app_prob:
                kind = "ios" if rng.random() < 0.55 else "android"
            else:
                kind = "desktop" if n == 0 and rng.random() < 0.65 else rng.choice(("desktop", "mobile_web"))
            device = _Device(kind=kind, anonymous_id=_uuid4(rng), user_agent="",
                             ip=f"{rng.choice(_IP_PREFIXES)}.{rng.randint(1, 254)}")
            if kind == "desktop":
                device.user_agent = rng.choice(_DESKTOP_AGENTS)
            elif kind == "mobile_web":
                device.user_agent = rng.choice(_MOBILE_WEB_AGENTS)
            elif kind == "ios":
                device.manufacturer = "Apple"
                device.model, device.os_version = rng.choice(_IOS_MODELS)
                device.device_id = _uuid4(rng).upper()  # identifierForVendor style
                device.user_agent = (f"ExampleShop/{_APP['version']} (iPhone; iOS {device.os_version}; "
                                     f"Scale/3.00)")
            else:
                device.manufacturer, device.model, device.os_version = rng.choice(_ANDROID_MODELS)
                device.device_id = f"{rng.getrandbits(64):016x}"  # ANDROID_ID style
                device.user_agent = f"Dalvik/2.1.0 (Linux; U; Android {device.os_version}; {device.model})"
            if nrng.random() < self.noise.clock_skew_device:
                # A wrong device clock: between 5 minutes and 3 hours off, either way.
                device.skew_ms = nrng.choice((-1, 1)) * nrng.randint(5 * MINUTE_MS, 3 * HOUR_MS)
                self.counts["clock_skew_devices"] += 1
            person.devices.append(device)

    def _build_campaigns(self) -> list[tuple[int, str, str, str]]:
        """Newsletter sends: weekly, twice weekly in the holiday season."""
        campaigns = []
        for d in range(self.days):
            day = (_EPOCH + timedelta(milliseconds=self.start_ms + d * DAY_MS)).date()
            peak = _holiday_season(day)
            if day.weekday() == 1 or (peak and day.weekday() == 4):
                theme = self.rng.choice(_PEAK_THEMES if peak else _EMAIL_THEMES)
                send_ms = self.start_ms + d * DAY_MS + 14 * HOUR_MS
                campaign_id = f"cmp_{day:%Y%m%d}"
                campaigns.append((send_ms, campaign_id, f"{day:%Y-%m-%d} {theme}", theme))
        return campaigns

    # -- event plumbing ----------------------------------------------------

    def _emit(self, source: str, body: dict, t: int, person: _Person, device: _Device | None = None) -> None:
        if not self.start_ms <= t <= self.limit_ms:
            return
        skew = device.skew_ms if device is not None else 0
        self.pending.append(_Pending(source, body, t, skew, skew == 0, person.index))

    def _email_form(self, person: _Person) -> str:
        """The person's email as typed: usually clean, sometimes odd case or spaces."""
        email = person.email
        roll = self.rng.random()
        if roll < 0.6:
            return email
        local, _, domain = email.partition("@")
        if roll < 0.75:
            return f"{'.'.join(part.capitalize() for part in local.split('.'))}@{domain.capitalize()}"
        if roll < 0.9:
            return f"  {email} "
        return f"{local}@{domain.upper()}"

    def _typo(self, person: _Person) -> str:
        """A mistyped version of the person's email that is nobody's real address."""
        rng = self.nrng
        local, _, domain = person.email.partition("@")
        for _ in range(20):
            kind = rng.randrange(4)
            if kind == 0 and domain.startswith("gmail."):
                candidate = f"{local}@gmial.{domain[6:]}"
            elif kind == 1 and len(local) > 3:
                cut = rng.randrange(1, len(local) - 1)
                candidate = f"{local[:cut]}{local[cut + 1:]}@{domain}"  # a missing letter
            elif kind == 2:
                cut = rng.randrange(len(local))
                candidate = f"{local[:cut]}{local[cut]}{local[cut:]}@{domain}"  # a doubled letter
            else:
                candidate = f"{local}@{domain.rsplit('.', 1)[0]}.con" if domain.endswith(".com") else \
                    f"{local}@{domain[:-1]}"
            if candidate == person.email or candidate in self._emails_taken:
                continue
            if self._typo_owner.setdefault(candidate, person.index) == person.index:
                return candidate
        return person.email

    def _local_price(self, product: _Product, currency: str, t: int) -> float | int:
        if currency == "USD":
            return product.price_usd
        local = product.price_usd / self.rates.rate(currency, t)
        # Yen prices are whole and usually end in a zero.
        return int(round(local, -1)) if currency == "JPY" else round(local, 2)

    def _pick_products(self, person: _Person, count: int) -> list[_Product]:
        rng = self.rng
        picks = []
        for _ in range(count):
            if person.persona.name == "runner_enthusiast" and rng.random() < 0.7:
                category = rng.choice(("running", "footwear"))
            elif rng.random() < 0.5:
                category = rng.choice(_INTEREST_CATEGORIES[rng.choice(person.interests)])
            else:
                category = rng.choice(self.categories)
            pool = self.by_category[category]
            bias = person.persona.price_bias
            candidates = [rng.choice(pool) for _ in range(max(1, abs(bias)))]
            key = lambda p: p.price_usd  # noqa: E731
            picks.append(max(candidates, key=key) if bias > 0 else min(candidates, key=key))
        return picks

    # -- web and app sessions ------------------------------------------------

    def _client_event(self, s: _Session, type_: str, payload: dict, page: dict | None = None,
                      traits: dict | None = None) -> None:
        """Emits an event from a browser or app, with the device's identity."""
        device, person = s.device, s.person
        body: dict = {"type": type_, "messageId": _uuid4(self.rng), "anonymousId": device.anonymous_id}
        if device.logged_in:
            body["userId"] = person.user_id
        body.update(payload)
        body["channel"] = "mobile" if device.source == "mobile" else "web"
        library = _LIBRARIES[device.kind] if device.source == "mobile" else _LIBRARIES["web"]
        context: dict = {"library": dict(library), "userAgent": device.user_agent, "ip": device.ip,
                         "locale": COUNTRIES[person.country].locale}
        if device.source == "mobile":
            context["app"] = dict(_APP)
            context["device"] = {"id": device.device_id, "manufacturer": device.manufacturer,
                                 "model": device.model, "type": device.kind}
            context["os"] = {"name": "iOS" if device.kind == "ios" else "Android", "version": device.os_version}
        if page is not None:
            context["page"] = dict(page)
        if s.campaign is not None:
            context["campaign"] = dict(s.campaign)
            s.campaign = None  # UTM parameters belong to the landing event only
        if traits:
            context["traits"] = traits
        body["context"] = context
        self._emit(device.source, body, s.t, person, device)
        s.t += self.rng.randint(4 * SECOND_MS, 75 * SECOND_MS)

    def _view(self, s: _Session, name: str, path: str, title: str, properties: dict | None = None) -> dict | None:
        """A page (web) or screen (app) view; returns the page context for web."""
        if s.device.source == "mobile":
            self._client_event(s, "screen", {"name": name, "properties": properties or {}})
            return None
        url = _SITE + path
        if s.campaign is not None:
            c = s.campaign
            url += (f"?utm_source={c['source']}&utm_medium={c['medium']}&utm_campaign={c['name']}"
                    f"&utm_term={c['term']}&utm_content={c['content']}")
        page = {"path": path, "url": url, "title": title, "referrer": s.referrer}
        self._client_event(s, "page", {"name": name, "properties": dict(page)}, page=page)
        s.referrer = url
        return page

    def _track(self, s: _Session, event: str, properties: dict, page: dict | None = None,
               traits: dict | None = None) -> None:
        self._client_event(s, "track", {"event": event, "properties": properties}, page=page, traits=traits)

    def _identify_traits(self, person: _Person, t: int, full: bool) -> dict:
        rng = self.rng
        traits: dict = {"email": self._email_form(person)}
        if person.phone_forms and rng.random() < 0.6:
            traits["phone"] = rng.choice(person.phone_forms)
        if full:
            traits["first_name"] = person.first_name
            traits["last_name"] = person.last_name
            if rng.random() < 0.5:
                traits["age"] = _age(person.birthday, (_EPOCH + timedelta(milliseconds=t)).date())
            else:
                traits["birthday"] = person.birthday.isoformat()
            traits["city"] = person.city
            traits["country"] = person.country
            traits["interests"] = list(person.interests)
        return traits

    def _login(self, s: _Session) -> None:
        """The visitor signs in: the cookie/app install gets linked to the account."""
        person, device, rng = s.person, s.device, self.rng
        page = self._view(s, "Sign In", "/account/login", "Sign in | Example Shop", {"screen": "login"})
        device.logged_in = True
        self._client_event(s, "identify", {"traits": self._identify_traits(person, s.t, full=True)}, page=page)
        if device.source == "web" and rng.random() < 0.3:
            self._client_event(s, "alias", {"previousId": device.anonymous_id, "userId": person.user_id},
                               page=page)
        if person.group is not None and not person.group_sent:
            group_id, name, industry = person.group
            self._client_event(s, "group", {"groupId": group_id, "traits": {"name": name, "industry": industry}},
                               page=page)
            person.group_sent = True

    def _browse(self, person: _Person, device: _Device, t: int, buy: bool, campaign: dict | None = None,
                landing: str | None = None) -> None:
        rng = self.rng
        if device.source == "web" and rng.random() < 0.04:
            # Cleared cookies: a fresh anonymousId, signed out.
            device.anonymous_id = _uuid4(rng)
            device.logged_in = False
            device.fresh = True
        s = _Session(person, device, t)
        s.referrer = "" if campaign else rng.choice(_REFERRERS)
        if campaign is None and device.source == "web" and rng.random() < 0.2:
            source, medium = rng.choice(_UTM_SOURCES)
            campaign = {"name": rng.choice(_UTM_CAMPAIGNS), "source": source, "medium": medium,
                        "term": rng.choice(("running shoes", "trail", "yoga mat", "sale", "gift")),
                        "content": rng.choice(("banner_a", "banner_b", "text_link", "video"))}
        s.campaign = campaign

        category = rng.choice(self.categories)
        if landing is not None:
            page = self._view(s, "Category", landing, f"{category.title()} | Example Shop", {"category": category})
        elif rng.random() < 0.5:
            page = self._view(s, "Home", "/", "Example Shop | Sports & Outdoor Gear", {})
        else:
            page = self._view(s, "Category", f"/c/{category}", f"{category.title()} | Example Shop",
                              {"category": category})

        # Account holders mostly sign in on a new browser or install ("remember me", app sign-in
        # walls); a signed-out returning visitor signs in now and then. Some cookies and installs
        # still never sign in: their identifiers cannot be linked to the person by anybody.
        if device.source == "mobile":
            login_odds = 1.0 if device.fresh else 0.4  # the app's sign-in wall
        else:
            login_odds = 0.95 if device.fresh else 0.4
        device.fresh = False
        if person.user_id and not device.logged_in and (buy or rng.random() < login_odds):
            self._login(s)
        elif device.logged_in and rng.random() < 0.2:
            # Sites commonly re-identify signed-in visitors on page load.
            self._client_event(s, "identify", {"traits": self._identify_traits(person, s.t, full=False)},
                               page=page)

        buy = buy and device.logged_in
        currency = COUNTRIES[person.country].currency
        viewed = self._pick_products(person, rng.randint(*person.persona.views))
        for product in viewed:
            path = f"/p/{product.product_id.lower()}"
            page = self._view(s, "Product", path, f"{product.name} | Example Shop", {"product_id": product.product_id})
            self._track(s, "Product Viewed", {
                "product_id": product.product_id, "sku": product.sku, "name": product.name,
                "category": product.category, "brand": product.brand,
                "price": self._local_price(product, currency, s.t), "currency": currency}, page=page)

        if buy:
            self._order_online(s, viewed, currency, page)
        elif viewed and rng.random() < 0.15:
            # An abandoned cart.
            product = viewed[-1]
            self._track(s, "Product Added", {
                "cart_id": f"{rng.getrandbits(64):016x}", "product_id": product.product_id, "sku": product.sku,
                "price": self._local_price(product, currency, s.t), "quantity": 1, "currency": currency}, page=page)

    def _order_lines(self, person: _Person, products: list[_Product], currency: str, t: int) -> list[dict]:
        rng = self.rng
        lines = []
        for product in products:
            quantity = 1 if rng.random() < 0.8 else rng.randint(2, 3)
            lines.append({"product_id": product.product_id, "sku": product.sku, "name": product.name,
                          "price": self._local_price(product, currency, t), "quantity": quantity,
                          "category": product.category})
        return lines

    def _order_totals(self, person: _Person, lines: list[dict], currency: str, t: int, shipping_usd: float) -> dict:
        rng = self.rng
        subtotal = sum(line["price"] * line["quantity"] for line in lines)
        coupon = None
        discount = 0.0
        if rng.random() < person.persona.coupon_prob:
            coupon, pct = rng.choice((("WELCOME10", 0.10), ("SAVE15", 0.15), ("RUN20", 0.20), ("FREESHIP", 0.0)))
            discount = subtotal * pct
        revenue = _money(subtotal - discount, currency)
        rate = self.rates.rate(currency, t)
        shipping = 0.0 if subtotal * rate >= 75 or coupon == "FREESHIP" else shipping_usd / rate
        shipping = _money(shipping, currency)
        tax = _money(revenue * COUNTRIES[person.country].tax_rate, currency)
        props: dict = {"total": _money(revenue + shipping + tax, currency), "revenue": revenue,
                       "shipping": shipping, "tax": tax, "discount": _money(discount, currency)}
        if coupon:
            props["coupon"] = coupon
        if rng.random() < 0.03:
            # Some integrations send amounts as strings; still numeric.
            props["revenue"] = str(revenue) if currency == "JPY" else f"{revenue:.2f}"
        props["currency"] = currency
        return props

    def _checkout_traits(self, person: _Person, email: str) -> dict:
        traits = {"email": email}
        if person.phone_forms and self.rng.random() < 0.7:
            traits["phone"] = self.rng.choice(person.phone_forms)
        return traits

    def _order_online(self, s: _Session, viewed: list[_Product], currency: str, page: dict | None) -> None:
        rng, person = self.rng, s.person
        low, high = person.persona.basket
        products = viewed[: rng.randint(low, high)]
        products += self._pick_products(person, max(0, low - len(products)))
        cart_id = f"{rng.getrandbits(64):016x}"
        lines = self._order_lines(person, products, currency, s.t)
        for line in lines:
            self._track(s, "Product Added", {
                "cart_id": cart_id, "product_id": line["product_id"], "sku": line["sku"], "price": line["price"],
                "quantity": line["quantity"], "currency": currency}, page=page)
        page = self._view(s, "Cart", "/cart", "Your cart | Example Shop", {})
        order_id = self._unique(lambda: f"W{rng.randrange(10**8, 10**9)}")
        totals = self._order_totals(person, lines, currency, s.t, shipping_usd=5.99)
        email = self._email_form(person)
        typo = self.nrng.random() < self.noise.email_typo
        if typo:
            # The checkout form's email has a typo; it travels with the real userId.
            email = self._typo(person)
        traits = self._checkout_traits(person, email)
        value = totals["revenue"] if not isinstance(totals["revenue"], str) else float(totals["revenue"])
        self._track(s, "Checkout Started", {"order_id": order_id, "value": value, "currency": currency},
                    page=page, traits=dict(traits))
        page = self._view(s, "Order Confirmation", "/checkout/confirmation", "Thank you | Example Shop", {})
        self._track(s, "Order Completed", {"order_id": order_id, **totals, "products": lines}, page=page,
                    traits=dict(traits))

    # -- email service provider ------------------------------------------

    def _email_engagement(self, person: _Person) -> list[int]:
        """Emits opens/clicks/unsubscribes; returns the times of link clicks."""
        rng = self.rng
        persona = person.persona
        lapse_ms = self.start_ms + (self.days // 3) * DAY_MS
        clicks = []
        if person.email is None or not person.email_owner or rng.random() < 0.15:
            return clicks  # not subscribed (or the household's other member is)
        for send_ms, campaign_id, campaign_name, theme in self.campaigns:
            if rng.random() >= persona.email_open:
                continue
            lapsed = persona.name == "lapsed" and send_ms >= lapse_ms
            email_id = f"em_{rng.getrandbits(48):012x}"
            props = {"email_id": email_id, "campaign_id": campaign_id, "campaign_name": campaign_name,
                     "email_subject": f"{theme}: picked for you, {person.first_name}"}
            t = send_ms + int(rng.expovariate(1 / (5 * HOUR_MS)))
            opens = 2 if rng.random() < 0.15 else 1
            for _ in range(opens):
                self._esp_event(person, "Email Opened", dict(props), t)
                t += rng.randint(MINUTE_MS, 10 * HOUR_MS)
            if not lapsed and rng.random() < persona.email_click:
                category = rng.choice(self.categories)
                click = dict(props, link_url=f"{_SITE}/c/{category}?utm_source=newsletter&utm_medium=email"
                                             f"&utm_campaign={campaign_id}")
                click_t = t + rng.randint(5 * SECOND_MS, 3 * MINUTE_MS)
                self._esp_event(person, "Email Link Clicked", click, click_t)
                clicks.append(click_t)
            if rng.random() < 0.004:
                self._esp_event(person, "Unsubscribed", {"list_id": "newsletter"}, t + MINUTE_MS)
                break
        return clicks

    def _esp_event(self, person: _Person, event: str, properties: dict, t: int) -> None:
        body: dict = {"type": "track", "event": event, "messageId": _uuid4(self.rng)}
        if self.rng.random() < 0.85:
            body["userId"] = person.user_id
        body["properties"] = properties
        body["channel"] = "server"
        # ESPs know the address as stored in the mailing list: lowercase.
        body["context"] = {"library": dict(_LIBRARIES["email"]), "traits": {"email": person.email}}
        self._emit("email", body, t, person)

    # -- point of sale -----------------------------------------------------

    def _store_visits(self, person: _Person) -> None:
        rng, nrng = self.rng, self.nrng
        if person.loyalty_id is None:
            return
        count = _poisson(rng, person.persona.store_visits_per_30d * self.days / 30)
        info = COUNTRIES[person.country]
        store_id = f"store-{person.country.lower()}-{info.cities.index(person.city) + 1:02d}" \
            if person.city in info.cities else f"store-{person.country.lower()}-01"
        visits = sorted(self._local_time(person, day, rng.randint(10, 19)) for day in self._random_days(count))
        if person.persona.name == "lapsed":
            visits = [t for t in visits if t < self.start_ms + (self.days // 3) * DAY_MS]
        currency = info.currency
        for number, t in enumerate(visits):
            kiosk = nrng.random() < self.noise.kiosk_share
            if number == 0:
                self._loyalty_signup(person, t, store_id, kiosk)
                kiosk = nrng.random() < self.noise.kiosk_share
                t += rng.randint(2 * MINUTE_MS, 20 * MINUTE_MS)
            self._pos_receipt(person, t, store_id, currency, kiosk)

    def _external_ids(self, person: _Person, kiosk: bool) -> list[dict]:
        ids = [{"id": person.loyalty_id, "type": "loyalty_id", "collection": "users", "encoding": "none"}]
        if kiosk:
            ids.append({"id": self.kiosk_id, "type": "device_id", "collection": "users", "encoding": "none"})
        return ids

    def _loyalty_signup(self, person: _Person, t: int, store_id: str, kiosk: bool) -> None:
        """The card is linked to the person by userId or email at the till."""
        rng = self.rng
        body: dict = {"type": "identify", "messageId": _uuid4(rng)}
        if rng.random() < 0.5:
            body["userId"] = person.user_id
        traits = self._identify_traits(person, t, full=False)
        traits["first_name"] = person.first_name
        traits["last_name"] = person.last_name
        traits["store_id"] = store_id
        body["traits"] = traits
        body["channel"] = "pos"
        body["context"] = {"library": dict(_LIBRARIES["pos"]), "externalIds": self._external_ids(person, kiosk)}
        self._emit("pos", body, t, person)

    def _pos_receipt(self, person: _Person, t: int, store_id: str, currency: str, kiosk: bool) -> None:
        rng = self.rng
        low, high = person.persona.basket
        lines = self._order_lines(person, self._pick_products(person, rng.randint(low, high)), currency, t)
        order_id = self._unique(lambda: f"{store_id.upper()}-{rng.randrange(10**6, 10**7)}")
        totals = self._order_totals(person, lines, currency, t, shipping_usd=0.0)
        props = {"order_id": order_id, "store_id": store_id,
                 **totals, "payment_method": rng.choice(("card", "card", "cash", "mobile_wallet")),
                 "products": lines}
        body: dict = {"type": "track", "event": "Order Completed", "messageId": _uuid4(rng),
                      "properties": props, "channel": "pos"}
        context: dict = {"library": dict(_LIBRARIES["pos"]), "externalIds": self._external_ids(person, kiosk)}
        if rng.random() < 0.3:
            # E-receipts: the cashier captured an email or phone number.
            if person.phone_forms and rng.random() < 0.4:
                context["traits"] = {"phone": rng.choice(person.phone_forms)}
            else:
                context["traits"] = {"email": self._email_form(person)}
        body["context"] = context
        self._emit("pos", body, t, person)

    # -- per person ----------------------------------------------------------

    def simulate(self) -> None:
        for person in self.persons:
            # Each person behaves from a private stream, so that a change to
            # one person (say, joining a household) does not ripple into the
            # behaviour of everybody simulated after them.
            self.rng = random.Random(person.seed)
            self._simulate_person(person)

    def _simulate_person(self, person: _Person) -> None:
        rng = self.rng
        persona = person.persona
        clicks = self._email_engagement(person)
        within = max(1, self.days // 3) if persona.name == "lapsed" else None
        span = within or self.days
        # Everybody in the data set visited at least once.
        count = max(1, _poisson(rng, persona.sessions_per_30d * span / 30))
        plan = [(self._local_time(person, day, bisect.bisect_left(_WEB_HOURS_CUM,
                                                                  rng.random() * _WEB_HOURS_CUM[-1])), None)
                for day in self._random_days(count, within)]
        for click_t in clicks:
            if rng.random() < 0.6:
                plan.append((click_t + rng.randint(2 * SECOND_MS, 40 * SECOND_MS), "email"))
        plan.sort(key=lambda item: item[0])
        weights = [3] + [1] * (len(person.devices) - 1)  # one device is the main one
        for t, origin in plan:
            device = rng.choices(person.devices, weights=weights)[0]
            buy = not person.never_login and rng.random() < persona.buy_prob
            campaign = landing = None
            if origin == "email":
                category = rng.choice(self.categories)
                landing = f"/c/{category}"
                campaign = {"name": "newsletter", "source": "newsletter", "medium": "email",
                            "term": "", "content": category}
            self._browse(person, device, t, buy, campaign, landing)
        self._store_visits(person)


# --------------------------------------------------------------------------
# Transport: timestamps, noise, files, truth
# --------------------------------------------------------------------------

_VIOLATIONS = ("missing_message_id", "unknown_type", "track_without_event", "revenue_not_numeric",
               "invalid_timestamp", "no_identifier")


def _identifiers(body: dict, phone_e164: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Yields (identifier_type, normalised value) pairs found in a valid event."""
    if body.get("userId"):
        yield "user_id", body["userId"]
    if body.get("anonymousId"):
        yield "anonymous_id", body["anonymousId"]
    if body.get("type") == "alias" and body.get("previousId"):
        yield "anonymous_id", body["previousId"]
    context = body.get("context", {})
    device = context.get("device")
    if device and device.get("id"):
        yield "device_id", device["id"]
    trait_sets = [context.get("traits")]
    if body.get("type") == "identify":
        trait_sets.append(body.get("traits"))
    for traits in trait_sets:
        if not traits:
            continue
        if traits.get("email"):
            yield "email", traits["email"].strip().lower()
        if traits.get("phone"):
            yield "phone", phone_e164[traits["phone"]]
    for ext in context.get("externalIds", ()):
        yield ext["type"], ext["id"]


class _Collector:
    """Turns pending events into file lines, injecting transport noise."""

    def __init__(self, world: _World) -> None:
        self.world = world
        self.rng = world.nrng
        self.noise = world.noise
        self.lines: dict[str, list[tuple[int, int, str]]] = {source: [] for source in EVENT_FILES}
        self.file_counts = {source: {"lines": 0, "valid": 0, "malformed_json": 0, "schema_violation": 0,
                                     "duplicate": 0} for source in EVENT_FILES}
        self.noise_counts = {"duplicate": 0, "late": 0, "very_late": 0, "malformed_json": 0,
                             "schema_violation": 0, "clock_skew_events": 0, "kiosk_share": 0, "email_typo": 0}
        self.violation_kinds = {kind: 0 for kind in _VIOLATIONS}
        self.used: list[dict[tuple[str, str], None]] = [{} for _ in world.persons]
        self._seq = 0

    def collect(self) -> None:
        for pending in self.world.pending:
            self._collect_one(pending)

    def _add_line(self, source: str, received_ms: int, line: str, kind: str) -> None:
        # Collectors flush in parallel, so arrival order is only roughly receivedAt order.
        key = received_ms + self.rng.randrange(90 * SECOND_MS)
        self._seq += 1
        self.lines[source].append((key, self._seq, line))
        counts = self.file_counts[source]
        counts["lines"] += 1
        counts[kind] += 1

    def _timing(self, p: _Pending) -> tuple[int, int, str]:
        """Returns (true send time, receivedAt, lateness kind)."""
        rng = self.rng
        latency = rng.randint(20, 800)
        roll = rng.random()
        if roll < self.noise.very_late:
            received = p.t + rng.randint(4 * DAY_MS, 20 * DAY_MS)
            return received - latency, received, "very_late"
        if roll < self.noise.very_late + self.noise.late:
            received = p.t + rng.randint(HOUR_MS, 2 * DAY_MS)
            return received - latency, received, "late"
        if p.source == "mobile":
            send_delay = rng.randint(200, 30 * SECOND_MS)  # apps flush in batches
        elif p.source == "web":
            send_delay = rng.randint(5, 400)
        else:
            send_delay = rng.randint(100, 5 * SECOND_MS)  # webhooks and store feeds
        return p.t + send_delay, p.t + send_delay + latency, ""

    def _collect_one(self, p: _Pending) -> None:
        rng, body = self.rng, p.body
        sent, received, lateness = self._timing(p)
        body["originalTimestamp"] = _iso(p.t + p.skew_ms)
        body["sentAt"] = _iso(sent + p.skew_ms)
        body["receivedAt"] = _iso(received)
        if p.stamped:
            body["timestamp"] = _iso(p.t)

        roll = rng.random()
        if roll < self.noise.malformed_json:
            self._add_line(p.source, received, self._malformed(body), "malformed_json")
            self.noise_counts["malformed_json"] += 1
            return
        if roll < self.noise.malformed_json + self.noise.schema_violation:
            kind = self._violate(body)
            self.violation_kinds[kind] += 1
            self.noise_counts["schema_violation"] += 1
            self._add_line(p.source, received, _dumps(body), "schema_violation")
            return

        line = _dumps(body)
        self._add_line(p.source, received, line, "valid")
        if lateness:
            self.noise_counts[lateness] += 1
        if not p.stamped:
            self.noise_counts["clock_skew_events"] += 1
        self._note_identifiers(p)
        if rng.random() < self.noise.duplicate:
            # A retry: same payload and messageId, only the server receipt time differs.
            again = received + rng.randint(SECOND_MS, 10 * MINUTE_MS)
            duplicate = dict(body, receivedAt=_iso(again))
            self._add_line(p.source, again, _dumps(duplicate), "valid")
            self.file_counts[p.source]["duplicate"] += 1
            self.noise_counts["duplicate"] += 1

    def _note_identifiers(self, p: _Pending) -> None:
        used = self.used[p.person]
        world = self.world
        person = world.persons[p.person]
        for kind, value in _identifiers(p.body, world.phones.e164_of):
            used[(kind, value)] = None
            if kind == "device_id" and value == world.kiosk_id:
                self.noise_counts["kiosk_share"] += 1
            elif kind == "email" and person.email is not None and value != person.email:
                self.noise_counts["email_typo"] += 1

    def _malformed(self, body: dict) -> str:
        rng = self.rng
        text = _dumps(body)
        roll = rng.random()
        if roll < 0.6:
            line = text[: rng.randint(10, len(text) - 2)]  # a truncated object
        elif roll < 0.8:
            line = rng.choice(_STRAY_TEXT)
        else:
            line = repr(body)  # a Python dict logged instead of JSON
        try:
            json.loads(line)
        except ValueError:
            return line
        return text[:-1]  # never let a "malformed" line be valid by accident

    def _violate(self, body: dict) -> str:
        rng = self.rng
        kinds = ["missing_message_id", "unknown_type", "invalid_timestamp", "no_identifier"]
        if body.get("type") == "track":
            kinds.append("track_without_event")
        if "revenue" in body.get("properties", {}):
            kinds.append("revenue_not_numeric")
        kind = rng.choice(kinds)
        if kind == "missing_message_id":
            del body["messageId"]
        elif kind == "unknown_type":
            body["type"] = rng.choice(_TYPE_TYPOS)
        elif kind == "track_without_event":
            del body["event"]
        elif kind == "revenue_not_numeric":
            body["properties"] = dict(body["properties"], revenue="abc")
        elif kind == "invalid_timestamp":
            body["timestamp"] = "not-a-date"
        else:
            for key in ("userId", "anonymousId", "previousId"):
                body.pop(key, None)
            context = {k: v for k, v in body.get("context", {}).items() if k not in ("traits", "externalIds")}
            if "device" in context:
                context["device"] = {k: v for k, v in context["device"].items() if k != "id"}
            body["context"] = context
            if "traits" in body:
                body["traits"] = {k: v for k, v in body["traits"].items() if k not in ("email", "phone")}
        return kind

    def write(self, out: Path) -> None:
        for source, rel in EVENT_FILES.items():
            rows = sorted(self.lines[source])
            with open(out / rel, "w", encoding="utf-8", newline="\n") as fh:
                for _, _, line in rows:
                    fh.write(line)
                    fh.write("\n")


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> int:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return len(rows)


def generate(out: str | os.PathLike, customers: int = 2000, days: int = 180, seed: int = 7,
             end: datetime = datetime(2026, 11, 1, tzinfo=timezone.utc), noise: NoiseRates = NoiseRates(),
             default_region: str = "US") -> dict:
    """Generates a synthetic data set of customer events plus ground truth.

    Args:
        out: Output directory; created if missing. Existing files of the same
            names are overwritten.
        customers: Number of real persons to simulate.
        days: Length of the simulated period, ending at ``end``.
        seed: Seed of all randomness; same arguments give identical bytes.
        end: Exclusive end of the period (timezone-aware; naive means UTC).
        noise: Rates of injected transport and identity noise.
        default_region: Region whose persons may write phone numbers in
            national format (and which a normaliser should assume).

    Returns:
        The manifest, which is also written to ``OUT/manifest.json``.

    Raises:
        ValueError: If an argument is out of range.
    """
    if customers < 1:
        raise ValueError("customers must be at least 1")
    if days < 1:
        raise ValueError("days must be at least 1")
    if default_region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown phone region {default_region!r}")
    if end.tzinfo is None:
        end = end.replace(tzinfo=timezone.utc)
    end = end.astimezone(timezone.utc)

    out = Path(out)
    for sub in ("events", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    world = _World(customers, days, _to_ms(end), seed, noise, default_region)
    world.simulate()
    collector = _Collector(world)
    collector.collect()
    collector.write(out)

    catalog_rows = [(p.product_id, p.sku, p.name, p.category, p.brand, f"{p.price_usd:.2f}", REPORTING_CURRENCY)
                    for p in world.catalog]
    identity_rows = sorted((world.persons[i].person_id, kind, value)
                           for i, used in enumerate(collector.used) for kind, value in used)
    person_rows = [(p.person_id, p.persona.name, p.age, p.city, p.country, "|".join(p.interests))
                   for p in world.persons]
    row_counts = {
        "catalog.csv": _write_csv(out / "catalog.csv",
                                  ("product_id", "sku", "name", "category", "brand", "price", "currency"),
                                  catalog_rows),
        "rates.csv": _write_csv(out / "rates.csv", ("date", "currency", "rate"),
                                [(d, cur, repr(rate)) for d, cur, rate in world.rates.rows]),
        "truth/identities.csv": _write_csv(out / "truth" / "identities.csv",
                                           ("person_id", "identifier_type", "identifier_value"), identity_rows),
        "truth/persons.csv": _write_csv(out / "truth" / "persons.csv",
                                        ("person_id", "persona", "age", "city", "country", "interests"),
                                        person_rows),
    }

    files: dict[str, dict] = {EVENT_FILES[s]: dict(c) for s, c in collector.file_counts.items()}
    files.update({name: {"rows": n} for name, n in row_counts.items()})
    totals = {key: sum(c[key] for c in collector.file_counts.values())
              for key in ("lines", "valid", "malformed_json", "schema_violation", "duplicate")}
    noise_counts = dict(collector.noise_counts)
    noise_counts["clock_skew_devices"] = world.counts["clock_skew_devices"]
    noise_counts["shared_family_email"] = world.counts["shared_family_email"]
    noise_counts["kiosk_persons"] = sum(1 for used in collector.used if ("device_id", world.kiosk_id) in used)
    noise_counts["schema_violation_kinds"] = dict(collector.violation_kinds)

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "generator": "cdpflow.synthetic",
        "arguments": {"customers": customers, "days": days, "seed": seed, "end": _iso(_to_ms(end)),
                      "default_region": default_region, "noise": asdict(noise)},
        "range": {"start": _iso(world.start_ms), "end": _iso(world.end_ms)},
        "reporting_currency": REPORTING_CURRENCY,
        "default_region": default_region,
        "kiosk_device_id": world.kiosk_id,
        "files": files,
        "events": totals,
        "noise": noise_counts,
    }
    with open(out / "manifest.json", "w", encoding="utf-8", newline="\n") as fh:
        fh.write(json.dumps(manifest, indent=2, ensure_ascii=False))
        fh.write("\n")
    return manifest
