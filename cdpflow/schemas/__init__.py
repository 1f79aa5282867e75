"""Versioned JSON Schemas of the tracking-API events, compiled once and validated fast.

Each event kind (`track`, `identify`, `page`, `screen`, `alias`, `group`) has one file per
version under `schemas/events/<kind>/v<N>.json`; shared definitions live in
`schemas/events/common/v1.json` and are referenced as `cdpflow://common/v1#/...`. The newest
version of each kind is applied unless a configuration pins another. This module depends on
nothing else in cdpflow.
"""
from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any, Callable, Dict, Mapping, Optional

import fastjsonschema

EVENT_TYPES = ("track", "identify", "page", "screen", "alias", "group")

_VERSION_FILE = re.compile(r"^v(\d+)\.json$")


class SchemaViolation(ValueError):
    """An event that does not satisfy its JSON Schema (or has no known kind)."""

    def __init__(self, message: str, schema_version: str):
        super().__init__(message)
        self.schema_version = schema_version


def _events_dir():
    return resources.files(__package__).joinpath("events")


@functools.lru_cache(maxsize=None)
def load_schema(kind: str, version: int) -> Dict[str, Any]:
    """Returns the parsed JSON Schema of one event kind and version."""
    return json.loads(_events_dir().joinpath(kind, f"v{version}.json").read_text("utf-8"))


def available_versions(kind: str) -> list[int]:
    """Lists the versions of an event kind that ship with the package, oldest first."""
    folder = _events_dir().joinpath(kind)
    found = []
    for entry in folder.iterdir():
        match = _VERSION_FILE.match(entry.name)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def _ref_handler(uri: str) -> Dict[str, Any]:
    # cdpflow://common/v1 -> events/common/v1.json
    kind, version = uri.split("://", 1)[1].split("#", 1)[0].strip("/").split("/")
    return load_schema(kind, int(version.lstrip("v")))


class EventValidator:
    """Validates raw events against the compiled schema of their kind.

    Compiling is the expensive part (fastjsonschema generates Python code), so one validator
    is built per worker (`DoFn.setup`) and reused for every element.

    Args:
      pinned: optional mapping kind -> version to apply instead of the newest.
    """

    def __init__(self, pinned: Optional[Mapping[str, int]] = None):
        self._validators: Dict[str, Callable[[Any], Any]] = {}
        self.versions: Dict[str, str] = {}
        for kind in EVENT_TYPES:
            version = (pinned or {}).get(kind) or available_versions(kind)[-1]
            self._validators[kind] = fastjsonschema.compile(
                load_schema(kind, version), handlers={"cdpflow": _ref_handler})
            self.versions[kind] = f"{kind}/v{version}"

    def validate(self, event: Any) -> str:
        """Checks one parsed event.

        Args:
          event: the parsed JSON value.

        Returns:
          The schema version applied, e.g. "track/v1".

        Raises:
          SchemaViolation: the event is not an object, has an unknown type, or breaks its schema.
        """
        if not isinstance(event, dict):
            raise SchemaViolation(f"event must be a JSON object, got {type(event).__name__}", "none")
        kind = event.get("type")
        validator = self._validators.get(kind) if isinstance(kind, str) else None
        if validator is None:
            raise SchemaViolation(
                f"unknown event type {kind!r}; expected one of {', '.join(EVENT_TYPES)}", "none")
        try:
            validator(event)
        except fastjsonschema.JsonSchemaException as err:
            raise SchemaViolation(err.message, self.versions[kind]) from None
        return self.versions[kind]
