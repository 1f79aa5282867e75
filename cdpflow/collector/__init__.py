"""The tracking-API collector: Segment- and RudderStack-compatible HTTP ingestion into Kafka.

    cdpflow serve collector [--port 8088] [--bootstrap 127.0.0.1:9092] [--config FILE]

`app.py` is the HTTP API (`create_app`), `sink.py` where accepted events go (`KafkaSink`: the
`cdp.events.raw` topic, keyed by userId, else anonymousId, acknowledged by every in-sync
replica before the collector answers 200).
"""
