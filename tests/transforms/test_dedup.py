import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from cdpflow.transforms import DEAD_LETTERS
from cdpflow.transforms.dedup import UNIQUE, Dedup
from tests.conftest import local_pipeline
from tests.transforms.helpers import normalized


def test_dedup_within_horizon_and_dead_letters_beyond():
    copies = [
        normalized(messageId="a", userId="u", receivedAt="2026-03-01T10:00:05.000Z"),
        normalized(messageId="a", userId="u", receivedAt="2026-03-01T10:00:01.000Z"),
        normalized(messageId="a", userId="u", receivedAt="2026-03-20T10:00:00.000Z"),
        normalized(messageId="b", userId="u"),
    ]
    p = local_pipeline()
    out = p | beam.Create(copies) | Dedup(horizon_hours=24)
    assert_that(out[UNIQUE] | beam.Map(lambda e: (e.message_id, e.raw)),
                equal_to([("a", copies[1].raw), ("b", copies[3].raw)]), label="Unique")
    assert_that(out[DEAD_LETTERS] | "DL" >> beam.Map(lambda d: (d.stage, d.raw)),
                equal_to([("dedup", copies[2].raw)]), label="TooLate")
    result = p.run()
    result.wait_until_finish()
    counters = {m.key.metric.name: m.committed for m in result.metrics().query()["counters"]}
    assert counters["deduplicated"] == 1 and counters["received"] == 4 and counters["dead_lettered"] == 1
