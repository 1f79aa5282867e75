"""Declarative segment rules (YAML) evaluated against a profile's features and traits.

A rules file looks like:

    version: rules-v1                  # recorded as model_version on memberships
    segments:
      - name: young_urban_runners
        description: age 25-34, in these cities, into running, 2+ orders in 90 days
        when:
          all:
            - age: {between: [25, 34]}
            - city: {in: [London, Berlin, New York]}
            - interests: {contains: running}
            - orders_90d: {gte: 2}

A condition is `all: [...]`, `any: [...]`, `not: {...}`, or `field: {operator: value}` (several
fields in one mapping must all hold). Operators: eq, ne, in, not_in (on a list field: any / none
of its elements is one of the values), gt, gte, lt, lte, between
(inclusive), contains (a list field holds the value), contains_any, exists. Strings compare
case-insensitively. A field is looked up in the profile's features, then in its traits; a
missing field fails every operator except `exists: false` and `ne`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from cdpflow.core.clusters import choose_scored, cluster_name
from cdpflow.core.follow import Followed, file_digest, local_reader
from cdpflow.core.timeutil import epoch_day, format_ts
from cdpflow.errors import BadInput
from cdpflow.schemas.topics import SEGMENT_CHANGES

_MISSING = object()


class RuleError(BadInput):
    """A segment definition that cannot be understood."""


def _fold(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


def _num(value: Any):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, Decimal)):
        return value
    return None


def _compare(op: Callable[[Any, Any], bool]):
    def check(actual, expected):
        a, e = _num(actual), _num(expected)
        if a is None or e is None:
            return False
        if isinstance(a, Decimal) != isinstance(e, Decimal):
            a, e = Decimal(str(a)), Decimal(str(e))
        return op(a, e)
    return check


def _as_list(actual):
    return actual if isinstance(actual, (list, tuple)) else []


def _key(value: Any) -> Any:
    # A hashable, case-folded stand-in, so a value of any JSON shape can be looked up in a set.
    value = _fold(value)
    if isinstance(value, (list, tuple, dict)):
        return repr(value)
    return value


def _is_in(actual: Any, expected) -> bool:
    """`in`: the value is one of the expected; a list field is in if any of its elements is."""
    wanted = {_key(x) for x in expected}
    if isinstance(actual, (list, tuple)):
        return any(_key(x) in wanted for x in actual)
    return _key(actual) in wanted


_OPERATORS: Dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, e: a is not _MISSING and _fold(a) == _fold(e),
    "ne": lambda a, e: a is _MISSING or _fold(a) != _fold(e),
    "in": lambda a, e: a is not _MISSING and _is_in(a, e),
    "not_in": lambda a, e: a is not _MISSING and not _is_in(a, e),
    "gt": _compare(lambda a, e: a > e),
    "gte": _compare(lambda a, e: a >= e),
    "lt": _compare(lambda a, e: a < e),
    "lte": _compare(lambda a, e: a <= e),
    "between": lambda a, e: _compare(lambda x, y: x >= y)(a, e[0]) and _compare(lambda x, y: x <= y)(a, e[1]),
    "contains": lambda a, e: _key(e) in {_key(x) for x in _as_list(a)},
    "contains_any": lambda a, e: bool({_key(x) for x in _as_list(a)} & {_key(x) for x in e}),
    "exists": lambda a, e: (a is not _MISSING and a is not None) == bool(e),
}

_LIST_OPERATORS = {"in", "not_in", "contains_any"}


def _compile(condition: Any, where: str) -> Callable[[Mapping[str, Any]], bool]:
    if not isinstance(condition, dict) or not condition:
        raise RuleError(f"{where}: a condition must be a non-empty mapping, got {condition!r}")
    checks = []
    for key, value in condition.items():
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                raise RuleError(f"{where}: '{key}' takes a non-empty list")
            parts = [_compile(v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
            checks.append((lambda ps: lambda p: all(c(p) for c in ps))(parts) if key == "all"
                          else (lambda ps: lambda p: any(c(p) for c in ps))(parts))
        elif key == "not":
            inner = _compile(value, f"{where}.not")
            checks.append(lambda p, inner=inner: not inner(p))
        else:
            if not isinstance(value, dict) or not value:
                raise RuleError(f"{where}.{key}: expected {{operator: value}}, got {value!r}")
            for op, expected in value.items():
                if op not in _OPERATORS:
                    raise RuleError(f"{where}.{key}: unknown operator {op!r} (known: {', '.join(_OPERATORS)})")
                if op in _LIST_OPERATORS and not isinstance(expected, list):
                    raise RuleError(f"{where}.{key}: '{op}' takes a list")
                if op == "between" and (not isinstance(expected, list) or len(expected) != 2):
                    raise RuleError(f"{where}.{key}: 'between' takes [low, high]")
                fn = _OPERATORS[op]
                checks.append(lambda p, key=key, fn=fn, expected=expected: fn(_lookup(p, key), expected))
    return lambda profile: all(check(profile) for check in checks)


def _lookup(profile: Mapping[str, Any], key: str) -> Any:
    if key in profile and profile[key] is not None:
        return profile[key]
    traits = profile.get("traits") or {}
    return traits.get(key, _MISSING) if key in traits else profile.get(key, _MISSING)


def _fields(condition: Any) -> frozenset:
    """The profile fields a (valid) condition reads."""
    found = set()
    for key, value in condition.items():
        if key in ("all", "any"):
            for part in value:
                found |= _fields(part)
        elif key == "not":
            found |= _fields(value)
        else:
            found.add(key)
    return frozenset(found)


# Fields a profile row gets from the CLV models when it is scored, not from its events: a rule
# on them can change only where the row is scored (the batch run's as-of time, the stream's row).
PREDICTED_FIELDS = frozenset({"expected_purchases_30d", "expected_purchases_90d", "probability_alive",
                              "expected_order_value", "clv_90d", "clv_model_id"})


@dataclass(frozen=True)
class Segment:
    name: str
    description: str
    matches: Callable[[Mapping[str, Any]], bool]
    fields: frozenset = frozenset()

    @property
    def predicted(self) -> bool:
        """True if the rule reads a predicted field (it is decided where rows are scored)."""
        return bool(self.fields & PREDICTED_FIELDS)


@dataclass(frozen=True)
class RuleSet:
    version: str
    segments: Sequence[Segment]

    def evaluate(self, profile: Mapping[str, Any]) -> List[str]:
        """Names of the segments the profile belongs to, in definition order."""
        return [s.name for s in self.segments if s.matches(profile)]


def parse_rules(document: Mapping[str, Any]) -> RuleSet:
    """Builds a RuleSet from the parsed YAML document.

    Raises:
      RuleError: a definition is malformed (the message says where).
    """
    if not isinstance(document, dict):
        raise RuleError("the rules document must be a mapping with 'segments'")
    segments, names = [], set()
    for i, spec in enumerate(document.get("segments") or []):
        where = f"segments[{i}]"
        if not isinstance(spec, dict) or not spec.get("name") or "when" not in spec:
            raise RuleError(f"{where}: each segment needs 'name' and 'when'")
        name = str(spec["name"])
        if name in names or name.startswith("lifecycle:"):
            raise RuleError(f"{where}: segment name {name!r} is repeated or reserved")
        names.add(name)
        segments.append(Segment(name, str(spec.get("description", "")), _compile(spec["when"], f"{where}.when"),
                                _fields(spec["when"])))
    return RuleSet(str(document.get("version", "rules-v1")), tuple(segments))


def rules_file_document(data: bytes, where: str) -> Dict[str, Any]:
    """A rules file's document (`version` and `segments`), from its bytes.

    Raises:
      RuleError: not YAML, or not a mapping with a `segments` list.
    """
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise RuleError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("segments"), list):
        raise RuleError(f"{where}: a rules file is a mapping with 'version' and a 'segments' list")
    return {"version": str(document.get("version", "rules-v1")), "segments": document["segments"]}


def follow_rules(document: Mapping[str, Any], read: Optional[Callable[[], bytes]] = None) -> Followed[RuleSet]:
    """The rules a configuration's `segments` gives, followed: when it names a `file`, that file
    is re-read every `reload_seconds` (`read` gives its bytes; default: a local file), and a new or
    edited rule applies from the next row on; an edit that does not parse keeps the rules in force.
    Without a file the rules never change."""
    rules = parse_rules(document)
    path = document.get("file")
    if not path:
        return Followed(lambda: None, lambda _: rules, float("inf"), "segment rules", initial=rules)
    read = read or local_reader(path)

    def load(_digest):
        return parse_rules(rules_file_document(read(), path))

    every_s = document.get("reload_seconds")
    return Followed(file_digest(read), load, 10.0 if every_s is None else float(every_s), f"segment rules {path}",
                    initial=rules)


def load_rules(path: str) -> RuleSet:
    with open(path, encoding="utf-8") as handle:
        return parse_rules(yaml.safe_load(handle))


SEGMENT_CHANGES_TOPIC = SEGMENT_CHANGES.name


def idempotency_key(profile_id: str, segment: str, direction: str, cause: str) -> str:
    """The key of one segment change: the same change computed twice (a replay, a retry) has the same key."""
    return hashlib.sha256(f"{profile_id}\x00{segment}\x00{direction}\x00{cause}".encode()).hexdigest()[:32]


def segment_change(profile_id: str, segment: str, source: str, direction: str, at: str, cause: str,
                   model_version=None) -> Dict[str, Any]:
    """One `cdp.segments.changes` message: enter or exit, at an ISO-8601 time, caused by a messageId."""
    return {"idempotency_key": idempotency_key(profile_id, segment, direction, cause), "profile_id": profile_id,
            "segment": segment, "source": source, "direction": direction, "at": at, "cause_message_id": cause,
            "model_version": model_version}


def outbox_message(change: Mapping[str, Any]) -> Dict[str, Any]:
    """A segment change as an outbox row: keyed by its profile, so one person's changes keep their order."""
    return {"idempotency_key": change["idempotency_key"], "topic": SEGMENT_CHANGES_TOPIC,
            "message_key": change["profile_id"], "payload": dict(change)}


# ------------------------------------------------------------------------ memberships over time
def lifecycle_version(lifecycle: Mapping[str, int]) -> str:
    """The model_version recorded on lifecycle memberships: the thresholds they were cut at."""
    return "lifecycle:" + "/".join(str(lifecycle.get(k, "-"))
                                   for k in ("new_days", "active_days", "at_risk_days", "churned_days"))


def segments_of(rules: RuleSet, lifecycle: Mapping[str, int], profile: Optional[Mapping[str, Any]]
                ) -> Dict[str, Tuple[str, str]]:
    """segment -> (source, model_version) of every segment a profile row belongs to (none: {})."""
    if profile is None or profile.get("deleted"):
        return {}
    found = {f"lifecycle:{profile['lifecycle_stage']}": ("lifecycle", lifecycle_version(lifecycle))}
    for name in rules.evaluate(profile):
        found[name] = ("rule", rules.version)
    return found


# Past this many events in the interval a profile's timeline is evaluated per day (see below).
DENSE_EVENTS = 5000


def membership_timeline(events: Sequence[Any], settings: Any, rules: RuleSet, since: Optional[int], until: int
                        ) -> List[Tuple[int, Dict[str, Tuple[str, str]], str]]:
    """When a profile's lifecycle and rule segments changed, in event time, from its events.

    The profile's features are recomputed at each moment they can change — each event's time,
    and each window edge, lifecycle threshold or birthday after it (`next_change`) — and its
    segments evaluated there (rules on predicted fields excepted: `Segment.predicted`). Returns
    `(time, segments_of-like {segment: (source, version)}, cause message id)` at every moment in
    (since, until] where the set differs from the moment before, the first such moment included;
    `since` None is the whole history. The batch run records its memberships at these moments,
    as the stream does at each row (its rows are as of the same events and edges).

    Args:
      events: the profile's NormalizedEvents (any order; those after `until` are left out).
      settings: `cdpflow.core.features.FeatureSettings`.
    """
    from cdpflow.core.features import ChangeClock, ProfileState, features  # features imports nothing of this module
    timed = sorted((e for e in events if e.timestamp <= until), key=lambda e: (e.timestamp, e.message_id))
    evaluated = RuleSet(rules.version, tuple(s for s in rules.segments if not s.predicted))
    state = ProfileState(settings.session_timeout_us)
    clock = ChangeClock(settings.lifecycle)  # next_change, kept as the state grows

    def add(event):
        orders = len(state.orders)
        state.add(event)
        clock.add(event.timestamp, len(state.orders) > orders)

    out: List[Tuple[int, Dict[str, Tuple[str, str]], str]] = []
    before: Optional[Dict[str, Tuple[str, str]]] = None
    # A profile with very many events (a bot, a shared device) is evaluated once per day with
    # events (at its last event before the next edge) instead of at every event: recomputing its
    # features costs as much as its days, and would cost that at each of its events.
    dense = sum(1 for e in timed if since is None or e.timestamp > since) > DENSE_EVENTS
    i, moment = 0, None
    while True:
        candidates = [timed[i].timestamp] if i < len(timed) else []
        edge = None
        if moment is not None:
            edge = clock.next(state, moment)
            if edge is not None and edge <= until:
                candidates.append(edge)
            else:
                edge = None
        if not candidates:
            return out
        moment = min(candidates)
        while i < len(timed) and timed[i].timestamp <= moment:
            add(timed[i])
            i += 1
        if dense and moment != edge and (since is None or moment > since):
            day = epoch_day(moment)
            while (i < len(timed) and epoch_day(timed[i].timestamp) == day
                   and (edge is None or timed[i].timestamp < edge)):
                add(timed[i])
                moment = timed[i].timestamp
                i += 1
        if since is not None and moment <= since:
            continue  # history a run before this one recorded: only the state is built
        now = segments_of(evaluated, settings.lifecycle, features(state, moment, settings))
        if now != before:
            # The cause names the event at this moment, or the edge after the latest event (so
            # two changes of one segment at two edges after the same event have two keys).
            latest_at, latest_id = state.last_event
            out.append((moment, now, latest_id if latest_at == moment else f"{latest_id}@{format_ts(moment)}"))
        before = now


# {"open": {segment: [source, version, entered_at]}, "entries": {segment: n}, "last": order of the last row}
Held = Dict[str, Any]


def held_from_memberships(rows: Sequence[Mapping[str, Any]]) -> Held:
    """A profile's membership state from its `segment_memberships` rows (how a stream resumes)."""
    held: Held = {"open": {}, "entries": {}}
    for row in rows:
        held["entries"][row["segment"]] = held["entries"].get(row["segment"], 0) + 1
        if row.get("exited_at") is None:
            held["open"][row["segment"]] = [row.get("source"), row.get("model_version"), row.get("entered_at")]
    return held


def _current_cluster(held: Held) -> Optional[str]:
    """The name of the cluster a profile's open memberships put it in (None: none)."""
    return next((cluster_name(s) for s in sorted(held["open"]) if cluster_name(s)), None)


class MembershipMachine:
    """One profile's open memberships in a stream, and the enters and exits each new row makes.

    Engine-free (the Beam stream's stateful DoFn and the Flink job hold `Held` in keyed state).
    The k-th time a profile enters a segment is enter #k, its exit exit #k, and the idempotency
    key is made from that ordinal: a stream that resumes from the warehouse's memberships (which
    count the entries so far) sends a change it sent before its restart under the same key,
    whatever row caused it this time.
    """

    def __init__(self, rules_document: Mapping[str, Any], lifecycle: Mapping[str, int]):
        self.rules = parse_rules(rules_document)
        self.lifecycle = dict(lifecycle)

    def on_row(self, profile_id: str, row: Mapping[str, Any], held: Optional[Held], rules: Optional[RuleSet] = None
               ) -> Tuple[Held, List[Dict[str, Any]]]:
        """A new profile row (or a deletion row): the new state and the changes, exits first.

        `rules`: the rules in force now (a followed rules file), else the machine's own. A row
        scored by the stream's cluster stage carries `_clusters` (`PortableModel.scored`): the
        profile is in the cluster those scores choose, the one it is in now kept within the
        model's margin (hysteresis, by name across versions); the enter carries the version.

        Rows may arrive out of order (the stage between the features and this one does not keep
        it): a row older than the last one applied — by as_of, a deletion after a row of the same
        as_of, then by when it was emitted — changes nothing.
        """
        order = [row.get("as_of") or 0, 1 if row.get("deleted") else 0, row.get("updated_at") or 0]
        if held is not None and held.get("last") is not None and order <= list(held["last"]):
            return held, []
        held = {"open": dict((held or {}).get("open", {})), "entries": dict((held or {}).get("entries", {})),
                "last": order}
        now = segments_of(rules or self.rules, self.lifecycle, row)
        if now and row.get("_clusters"):
            name, version = choose_scored(row["_clusters"], _current_cluster(held))
            now[f"cluster:{name}"] = ("model", version)
        at = row.get("as_of")
        cause = row.get("_cause_message_id") or f"deleted@{at}"
        changes = []
        for segment in sorted(set(held["open"]) - set(now)):
            source, version, _ = held["open"].pop(segment)
            changes.append(self._change(profile_id, segment, source, "exit", at, cause, version,
                                        held["entries"].get(segment, 1)))
        for segment in sorted(set(now) - set(held["open"])):
            source, version = now[segment]
            held["entries"][segment] = held["entries"].get(segment, 0) + 1
            held["open"][segment] = [source, version, at]
            changes.append(self._change(profile_id, segment, source, "enter", at, cause, version,
                                        held["entries"][segment]))
        return held, changes

    @staticmethod
    def shadow_would_move(row: Mapping[str, Any], held: Held) -> Optional[bool]:
        """Whether the shadow model scored beside the promoted one (`_clusters["shadow"]`) would put
        the profile in another cluster than the one it is now in (None: no shadow scores)."""
        scored = (row.get("_clusters") or {}).get("shadow")
        if not scored or row.get("deleted"):
            return None
        current = _current_cluster(held)
        name, _ = choose_scored(scored, current)
        return name != current

    @staticmethod
    def _change(profile_id, segment, source, direction, at, cause, version, ordinal) -> Dict[str, Any]:
        change = segment_change(profile_id, segment, source, direction, format_ts(at), cause, version)
        change["idempotency_key"] = idempotency_key(profile_id, segment, direction, f"#{ordinal}")
        change["ordinal"] = ordinal
        return change
