"""The streaming graph: raw event lines in, live profile rows, lifecycle transitions and dead letters out.

    lines -> ParseAndValidate -> Normalize -> CheckLateness -> DedupStream -> (event time)
          -> Enrich -> ResolveIdentityStream -> StreamFeatures -> profile rows, transitions

`build_stream` wires it into a streaming pipeline whose source is given as a PCollection of
raw lines (bytes): a TestStream in tests, a Kafka source once the collector topics exist. Each
event is re-stamped with its event time after the lateness check, so the features' timers follow
event time while the source's watermark follows arrival.

Starting on an existing warehouse (`preload`): the warehouse's accepted events (`events.raw`)
are read once through the same steps as new ones. They pass dedup (first copies; and a re-sent
copy arriving later is still dropped) and lateness (they passed it before) and reach the
identity stage, which returns their recorded decisions from an identity store rebuilt from the
warehouse's events under its governance (`cdpflow.pipelines.replay.rebuild_identity_store`);
so feature state starts with the whole history and windows do not start empty. New events then
continue from there.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp

from cdpflow.core.features import FeatureSettings
from cdpflow.core.identity import IdentityRules
from cdpflow.transforms import DEAD_LETTERS
from cdpflow.transforms.dedup import UNIQUE, DedupStream
from cdpflow.transforms.enrich import EnrichFromFiles
from cdpflow.transforms.features import PROFILES, TRANSITIONS
from cdpflow.transforms.identity import MOVES, ROUTED, ApplyControl, ResolveIdentityStream
from cdpflow.transforms.lateness import ON_TIME, CheckLateness
from cdpflow.transforms.normalize import NORMALIZED, Normalize
from cdpflow.transforms.stream_features import StreamFeatures
from cdpflow.transforms.validate import VALID, ParseAndValidate

ACCEPTED = "events"


def _at_event_time(event):
    return beam.window.TimestampedValue(event, Timestamp(micros=event.timestamp))


def build_stream(lines: beam.PCollection, config: Dict[str, Any], identity_store: str,
                 identity_rules: IdentityRules,
                 preload: Optional[beam.PCollection] = None, clv_model: Optional[dict] = None,
                 until: Optional[int] = None, routed_out: bool = False, governance=None,
                 control: Optional[beam.PCollection] = None) -> Dict[str, beam.PCollection]:
    """Wires the streaming graph after `lines` (raw event lines, bytes).

    Args:
      lines: the source.
      config: see `cdpflow/config/default.yaml`.
      identity_store: the identity store's SQLite file, shared by every worker.
      identity_rules: from `cdpflow.core.governance.identity_rules`: the configuration with the
        warehouse's forgotten identifiers and separations (required: a stream whose rules came
        from the configuration alone would let a forgotten person back in).
      preload: raw lines of events already accepted into the warehouse (its `events.raw`).
      clv_model: the warehouse's latest fitted `clv_models` row (`DuckDBWarehouse.latest_clv_model`).
      until: the end of a replay or of a bounded live run: every profile gets a last row as of it,
        and no timer is set past it (None for a live stream that runs on).
      governance: for a stream that runs on, a callable giving the warehouse's current identity
        rules (`cdpflow.core.governance.WarehouseGovernance`), asked again every few seconds.
      control: the values of `cdp.control` records: split commands are applied to the live
        graph and their moves join the identity stage's (`ApplyControl`).
      routed_out: also return `routed`: the events identity attributed, (node key, (event with
        its profile, epoch)); forgotten people's events are not among them.

    Returns:
      PCollections: `profiles` (rows and deletions), `lifecycle_transitions`, `events` (the
      accepted events, preloaded ones included, before identity: their profile is the identity
      store's to say), `dead_letters`.
    """
    settings = FeatureSettings.from_config(config)
    enrichment = config.get("enrichment") or {}
    if preload is not None:
        # History first through dedup too, so a re-sent copy of an event already in the
        # warehouse is still recognised as a duplicate.
        lines = (lines, preload) | "WithHistory" >> beam.Flatten()
    parsed = lines | "ParseAndValidate" >> ParseAndValidate()
    normalized = parsed[VALID] | "Normalize" >> Normalize(config["default_region"])
    # Lateness before dedup: it depends on the copy alone, so a late copy processed first never
    # takes the messageId from an on-time one (the history and the live lines are not ordered).
    on_time = normalized[NORMALIZED] | "CheckLateness" >> CheckLateness(settings.allowed_lateness_us,
                                                                               settings.max_future_skew_us)
    unique = on_time[ON_TIME] | "Dedup" >> DedupStream(config["dedup"]["horizon_hours"],
                                                       settings.allowed_lateness_us)
    accepted = unique[UNIQUE] | "AtEventTime" >> beam.Map(_at_event_time)
    enriched = accepted | "Enrich" >> EnrichFromFiles(enrichment.get("catalog"), enrichment.get("rates"),
                                                      config["reporting_currency"])
    identity = enriched | "ResolveIdentity" >> ResolveIdentityStream(
        identity_store, identity_rules, governance=governance)
    moves = identity[MOVES]
    if control is not None:
        split = control | "ApplyControl" >> ApplyControl(identity_store, identity_rules, config["default_region"])
        moves = (moves, split) | "AllMoves" >> beam.Flatten()
    features = (identity[ROUTED], moves) | "StreamFeatures" >> StreamFeatures(settings, clv_model, until,
                                                                                             identity_store)
    dead_letters = ((parsed[DEAD_LETTERS], normalized[DEAD_LETTERS], unique[DEAD_LETTERS], on_time[DEAD_LETTERS],
                     identity[DEAD_LETTERS])
                    | "AllDeadLetters" >> beam.Flatten())
    outputs = {
        PROFILES: features[PROFILES],
        TRANSITIONS: features[TRANSITIONS],
        ACCEPTED: accepted,
        DEAD_LETTERS: dead_letters,
    }
    if routed_out:
        outputs[ROUTED] = identity[ROUTED]
    return outputs
