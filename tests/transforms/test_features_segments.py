from decimal import Decimal

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from cdpflow.core.timeutil import parse_ts
from cdpflow.transforms.features import PROFILES, TRANSITIONS, ComputeFeatures
from cdpflow.core.segments import idempotency_key
from cdpflow.transforms.segments import CHANGES, MEMBERSHIPS, AssignSegments
from tests.conftest import local_pipeline
from tests.transforms.helpers import normalized

LIFECYCLE = {"new_days": 30, "active_days": 90, "at_risk_days": 180}
AS_OF = parse_ts("2026-03-31T00:00:00Z")


def order(mid, profile, day, revenue):
    e = normalized(messageId=mid, userId=profile, event="Order Completed", timestamp=f"2026-03-{day:02d}T10:00:00Z",
                   properties={"revenue": revenue})
    return e.replace(profile_id=profile, revenue_reporting=Decimal(revenue))


def test_features_per_profile_leave_out_events_after_as_of():
    events = [order("1", "pA", 1, "10"), order("2", "pA", 20, "5"), order("3", "pB", 2, "7"),
              order("late", "pA", 31, "100").replace(timestamp=AS_OF + 1)]
    p = local_pipeline()
    links = p | "Links" >> beam.Create([{"profile_id": "pA"}, {"profile_id": "pA"}, {"profile_id": "pB"}])
    as_of = p | "AsOf" >> beam.Create([AS_OF])
    out = p | beam.Create(events) | ComputeFeatures(links, as_of, LIFECYCLE)
    assert_that(out[TRANSITIONS] | "T" >> beam.Map(lambda t: (t["profile_id"], t["from_stage"], t["to_stage"], t["transitioned_at"])),
                equal_to([("pA", None, "new", events[0].timestamp), ("pB", None, "new", events[2].timestamp)]),
                label="Transitions")
    assert_that(out[PROFILES] | beam.Map(lambda r: (r["profile_id"], r["orders_total"], r["revenue_total"],
                                           r["identifier_count"], r["lifecycle_stage"], r["_cause_message_id"])),
                equal_to([("pA", 2, Decimal("15"), 2, "new", "2"), ("pB", 1, Decimal("7"), 1, "new", "3")]))
    p.run().wait_until_finish()


def test_segments_enter_exit_once_with_keys_from_the_cause():
    rules = {"version": "r1", "segments": [{"name": "big", "when": {"revenue_total": {"gte": 10}}}]}
    profiles = [
        {"profile_id": "pA", "revenue_total": Decimal("15"), "lifecycle_stage": "new", "_cause_message_id": "mA"},
        {"profile_id": "pB", "revenue_total": Decimal("1"), "lifecycle_stage": "new", "_cause_message_id": "mB"},
    ]
    earlier = parse_ts("2026-03-01T00:00:00Z")
    previous = [
        {"profile_id": "pB", "segment": "big", "source": "rule", "entered_at": earlier, "exited_at": None, "model_version": "r1"},
        {"profile_id": "pB", "segment": "lifecycle:new", "source": "lifecycle", "entered_at": earlier, "exited_at": None,
         "model_version": "lifecycle:30/90/180"},
        {"profile_id": "pGone", "segment": "big", "source": "rule", "entered_at": earlier, "exited_at": None, "model_version": "r1"},
    ]
    p = local_pipeline()
    out = (p | "Profiles" >> beam.Create(profiles)) | AssignSegments(
        rules, p | "Prev" >> beam.Create(previous), p | "AsOf" >> beam.Create([AS_OF]), LIFECYCLE)
    assert_that(out[CHANGES] | beam.Map(lambda c: (c["profile_id"], c["segment"], c["direction"], c["idempotency_key"])),
                equal_to([("pA", "big", "enter", idempotency_key("pA", "big", "enter", "mA")),
                          ("pA", "lifecycle:new", "enter", idempotency_key("pA", "lifecycle:new", "enter", "mA")),
                          ("pB", "big", "exit", idempotency_key("pB", "big", "exit", "mB")),
                          ("pGone", "big", "exit", idempotency_key("pGone", "big", "exit", "absorbed-or-gone@2026-03-31T00:00:00.000000Z"))]),
                label="Changes")
    assert_that(out[MEMBERSHIPS] | "Rows" >> beam.Map(lambda r: (r["profile_id"], r["segment"], r["entered_at"], r["exited_at"])),
                equal_to([("pA", "big", AS_OF, None), ("pA", "lifecycle:new", AS_OF, None),
                          ("pB", "big", earlier, AS_OF), ("pB", "lifecycle:new", earlier, None),
                          ("pGone", "big", earlier, AS_OF)]), label="Memberships")
    p.run().wait_until_finish()
