import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from cdpflow.transforms import DEAD_LETTERS
from cdpflow.transforms.normalize import NORMALIZED, Normalize
from cdpflow.transforms.validate import VALID, ParseAndValidate
from tests.conftest import local_pipeline
from tests.transforms.helpers import raw

GOOD = raw(messageId="m1", userId="u1", traits={"email": " U1@X.COM "})
NO_ID = raw(messageId="m2", traits={"email": "not-an-email"})
LINES = [GOOD, NO_ID, "{broken", raw(messageId="m3", type="trak"), raw(userId="u3")]
NOT_UTF8 = b'{"type": "track", "userId": "\xff"}'


def test_parse_validate_normalize_route_every_record():
    p = local_pipeline()
    parsed = p | beam.Create(LINES + [NOT_UTF8]) | ParseAndValidate()
    normalized = parsed[VALID] | Normalize()
    assert_that(normalized[NORMALIZED] | "Ids" >> beam.Map(lambda e: (e.message_id, e.identifiers)),
                equal_to([("m1", (("email", "u1@x.com"), ("user_id", "u1")))]), label="Normalized")
    assert_that(parsed[DEAD_LETTERS] | "ParseDL" >> beam.Map(lambda d: (d.stage, d.schema_version, d.raw)),
                equal_to([("parse", None, "{broken"), ("parse", None, '{"type": "track", "userId": "\\xff"}'),
                          ("validate", "none", LINES[3]),
                          ("validate", "track/v1", LINES[4])]), label="ParseDeadLetters")
    assert_that(normalized[DEAD_LETTERS] | "NormDL" >> beam.Map(lambda d: (d.stage, d.raw, "identifier" in d.error)),
                equal_to([("normalize", NO_ID, True)]), label="NormalizeDeadLetters")
    result = p.run()
    result.wait_until_finish()
    counters = {m.key.metric.name: m.committed for m in result.metrics().query()["counters"]
                if m.key.metric.namespace.endswith("_ParseAndValidateFn")}
    assert counters == {"received": 6, "succeeded": 2, "dead_lettered": 4}
