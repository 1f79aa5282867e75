"""The Kafka producer every cdpflow writer uses (the stream's sink, the loader, the collector), without Beam.

`producer` is idempotent with acks=all; `send_all` returns only once the brokers hold every record.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

Record = Tuple  # (topic, key: Optional[bytes], value: Optional[bytes][, headers: [(str, bytes)]])


def producer(bootstrap: str, timeout_s: float = 30.0, **more):
    """An idempotent, acks=all producer (what every cdpflow writer to Kafka uses, the collector too);
    `more`: other KafkaProducer settings."""
    from kafka import KafkaProducer
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                         max_block_ms=int(timeout_s * 1000), request_timeout_ms=int(timeout_s * 1000),
                         delivery_timeout_ms=int(timeout_s * 1000) + 10, compression_type="gzip", **more)


def send_all(client, records: Sequence[Record], timeout_s: float = 60.0) -> int:
    """Sends the records and waits until the brokers hold every one; raises if any failed."""
    futures: List = []
    for record in records:
        topic, key, value = record[:3]
        headers: Optional[list] = record[3] if len(record) > 3 else None
        futures.append(client.send(topic, key=key, value=value, headers=headers or None))
    client.flush(timeout=timeout_s)
    for future in futures:
        future.get(timeout=timeout_s)  # raises the delivery error, if any
    return len(futures)
