"""The `Warehouse` interface: what every path reads from and writes to, whatever the backend.

A backend is chosen by URI (`open_warehouse`): `duckdb:///path/cdp.duckdb` (or a plain path)
is the embedded DuckDB file; `bigquery://PROJECT/DATASET` is BigQuery, through the same table
contract (`cdpflow.schemas.tables`). One module per backend, as feast keeps its online stores.

The contract every backend keeps:
- `version()` is a number every commit raises by one. A writer reads it before it starts and
  hands it to its write (`expected_version`); a write that finds another number changes nothing
  and raises `ConcurrentWriteError` (optimistic concurrency: commands that lost a race fail,
  nothing committed meanwhile is overwritten).
- `commit` writes a run's tables, its appends and its outbox messages atomically: all or none.
- the outbox holds messages for the change topics in the same transaction as the tables, and a
  publisher marks what it delivered, so a crash between commit and publish loses nothing.
- `governance()` is the only way paths learn what was forgotten and separated.
"""
from __future__ import annotations

import abc
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from cdpflow.core.governance import GovernanceState, SuppressionKey
from cdpflow.core.segments import SEGMENT_CHANGES_TOPIC


class WarehouseError(RuntimeError):
    """The warehouse cannot be opened or does not hold what was asked for."""


class ConcurrentWriteError(WarehouseError):
    """Another command committed to the warehouse after this one read it; nothing was written."""

    def __init__(self, expected: int, found: int):
        super().__init__(
            f"the warehouse changed while this command ran (it read version {expected}, another command has "
            f"since committed version {found}); nothing was written: run the command again")
        self.expected, self.found = expected, found


class Warehouse(abc.ABC):
    """A warehouse holding the tables of `cdpflow.schemas.tables.ALL_TABLES`."""

    uri: str

    def close(self) -> None:
        """Releases the connection."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Reading -------------------------------------------------------------------------------
    @abc.abstractmethod
    def version(self) -> int:
        """The number of commits so far (0 for a new warehouse)."""

    @abc.abstractmethod
    def count(self, name: str) -> int:
        """Rows in a table (0 if it does not exist)."""

    @abc.abstractmethod
    def accepted_events(self) -> List[str]:
        """The raw payload of every accepted event (`events.raw`), in messageId order."""

    @abc.abstractmethod
    def identity_history(self) -> List[tuple]:
        """(timestamp µs, message_id, identifiers) of every accepted event, in event-time order.

        What an identity store is rebuilt from: resolved in this order, it gives the graph the
        batch run committed (the batch resolves in the same order).
        """

    def write_replay(self, out_path: str) -> int:
        """Writes the raw payload of every accepted event, one per line, for a replay; returns how many."""
        rows = self.accepted_events()
        with open(out_path, "w", encoding="utf-8") as handle:
            for raw in rows:
                handle.write(raw.replace("\n", " ") + "\n")
        return len(rows)

    @abc.abstractmethod
    def latest_as_of(self) -> Optional[int]:
        """The newest as_of of the profiles table (UTC microseconds; None when it is empty): where
        the previous run's view of the profiles ends, and a batch run's membership history resumes."""

    @abc.abstractmethod
    def memberships(self) -> List[Dict[str, Any]]:
        """The segment_memberships rows in staged form (timestamps as microseconds)."""

    @abc.abstractmethod
    def profiles(self) -> List[Dict[str, Any]]:
        """Every `profiles` row (as the backend returns it: times as datetimes, money as Decimal)."""

    @abc.abstractmethod
    def open_segment_sizes(self) -> Dict[str, int]:
        """Open memberships per segment, by segment name."""

    @abc.abstractmethod
    def latest_clv_model(self) -> Optional[Dict[str, Any]]:
        """The newest fitted `clv_models` row, or None."""

    @abc.abstractmethod
    def governance(self) -> GovernanceState:
        """Forgotten identifiers (key id, hash) and manual separations."""

    @abc.abstractmethod
    def identity_links(self) -> List[Dict[str, Any]]:
        """identifier_type, identifier_value, profile_id of every link."""

    @abc.abstractmethod
    def resolve_profile_id(self, identifier: str) -> Optional[str]:
        """The current profile of an identifier ("type:value", a bare exact value) or a profile id."""

    @abc.abstractmethod
    def profile(self, identifier: str) -> Optional[Dict[str, Any]]:
        """One unified profile: its row, identifiers, open segments and merges; None if unknown."""

    @abc.abstractmethod
    def merges_into(self, profile_id: str) -> List[Dict[str, Any]]:
        """Merges (not undone) whose survivor is, or was absorbed into, this profile."""

    @abc.abstractmethod
    def export(self, table: str, fmt: str, out: str) -> int:
        """Copies a table to a file; returns the row count."""

    @abc.abstractmethod
    def pending_outbox(self, topic: str = SEGMENT_CHANGES_TOPIC) -> List[Dict[str, Any]]:
        """Outbox messages not yet published, oldest first (idempotency_key, message_key, payload)."""

    # Writing -------------------------------------------------------------------------------
    @abc.abstractmethod
    def commit(self, staging_dir: str, replace: Iterable[str], append_unique: Mapping[str, str],
               outbox: Sequence[Mapping[str, Any]] = (), expected_version: Optional[int] = None,
               suppressed: Optional[Callable[[Sequence[Sequence[str]]], bool]] = None) -> Dict[str, int]:
        """Loads a run's staged tables and its outbox messages in one transaction, checking the version.

        `suppressed` tells, from a dead letter's identifiers, whether it names a forgotten person:
        such dead letters kept from before (an older release matched them by text) go in the
        same transaction.
        """

    @abc.abstractmethod
    def forget(self, identifier: str, now_us: int, key: SuppressionKey,
               expected_version: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Deletes a person everywhere in the warehouse and keeps keyed hashes of their identifiers."""

    def profiles_holding(self, identifier: str) -> List[str]:
        """Every profile holding an identifier that exactly equals `identifier` (typed, or bare and normalised)."""
        raise NotImplementedError

    def forget_target(self, identifier: str) -> Optional[str]:
        """The profile a forget of `identifier` deletes (None: no profile holds it).

        Raises:
          WarehouseError: a bare value that names several profiles.
        """
        holders = self.profiles_holding(identifier)
        if len(holders) > 1:
            raise WarehouseError(f"{identifier!r} names {len(holders)} profiles ({', '.join(holders)}): "
                                 "say which with type:value, e.g. email:ann@example.org or user_id:42")
        return holders[0] if holders else self.resolve_profile_id(identifier)

    @abc.abstractmethod
    def add_separations(self, pairs, now_us: int, reason: str, expected_version: Optional[int] = None) -> int:
        """Records pairs of identifiers that must stay apart; returns how many were new."""

    @abc.abstractmethod
    def mark_published(self, idempotency_keys: Sequence[str], now_us: int) -> None:
        """Marks outbox messages as delivered."""

    # Where the embedded defaults keep their files ----------------------------------------------
    def demo_key_file(self) -> Optional[str]:
        """Where the embedded demo keeps its generated suppression key (None: no demo key here)."""
        return None

    def default_identity_store(self) -> Optional[str]:
        """The URI of the identity store kept with this warehouse (None if none)."""
        return None


def open_warehouse(uri: str, read_only: bool = False, lock_timeout: Optional[float] = None,
                   must_exist: bool = False) -> Warehouse:
    """Opens a warehouse by URI: `duckdb:///path/file.duckdb`, a plain path (DuckDB), or
    `bigquery://PROJECT/DATASET[?endpoint=URL]` (`cdpflow.warehouse.bigquery`).

    A command that only changes an existing warehouse (forget, split, publish) passes
    `must_exist`, so a mistyped path is an error instead of a new, empty warehouse; reading
    (`read_only`) always needs one.

    Raises:
      WarehouseError: unknown scheme, or the warehouse cannot be opened.
    """
    scheme, sep, rest = str(uri).partition("://")
    if not sep:
        scheme, rest = "duckdb", str(uri)
    if scheme == "duckdb":
        from cdpflow.warehouse.embedded import DuckDBWarehouse
        if must_exist and not read_only and not os.path.exists(rest):
            raise WarehouseError(f"no warehouse at {rest}; run `cdpflow run --warehouse {rest} ...` first")
        return DuckDBWarehouse(rest, read_only=read_only, lock_timeout=lock_timeout)
    if scheme == "bigquery":
        from cdpflow.warehouse.bigquery import BigQueryWarehouse
        return BigQueryWarehouse(str(uri), read_only=read_only)
    raise WarehouseError(f"unknown warehouse URI {uri!r}: use duckdb:///path/cdp.duckdb, a file path, or "
                         "bigquery://PROJECT/DATASET")


def identifier_candidates(identifier: str):
    """(type or None, exact values to look up) for an identifier as typed by a user: `type:value`
    normalised by its type, or a bare value as typed and as an email or a phone would be."""
    from cdpflow.core.normalize import normalize_email, normalize_phone
    if ":" in identifier and not identifier.startswith("p_"):
        id_type, value = identifier.split(":", 1)
        id_type = id_type.strip().lower()
        normalised = {"email": normalize_email(value), "phone": normalize_phone(value)}.get(id_type)
        return id_type, [normalised or value.strip()]
    values = [identifier] + [c for c in (normalize_email(identifier), normalize_phone(identifier)) if c]
    return None, list(dict.fromkeys(values))


def companion_path(uri: str, suffix: str) -> str:
    """Where a warehouse's local companions live (the demo's generated keys, the identity stores kept
    with it, its segment-changes file, its model registry): beside an embedded warehouse's file,
    `<name><suffix>`; for a remote warehouse, under `$CDPFLOW_STATE_DIR` (default `.cdpflow` in the
    working directory), named after its URI."""
    local = warehouse_path(uri)
    if local:
        return os.path.splitext(local)[0] + suffix
    scheme, _, rest = str(uri).partition("://")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", rest.split("?")[0]).strip("_")
    return os.path.join(os.environ.get("CDPFLOW_STATE_DIR", ".cdpflow"), f"{scheme}_{name}{suffix}")


def warehouse_path(uri: str) -> Optional[str]:
    """The local file behind an embedded warehouse URI (None for a remote backend)."""
    scheme, sep, rest = str(uri).partition("://")
    if not sep:
        return str(uri)
    return rest if scheme == "duckdb" else None
