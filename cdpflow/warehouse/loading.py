"""What one micro-batch of the stream's topics asks of the warehouse, worked out once for every backend.

`cdpflow load` reads `cdp.warehouse.rows`, `cdp.profiles.changes`, `cdp.segments.changes` and
`cdp.events.deadletter` in micro-batches; `plan_stream_batch` sorts a micro-batch into what each
table gets (records below the stored offsets skipped, forgotten people's rows left out, the
newest row per profile, the offsets it moves to). The DuckDB and BigQuery backends apply the
plan in one transaction each, in their own SQL (`load_stream_batch`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from cdpflow.schemas.topics import DEAD_LETTERS, PROFILE_CHANGES, SEGMENT_CHANGES, WAREHOUSE_ROWS


def dead_letter_row(record: Mapping[str, Any]) -> Dict[str, Any]:
    """A `cdp.events.deadletter` record as a dead_letters row: the stream's are rows already; an
    importer's (`cdpflow import --to kafka`) name their file and row, and are keyed by their id."""
    value = dict(record["value"])
    if "row" in value and "file" in value:
        value["error"] = f"{value.get('source') or 'import'} {value['file']} row {value['row']}: {value.get('error')}"
    value.setdefault("dead_letter_id", record["key"])
    return value


@dataclass
class StreamBatch:
    """One micro-batch, sorted by table (see the module docstring)."""

    skipped: int
    events: List[Dict[str, Any]]  # new accepted events, each with the profile it belongs to now
    upserts: List[Mapping[str, Any]]  # the newest row of each profile the store knows
    gone: List[str]  # profiles the store no longer knows (forgotten, absorbed): deleted whatever the rows say
    tombstones: List[Tuple[str, int]]  # (profile, as_of): deleted unless a newer row arrived first
    changes: List[Mapping[str, Any]]  # segment changes of known profiles (and every exit)
    transitions: List[Mapping[str, Any]]  # lifecycle transitions (added, or `retracted`), by as_of
    letters: List[Dict[str, Any]]  # dead letters
    ends: Dict[Tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> next offset


def plan_stream_batch(records: Sequence[Mapping[str, Any]], identity: Mapping[str, Any],
                      stored: Mapping[Tuple[str, int], int],
                      suppressed: Optional[Callable[[Sequence[Sequence[str]]], bool]] = None) -> StreamBatch:
    """Sorts a micro-batch (see `DuckDBWarehouse.load_stream_batch` for `records` and `identity`)."""
    fresh = [r for r in records if r["offset"] >= stored.get((r["topic"], r["partition"]), 0)]
    known = identity["profiles"]
    by_topic: Dict[str, list] = {}
    for record in fresh:
        if not record.get("skip"):
            by_topic.setdefault(record["topic"], []).append(record)
    rows = by_topic.get(WAREHOUSE_ROWS.name, ())
    events = [r["value"]["row"] for r in rows if r["value"]["table"] == "events"]
    if suppressed is not None:
        events = [e for e in events if not suppressed([tuple(i) for i in e.get("identifiers") or ()])]
    if events:
        final = identity["final"]([e["message_id"] for e in events])
        for event in events:
            event["profile_id"] = final.get(event["message_id"], event.get("profile_id"))
    newest: Dict[str, Mapping[str, Any]] = {}
    for record in by_topic.get(PROFILE_CHANGES.name, ()):
        pid = record["key"]
        if pid not in newest or tuple(record["order"]) >= tuple(newest[pid]["order"]):
            newest[pid] = record
    letters = [dead_letter_row(r) for r in by_topic.get(DEAD_LETTERS.name, ())]
    if suppressed is not None:
        letters = [d for d in letters if not suppressed([tuple(i) for i in d.get("identifiers") or ()])]
    ends: Dict[Tuple[str, int], int] = {}
    for record in fresh:
        place = (record["topic"], record["partition"])
        ends[place] = max(ends.get(place, 0), record["offset"] + 1)
    return StreamBatch(
        skipped=len(records) - len(fresh),
        events=events,
        upserts=[r["value"] for pid, r in newest.items() if r["value"] is not None and pid in known],
        gone=[pid for pid in newest if pid not in known],
        tombstones=[(pid, r["order"][0]) for pid, r in newest.items() if r["value"] is None and pid in known],
        changes=[r["value"] for r in by_topic.get(SEGMENT_CHANGES.name, ())
                 if r["value"]["profile_id"] in known or r["value"]["direction"] == "exit"],
        # (a retraction always applies: it comes under the id of a profile a merge absorbed)
        transitions=sorted((r["value"]["row"] for r in rows if r["value"]["table"] == "lifecycle_transitions"
                            and (r["value"]["row"]["profile_id"] in known or r["value"]["row"].get("retracted"))),
                           key=lambda t: t["as_of"]),
        letters=letters,
        ends=ends)
