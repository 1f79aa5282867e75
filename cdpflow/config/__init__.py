"""Configuration: the packaged defaults (`default.yaml`) with a user's YAML merged over them."""
from __future__ import annotations

import copy
from importlib import resources
from typing import Any, Dict, Optional

import yaml


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
            user = yaml.safe_load(handle) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{path}: the configuration must be a YAML mapping")
        config = _merge(config, user)
    return _merge(config, {k: v for k, v in overrides.items() if v is not None})
