import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from cdpflow.transforms.identity import EVENTS, LINKS, MERGES, ResolveIdentity
from tests.conftest import local_pipeline
from tests.transforms.helpers import normalized


def test_resolve_identity_joins_profiles_through_shared_identifiers():
    events = [
        normalized(messageId="1", anonymousId="cookie-1", timestamp="2026-03-01T10:00:00Z"),
        normalized(messageId="2", userId="u1", traits={"email": "a@x.com"}, timestamp="2026-03-02T10:00:00Z"),
        normalized(messageId="3", anonymousId="cookie-1", userId="u1", type="identify", timestamp="2026-03-03T10:00:00Z"),
        normalized(messageId="4", userId="u2", timestamp="2026-03-04T10:00:00Z"),
    ]
    p = local_pipeline()
    out = p | beam.Create(events) | ResolveIdentity()

    def groups(links):
        by_profile = {}
        for link in links:
            by_profile.setdefault(link["profile_id"], set()).add((link["identifier_type"], link["identifier_value"]))
        return sorted(sorted(g) for g in by_profile.values())

    assert_that(out[LINKS] | "AllLinks" >> beam.combiners.ToList() | "Groups" >> beam.Map(groups), equal_to([[
        [("anonymous_id", "cookie-1"), ("email", "a@x.com"), ("user_id", "u1")], [("user_id", "u2")]]]), label="Links")
    assert_that(out[MERGES] | "Cause" >> beam.Map(lambda m: m["cause_message_id"]), equal_to(["3"]), label="Merges")
    # Events 1-3 end on one profile (the survivor), event 4 on another.
    assert_that(out[EVENTS] | "Profiles" >> beam.Map(lambda e: (e.message_id, e.profile_id))
                | "AllPairs" >> beam.combiners.ToList()
                | "Check" >> beam.Map(lambda pairs: len({p for m, p in pairs if m in "123"}) == 1 and len({p for _, p in pairs}) == 2),
                equal_to([True]), label="Events")
    p.run().wait_until_finish()
