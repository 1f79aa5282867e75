"""`cdpflow serve sidecar`: delivers `cdp.segments.changes` to the configured destinations.

    cdpflow serve sidecar --bootstrap 127.0.0.1:9092 --profile-store redis://127.0.0.1:6379/0 \\
                          [--identity-store redis://...] [--destination NAME ...] [--config FILE]

One worker per destination, each a Kafka consumer of its own group (`cdpflow-sidecar.<name>`,
read_committed, offsets committed by hand):

1. poll a batch; group it by profile, keeping each profile's changes in their topic order;
2. leave out changes for segments the destination does not take, and changes of people the
   governance says are gone: a profile the profile store has forgotten, or whose email, phone or
   user id is among the forgotten identifiers the identity store holds (the same keyed hashes
   every other path checks; a forget made while the sidecar runs counts from its next batch);
3. deliver each profile's changes in order (profiles side by side, up to `workers` at once),
   the body built by the destination from the change and what its field policy allows of the
   profile (from the profile store);
4. a change that fails for good goes to `cdp.destinations.deadletter`, and the profile is held:
   its later changes follow it there, in order, until `cdpflow destinations replay` has delivered
   them all — so a receiver never sees an exit before its enter;
5. only when every change of the batch is delivered, skipped or stored as a dead letter (acks=all)
   are the offsets committed. A sidecar killed before that delivers the batch again on restart:
   the receiver sees a change at least once, and once after deduplicating by its idempotency key.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import orjson

from cdpflow.activation.destinations import Delivery, Destination, Outcome
from cdpflow.activation.profile_store import RedisProfileStore
from cdpflow.schemas.topics import DESTINATION_DEAD_LETTERS, SEGMENT_CHANGES

log = logging.getLogger(__name__)

Suppressed = Callable[[Optional[Mapping[str, Any]]], bool]


def group_for(destination: str) -> str:
    return f"cdpflow-sidecar.{destination}"


def profile_identifiers(profile: Optional[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    """The identifiers a profile row names (email, phone, user id), as the identity rules take them."""
    if not profile:
        return []
    return [(kind, str(profile[kind])) for kind in ("email", "phone", "user_id") if profile.get(kind)]


class GovernanceView:
    """Whether a profile's person is forgotten: the starting rules, with the identity store's forgets.

    `refresh` re-reads the separations and forgotten hashes the identity store holds (the sidecar
    calls it before each batch, so a forget made while it runs counts from the next batch on).
    """

    def __init__(self, identity_store_uri: Optional[str], rules=None):
        self.uri, self._rules, self._store = identity_store_uri, rules, None

    def refresh(self) -> None:
        if self.uri is None:
            return
        if self._store is None:
            from cdpflow.core.identity import open_identity_store
            self._store = open_identity_store(self.uri, self._rules)
        self._rules = self._store.governed_rules()

    @property
    def forgotten(self) -> frozenset:
        """The forgotten identifiers' hashes the view holds now."""
        return self._rules.suppressed if self._rules is not None else frozenset()

    def suppressed(self, profile: Optional[Mapping[str, Any]]) -> bool:
        return self._rules is not None and self._rules.is_suppressed(profile_identifiers(profile))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class DestinationWorker:
    """Delivers the change topic to one destination (see the module docstring)."""

    def __init__(self, bootstrap: str, destination: Destination, profiles: RedisProfileStore,
                 governance: GovernanceView, workers: int = 8, max_records: int = 500, producer=None,
                 before_batch: Optional[Callable[[], Any]] = None):
        self.bootstrap, self.destination, self.profiles = bootstrap, destination, profiles
        self.before_batch = before_batch
        self.governance, self.max_records = governance, max_records
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"deliver-{destination.name}")
        self.counts = {"delivered": 0, "dead_lettered": 0, "held": 0, "skipped_segment": 0, "suppressed": 0,
                       "attempts": 0, "batches": 0, "consent_removals": 0}
        self._producer = producer
        self._lock = threading.Lock()  # the counts, from the delivering threads
        self._stop = threading.Event()
        self.held_key = f"{profiles.prefix}:sidecar:{destination.name}:held"

    # ------------------------------------------------------------------ Kafka
    def consumer(self):
        from kafka import KafkaConsumer
        return KafkaConsumer(SEGMENT_CHANGES.name, bootstrap_servers=self.bootstrap,
                             group_id=group_for(self.destination.name), enable_auto_commit=False,
                             auto_offset_reset="earliest", isolation_level="read_committed",
                             max_poll_records=self.max_records)

    def producer(self):
        if self._producer is None:
            from cdpflow.io.kafka_producer import producer
            self._producer = producer(self.bootstrap)
        return self._producer

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    # ------------------------------------------------------------------ one batch
    def handle(self, records: Sequence[Any]) -> Dict[str, int]:
        """Delivers one polled batch (records of any partitions); returns what became of it."""
        by_profile: "OrderedDict[str, List[Tuple[Any, Dict[str, Any]]]]" = OrderedDict()
        for record in sorted(records, key=lambda r: (r.partition, r.offset)):
            if record.value is None:
                continue
            try:
                change = orjson.loads(record.value)
                profile_id = change["profile_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError) as err:
                self._dead_letter(record, None, f"not a segment change: {err}", 0)
                continue
            if not self.destination.wants(change):
                self._count("skipped_segment", 1)
                continue
            by_profile.setdefault(profile_id, []).append((record, change))
        if self.destination.batched:
            # one call for the whole batch (e.g. audience requests of many members each)
            prepared = [(items, self._prepare(pid, items)) for pid, items in by_profile.items()]
            prepared = [(items, deliveries) for items, deliveries in prepared if deliveries is not None]
            outcomes = self.destination.deliver_many([deliveries for _, deliveries in prepared])
            for (items, _), done in zip(prepared, outcomes):
                self._settle(items, done)
        else:
            futures = [self.pool.submit(self._profile_changes, pid, items) for pid, items in by_profile.items()]
            for future in futures:
                future.result()
        if self._producer is not None:
            self._producer.flush()  # dead letters stored (acks=all) before the offsets move
        self._count("batches", 1)
        return dict(self.counts)

    def gone(self, profile_id: str, profile: Optional[Mapping[str, Any]]) -> bool:
        """Whether governance keeps the profile's changes from leaving (forgotten in the store or by the rules)."""
        return self.profiles.is_forgotten(profile_id) or self.governance.suppressed(profile)

    def _prepare(self, profile_id: str, items: List[Tuple[Any, Dict[str, Any]]]) -> Optional[List[Delivery]]:
        """The deliveries of one profile's changes, or None when governance or a hold settles them."""
        profile = self.profiles.profile(profile_id)
        if self.gone(profile_id, profile):
            self._count("suppressed", len(items))
            return None
        if self.profiles.client.hget(self.held_key, profile_id):
            for record, change in items:
                self._dead_letter(record, change, "held behind an earlier dead letter of this profile", 0)
            self._count("held", len(items))
            return None
        return [Delivery(change["idempotency_key"], profile_id, self.destination.body(change, profile))
                for _, change in items]

    def _settle(self, items: List[Tuple[Any, Dict[str, Any]]], outcomes: Sequence[Outcome]) -> None:
        for (record, change), outcome in zip(items, outcomes):
            self._count("attempts", outcome.attempts)
            if outcome.delivered:
                self._count("delivered", 1)
            else:
                self._dead_letter(record, change, outcome.error or "not delivered", outcome.attempts)

    def _profile_changes(self, profile_id: str, items: List[Tuple[Any, Dict[str, Any]]]) -> None:
        deliveries = self._prepare(profile_id, items)
        if deliveries is not None:
            self._settle(items, self.destination.deliver(deliveries))

    def consent_sweep(self) -> int:
        """An email destination removes profiles that withdrew consent from the audiences of all
        their segments (the profile store records each withdrawal); returns how many were removed."""
        if not self.destination.email:
            return 0
        cursor_key = f"{self.profiles.prefix}:sidecar:{self.destination.name}:consent_cursor"
        cursor = float(self.profiles.client.get(cursor_key) or 0)
        removed, last = 0, cursor
        for member, score in self.profiles.consent_withdrawals(after=cursor):
            profile = self.profiles.profile(member)
            view = self.destination.policy.profile_view(profile)
            if view.get("email") and not self.destination.body({}, profile).get("consented"):
                audiences = {self.destination.audience_of(s): [view["email"]]
                             for s in self.profiles.segments_of(member) if self.destination.wants({"segment": s})}
                if audiences and not self.destination.remove_everywhere(audiences):
                    break  # tried again before the next batch
                removed += 1
            last = score
        if last != cursor:
            self.profiles.client.set(cursor_key, repr(last))
        self._count("consent_removals", removed)
        return removed

    def _dead_letter(self, record, change: Optional[Dict[str, Any]], error: str, attempts: int) -> None:
        profile_id = (change or {}).get("profile_id") or ""
        value = {"destination": self.destination.name, "change": change,
                 "raw": None if change is not None else record.value.decode("utf-8", "replace"),
                 "error": error, "attempts": attempts, "dead_lettered_at": int(time.time() * 1_000_000),
                 "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset}}
        producer = self.producer()
        source = f"{record.topic}:{record.partition}:{record.offset}"
        key = dead_letter_key(profile_id, self.destination.name, (change or {}).get("idempotency_key") or source)
        producer.send(DESTINATION_DEAD_LETTERS.name, key=key, value=orjson.dumps(value),
                      partition=dead_letter_partition(producer, profile_id))
        if profile_id:
            # held until a replay has delivered every dead letter of the profile
            self.profiles.client.hincrby(self.held_key, profile_id, 1)
        self._count("dead_lettered", 1)

    # ------------------------------------------------------------------ the loop
    def run(self, until_idle_s: Optional[float] = None) -> Dict[str, int]:
        """Delivers until `stop` (or until nothing new came for `until_idle_s` seconds)."""
        consumer = self.consumer()
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=500, max_records=self.max_records)
                records = [r for batch in polled.values() for r in batch]
                if self.before_batch is not None:
                    self.before_batch()  # the profile store holds the rows written with these changes
                self.governance.refresh()
                self.consent_sweep()  # also when no change comes: an unsubscribe moves no segment
                if not records:
                    if not consumer.assignment():
                        idle_since = time.monotonic()  # still joining its group: not idle yet
                    elif until_idle_s is not None and time.monotonic() - idle_since >= until_idle_s:
                        break
                    continue
                self.handle(records)
                consumer.commit()  # the positions after this batch: every change of it is settled
                idle_since = time.monotonic()
        finally:
            consumer.close()
        return dict(self.counts)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self._producer is not None:
            self._producer.flush()
            self._producer.close()
        self.destination.close()


def replay_dead_letters(bootstrap: str, destination: Destination, profiles: RedisProfileStore,
                        governance: GovernanceView, idle_s: float = 3.0) -> Dict[str, int]:
    """`cdpflow destinations replay`: resends a destination's dead letters, in order per profile.

    Reads `cdp.destinations.deadletter` from where this destination's replays last stopped
    (group `cdpflow-replay.<name>`). A profile's dead letters are resent in their order; each
    one delivered releases one hold on the profile, and a profile with none left is delivered
    live again. One that fails again is dead-lettered again (the profile stays held). A
    forgotten person's dead letters are dropped, never resent.
    """
    from kafka import TopicPartition

    from cdpflow.io.kafka_consumer import assigned, commit_positions
    worker = DestinationWorker(bootstrap, destination, profiles, governance)
    consumer, tps = assigned(bootstrap, f"cdpflow-replay.{destination.name}", (DESTINATION_DEAD_LETTERS.name,))
    counts = {"resent": 0, "failed_again": 0, "suppressed": 0, "released": 0}
    failed = set()
    governance.refresh()
    try:
        # what the topic holds now: a dead letter written by this replay is left to the next one
        ends = consumer.end_offsets(tps)
        idle_since = time.monotonic()
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() - idle_since < idle_s:
            polled = consumer.poll(timeout_ms=500)
            records = sorted((r for batch in polled.values() for r in batch if r.offset < ends[TopicPartition(r.topic, r.partition)]),
                             key=lambda r: (r.partition, r.offset))
            if not records:
                continue
            idle_since = time.monotonic()
            for record in records:
                if record.value is None:
                    continue  # a tombstone: a forget purged that letter
                letter = orjson.loads(record.value)
                change = letter.get("change")
                if letter.get("destination") != destination.name or not change:
                    continue
                profile_id = change["profile_id"]
                profile = profiles.profile(profile_id)
                if worker.gone(profile_id, profile):
                    counts["suppressed"] += 1
                    _release(profiles, worker.held_key, profile_id)
                    continue
                if profile_id in failed:  # an earlier dead letter of the profile failed again: keep the order
                    outcome = Outcome(change["idempotency_key"], False, 0, "held behind an earlier dead letter of this profile")
                else:
                    outcome = destination.deliver([Delivery(change["idempotency_key"], profile_id,
                                                            destination.body(change, profile))])[0]
                if outcome.delivered:
                    counts["resent"] += 1
                    counts["released"] += _release(profiles, worker.held_key, profile_id)
                else:
                    counts["failed_again"] += 1
                    failed.add(profile_id)
                    # a new dead letter (and hold) replaces this one, which this replay consumes
                    _release(profiles, worker.held_key, profile_id)
                    worker._dead_letter(record, change, outcome.error or "not delivered", outcome.attempts)
            worker.producer().flush()
            commit_positions(consumer, tps)
    finally:
        consumer.close()
        worker.close()
    return counts


def _release(profiles: RedisProfileStore, held_key: str, profile_id: str) -> int:
    """Releases one hold on a profile; 1 when it was the last (the profile is delivered live again)."""
    left = profiles.client.hincrby(held_key, profile_id, -1)
    if left <= 0:
        profiles.client.hdel(held_key, profile_id)
        return 1
    return 0


# --------------------------------------------------------------------------- dead letters by profile
def dead_letter_key(profile_id: str, destination: str, letter: str) -> bytes:
    """A dead letter's key: unique per letter, so that the compacted topic keeps every letter and a
    forget can replace each of a person's letters with a tombstone (`purge_dead_letters`)."""
    return f"{profile_id}|{destination}|{letter}".encode("utf-8")


def dead_letter_partition(producer, profile_id: str) -> Optional[int]:
    """The partition of a profile's dead letters: by the profile id alone (Kafka's own murmur2
    hash, as if the profile id were the key), so one profile's letters keep their order."""
    if not profile_id:
        return None
    from kafka.partitioner.default import murmur2
    partitions = sorted(producer.partitions_for(DESTINATION_DEAD_LETTERS.name))
    return partitions[(murmur2(profile_id.encode("utf-8")) & 0x7FFFFFFF) % len(partitions)]


def purge_dead_letters(bootstrap: str, profile_id: str, timeout_s: float = 30.0) -> int:
    """Writes a tombstone over every dead letter of a forgotten profile, for every destination.

    Reads the profile's partition of `cdp.destinations.deadletter` up to its end (the topic is
    compacted, so the letters are removed once compaction passes; a replay skips them at once,
    and skips any letter of a forgotten profile anyway). Returns how many letters it tombstoned.
    """
    from kafka import KafkaConsumer, TopicPartition

    from cdpflow.io.kafka_producer import producer as make_producer
    producer = make_producer(bootstrap, timeout_s)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed")
    try:
        tp = TopicPartition(DESTINATION_DEAD_LETTERS.name, dead_letter_partition(producer, profile_id))
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        prefix = f"{profile_id}|".encode("utf-8")
        live: Dict[bytes, bool] = {}
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {tp.topic} partition {tp.partition} took over {timeout_s:g} s")
            for record in consumer.poll(timeout_ms=500).get(tp, []):
                if record.offset < end and record.key and record.key.startswith(prefix):
                    live[record.key] = record.value is not None
        futures = [producer.send(tp.topic, key=key, value=None, partition=tp.partition)
                   for key, alive in live.items() if alive]
        producer.flush(timeout=timeout_s)
        for future in futures:
            future.get(timeout=timeout_s)
        return len(futures)
    finally:
        consumer.close()
        producer.close()
