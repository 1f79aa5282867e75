"""Rows of a CRM export or a POS file -> tracking-spec events (or dead letters with the row number)."""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import yaml

from cdpflow.core.normalize import NormalizationError, normalize_email, normalize_event, normalize_phone
from cdpflow.errors import BadInput
from cdpflow.schemas import EventValidator, SchemaViolation

KINDS = ("crm", "pos")
_TOP_LEVEL = {"user_id": "userId", "anonymous_id": "anonymousId"}
_TRAIT_IDS = ("email", "phone")


@dataclass(frozen=True)
class Mapping_:
    """A parsed mapping file (see the package docstring)."""

    kind: str
    source: str
    timestamp: str
    identifiers: Dict[str, str]
    traits: Dict[str, str] = field(default_factory=dict)
    timezone: str = "UTC"
    order_id: Optional[str] = None
    revenue: Optional[str] = None
    currency: Optional[str] = None
    default_currency: Optional[str] = None


def load_mapping(path: str, kind: str) -> Mapping_:
    """Reads and checks a mapping file.

    Raises:
      BadInput: the file is missing, not YAML, or names no identifier, time or (pos) order id.
    """
    if kind not in KINDS:
        raise BadInput(f"unknown connector {kind!r}: {', '.join(KINDS)}")
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle) or {}
    except OSError as err:
        raise BadInput(f"mapping {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise BadInput(f"mapping {path}: not valid YAML: {err}") from None
    if not isinstance(document, dict):
        raise BadInput(f"mapping {path}: must be a YAML mapping")
    known = {"source", "timestamp", "timezone", "identifiers", "traits", "order_id", "revenue", "currency",
             "default_currency"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise BadInput(f"mapping {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    identifiers = document.get("identifiers") or {}
    traits = document.get("traits") or {}
    for name, value in (("identifiers", identifiers), ("traits", traits)):
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise BadInput(f"mapping {path}: {name} must map names to column names")
    if not identifiers:
        raise BadInput(f"mapping {path}: `identifiers` must name at least one identifier column")
    if not isinstance(document.get("timestamp"), str):
        raise BadInput(f"mapping {path}: `timestamp` must name the column with each row's time")
    zone = str(document.get("timezone") or "UTC")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadInput(f"mapping {path}: unknown timezone {zone!r}") from None
    mapping = Mapping_(kind, str(document.get("source") or kind), document["timestamp"],
                       {k.lower(): v for k, v in identifiers.items()}, dict(traits), zone,
                       document.get("order_id"), document.get("revenue"), document.get("currency"),
                       document.get("default_currency"))
    if kind == "pos" and not (mapping.order_id and mapping.revenue):
        raise BadInput(f"mapping {path}: a pos mapping needs `order_id` and `revenue` columns")
    return mapping


def read_rows(path: str) -> Iterator[Tuple[int, Union[Dict[str, Any], str]]]:
    """(row number, row) of a CSV (header first; rows numbered from 2, as a spreadsheet shows them)
    or JSON-lines file (numbered from 1). A line that is not a JSON object comes back as text."""
    if not os.path.exists(path):
        raise BadInput(f"no such file: {path}")
    if path.endswith((".jsonl", ".json", ".ndjson")):
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    row = None
                yield number, row if isinstance(row, dict) else line.decode("utf-8", "replace").strip()
        return
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            yield number, row


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _time(value: Any, zone: str) -> str:
    text = _text(value)
    if text is None:
        raise ValueError("no time")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        moment = datetime.combine(date.fromisoformat(text), datetime.min.time())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(zone))
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message_id(kind: str, parts: Any) -> str:
    return f"{kind}-" + hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def to_event(mapping: Mapping_, row: Mapping[str, Any]) -> Dict[str, Any]:
    """The tracking-spec event of one row.

    Its `receivedAt` is the row's own time: when the source system recorded the fact. So
    history imports pass the lateness check, and the same row imported again is the same event
    to the byte (same messageId, same receivedAt): the pipeline drops it as a duplicate.

    Raises:
      ValueError: a column the mapping names is missing, or the time does not parse.
    """
    missing = [c for c in [mapping.timestamp, *mapping.identifiers.values(), *mapping.traits.values(),
                           *(c for c in (mapping.order_id, mapping.revenue, mapping.currency) if c)] if c not in row]
    if missing:
        raise ValueError(f"column(s) {', '.join(missing)} missing from the row")
    when = _time(row[mapping.timestamp], mapping.timezone)
    event: Dict[str, Any] = {"timestamp": when, "receivedAt": when}
    traits = {name: row[column] for name, column in mapping.traits.items() if _text(row[column]) is not None}
    external = []
    for id_type, column in sorted(mapping.identifiers.items()):
        value = _text(row[column])
        if value is None:
            continue
        if id_type in _TOP_LEVEL:
            event[_TOP_LEVEL[id_type]] = value
        elif id_type in _TRAIT_IDS:
            traits[id_type] = value
        else:
            external.append({"id": value, "type": id_type, "collection": "users", "encoding": "none"})
    context: Dict[str, Any] = {"source": {"name": mapping.source}}
    if external:
        context["externalIds"] = external
    if mapping.kind == "crm":
        event.update(type="identify", traits=traits)
        identity = {k: event.get(k) for k in ("userId", "anonymousId")}
        event["messageId"] = _message_id("crm", [mapping.source, identity, traits, external, when])
    else:
        currency = _text(row[mapping.currency]) if mapping.currency else mapping.default_currency
        properties: Dict[str, Any] = {"order_id": _text(row[mapping.order_id]), "revenue": _text(row[mapping.revenue])}
        if currency:
            properties["currency"] = currency
        if properties["order_id"] is None:
            raise ValueError(f"no order id in column {mapping.order_id}")
        context["channel"] = "pos"
        if traits:
            context["traits"] = traits
        event.update(type="track", event="Order Completed", properties=properties)
        event["messageId"] = _message_id("pos", [mapping.source, properties["order_id"]])
    event["context"] = context
    return event


@dataclass
class ImportResult:
    """What an import produced: events to send, and dead letters (row number, error, raw row)."""

    events: List[Dict[str, Any]] = field(default_factory=list)
    dead_letters: List[Dict[str, Any]] = field(default_factory=list)


def convert(path: str, mapping: Mapping_, default_region: str = "US") -> ImportResult:
    """Every row of the file as an event, or a dead letter naming its row; nothing is dropped."""
    validator = EventValidator()
    result = ImportResult()
    for number, row in read_rows(path):
        raw = row if isinstance(row, str) else orjson.dumps(row).decode()
        if isinstance(row, str):
            result.dead_letters.append(_letter(path, number, "parse", "not a JSON object", raw, mapping, None,
                                               default_region))
            continue
        try:
            event = to_event(mapping, row)
            version = validator.validate(event)
            normalize_event(event, orjson.dumps(event).decode(), version, default_region)
        except (ValueError, SchemaViolation, NormalizationError) as err:
            stage = "validate" if isinstance(err, SchemaViolation) else "normalize" \
                if isinstance(err, NormalizationError) else "map"
            result.dead_letters.append(_letter(path, number, stage, str(err), raw, mapping, row, default_region))
            continue
        result.events.append(event)
    return result


def dead_letter_key(letter: Mapping[str, Any]) -> str:
    """The `cdp.events.deadletter` key: a hash of the stage and the raw record (as the pipeline's)."""
    return hashlib.sha1(f"{letter['stage']}\x00{letter['raw']}".encode("utf-8")).hexdigest()


def row_identifiers(mapping: Mapping_, row: Optional[Mapping[str, Any]], default_region: str = "US") -> List[List[str]]:
    """[type, normalised value] of each identifier the mapping names in a row (a row that is not an
    object names none): what a forget and the suppression check find a refused row by."""
    found = []
    for id_type, column in sorted(mapping.identifiers.items()) if isinstance(row, Mapping) else ():
        value = _text(row.get(column))
        if value is None:
            continue
        if id_type == "email":
            value = normalize_email(value) or value
        elif id_type == "phone":
            value = normalize_phone(value, default_region) or value
        found.append([id_type, value])
    return found


def _letter(path, number, stage, error, raw, mapping, row=None, default_region: str = "US") -> Dict[str, Any]:
    return {"source": mapping.source, "file": os.path.basename(path), "row": number, "stage": stage,
            "error": error, "raw": raw, "identifiers": row_identifiers(mapping, row, default_region)}
