"""Tests of the synthetic event generator (cdpflow.synthetic).

The generated data set is the contract the rest of the pipeline is built and
evaluated against, so these tests check that contract from the outside: they
read the files back like a consumer would and compare them with the manifest
and the ground truth.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import phonenumbers
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdpflow.synthetic import NoiseRates, generate

END = datetime(2026, 11, 1, tzinfo=timezone.utc)
EVENT_FILES = ("events/web.jsonl", "events/mobile.jsonl", "events/email.jsonl", "events/pos.jsonl")
ALL_FILES = EVENT_FILES + ("catalog.csv", "rates.csv", "truth/identities.csv", "truth/persons.csv",
                           "manifest.json")
TYPES = {"identify", "track", "page", "screen", "alias", "group"}
COUNTRY_CURRENCY = {"US": "USD", "CA": "CAD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "JP": "JPY"}
RAISED = NoiseRates().scale(5)


# --------------------------------------------------------------------------
# Helpers: a minimal consumer of the files
# --------------------------------------------------------------------------


def parse_ts(value: object) -> datetime | None:
    """Parses the ISO-8601 'YYYY-MM-DDTHH:MM:SS.mmmZ' form; None if invalid."""
    if not isinstance(value, str) or len(value) != 24 or not value.endswith("Z"):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def has_identifier(event: dict) -> bool:
    if event.get("userId") or event.get("anonymousId"):
        return True
    context = event.get("context") or {}
    if context.get("externalIds"):
        return True
    trait_sets = [context.get("traits") or {}]
    if event.get("type") == "identify":
        trait_sets.append(event.get("traits") or {})
    return any(traits.get("email") or traits.get("phone") for traits in trait_sets)


def is_numeric(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)  # numeric strings such as "49.90" are allowed
    except (TypeError, ValueError):
        return False
    return True


def contract_problems(event: dict, source: str) -> list[str]:
    """Everything about one parsed event that breaks the event contract."""
    problems = []
    if event.get("type") not in TYPES:
        problems.append("type")
    if not isinstance(event.get("messageId"), str) or not event["messageId"]:
        problems.append("messageId")
    if parse_ts(event.get("receivedAt")) is None:
        problems.append("receivedAt")
    for key in ("originalTimestamp", "sentAt", "timestamp"):
        if key in event and parse_ts(event[key]) is None:
            problems.append(key)
    if not has_identifier(event):
        problems.append("identifier")
    elif source in ("events/web.jsonl", "events/mobile.jsonl") and not event.get("anonymousId"):
        problems.append("anonymousId")  # client-side events always carry the cookie / install id
    if event.get("type") == "track" and not event.get("event"):
        problems.append("event")
    properties = event.get("properties") or {}
    if "revenue" in properties and not is_numeric(properties["revenue"]):
        problems.append("revenue")
    return problems


def read_events(out: Path, rel: str) -> tuple[list[dict], list[dict], int, list[str]]:
    """Returns (valid events, violating events, malformed count, raw lines)."""
    valid, violating, malformed = [], [], 0
    lines = (out / rel).read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            malformed += 1
            continue
        if not isinstance(event, dict):
            malformed += 1
        elif contract_problems(event, rel):
            violating.append(event)
        else:
            valid.append(event)
    return valid, violating, malformed, lines


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def event_time(event: dict) -> datetime:
    """The true event time as a consumer computes it."""
    if "timestamp" in event:
        return parse_ts(event["timestamp"])
    received, sent, original = (parse_ts(event[k]) for k in ("receivedAt", "sentAt", "originalTimestamp"))
    return received - (sent - original)


def normalised_identifiers(event: dict) -> list[tuple[str, str]]:
    """Identifiers of an event, normalised like the truth file says."""
    found = []
    if event.get("userId"):
        found.append(("user_id", event["userId"]))
    if event.get("anonymousId"):
        found.append(("anonymous_id", event["anonymousId"]))
    context = event.get("context") or {}
    if (context.get("device") or {}).get("id"):
        found.append(("device_id", context["device"]["id"]))
    trait_sets = [context.get("traits") or {}]
    if event.get("type") == "identify":
        trait_sets.append(event.get("traits") or {})
    for traits in trait_sets:
        if traits.get("email"):
            found.append(("email", traits["email"].strip().lower()))
        if traits.get("phone"):
            number = phonenumbers.parse(traits["phone"], "US")
            found.append(("phone", phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)))
    for ext in context.get("externalIds") or ():
        found.append((ext["type"], ext["id"]))
    return found


# --------------------------------------------------------------------------
# Fixtures: generate each data set once per module
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("default")
    return out, generate(out, customers=300, days=180, seed=11)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("noisy")
    return out, generate(out, customers=300, days=90, seed=5, noise=RAISED)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean")
    return out, generate(out, customers=150, days=60, seed=3, noise=NoiseRates().scale(0))


@pytest.fixture(params=["default_run", "noisy_run", "clean_run"])
def any_run(request) -> tuple[Path, dict]:
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------
# NoiseRates
# --------------------------------------------------------------------------


@given(st.floats(min_value=0, max_value=1000, allow_nan=False))
def test_scale_multiplies_and_caps_every_rate(factor):
    base = NoiseRates()
    scaled = base.scale(factor)
    for f in dataclasses.fields(NoiseRates):
        assert getattr(scaled, f.name) == pytest.approx(min(1.0, getattr(base, f.name) * factor))


def test_scale_rejects_negative_factor_and_rates_out_of_range():
    with pytest.raises(ValueError):
        NoiseRates().scale(-1)
    with pytest.raises(ValueError):
        NoiseRates(duplicate=1.5)


# --------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------


def _file_bytes(out: Path) -> dict[str, bytes]:
    return {rel: (out / rel).read_bytes() for rel in ALL_FILES}


def test_same_arguments_give_identical_bytes_and_other_seed_differs(tmp_path):
    args = dict(customers=80, days=45, end=END, noise=RAISED)
    generate(tmp_path / "a", seed=42, **args)
    generate(tmp_path / "b", seed=42, **args)
    generate(tmp_path / "c", seed=43, **args)
    first, second, other = (_file_bytes(tmp_path / name) for name in "abc")
    assert first == second
    for rel in EVENT_FILES + ("truth/identities.csv", "truth/persons.csv"):
        assert first[rel] != other[rel], rel


def _message_ids(out: Path) -> set[str]:
    ids = set()
    for rel in EVENT_FILES:
        for line in (out / rel).read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "messageId" in event:
                ids.add(event["messageId"])
    return ids


def test_noise_does_not_change_the_behaviour(tmp_path):
    # Noise has its own random stream: raising it must damage the same events,
    # not re-roll who the customers are and what they do. (Households are left
    # out: sharing an inbox legitimately changes what those two persons do.)
    loud_noise = dataclasses.replace(RAISED, shared_family_email=0.0)
    generate(tmp_path / "quiet", customers=60, days=30, seed=9, noise=NoiseRates().scale(0))
    generate(tmp_path / "loud", customers=60, days=30, seed=9, noise=loud_noise)
    assert (tmp_path / "quiet/truth/persons.csv").read_bytes() == (tmp_path / "loud/truth/persons.csv").read_bytes()
    quiet, loud = _message_ids(tmp_path / "quiet"), _message_ids(tmp_path / "loud")
    assert loud <= quiet
    assert len(loud) >= 0.9 * len(quiet)


# --------------------------------------------------------------------------
# Volume and layout
# --------------------------------------------------------------------------


def test_volume_and_files(default_run):
    out, manifest = default_run
    for rel in ALL_FILES:
        assert (out / rel).is_file(), rel
        assert (out / rel).stat().st_size > 0, rel
    total = sum(len((out / rel).read_text(encoding="utf-8").splitlines()) for rel in EVENT_FILES)
    assert 25 <= total / 300 <= 45
    assert manifest["events"]["lines"] == total
    for rel in EVENT_FILES:
        assert manifest["files"][rel]["lines"] > 0, rel


def test_lines_are_not_sorted_by_event_time(default_run):
    out, _ = default_run
    valid, _, _, _ = read_events(out, "events/web.jsonl")
    times = [event_time(e) for e in valid]
    assert any(later < earlier for earlier, later in zip(times, times[1:]))


def test_catalog_and_rates(default_run):
    out, manifest = default_run
    catalog = read_csv(out / "catalog.csv")
    assert 150 <= len(catalog) <= 250
    assert len({row["product_id"] for row in catalog}) == len(catalog)
    assert {"running", "outdoor", "fitness", "apparel", "footwear", "accessories", "home"} <= \
        {row["category"] for row in catalog}
    assert 10 <= len({row["brand"] for row in catalog}) <= 20
    assert all(float(row["price"]) > 0 and row["currency"] == "USD" for row in catalog)

    rates = read_csv(out / "rates.csv")
    by_date = defaultdict(dict)
    for row in rates:
        by_date[row["date"]][row["currency"]] = float(row["rate"])
    day = (END - timedelta(days=180 + 7)).date()
    while day < END.date():
        assert set(by_date[day.isoformat()]) == {"USD", "EUR", "GBP", "CAD", "JPY"}, day
        assert by_date[day.isoformat()]["USD"] == 1.0
        day += timedelta(days=1)
    eur = [by_date[d]["EUR"] for d in sorted(by_date)]
    assert len(set(eur)) > 1 and max(eur) / min(eur) < 1.5  # drifts, slowly
    assert manifest["reporting_currency"] == "USD" and manifest["default_region"] == "US"


# --------------------------------------------------------------------------
# Event contract
# --------------------------------------------------------------------------


def test_manifest_counts_match_files(any_run):
    out, manifest = any_run
    for rel in EVENT_FILES:
        valid, violating, malformed, lines = read_events(out, rel)
        counts = manifest["files"][rel]
        assert counts["lines"] == len(lines), rel
        assert counts["malformed_json"] == malformed, rel
        assert counts["schema_violation"] == len(violating), rel
        assert counts["valid"] == len(valid), rel
        assert malformed + len(violating) + len(valid) == len(lines)
    for rel in ("catalog.csv", "rates.csv", "truth/identities.csv", "truth/persons.csv"):
        assert manifest["files"][rel]["rows"] == len(read_csv(out / rel)), rel
    assert manifest == json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_noise_is_injected_and_counted(noisy_run):
    out, manifest = noisy_run
    noise = manifest["noise"]
    for kind in ("duplicate", "late", "very_late", "malformed_json", "schema_violation", "clock_skew_devices",
                 "clock_skew_events", "shared_family_email", "kiosk_share", "email_typo"):
        assert noise[kind] > 0, kind
    assert sum(noise["schema_violation_kinds"].values()) == noise["schema_violation"]
    assert sum(1 for n in noise["schema_violation_kinds"].values() if n) >= 4


def test_duplicates_repeat_the_payload_with_a_later_receipt(noisy_run):
    out, manifest = noisy_run
    repeats = 0
    for rel in EVENT_FILES:
        valid, _, _, _ = read_events(out, rel)
        by_id = defaultdict(list)
        for event in valid:
            by_id[event["messageId"]].append(event)
        for copies in by_id.values():
            if len(copies) < 2:
                continue
            repeats += len(copies) - 1
            copies.sort(key=lambda e: e["receivedAt"])
            first = copies[0]
            for again in copies[1:]:
                delay = parse_ts(again["receivedAt"]) - parse_ts(first["receivedAt"])
                assert timedelta(seconds=1) <= delay <= timedelta(minutes=10)
                assert dict(again, receivedAt=None) == dict(first, receivedAt=None)
        assert manifest["files"][rel]["duplicate"] == sum(len(c) - 1 for c in by_id.values()), rel
    assert repeats == manifest["noise"]["duplicate"] > 0


def test_events_follow_the_tracking_spec(default_run):
    out, _ = default_run
    libraries = defaultdict(set)
    seen = Counter()
    for rel in EVENT_FILES:
        valid, _, _, _ = read_events(out, rel)
        for event in valid:
            context = event["context"]
            libraries[rel].add(context["library"]["name"])
            seen[(rel, event["type"], event.get("event"))] += 1
            ip = context.get("ip")
            if ip is not None:
                assert ip.rsplit(".", 1)[0] in ("192.0.2", "198.51.100", "203.0.113"), ip
            if rel in ("events/web.jsonl", "events/mobile.jsonl"):
                assert context["userAgent"]
            if event["type"] == "page":
                assert {"path", "url", "title", "referrer"} <= set(context["page"])
            if event["type"] == "identify" and "country" in event["traits"]:
                traits = event["traits"]
                assert traits["country"] in COUNTRY_CURRENCY
                assert ("age" in traits) != ("birthday" in traits)
            if event.get("event") == "Order Completed":
                props = event["properties"]
                assert {"order_id", "total", "revenue", "currency", "products"} <= set(props)
                assert props["currency"] in set(COUNTRY_CURRENCY.values())
            if rel == "events/pos.jsonl":
                assert event["channel"] == "pos"
                assert any(x["type"] == "loyalty_id" for x in context["externalIds"])
            if rel == "events/email.jsonl":
                assert context["traits"]["email"] == context["traits"]["email"].strip().lower()
    assert libraries["events/web.jsonl"] == {"analytics.js"}
    assert libraries["events/mobile.jsonl"] == {"analytics-ios", "analytics-android"}
    assert libraries["events/pos.jsonl"] == {"pos-feed"}
    for key in [("events/web.jsonl", "page", None), ("events/web.jsonl", "identify", None),
                ("events/web.jsonl", "alias", None), ("events/web.jsonl", "track", "Checkout Started"),
                ("events/mobile.jsonl", "screen", None), ("events/mobile.jsonl", "track", "Product Viewed"),
                ("events/email.jsonl", "track", "Email Opened"), ("events/email.jsonl", "track", "Email Link Clicked"),
                ("events/pos.jsonl", "track", "Order Completed"), ("events/pos.jsonl", "identify", None)]:
        assert seen[key] > 0, key


def test_order_currency_follows_the_persons_country(default_run):
    out, _ = default_run
    country = {row["person_id"]: row["country"] for row in read_csv(out / "truth/persons.csv")}
    owner = {row["identifier_value"]: row["person_id"] for row in read_csv(out / "truth/identities.csv")
             if row["identifier_type"] == "user_id"}
    checked = 0
    for rel in ("events/web.jsonl", "events/mobile.jsonl"):
        valid, _, _, _ = read_events(out, rel)
        for event in valid:
            if event.get("event") == "Order Completed":
                assert event["properties"]["currency"] == COUNTRY_CURRENCY[country[owner[event["userId"]]]]
                checked += 1
    assert checked > 50


# --------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------


def test_truth_identifiers_are_normalised(any_run):
    out, _ = any_run
    persons = {row["person_id"] for row in read_csv(out / "truth/persons.csv")}
    identities = read_csv(out / "truth/identities.csv")
    kinds = Counter(row["identifier_type"] for row in identities)
    assert set(kinds) <= {"user_id", "anonymous_id", "email", "phone", "loyalty_id", "device_id"}
    assert {"user_id", "anonymous_id", "email", "phone"} <= set(kinds)
    for row in identities:
        assert row["person_id"] in persons
        value = row["identifier_value"]
        if row["identifier_type"] == "email":
            assert value == value.strip().lower() and "@" in value
        elif row["identifier_type"] == "phone":
            number = phonenumbers.parse(value, None)
            assert phonenumbers.is_valid_number(number), value
            assert phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164) == value
    rows = [(r["person_id"], r["identifier_type"], r["identifier_value"]) for r in identities]
    assert len(rows) == len(set(rows))


def test_every_identifier_in_the_events_is_in_the_truth(any_run):
    out, _ = any_run
    truth = {(r["identifier_type"], r["identifier_value"]) for r in read_csv(out / "truth/identities.csv")}
    for rel in EVENT_FILES:
        valid, _, _, _ = read_events(out, rel)
        for event in valid:
            for identifier in normalised_identifiers(event):
                assert identifier in truth, (rel, identifier)


def test_messy_raw_identifiers_are_present(default_run):
    out, _ = default_run
    emails, phones = set(), set()
    for rel in EVENT_FILES:
        valid, _, _, _ = read_events(out, rel)
        for event in valid:
            for traits in ((event.get("context") or {}).get("traits") or {}, event.get("traits") or {}):
                if "email" in traits:
                    emails.add(traits["email"])
                if "phone" in traits:
                    phones.add(traits["phone"])
    assert any(e != e.strip() for e in emails) and any(e.strip() != e.strip().lower() for e in emails)
    assert any(p.startswith("+") and " " not in p for p in phones)  # E.164
    assert any(p.startswith("+") and (" " in p or "-" in p) for p in phones)  # international
    national = [p for p in phones if not p.startswith(("+", "00"))]
    assert national
    for raw in national:  # national spellings only make sense in the default region
        assert phonenumbers.region_code_for_number(phonenumbers.parse(raw, "US")) == "US"


def test_shared_identifiers_in_truth(noisy_run):
    out, manifest = noisy_run
    persons_by = defaultdict(set)
    for row in read_csv(out / "truth/identities.csv"):
        persons_by[(row["identifier_type"], row["identifier_value"])].add(row["person_id"])
    shared_emails = [k for k, v in persons_by.items() if k[0] == "email" and len(v) == 2]
    assert shared_emails, "no household email listed for two persons"
    kiosk = persons_by[("device_id", manifest["kiosk_device_id"])]
    assert len(kiosk) >= 5 and len(kiosk) == manifest["noise"]["kiosk_persons"]
    # Anything else shared would be a generator bug (e.g. colliding ids).
    for (kind, value), persons in persons_by.items():
        if len(persons) > 1:
            assert kind == "email" and len(persons) == 2 or value == manifest["kiosk_device_id"], (kind, value)


def test_some_persons_stay_anonymous(default_run):
    out, _ = default_run
    kinds_by_person = defaultdict(set)
    for row in read_csv(out / "truth/identities.csv"):
        kinds_by_person[row["person_id"]].add(row["identifier_type"])
    anonymous = [p for p, kinds in kinds_by_person.items() if kinds == {"anonymous_id"}]
    assert 0.05 <= len(anonymous) / len(kinds_by_person) <= 0.3


def test_personas_and_persons(default_run):
    out, _ = default_run
    persons = read_csv(out / "truth/persons.csv")
    assert len(persons) == 300
    personas = Counter(row["persona"] for row in persons)
    assert set(personas) == {"bargain_hunter", "loyal_big_spender", "window_shopper", "lapsed",
                             "runner_enthusiast", "in_store_regular"}
    runners = [row for row in persons if row["persona"] == "runner_enthusiast"]
    assert all("running" in row["interests"].split("|") for row in runners)
    assert sum(25 <= int(row["age"]) <= 34 for row in runners) / len(runners) > 0.6
    assert {row["country"] for row in persons} <= set(COUNTRY_CURRENCY)


def test_zero_noise_gives_clean_files(clean_run):
    out, manifest = clean_run
    noise = manifest["noise"]
    for kind in ("malformed_json", "schema_violation", "duplicate", "late", "very_late", "clock_skew_devices",
                 "clock_skew_events", "shared_family_email", "kiosk_share", "email_typo"):
        assert noise[kind] == 0, kind
    for rel in EVENT_FILES:
        valid, violating, malformed, lines = read_events(out, rel)
        assert not violating and malformed == 0
        assert len({e["messageId"] for e in valid}) == len(lines)
        assert all("timestamp" in e for e in valid)


# --------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------


def test_event_times_lie_in_the_range_even_with_skewed_clocks(noisy_run):
    out, manifest = noisy_run
    start, end = END - timedelta(days=90), END
    skewed = 0
    unstamped = set()  # message ids: the manifest counts events, not re-sent copies
    for rel in EVENT_FILES:
        valid, _, _, _ = read_events(out, rel)
        for event in valid:
            true_time = event_time(event)
            assert start <= true_time <= end, (rel, event["messageId"])
            assert parse_ts(event["receivedAt"]) >= true_time
            if "timestamp" not in event:
                unstamped.add(event["messageId"])
                if abs(parse_ts(event["originalTimestamp"]) - true_time) > timedelta(minutes=5):
                    skewed += 1
    assert len(unstamped) == manifest["noise"]["clock_skew_events"]
    assert skewed > 0


def test_late_arrivals(noisy_run):
    out, manifest = noisy_run
    very_late = late = 0
    for rel in EVENT_FILES:
        valid, _, _, _ = read_events(out, rel)
        for event in valid:
            delay = parse_ts(event["receivedAt"]) - event_time(event)
            # A second of slack: consumers see the delay minus the network latency.
            very_late += delay >= timedelta(days=4, seconds=-1)
            late += timedelta(hours=1, seconds=-1) <= delay <= timedelta(days=2)
    assert very_late >= manifest["noise"]["very_late"] > 0
    assert late >= manifest["noise"]["late"] > 0
