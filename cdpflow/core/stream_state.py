"""The stream's state machines, engine-free: what a Beam DoFn or a Flink KeyedProcessFunction runs.

The streaming features (`cdpflow.transforms.stream_features` on Beam; the Flink job to come)
are two keyed stages, because keyed state belongs to one key and a pipeline cannot loop:

  IdentifierMachine (keyed by node key) folds the events attributed to one identifier into a
      ProfileState and knows which profile owns the identifier. After each event it sends its
      whole state to the owner; when the identity store moves the identifier (a newer epoch),
      it retracts its state from the old profile and sends it to the new one (the hand-over).
  ProfileMachine (keyed by profile id) keeps the newest state of each of its identifiers (by
      sequence number, so the order a runner delivers them in does not matter), and, when the
      engine's event-time timer fires, assembles the profile row, diffs the lifecycle history
      against what it sent (new transitions are sent; a transition a late event or a merge
      superseded is retracted), and says when the timer should fire next.

An engine adapter only moves values between its state API and these functions, and encodes
state with `encode_state` / `decode_state`: explicit, versioned JSON (never pickle), so state
restored after an upgrade of cdpflow, Python or the engine still reads, and a state written
by a newer version than the reader knows is refused with a clear error instead of misread.
This module imports no engine.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import orjson

from cdpflow.core.features import (ORDERS, REVENUE, FeatureSettings, ProfileState, copy_state, features,
                                   lifecycle_transitions, next_change)
from cdpflow.core.timeutil import US_PER_DAY, epoch_day
from cdpflow.models.clv import history_from_days

PUT, RETRACT = "put", "retract"
STATE_VERSION = 1

Owner = Tuple[Optional[str], int, int]  # (profile id, epoch, sequence number)
Message = Tuple[str, Tuple[str, str, int, Optional[ProfileState]]]  # (profile, (kind, node key, seq, state))
Members = Dict[str, Tuple[int, Optional[ProfileState]]]
Transition = Tuple[int, str, str]  # (transitioned_at, from_stage, to_stage)
Emitted = Tuple[Optional[int], bool, FrozenSet[Transition]]  # (as_of of the last row, exists, transitions sent)


class StateVersionError(ValueError):
    """Stream state written by a cdpflow whose state encoding this one does not know."""


# ------------------------------------------------------------------------------- encodings
def _to_json(value: Any) -> Any:
    # Tagged so that every Python value the state holds comes back with its own type: tuples
    # stay tuples (they are compared with tuples), Decimals stay exact, int-keyed maps keep ints.
    if isinstance(value, ProfileState):
        return {"$profile": {
            "session_timeout_us": value.session_timeout_us, "first_seen": value.first_seen,
            "last_seen": value.last_seen, "last_event": _to_json(value.last_event),
            "event_count": value.event_count, "days": _to_json(value.days), "orders": value.orders,
            "runs": value.runs, "traits": _to_json(value.traits), "user_id": _to_json(value.user_id),
            "subscribed": _to_json(value.subscribed)}}
    if isinstance(value, Decimal):
        return {"$d": str(value)}
    if isinstance(value, tuple):
        return {"$t": [_to_json(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"$s": sorted((_to_json(v) for v in value), key=orjson.dumps)}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _to_json(v) for k, v in value.items()}
        return {"$m": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$profile" in value:
        fields = value["$profile"]
        return ProfileState(
            fields["session_timeout_us"], fields["first_seen"], fields["last_seen"], _from_json(fields["last_event"]),
            fields["event_count"], _from_json(fields["days"]), list(fields["orders"]),
            [list(r) for r in fields["runs"]], _from_json(fields["traits"]), _from_json(fields["user_id"]),
            _from_json(fields["subscribed"]))
    if "$d" in value:
        return Decimal(value["$d"])
    if "$t" in value:
        return tuple(_from_json(v) for v in value["$t"])
    if "$s" in value:
        return frozenset(_from_json(v) for v in value["$s"])
    if "$m" in value:
        return {_from_json(k): _from_json(v) for k, v in value["$m"]}
    return {k: _from_json(v) for k, v in value.items()}


def encode_state(value: Any) -> bytes:
    """Stream state (owners, ProfileStates, member maps, what was emitted) as versioned JSON bytes."""
    return orjson.dumps({"v": STATE_VERSION, "state": _to_json(value)})


def decode_state(data: bytes) -> Any:
    """The value `encode_state` wrote.

    Raises:
      StateVersionError: written by an encoding this version does not know.
    """
    document = orjson.loads(data)
    version = document.get("v") if isinstance(document, dict) else None
    if version != STATE_VERSION:
        raise StateVersionError(f"stream state of encoding version {version!r}; this cdpflow reads version "
                                f"{STATE_VERSION}: restore from a savepoint taken by a compatible release")
    return _from_json(document["state"])


def timer_ms(micros: int) -> int:
    """The millisecond an engine's timer is set to for a moment in µs: rounded up, so a timer never
    fires before its moment (firing early would find nothing changed and set the same timer again)."""
    return -(-micros // 1000)


# ------------------------------------------------------------------------- identifier stage
class IdentifierMachine:
    """One identifier's state: its events folded, and which profile owns it.

    Args:
      session_timeout_us: the features' session timeout (the state needs it to fold sessions).
    """

    def __init__(self, session_timeout_us: int):
        self.session_timeout_us = session_timeout_us

    def on_event(self, key: str, owner: Optional[Owner], held: Optional[ProfileState], event, epoch: int
                 ) -> Tuple[Owner, ProfileState, List[Message], bool]:
        """An event attributed to this identifier, decided at `epoch`.

        Returns:
          (owner, state, messages to profiles, whether the identifier changed hands).
        """
        profile, version, seq = owner or (None, -1, 0)
        held = held or ProfileState(self.session_timeout_us)
        held.add(event)
        if profile is None or (epoch > version and event.profile_id != profile):
            # First event, or the store's decision is newer than what this identifier knew.
            out, moved = self.hand_over(key, profile, event.profile_id, held, seq + 1), profile is not None
            profile = event.profile_id
        else:
            out, moved = [(profile, (PUT, key, seq + 1, copy_state(held)))], False
        return (profile, max(epoch, version), seq + 1), held, out, moved

    def on_move(self, key: str, owner: Optional[Owner], held: Optional[ProfileState], new_profile: str, epoch: int
                ) -> Tuple[Owner, List[Message], bool]:
        """The identity store moved this identifier to `new_profile` at `epoch` (a merge or split).

        Returns:
          (owner, messages to profiles, whether the identifier changed hands).
        """
        profile, version, seq = owner or (None, -1, 0)
        if epoch <= version:  # an older move than one already applied
            return (profile, version, seq), [], False
        out, moved = [], False
        if held is not None and new_profile != profile:
            out, moved = self.hand_over(key, profile, new_profile, held, seq + 1), profile is not None
            seq += 1
        return (new_profile, epoch, seq), out, moved

    @staticmethod
    def first_delivery(seen: Optional[FrozenSet[str]], message_id: str) -> Optional[FrozenSet[str]]:
        """The messageIds folded in with this one, or None if it was folded in before (a repeat).

        Dedup passes one copy of each messageId, but a runner may deliver an element twice
        downstream of it (a retried bundle; Prism, see docs/versions.md), and a restarted
        stream reads its history again: an identifier's state counts each event once.
        """
        seen = seen or frozenset()
        if message_id in seen:
            return None
        return seen | {message_id}

    @staticmethod
    def hand_over(key: str, old: Optional[str], new: str, held: ProfileState, seq: int) -> List[Message]:
        out: List[Message] = []
        if old is not None:
            out.append((old, (RETRACT, key, seq, None)))
        out.append((new, (PUT, key, seq, copy_state(held))))
        return out


# ---------------------------------------------------------------------------- profile stage
class ProfileMachine:
    """One profile's member states, and the decision of what to emit when its timer fires.

    Args:
      settings: the feature settings.
      until: the end of a replay or of a bounded run: no timer past it, and a last timer at it
        (every profile's last row is as of the end). None for a live stream (a timer more than a day
        past `now` is a drain moving the watermark to the end of time, and emits nothing).
    """

    def __init__(self, settings: FeatureSettings, until: Optional[int] = None):
        self.settings = settings
        self.until = until

    @staticmethod
    def receive(members: Optional[Members], kind: str, key: str, seq: int, state: Optional[ProfileState]
                ) -> Optional[Members]:
        """Members with this message applied, or None if a newer message of the identifier was seen."""
        held = dict(members or {})
        last_seq, _ = held.get(key, (0, None))
        if seq <= last_seq:
            # Overtaken by a newer message from the same identifier (its state already includes
            # this one's): the order between the two stages does not matter.
            return None
        held[key] = (seq, state if kind == PUT else None)
        return held

    def on_timer(self, profile_id: str, fired: int, members: Optional[Members], emitted: Optional[Emitted],
                 now: int, identifier_count: Optional[int] = None
                 ) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]], Emitted, Optional[int]]:
        """What the profile emits when its timer fires at `fired` (event time, µs).

        `identifier_count` is how many identifiers the identity store says the profile holds
        (the engine adapter reads it when the timer fires); the row carries it. 0 means the
        store no longer knows the profile (forgotten): its deletion is emitted, and the adapter
        clears the members' state.

        Returns:
          (row, transitions, emitted, next timer): the profile row (a deletion row
          `{"profile_id", "deleted": True, "as_of"}` when no member holds state any more; None to
          emit nothing), the lifecycle transitions to send (new ones; and superseded ones, marked
          `retracted: True`), what to remember as emitted, and when to fire next (None: not again).
        """
        last_as_of, exists, sent = emitted or (None, False, frozenset())
        if self.until is None and fired > now + US_PER_DAY:
            return None, [], (last_as_of, exists, sent), None
        if identifier_count == 0:
            # The identity store no longer knows the profile (forgotten while the stream ran):
            # nothing of it is emitted again but its deletion. The adapter drops its state.
            members = None
        merged = ProfileState(self.settings.session_timeout_us)
        for _, state in (members or {}).values():
            if state is not None:
                merged.merge(state)
        if merged.first_seen is None:
            if not exists:
                return None, [], (last_as_of, exists, sent), None
            # Gone (absorbed by a merge): its row is deleted and its transitions retracted, so
            # the stream's net history is the survivor's alone, as the batch tables say.
            as_of = max(fired, last_as_of or 0)
            retracted = [self._transition(profile_id, t, as_of, retracted=True) for t in sorted(sent)]
            return {"profile_id": profile_id, "deleted": True, "as_of": as_of}, retracted, (last_as_of, False, frozenset()), None
        as_of = max(fired, merged.last_seen, last_as_of if last_as_of is not None else merged.last_seen)
        row = features(merged, as_of, self.settings)
        row.update(profile_id=profile_id, identifier_count=identifier_count, as_of=as_of, updated_at=now, _cause_message_id=merged.last_event[1],
                   _history=history_from_days({d: v[REVENUE] for d, v in merged.days.items() if v[ORDERS]},
                                              epoch_day(as_of)))
        # The whole stage history as it now stands, diffed against what was sent: a late order or
        # a merge can add a change before the previous row (sent now) or supersede one already
        # sent (retracted), so the net history equals the batch's.
        history = frozenset(lifecycle_transitions(merged, None, as_of, self.settings.lifecycle))
        out = [self._transition(profile_id, t, as_of, retracted=True) for t in sorted(sent - history)]
        out += [self._transition(profile_id, t, as_of) for t in sorted(history - sent)]
        following = next_change(merged, as_of, self.settings.lifecycle)
        if self.until is not None and (following is None or following > self.until):
            # A run with an end: nothing past it, and a last row as of it for every profile.
            following = self.until if as_of < self.until else None
        return row, out, (as_of, True, history), following

    @staticmethod
    def _transition(profile_id: str, transition: Transition, as_of: int, retracted: bool = False) -> Dict[str, Any]:
        at, before, after = transition
        row = {"profile_id": profile_id, "from_stage": before, "to_stage": after, "transitioned_at": at,
               "as_of": as_of, "source": "stream"}
        if retracted:
            row["retracted"] = True
        return row
