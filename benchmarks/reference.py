"""The plain single-process Python reference: the same per-event work as the batch pipeline, no Beam.

Parse -> validate -> normalise -> lateness -> dedup -> enrich -> identity (event-time order) -> features ->
segments, using the same `cdpflow.core` functions the pipeline's DoFns call. Its throughput is
the limit the pipeline is measured against.
"""
from __future__ import annotations

import glob
import os
from typing import Dict

import orjson

from cdpflow.core.dedup import split_copies
from cdpflow.core.enrich import Rates, campaign, load_catalog, parse_user_agent, products
from cdpflow.core.features import FeatureSettings, ProfileState, features
from cdpflow.core.identity import IdentityRules, SQLiteIdentityStore
from cdpflow.core.normalize import NormalizationError, normalize_event
from cdpflow.core.segments import parse_rules
from cdpflow.schemas import EventValidator, SchemaViolation


def accepted_events(events_dir: str, config: Dict):
    """Every line under `events_dir` up to identity: (counts, events with profile_id set, store)."""
    validator = EventValidator()
    catalog = load_catalog(config["enrichment"]["catalog"])
    rates = Rates.load(config["enrichment"]["rates"], config["reporting_currency"])
    horizon = int(config["dedup"]["horizon_hours"] * 3600 * 1_000_000)
    settings = FeatureSettings.from_config(config)
    counts = {"read": 0, "dead_letters": 0, "duplicates": 0, "accepted": 0}
    copies = {}
    for path in sorted(glob.glob(os.path.join(events_dir, "*.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                counts["read"] += 1
                raw = line.strip()
                try:
                    event = orjson.loads(raw)
                    version = validator.validate(event)
                    normalized = normalize_event(event, raw, version, config["default_region"])
                except (orjson.JSONDecodeError, SchemaViolation, NormalizationError):
                    counts["dead_letters"] += 1
                    continue
                if normalized.received_at - normalized.timestamp > settings.allowed_lateness_us:
                    counts["dead_letters"] += 1
                    continue
                copies.setdefault(normalized.message_id, []).append(normalized)
    unique = []
    for group in copies.values():
        kept, duplicates, late = split_copies(group, horizon)
        counts["duplicates"] += len(duplicates)
        counts["dead_letters"] += len(late)
        enrichment = {}
        if isinstance(kept.context.get("userAgent"), str):
            enrichment["user_agent"] = parse_user_agent(kept.context["userAgent"])
        utm = campaign(kept.context)
        if utm:
            enrichment["campaign"] = utm
        if kept.type == "track":
            enrichment["products"] = products(kept.properties, catalog)
        reporting = rates.convert(kept.revenue, kept.currency, kept.timestamp) if kept.revenue is not None else None
        unique.append(kept.replace(enrichment=enrichment, revenue_reporting=reporting))
    # The same identity store and rules as the pipeline, in memory: resolution in event-time order.
    store = SQLiteIdentityStore(":memory:", IdentityRules.from_config(config["identity"]))
    unique.sort(key=lambda e: (e.timestamp, e.message_id))
    for start in range(0, len(unique), 500):
        store.resolve_batch((e.message_id, e.timestamp, e.identifiers) for e in unique[start:start + 500])
    accepted = []
    decided = store.final_profiles([e.message_id for e in unique])
    for event in unique:
        status, profile_id = decided[event.message_id]
        if status != "ok":
            counts["dead_letters"] += 1
            continue
        accepted.append(event.replace(profile_id=profile_id))
    return counts, accepted, store


def run_reference(events_dir: str, config: Dict) -> Dict[str, int]:
    """Processes every line under `events_dir`; returns counts comparable to the pipeline's."""
    counts, accepted, store = accepted_events(events_dir, config)
    rules = parse_rules(config["segments"])
    settings = FeatureSettings.from_config(config)
    states: Dict[str, ProfileState] = {}
    as_of = max((e.timestamp for e in accepted), default=0)
    for event in accepted:
        state = states.get(event.profile_id)
        if state is None:
            state = states[event.profile_id] = ProfileState(settings.session_timeout_us)
        state.add(event)
    memberships = 0
    for profile_id, state in states.items():
        row = features(state, as_of, settings)
        memberships += 1 + len(rules.evaluate(row))
    counts["accepted"] = len(accepted)
    counts["profiles"] = len(states)
    counts["merges"] = len(store.merges())
    counts["memberships"] = memberships
    return counts
