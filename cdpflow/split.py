"""`cdpflow identity split`: undo a wrong merge in a warehouse, keeping the id marketers know.

The split is decided by the identity graph itself (`IdentityStore.split`, the same code the live
path runs for a `split` command on `cdp.control`), on a copy of the graph kept beside the
warehouse by its last batch run: the merges into the profile become separations of their
founders' identifiers, and when the part holding the user id (else most identifiers) is not the
one whose founder the profile's id hashes from, the two founders swap names. Both are recorded in
the warehouse's governance (`identity_separations`, `identity_names`) in one transaction, and the
warehouse is then re-derived from its events with them in force, so every later run, replay and
stream gives the parts the same ids. A graph copy that does not agree with the warehouse (a
warehouse the stream's loader fills, or a crash after a commit) is re-derived first.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from cdpflow.errors import BadInput

Identifier = Tuple[str, str]


@dataclass
class SplitResult:
    """What a split did: the profile split, the separations and names recorded, the parts after
    the re-derivation (id -> identifiers), and the run summaries."""

    profile_id: str
    separations: List[Tuple[Identifier, Identifier]]
    names: List[Tuple[Identifier, str, int]]
    parts: Dict[str, List[Identifier]] = field(default_factory=dict)
    rederived_first: bool = False
    summary: Any = None


def split_in_warehouse(warehouse: str, profile: str, config: Dict[str, Any], merge: Optional[str] = None,
                       reason: str = "manual split", runner: str = "direct") -> SplitResult:
    """Splits a warehouse's profile (see the module docstring).

    Args:
      profile: the profile's id, or any of its identifiers.
      merge: undo only the merge that absorbed this profile id (default: every merge into it).

    Raises:
      BadInput: no profile holds `profile`, it has no merge to undo, or every one asked for is split already.
    """
    from cdpflow.core import governance
    from cdpflow.core.identity import open_identity_store, sqlite_path
    from cdpflow.pipelines.batch import check_reference_data, keep_identity_store, pipeline_options, run_batch
    from cdpflow.warehouse import open_warehouse
    # What the re-derivation needs is checked before anything is recorded: a split recorded but
    # not re-derived would leave the warehouse's tables behind its governance.
    check_reference_data(config)
    pipeline_options(runner, [])

    def read():
        with open_warehouse(warehouse, must_exist=True) as wh:
            profile_id = wh.resolve_profile_id(profile)
            if profile_id is None:
                raise BadInput(f"no profile holds {profile!r}")
            merges = [m for m in wh.merges_into(profile_id) if merge in (None, m["absorbed_id"])]
            if not merges:
                raise BadInput(f"profile {profile_id} has no merge to undo" + (f" that absorbed {merge}" if merge else ""))
            key = governance.suppression_key(config, wh.demo_key_file())
            return (profile_id, wh.version(), sqlite_path(wh.default_identity_store()),
                    governance.identity_rules(config, wh.governance(), key))

    profile_id, version, kept, rules = read()
    rederived_first = not _agrees(kept, version)
    if rederived_first:
        # The graph kept beside the warehouse is older than the warehouse (or missing): the run
        # re-derives both from the warehouse's events, as the split's own run would.
        run_batch([], warehouse, config, runner=runner)
        profile_id, version, kept, rules = read()
    work = tempfile.mkdtemp(prefix="cdpflow-split-")
    try:
        copy = os.path.join(work, "identity.sqlite")
        # (the copy is how a run keeps its graph; the stamp it writes is the one the graph has)
        keep_identity_store(kept, copy, version)
        store = open_identity_store("sqlite://" + copy, rules)
        try:
            now = int(time.time() * 1_000_000)
            outcome = store.split(profile_id, f"cli-{now}", now, merge=merge)
        finally:
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not outcome.separations:
        raise BadInput(f"every merge of {profile_id} asked for is already split: nothing recorded")
    with open_warehouse(warehouse, must_exist=True) as wh:
        wh.add_separations(outcome.separations, now, reason, expected_version=version, names=outcome.names)
    summary = run_batch([], warehouse, config, runner=runner)
    with open_warehouse(warehouse, read_only=True) as wh:
        links = wh.identity_links()
    held: Dict[str, List[Identifier]] = {}
    for row in links:
        held.setdefault(row["profile_id"], []).append((row["identifier_type"], row["identifier_value"]))
    where = {identifier: pid for pid, identifiers in held.items() for identifier in identifiers}
    parts = {}
    for pair in outcome.separations:
        for identifier in pair:
            pid = where.get(tuple(identifier))
            if pid is not None:
                parts[pid] = sorted(held[pid])
    return SplitResult(profile_id, outcome.separations, outcome.names, parts, rederived_first, summary)


def _agrees(store_file: Optional[str], version: int) -> bool:
    """True if the graph kept beside the warehouse was stamped with the warehouse's version."""
    if not store_file or not os.path.exists(store_file):
        return False
    from cdpflow.core.identity import SQLiteIdentityStore
    store = SQLiteIdentityStore(store_file)
    try:
        return store.warehouse_version() == version
    finally:
        store.close()
