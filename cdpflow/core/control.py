"""Commands on `cdp.control`: what they say, how they are read, and the id that makes them idempotent.

Two commands, JSON objects on the topic (keyed by anything; the loader and the stream read every
partition):

    {"command": "forget", "identifier": "email:ann@example.com"}
    {"command": "split", "profile": "p_3f2a...", "merge": "p_91c0...", "reason": "shared family email"}

`forget` names an identifier (`type:value`, or a profile id); `split` names a profile by its id
or by one of its identifiers (`type:value`), and undoes every merge into it, or only the merge
that absorbed `merge`. Both the loader (`cdpflow.loader`) and the stream (`ApplyControl`) read
the topic; a command's id (`command_id`: its `id` field, else a hash of its content) lets each
apply it once and the other find it done. Plain Python: the Beam stream and the Flink job use it.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import orjson

from cdpflow.core.normalize import normalize_email, normalize_phone

COMMANDS = ("forget", "split")


class ControlError(ValueError):
    """A `cdp.control` record that is not a command cdpflow applies (refused, logged and counted)."""


class Command(NamedTuple):
    """One parsed command: `target` is the identifier or profile it names, as typed."""

    name: str
    target: str
    merge: Optional[str]
    reason: str
    id: str


def command_id(value: Dict[str, Any]) -> str:
    """The command's own `id`, else a hash of its content (the same for the same command, in any process)."""
    given = value.get("id")
    if isinstance(given, str) and given.strip():
        return given.strip()
    return "c_" + hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]


def parse_command(value: Any) -> Command:
    """Reads one `cdp.control` value (already JSON-decoded).

    Raises:
      ControlError: not an object, an unknown command, or its target missing or empty.
    """
    if not isinstance(value, dict):
        raise ControlError(f"a control record must be a JSON object, not {type(value).__name__}")
    name = value.get("command")
    if name not in COMMANDS:
        raise ControlError(f"unknown command {name!r}: one of {', '.join(COMMANDS)}")
    field = "identifier" if name == "forget" else "profile"
    target = value.get(field)
    if not isinstance(target, str) or not target.strip():
        raise ControlError(f"{name} needs {field!r}: a profile id or an identifier as type:value")
    merge = value.get("merge")
    if merge is not None and (name != "split" or not isinstance(merge, str) or not merge.strip()):
        raise ControlError("'merge' is a profile id, and only split takes it")
    reason = value.get("reason") if isinstance(value.get("reason"), str) else f"{name} from cdp.control"
    return Command(name, target.strip(), merge.strip() if merge else None, reason, command_id(value))


def reference(target: str, default_region: str = "US") -> Union[str, Tuple[str, str]]:
    """What a command's target names: a profile id (`p_...`) as it is, or (type, normalised value).

    Raises:
      ControlError: neither a profile id nor `type:value`.
    """
    if target.startswith("p_"):
        return target
    if ":" not in target:
        raise ControlError(f"{target!r}: give a profile id (p_...) or an identifier as type:value")
    id_type, value = target.split(":", 1)
    id_type, value = id_type.strip().lower(), value.strip()
    normalised = {"email": normalize_email, "phone": lambda v: normalize_phone(v, default_region)}.get(id_type)
    return id_type, (normalised(value) if normalised else None) or value


SPLIT, LEFT, REFUSED = "split", "left", "refused"


class Applied(NamedTuple):
    """What a stream did with one `cdp.control` record.

    `outcome`: SPLIT (applied to the identity store; `moves` are the (node key, (profile, epoch))
    its feature state must follow, the repeat of an earlier application included), LEFT (a
    forget: the loader applies it, with the warehouse; the store's held hashes reach the workers)
    or REFUSED (not a command: `error` says why; nothing was applied).
    """

    outcome: str
    moves: list
    error: Optional[str]


def apply_for_stream(store, value: bytes, default_region: str, at_us: int) -> Applied:
    """Applies one `cdp.control` record (bytes) to a stream's identity store, at event time `at_us`.

    The stream's part of a command: a split re-derives the profile in the store (idempotent by
    the command's id, so the loader's application and a re-read of the topic change nothing)
    and gives back the moves the features must make. Engine-free: the Beam stream's
    `ApplyControl` and the Flink job's both call it.
    """
    try:
        command = parse_command(orjson.loads(value))
        target = reference(command.target, default_region) if command.name == "split" else None
    except (orjson.JSONDecodeError, ControlError) as err:
        return Applied(REFUSED, [], str(err))
    if command.name != "split":
        return Applied(LEFT, [], None)
    outcome = store.split(target, command.id, at_us, merge=command.merge)
    moves = [(key, (profile_id, epoch)) for epoch, key, profile_id in outcome.replayed]
    moves += [(key, (profile_id, outcome.epoch)) for key, profile_id in sorted(outcome.moves.items())]
    return Applied(SPLIT, moves, None)
