"""Identity resolution: the rules, the graph algorithm, and the stores it lives in.

    rules.py    identifiers, profile ids, merge protection (`IdentityRules`)
    graph.py    the algorithm and the `IdentityStore` interface (written once, in Python)
    sqlite.py   the embedded backend: one SQLite file (`sqlite:///path`, or a plain path)
    redis.py    the shared backend: Redis (`redis://127.0.0.1:6379/0`)

`open_identity_store(uri, rules)` chooses the backend by URI. docs/identity.md explains the design.
"""
from __future__ import annotations

from typing import Optional

from cdpflow.core.identity.graph import IdentityStore
from cdpflow.core.identity.rules import (BLOCKED, DEFAULT_BLOCKED, DEFAULT_LIMITS, DEFAULT_PRIORITY, OK, SUPPRESSED,
                                         Decision, IdentityRules, identifier_hash, key_identifier, node_key,
                                         profile_id_for)
from cdpflow.core.identity.sqlite import SQLiteIdentityStore

__all__ = ["BLOCKED", "DEFAULT_BLOCKED", "DEFAULT_LIMITS", "DEFAULT_PRIORITY", "OK", "SUPPRESSED", "Decision",
           "IdentityRules", "IdentityStore", "SQLiteIdentityStore", "identifier_hash", "key_identifier", "node_key",
           "open_identity_store", "profile_id_for", "sqlite_path"]


def sqlite_path(uri: str) -> Optional[str]:
    """The file of a `sqlite:///path` URI or a plain path; None for another backend's URI."""
    if uri.startswith("sqlite://"):
        return uri[len("sqlite://"):]
    return None if "://" in uri else uri


def open_identity_store(uri: str, rules: IdentityRules = IdentityRules(), worker: Optional[int] = None) -> IdentityStore:
    """Opens an identity store by URI: `sqlite:///path`, a plain path or `:memory:`, or `redis://host:port/db`.

    Raises:
      ValueError: an unknown scheme.
    """
    if uri.startswith(("redis://", "rediss://", "unix://")):
        from cdpflow.core.identity.redis import RedisIdentityStore
        return RedisIdentityStore(uri, rules, worker)
    path = sqlite_path(uri)
    if path is None:
        from cdpflow.errors import BadInput
        raise BadInput(f"unknown identity store {uri!r}: use sqlite:///path/identity.sqlite or redis://host:port/db")
    return SQLiteIdentityStore(path, rules, worker)
