"""`cdpflow load`: the warehouse's single writer for the live path.

    cdpflow load --bootstrap 127.0.0.1:9092 --warehouse out/cdp.duckdb [--identity-store URI]

DuckDB admits one writing process and a Flink or Dataflow job has many workers, so the
streaming jobs write only to Kafka and this loader moves what they wrote into the warehouse:

- it reads `cdp.profiles.changes`, `cdp.segments.changes`, `cdp.events.deadletter` and
  `cdp.warehouse.rows` (read_committed: a transactional producer's aborted records never load),
  and `cdp.control` (forget and split commands, `cdpflow.core.control`);
- it gathers a micro-batch (up to `max_batch` records or `max_wait_s`), opens the warehouse,
  commits the rows together with the offsets they came from in one transaction
  (`Warehouse.load_stream_batch`), and closes it: exactly once without trusting Kafka's own
  commits, since a record below its partition's stored offset is skipped, and the file is held
  only while a batch commits, so `cdpflow profile`, `export` and the API open it between;
- the identity tables and each event's profile come from the identity store the stream resolves
  against (the graph is the store's), read at each commit;
- governance: the warehouse's forgotten identifiers are read at each commit; an event or a
  dead letter that names one is not loaded, nor a row of a profile the identity store no longer
  knows. A `forget` on `cdp.control` deletes the person from the warehouse and the identity
  store, and the exits it writes to the outbox are published to `cdp.segments.changes`. A
  `split` undoes merges in the identity store (the stream applies it too, and moves its feature
  state) and records the separations in the warehouse's governance.

After a commit the consumer group's offsets are committed too, for lag dashboards only; on
start the loader seeks to the offsets the warehouse holds.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import orjson

from cdpflow.core import control, governance
from cdpflow.core.identity import open_identity_store
from cdpflow.schemas.topics import CONTROL, DEAD_LETTERS, PROFILE_CHANGES, SEGMENT_CHANGES, WAREHOUSE_ROWS
from cdpflow.warehouse import open_warehouse

log = logging.getLogger(__name__)

LOADED_TOPICS = (PROFILE_CHANGES.name, SEGMENT_CHANGES.name, DEAD_LETTERS.name, WAREHOUSE_ROWS.name, CONTROL.name)
LOADER_GROUP = "cdpflow-loader"
_UNREADABLE = {"$unreadable": True}  # a record whose value is not JSON (never written by cdpflow)


def _order(record) -> tuple:
    """How new a profile record is: (as_of, a tombstone after a row of the same as_of, emission time)."""
    found = {name: int(value) for name, value in record.headers or () if name in ("as_of", "updated_at")}
    return (found.get("as_of", 0), 1 if record.value is None else 0, found.get("updated_at", 0))


class Loader:
    """Loads the stream's topics into the warehouse in micro-batches; see the module docstring.

    Args:
      bootstrap: HOST:PORT of the brokers.
      warehouse: the warehouse URI.
      config: the merged configuration (its suppression key settings).
      identity_store: the URI of the identity store the stream resolves against.
      max_batch, max_wait_s: a micro-batch ends at this many records or after this long.
    """

    def __init__(self, bootstrap: str, warehouse: str, config: Dict[str, Any], identity_store: str,
                 group: str = LOADER_GROUP, max_batch: int = 5000, max_wait_s: float = 1.0):
        from kafka import KafkaConsumer, TopicPartition
        self.bootstrap, self.warehouse, self.config = bootstrap, warehouse, config
        self.identity_store = identity_store
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                      isolation_level="read_committed", auto_offset_reset="earliest",
                                      max_poll_records=max_batch)
        self.partitions = []
        for topic in LOADED_TOPICS:
            found = self.consumer.partitions_for_topic(topic)
            if not found:
                raise RuntimeError(f"no topic {topic!r} at {bootstrap} (`cdpflow stack up kafka` creates it)")
            self.partitions.extend(TopicPartition(topic, p) for p in sorted(found))
        self.consumer.assign(self.partitions)
        self.seek_to_stored()
        self.totals: Dict[str, int] = {}
        self._publisher = None
        self._suppressed = None

    def close(self):
        self.consumer.close()
        if self._publisher is not None:
            self._publisher.close(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------ batches
    def poll_batch(self) -> List[Dict[str, Any]]:
        """Up to `max_batch` records, waiting at most `max_wait_s` (fewer if the topics have fewer)."""
        batch: List[Dict[str, Any]] = []
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            polled = self.consumer.poll(timeout_ms=int(left * 1000), max_records=self.max_batch - len(batch))
            for tp, records in polled.items():
                for record in records:
                    try:
                        value = orjson.loads(record.value) if record.value is not None else None
                    except orjson.JSONDecodeError:
                        value = _UNREADABLE
                    batch.append({"topic": tp.topic, "partition": tp.partition, "offset": record.offset,
                                  "timestamp": record.timestamp * 1000,
                                  "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
                                  "value": value, "order": _order(record)})
            if not polled:
                break
        return batch

    def commit(self, batch: List[Dict[str, Any]]) -> Dict[str, int]:
        """Commits one micro-batch to the warehouse (rows and offsets together); returns the counts."""
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata
        now = int(time.time() * 1_000_000)
        counts: Dict[str, int] = {}
        unreadable = [r for r in batch if r["value"] is _UNREADABLE]
        if unreadable:
            # Not cdpflow's: said and counted, their offsets passed so they do not block the rest.
            log.error("loader: %d record(s) that are not JSON, e.g. %s:%s:%s", len(unreadable), unreadable[0]["topic"],
                      unreadable[0]["partition"], unreadable[0]["offset"])
            counts["unreadable"] = len(unreadable)
            for record in unreadable:
                record["skip"] = True
        with open_warehouse(self.warehouse) as wh:
            key = governance.suppression_key(self.config, wh.demo_key_file())
            stored = wh.stream_offsets()
            # Commands first: rows the stream produced for a person before their forget was read
            # meet the suppression check below and are not loaded.
            for record in batch:
                if record["topic"] == CONTROL.name and not record.get("skip") and \
                        record["offset"] >= stored.get((CONTROL.name, record["partition"]), 0):
                    try:
                        done = self._control(wh, record, key, now)
                    except Exception as err:  # noqa: BLE001 (one bad command must not stop the loading)
                        log.error("loader: cdp.control %s:%s refused: %s: %s", record["partition"], record["offset"],
                                  type(err).__name__, err)
                        done = {"control_refused": 1}
                    for name, value in done.items():
                        counts[name] = counts.get(name, 0) + value
            rules = governance.identity_rules(self.config, wh.governance(), key)
            store = open_identity_store(self.identity_store, rules)
            try:
                links = store.links()
                if rules.suppressed != self._suppressed or any(
                        rules.is_suppressed([(link["identifier_type"], link["identifier_value"])]) for link in links):
                    # Forgotten since the last commit (`cdpflow forget` on the warehouse, or a
                    # control command), or resolved again by a stream that had not heard of it
                    # yet: every profile holding a forgotten identifier leaves the store.
                    counts["purged_identifiers"] = store.purge(rules)
                    self._suppressed = rules.suppressed
                    links = store.links()
                conflicts = [c for c in store.conflicts()
                             if not rules.is_suppressed([(c["identifier_type"], c["identifier_value"])])]
                identity = {"links": links, "merges": store.merges(), "conflicts": conflicts,
                            "profiles": {link["profile_id"] for link in links}, "final": store.current_profiles}
                counts.update(wh.load_stream_batch(batch, identity, now, suppressed=rules.is_suppressed))
            finally:
                store.close()
            self._publish_outbox(wh)  # exits a forget committed before a crash, not yet sent
        for name, value in counts.items():
            self.totals[name] = self.totals.get(name, 0) + value
        ends: Dict[Any, int] = {}
        for record in batch:
            tp = TopicPartition(record["topic"], record["partition"])
            ends[tp] = max(ends.get(tp, 0), record["offset"] + 1)
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in ends.items()})
        except Exception as err:  # only for lag dashboards: the warehouse holds the offsets that count
            log.warning("loader: committing the consumer group's offsets failed: %s", err)
        return counts

    def _control(self, wh, record, key, now) -> Dict[str, int]:
        """Applies one `cdp.control` command; a crash part-way is safe to repeat from the start."""
        try:
            command = control.parse_command(record["value"])
        except control.ControlError as err:
            log.error("loader: cdp.control record %s:%s refused: %s: %r", record["partition"], record["offset"], err,
                      record["value"])
            return {"control_refused": 1}
        if command.name == "split":
            return self._split(wh, command, key, record.get("timestamp") or now)
        return self._forget(wh, command.target, key, now)

    def _split(self, wh, command: "control.Command", key, at: int) -> Dict[str, int]:
        """Applies a split to the identity store (which the stream resolves against) and records
        its separations in the warehouse, so batch runs, replays and restarts keep the parts apart.

        The stream applies the same command (idempotent by its id in the store): whichever comes
        first re-derives the profile, and the stream sends the moves to its feature state either way.
        """
        rules = governance.identity_rules(self.config, wh.governance(), key)
        store = open_identity_store(self.identity_store, rules)
        try:
            outcome = store.split(control.reference(command.target, self.config["default_region"]), command.id, at,
                                  merge=command.merge)
            held, names = store.separations(), store.names()
        finally:
            store.close()
        added = wh.add_separations(held, at, command.reason, names=names)
        if not (outcome.profiles or outcome.replayed or outcome.separations or added):
            log.warning("loader: split %s of %r: no merge to undo (unknown profile, or split already)", command.id,
                        command.target)
            return {"split_nothing": 1}
        log.info("loader: split %s of %r: now profiles %s", command.id, command.target, ", ".join(outcome.profiles))
        return {"split": 1}

    def _forget(self, wh, identifier: str, key, now) -> Dict[str, int]:
        from cdpflow.io.kafka_producer import send_all
        store = open_identity_store(self.identity_store)
        try:
            # The person as the identity store knows them: the stream may have resolved events the
            # warehouse does not hold yet (or never will, if the loader was behind).
            found = wh.identifier_of(identifier)
            in_store = store.profile_of(found) if found else None
            if in_store is not None:
                held = [(link["identifier_type"], link["identifier_value"]) for link in store.links()
                        if link["profile_id"] == in_store]
            else:
                held = [found] if found else []
            profile_id = wh.resolve_profile_id(identifier) or in_store
            if profile_id:
                # First, so a repeat after a crash still sends it: compaction drops the person's rows.
                send_all(self._producer(), [(PROFILE_CHANGES.name, profile_id.encode(), None)])
            done = wh.forget(identifier, now, key)
            identifiers = sorted(set(held) | set(tuple(i) for i in (done or {}).get("identifiers", ())))
            if not identifiers:
                return {"forget_unknown": 1}
            # Suppressed whether or not the warehouse held them: what arrives later stays out.
            wh.suppress(identifiers, now, key)
            # the store keeps the hashes too: a stream resolving against it refuses the person
            # from its next batch, before it next reads the warehouse's governance
            store.forget(identifiers, hashes=[key.hash(tuple(i)) for i in identifiers])
        finally:
            store.close()
        return {"forgotten": 1}  # its exits are published at the end of the commit

    def _producer(self):
        from cdpflow.io.kafka_producer import producer
        if self._publisher is None:
            self._publisher = producer(self.bootstrap)
        return self._publisher

    def _publish_outbox(self, wh):
        from cdpflow.io.kafka_producer import send_all
        pending = wh.pending_outbox()
        if not pending:
            return
        send_all(self._producer(), [(SEGMENT_CHANGES.name, m["message_key"].encode(), orjson.dumps(m["payload"]),
                                    [("idempotency_key", m["idempotency_key"].encode())]) for m in pending])
        wh.mark_published([m["idempotency_key"] for m in pending], int(time.time() * 1_000_000))

    # ------------------------------------------------------------------------------ loops
    def seek_to_stored(self) -> None:
        """Puts every partition back where the warehouse says loading stands."""
        with open_warehouse(self.warehouse) as wh:
            stored = wh.stream_offsets()
        for tp in self.partitions:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)

    def step(self, retries: int = 5) -> bool:
        """Loads one micro-batch; True if there was one. A commit that fails is tried again from
        the stored offsets (the batch was rolled back); after `retries` failures in a row it raises."""
        for attempt in range(retries + 1):
            batch = self.poll_batch()
            if not batch:
                return False
            try:
                self.commit(batch)
                return True
            except Exception as err:  # noqa: BLE001 (a busy file, a broker blip: retried, then raised)
                if attempt == retries:
                    raise
                log.warning("loader: a commit failed (%s: %s); again from the stored offsets", type(err).__name__, err)
                time.sleep(min(5.0, 0.5 * 2 ** attempt))
                self.seek_to_stored()
        return False

    def run_until_caught_up(self) -> Dict[str, int]:
        """Loads until every partition is read to the end it had when this was called."""
        ends = self.consumer.end_offsets(self.partitions)
        while any(self.consumer.position(tp) < ends[tp] for tp in self.partitions):
            self.step()
        return dict(self.totals)

    def run(self, stop=None) -> Dict[str, int]:
        """Loads until `stop` (a threading.Event) is set, then loads what is left."""
        while stop is None or not stop.is_set():
            if not self.step() and stop is not None:
                stop.wait(self.max_wait_s)
        return self.run_until_caught_up()


def run_loader(bootstrap: str, warehouse: str, config: Dict[str, Any], identity_store: Optional[str] = None,
               until_caught_up: bool = False) -> Dict[str, int]:
    """`cdpflow load`: runs until interrupted (or, with `until_caught_up`, until the topics are loaded)."""
    from cdpflow.pipelines.live import stream_identity_store
    with Loader(bootstrap, warehouse, config, identity_store or stream_identity_store(warehouse)) as loader:
        if until_caught_up:
            return loader.run_until_caught_up()
        try:
            return loader.run()
        except KeyboardInterrupt:
            return dict(loader.totals)
