"""Configuration: the packaged defaults (`default.yaml`) with a user's YAML merged over them."""
from __future__ import annotations

import copy
import difflib
from importlib import resources
from typing import Any, Dict, Optional

import yaml

from cdpflow.errors import BadInput


def _merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_config() -> Dict[str, Any]:
    return yaml.safe_load(resources.files(__package__).joinpath("default.yaml").read_text("utf-8"))


def load_config(path: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
    """The defaults, with the YAML file at `path` and then keyword overrides merged over them.

    Raises:
      ValueError: the file is not a YAML mapping.
    """
    config = default_config()
    if path:
        with open(path, encoding="utf-8") as handle:
            try:
                user = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                raise BadInput(f"{path}: not valid YAML: {err}") from None
        if not isinstance(user, dict):
            raise BadInput(f"{path}: the configuration must be a YAML mapping")
        refuse_unknown_keys(user, config, path)
        config = _merge(config, user)
    config = _merge(config, {k: v for k, v in overrides.items() if v is not None})
    validate(config, path or "the configuration")
    return with_rules_file(config)


# Sections whose keys the user names (identifier types, write keys, destination and API key
# names): any key is allowed there, and what is under it is checked by the code that reads it.
OPEN_SECTIONS = frozenset({
    ("identity", "max_per_profile"), ("identity", "blocked"), ("collector", "write_keys"),
    ("activation", "destinations"), ("api", "keys"),
})


def refuse_unknown_keys(user: Dict[str, Any], defaults: Dict[str, Any], where: str, _at: tuple = ()) -> None:
    """Refuses a key the configuration does not have (a typo such as `dedup.horizon_hourz` would
    otherwise be ignored silently, and the default used), naming its path and the nearest valid key.

    Raises:
      BadInput: a key not among the defaults' keys at its place.
    """
    for key, value in user.items():
        path = _at + (str(key),)
        if _at in OPEN_SECTIONS:
            continue
        if key not in defaults:
            near = difflib.get_close_matches(str(key), [str(k) for k in defaults], n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join(_at + (near[0],))}?" if near else \
                f"; valid keys{' of ' + '.'.join(_at) if _at else ''}: {', '.join(sorted(map(str, defaults)))}"
            raise BadInput(f"{where}: unknown configuration key {'.'.join(path)}{hint}")
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            refuse_unknown_keys(value, defaults[key], where, path)


def read_bytes(path: str) -> bytes:
    """A small file's bytes: a local path, or any Beam FileSystems path (gs://...) where Beam is."""
    if "://" not in path:
        with open(path, "rb") as handle:
            return handle.read()
    from apache_beam.io.filesystems import FileSystems
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            return handle.read()
    except Exception as err:  # noqa: BLE001 (Beam's IOError types differ by filesystem)
        raise OSError(str(err)) from None


def rules_reader(segments: Dict[str, Any]):
    """What reads the rules file a `segments` section names, through `read_bytes` (a local path or
    gs://...): how a stream's workers follow it (`cdpflow.core.segments.follow_rules`); None without one."""
    path = segments.get("file")
    return (lambda: read_bytes(path)) if path else None


def with_rules_file(config: Dict[str, Any]) -> Dict[str, Any]:
    """The configuration with `segments.file`'s rules in place of its own (the path made absolute,
    so a stream's workers read the same file); unchanged without a file.

    Raises:
      BadInput: the file cannot be read or is not a rules document.
    """
    import os
    segments = config.get("segments") or {}
    path = segments.get("file")
    if not path:
        return config
    if "://" not in str(path):
        path = os.path.abspath(str(path))
    try:
        data = read_bytes(path)
    except OSError as err:
        raise BadInput(f"segments.file {path}: {err.strerror or err}") from None
    from cdpflow.core.segments import parse_rules, rules_file_document
    document = rules_file_document(data, f"segments.file {path}")
    parse_rules(document)  # refused now, with where it is wrong, not on a worker
    config = copy.deepcopy(config)
    config["segments"] = dict(segments, file=path, **document)
    return config


def _number(config, where, *keys, minimum=0.0, integer=False):
    value = config
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= minimum:
        raise BadInput(f"{where}: {'.'.join(keys)} must be a {'whole ' if integer else ''}number above {minimum:g}, "
                         f"got {value!r}")
    return value


def validate(config: Dict[str, Any], where: str) -> None:
    """Checks the types and ranges of the configuration, saying which key is wrong.

    Raises:
      ValueError: a key has a value of the wrong kind (segment rules are checked when parsed).
    """
    region = config.get("default_region")
    if not (isinstance(region, str) and len(region) == 2 and region.isalpha()):
        raise BadInput(f"{where}: default_region must be a two-letter region code such as US, got {region!r}")
    currency = config.get("reporting_currency")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isalpha()):
        raise BadInput(f"{where}: reporting_currency must be a three-letter currency code, got {currency!r}")
    _number(config, where, "dedup", "horizon_hours")
    days = [_number(config, where, "lifecycle", k, integer=True)
            for k in ("new_days", "active_days", "at_risk_days", "churned_days")]
    if not days[1] <= days[2] <= days[3]:
        raise BadInput(f"{where}: lifecycle needs active_days <= at_risk_days <= churned_days")
    _number(config, where, "features", "allowed_lateness_hours")
    _number(config, where, "features", "max_future_skew_hours")
    _number(config, where, "features", "session_timeout_minutes")
    for key in ("open_weight", "click_weight", "scale"):
        _number(config, where, "features", "engagement", key)
    identity = config.get("identity") or {}
    if not (isinstance(identity.get("priority"), list) and all(isinstance(t, str) for t in identity["priority"])):
        raise BadInput(f"{where}: identity.priority must be a list of identifier types")
    for id_type, limit in (identity.get("max_per_profile") or {}).items():
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise BadInput(f"{where}: identity.max_per_profile.{id_type} must be a whole number >= 1 or null")
    _number(config, where, "identity", "quarantine", "max_profiles", integer=True)
    _number(config, where, "identity", "quarantine", "window_days")
    if identity.get("mode", "ordered") not in ("ordered", "parallel"):
        raise BadInput(f"{where}: identity.mode must be ordered or parallel, got {identity.get('mode')!r}")
    segments = config.get("segments") or {}
    if segments.get("file") is not None and not isinstance(segments.get("file"), str):
        raise BadInput(f"{where}: segments.file must be the path of a rules file, got {segments.get('file')!r}")
    _number(config, where, "segments", "reload_seconds")
    _number(config, where, "models", "reload_seconds")
    collector = config.get("collector") or {}
    keys = collector.get("write_keys") or {}
    if not isinstance(keys, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                             for k, v in keys.items()):
        raise BadInput(f"{where}: collector.write_keys must map each write key to its source's name")
    origins = collector.get("cors_origins") or []
    if not (isinstance(origins, list) and all(isinstance(o, str) for o in origins)):
        raise BadInput(f"{where}: collector.cors_origins must be a list of origins such as https://shop.example.com")
    _number(config, where, "collector", "max_in_flight_mb")
    _number(config, where, "collector", "store_timeout_seconds")
