"""Publishing the outbox: segment changes leave the warehouse only after they are committed.

A run (or a forget) writes its segment changes to the warehouse's `outbox` table in the same
transaction as the tables they describe. A publisher then delivers the pending messages and
marks them published. A crash between the commit and the publish loses nothing (the messages
wait in the outbox, and `cdpflow publish` or the next command sends them), and a crash between
the delivery and the mark sends nothing twice: every message carries an idempotency key, and a
publisher skips the keys its destination already holds.

    cdpflow publish --warehouse out/cdp.duckdb [--changes-out FILE]

The destination today is a JSON-lines file (`<warehouse>.segment_changes.jsonl` by default);
the Kafka topic `cdp.segments.changes` plugs in as another `Publisher`.
"""
from __future__ import annotations

import abc
import os
import time
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Set

import orjson

from cdpflow import faults
from cdpflow.core.segments import SEGMENT_CHANGES_TOPIC


class Publisher(abc.ABC):
    """Delivers outbox messages to one destination, at most once per idempotency key."""

    @abc.abstractmethod
    def publish(self, messages: Sequence[Mapping[str, Any]]) -> List[str]:
        """Delivers messages (idempotency_key, message_key, payload); returns the keys now delivered.

        Keys the destination already held count as delivered and are not sent again.
        """

    def close(self) -> None:
        """Releases the destination."""


class JsonLinesPublisher(Publisher):
    """Appends each message's payload as one JSON line to a file, skipping keys the file holds."""

    def __init__(self, path: str):
        self.path = path

    def _delivered(self) -> Set[str]:
        keys: Set[str] = set()
        if not os.path.exists(self.path):
            return keys
        with open(self.path, "rb") as handle:
            for line in handle:
                if line.strip():
                    try:
                        keys.add(orjson.loads(line)["idempotency_key"])
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        # A line cut short by a crash mid-write: its message is sent again whole.
                        continue
        return keys

    def publish(self, messages: Sequence[Mapping[str, Any]]) -> List[str]:
        delivered = self._delivered()
        fresh = [m for m in messages if m["idempotency_key"] not in delivered]
        if fresh:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "ab") as handle:
                if handle.tell() and not _ends_with_newline(self.path):
                    handle.write(b"\n")  # after a line a crash cut short
                for message in fresh:
                    handle.write(orjson.dumps(message["payload"]) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        return [m["idempotency_key"] for m in messages]


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def publish_pending(warehouse, publisher: Publisher, topic: str = SEGMENT_CHANGES_TOPIC) -> Dict[str, int]:
    """Delivers every pending outbox message of `topic`, then marks them published.

    Args:
      warehouse: an open, writable `cdpflow.warehouse.Warehouse`.
      publisher: where the messages go.

    Returns:
      {"pending": messages found, "published": messages marked delivered}.
    """
    pending = warehouse.pending_outbox(topic)
    if not pending:
        return {"pending": 0, "published": 0}
    delivered = publisher.publish(pending)
    faults.fault_point("after-deliver")
    warehouse.mark_published(delivered, int(time.time() * 1_000_000))
    return {"pending": len(pending), "published": len(delivered)}


def changes_file_for(warehouse_uri: str) -> str:
    """The default JSON-lines destination of a warehouse's segment changes (beside its file;
    for a remote warehouse, in the local state folder: `companion_path`)."""
    from cdpflow.warehouse.base import companion_path
    return companion_path(warehouse_uri, ".segment_changes.jsonl")


def read_changes(path: str) -> Iterable[Dict[str, Any]]:
    """The segment changes a JSON-lines destination holds (for tests and tools)."""
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                yield orjson.loads(line)
