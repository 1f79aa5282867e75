"""Forgetting a person: the warehouse, its identity stores and its outbox, in one call.

Used by `cdpflow forget` and by the profile API of the embedded demo (`DELETE /v1/profiles/{id}`
over a DuckDB warehouse), so both forget the same way: the warehouse deletes the person and keeps
their identifiers' hashes (so no replay brings them back), every identity store kept with it
forgets them and agrees with the warehouse's new version, and the exits of their open memberships
are published. Activation (destinations, profile stores, Kafka) is `cdpflow.activation.forget`.
"""
from __future__ import annotations

import os
import time
from datetime import datetime
from decimal import Decimal
from typing import Any, Dict, Mapping, Optional, Sequence


def forget_person(warehouse: str, identifier: str, config: Mapping[str, Any],
                  identity_stores: Sequence[str] = (), changes_out: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Forgets the person holding `identifier` (any identifier, or the profile id).

    Returns:
      The warehouse's account (profile_id, identifiers, deleted counts, exits) with
      `identity_removed`, `published`, `changes_file`, and the `profile` row and open `segments`
      it had (as `profile_row` gives them); None if nothing holds `identifier`.
    Raises:
      WarehouseError: a bare value naming several profiles, or a concurrent write.
      BadInput: the suppression key cannot match the hashes the warehouse holds.
    """
    from cdpflow.core import governance
    from cdpflow.outbox import JsonLinesPublisher, changes_file_for, publish_pending
    from cdpflow.pipelines.live import stream_identity_store
    from cdpflow.warehouse import open_warehouse, warehouse_path
    now = int(time.time() * 1_000_000)
    changes_file = changes_out or changes_file_for(warehouse)
    with open_warehouse(warehouse, must_exist=True) as wh:
        key = governance.suppression_key(config, wh.demo_key_file())
        governance.identity_rules(config, wh.governance(), key)  # refuses hashes of a key it cannot match
        before = wh.profile(identifier)  # the row and memberships the destinations are told to delete
        done = wh.forget(identifier, now, key, expected_version=wh.version())
        if done is None:
            return None
        known = before is not None and before["profile"].get("profile_id") == done["profile_id"]
        done["profile"] = profile_row(before["profile"]) if known else None
        done["segments"] = [s["segment"] for s in before["segments"]] if known else []
        # The identity store kept with the warehouse forgets them too, and so does the live
        # stream's beside it, if there is one (a loader purges any other store it loads from at
        # its next commit); both then agree with the warehouse's new version.
        rules = governance.identity_rules(config, wh.governance(), key)
        kept = [wh.default_identity_store()] + ([stream_identity_store(warehouse)] if warehouse_path(warehouse) else [])
        done["identity_removed"] = sum(forget_in_identity_store(uri, done["identifiers"], rules, wh.version(), key)
                                       for uri in dict.fromkeys([*kept, *identity_stores]) if uri)
        done["published"] = publish_pending(wh, JsonLinesPublisher(changes_file))["published"]
        done["changes_file"] = changes_file
    return done


def profile_row(row: Mapping[str, Any]) -> Dict[str, Any]:
    """A warehouse `profiles` row as the change topic carries it (and the profile store holds it):
    JSON values, times as UTC microseconds, money as decimal strings."""
    import orjson

    from cdpflow.core.rows import to_json_line
    from cdpflow.core.timeutil import from_datetime
    # money without the scale's trailing zeros (792.8962, not 792.896200000), as the stream writes it
    plain = {k: format(v.normalize(), "f") if isinstance(v, Decimal) else v for k, v in row.items()
             if not isinstance(v, datetime)}
    out = orjson.loads(to_json_line(plain))
    for name, value in row.items():
        if isinstance(value, datetime):
            out[name] = from_datetime(value)
    if isinstance(out.get("traits"), str):
        out["traits"] = orjson.loads(out["traits"])
    return out


def forget_in_identity_store(uri: Optional[str], identifiers, rules, version: int, key=None) -> int:
    """Removes a forgotten person from an identity store (and anything else its rules suppress).

    With the suppression `key`, the store keeps the person's hashes too, so a stream resolving
    against it refuses them from its next batch on."""
    from cdpflow.core.identity import open_identity_store, sqlite_path
    if not uri:
        return 0
    path = sqlite_path(uri)
    if path is not None and not os.path.exists(path):
        return 0
    store = open_identity_store(uri, rules)
    try:
        hashes = [key.hash(tuple(i)) for i in identifiers] if key is not None else []
        removed = store.forget(identifiers, hashes=hashes) + store.purge(rules)
        store.stamp_warehouse_version(version)
        return removed
    finally:
        store.close()
