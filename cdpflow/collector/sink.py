"""Where the collector puts accepted events: a `Sink` that says only once they are stored.

`KafkaSink` produces to `cdp.events.raw` with an idempotent producer and `acks=all`, and
returns only when the broker has acknowledged every record of the request, so the collector
never answers 200 for an event Kafka does not hold. A broker that is down or slow makes
`send` raise `SinkUnavailable` within its timeout; the collector then answers 503 with
Retry-After, and the client (every tracking SDK retries) sends again. Retries are safe: the
stream deduplicates by messageId.
"""
from __future__ import annotations

import abc
import threading
from typing import List, Optional, Sequence, Tuple

from cdpflow.schemas.topics import RAW_EVENTS

RAW_TOPIC = RAW_EVENTS.name

Record = Tuple[Optional[bytes], bytes]  # (partition key, value)


class SinkUnavailable(RuntimeError):
    """The sink could not store the records in time; nothing may be acknowledged."""


class Sink(abc.ABC):
    """Stores records durably; `send` returns only once every record is stored."""

    @abc.abstractmethod
    def send(self, records: Sequence[Record]) -> None:
        """Stores the records, or raises SinkUnavailable (then none may be counted as stored)."""

    def healthy(self) -> bool:
        """Whether the sink can take records now."""
        return True

    def close(self) -> None:
        """Flushes and releases the connection."""


class KafkaSink(Sink):
    """An idempotent, acks=all producer to one topic.

    Args:
      bootstrap: HOST:PORT of the brokers.
      topic: where events go (default `cdp.events.raw`).
      timeout_s: how long a request may wait for the acknowledgements before it fails (503).
    """

    def __init__(self, bootstrap: str, topic: str = RAW_TOPIC, timeout_s: float = 10.0):
        self.topic = topic
        self.timeout_s = timeout_s
        self.bootstrap = bootstrap
        self._producer = None
        self._lock = threading.Lock()

    def producer(self):
        """The producer, connected on first use: the collector starts (and says 503) while Kafka is down."""
        from kafka.errors import KafkaError

        from cdpflow.io.kafka_producer import producer
        with self._lock:
            if self._producer is None:
                try:
                    self._producer = producer(self.bootstrap, self.timeout_s, retries=5,
                                              bootstrap_timeout_ms=int(self.timeout_s * 1000))
                except KafkaError as err:
                    raise SinkUnavailable(f"cannot reach Kafka at {self.bootstrap}: {type(err).__name__}: {err}") \
                        from None
            return self._producer

    def send(self, records: Sequence[Record]) -> None:
        from kafka.errors import KafkaError
        producer = self.producer()
        futures: List = []
        try:
            for key, value in records:
                futures.append(producer.send(self.topic, key=key, value=value))
            producer.flush(timeout=self.timeout_s)
            for future in futures:
                future.get(timeout=self.timeout_s)
        except KafkaError as err:
            # An idempotent producer whose batches expired cannot go on with its sequence
            # numbers: start the next request with a new producer (a new producer id).
            self._reset(producer)
            raise SinkUnavailable(f"Kafka at {self.bootstrap} did not store the events: {type(err).__name__}: {err}") \
                from None

    def _reset(self, producer) -> None:
        with self._lock:
            if self._producer is producer:
                self._producer = None
        try:
            producer.close(timeout=0)
        except Exception:  # a producer already broken may fail to close; it is dropped either way
            pass

    def healthy(self) -> bool:
        from kafka.errors import KafkaError
        try:
            # Fresh metadata for the topic: a broker that answers and leads its partitions.
            return bool(self.producer().partitions_for(self.topic))
        except (SinkUnavailable, KafkaError):
            return False

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
