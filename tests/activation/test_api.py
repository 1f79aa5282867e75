"""The profile API over a Redis profile store seeded from a batch run of generated profiles.

Auth, scopes, PII redaction, lookups, pagination, classification, the forget, rate limits, and
schemathesis against the app's own OpenAPI document (every check, every operation).
"""
from __future__ import annotations

import time
import uuid

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CHECKS

from cdpflow.activation.api import ApiKey, create_api, redis_forgetter
from cdpflow.activation.profile_store import open_profile_store
from cdpflow.config import load_config
from cdpflow.core.identity import open_identity_store
from tests.activation.test_sidecar import _batch_run

FULL, READ, WRITE = "full-key-for-tests", "read-key-for-tests", "write-key-for-tests"
EVERY_CHECK = CHECKS.get_all()  # what `--checks all` runs


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    return (folder, *_batch_run(folder))


def _store(redis_url, profiles, changes):
    store = open_profile_store(f"{redis_url}?prefix=api-{uuid.uuid4().hex[:8]}")
    for row in profiles:
        store.apply_profile(row["profile_id"], row, row["as_of"], row["updated_at"])
    for change in changes:
        store.apply_change(change)
    return store


@pytest.fixture(scope="module")
def seeded_store(batch, redis_url):
    folder, _, profiles, changes = batch
    store = _store(redis_url, profiles, changes)
    identity = open_identity_store("sqlite://" + str(folder / "cdp.identity.sqlite"))
    yield store, profiles, changes, identity
    identity.close()
    store.close()


def _app(seeded_store, per_second=1000.0, sent=None):
    store, _, _, identity = seeded_store
    keys = [ApiKey("full", FULL.encode(), ["profiles:read", "pii:read", "write"], per_second),
            ApiKey("read", READ.encode(), ["profiles:read"], per_second),
            ApiKey("writer", WRITE.encode(), ["write"], per_second)]
    config = load_config(None)
    return create_api(store, keys, config, identity,
                      redis_forgetter(store, config, control=sent.append if sent is not None else None))


def _bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_keys_scopes_and_pii(seeded_store):
    _, profiles, _, _ = seeded_store
    client = TestClient(_app(seeded_store))
    person = next(p for p in profiles if p["email"] and p["first_name"])
    url = f"/v1/profiles/{person['profile_id']}"
    assert client.get(url).status_code == 401
    assert client.get(url, headers=_bearer("nope")).status_code == 401
    assert client.get(url, headers=_bearer(WRITE)).status_code == 403
    full = client.get(url, headers=_bearer(FULL)).json()
    assert full["email"] == person["email"] and full["first_name"] == person["first_name"]
    assert not full["pii_redacted"]
    redacted = client.get(url, headers={"X-API-Key": READ}).json()
    assert redacted["pii_redacted"] and all(redacted[f] is None for f in ("email", "phone", "user_id", "first_name",
                                                                         "last_name", "traits"))
    assert person["email"] not in client.get(url, headers={"X-API-Key": READ}).text
    assert redacted["segments"] == full["segments"] and redacted["event_count"] == full["event_count"]


def test_lookups_find_the_person_by_any_identifier(seeded_store):
    store, profiles, _, identity = seeded_store
    client = TestClient(_app(seeded_store))
    person = next(p for p in profiles if p["email"] and p["user_id"])
    by_email = client.get("/v1/profiles", params={"email": person["email"].upper()}, headers=_bearer(FULL))
    assert by_email.status_code == 200 and by_email.json()["profile_id"] == person["profile_id"]
    assert client.get("/v1/profiles", params={"user_id": person["user_id"]},
                      headers=_bearer(FULL)).json()["profile_id"] == person["profile_id"]
    # a lookup by a personal identifier needs the PII scope: it would confirm the person
    assert client.get("/v1/profiles", params={"email": person["email"]}, headers=_bearer(READ)).status_code == 403
    links = [link for link in identity.links() if link["identifier_type"] == "anonymous_id"]
    assert links
    link = links[0]
    found = client.get("/v1/profiles", params={"anonymous_id": link["identifier_value"]}, headers=_bearer(READ))
    assert found.status_code == 200 and found.json()["profile_id"] == identity.profile_of(("anonymous_id",
                                                                                           link["identifier_value"]))
    assert client.get("/v1/profiles", params={"email": "nobody@example.org"}, headers=_bearer(FULL)).status_code == 404
    assert client.get("/v1/profiles", headers=_bearer(FULL)).status_code == 400


def test_segment_members_page_through_exactly_the_memberships(seeded_store):
    _, profiles, changes, _ = seeded_store
    client = TestClient(_app(seeded_store))
    expected = {}
    for change in changes:  # the memberships the changes leave, worked out here from the changes
        members = expected.setdefault(change["segment"], set())
        (members.add if change["direction"] == "enter" else members.discard)(change["profile_id"])
    listed = {s["name"]: s["members"] for s in client.get("/v1/segments", headers=_bearer(READ)).json()["segments"]}
    assert listed == {name: len(m) for name, m in expected.items() if name in listed}
    assert {name for name, m in expected.items() if m} <= set(listed)
    for name, members in expected.items():
        if not members:
            continue
        seen, cursor = [], None
        while True:
            params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
            page = client.get(f"/v1/segments/{name}/members", params=params, headers=_bearer(READ)).json()
            seen += page["members"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(members)
    assert client.get("/v1/segments/no_such_segment/members", headers=_bearer(READ)).status_code == 404


def test_classify_by_features_and_by_profile(seeded_store):
    store, profiles, _, _ = seeded_store
    client = TestClient(_app(seeded_store))
    rich = client.post("/v1/classify", json={"features": {"clv_90d": 250.0}}, headers=_bearer(READ)).json()
    poor = client.post("/v1/classify", json={"features": {"clv_90d": 5.0}}, headers=_bearer(READ)).json()
    assert "predicted_high_value" in rich["segments"] and "predicted_high_value" not in poor["segments"]
    assert rich["rules_version"] and rich["model_version"] is None
    person = profiles[0]
    by_id = client.post("/v1/classify", json={"profile_id": person["profile_id"]}, headers=_bearer(READ)).json()
    assert by_id["profile_id"] == person["profile_id"]
    assert client.post("/v1/classify", json={}, headers=_bearer(READ)).status_code == 400
    assert client.post("/v1/classify", json={"profile_id": "p_none"}, headers=_bearer(READ)).status_code == 404


def test_the_forget_takes_the_write_scope_and_the_profile_is_gone(seeded_store):
    store, profiles, _, _ = seeded_store
    sent = []
    client = TestClient(_app(seeded_store, sent=sent))
    person = profiles[-1]
    url = f"/v1/profiles/{person['profile_id']}"
    assert client.delete(url, headers=_bearer(READ)).status_code == 403
    assert client.delete(url, headers=_bearer(WRITE)).json() == {"profile_id": person["profile_id"], "forgotten": True,
                                                                 "unconfirmed": []}
    assert sent == [person["profile_id"]]
    assert client.get(url, headers=_bearer(FULL)).status_code == 404
    assert store.is_forgotten(person["profile_id"])


def test_a_key_past_its_rate_limit_gets_429_with_retry_after(seeded_store):
    client = TestClient(_app(seeded_store, per_second=5.0))
    answers = [client.get("/v1/segments", headers=_bearer(READ)) for _ in range(8)]
    assert [a.status_code for a in answers[:5]] == [200] * 5
    limited = [a for a in answers if a.status_code == 429]
    assert limited and all(int(a.headers["Retry-After"]) >= 1 for a in limited)
    assert client.get("/health").json() == {"status": "ok", "profile_store": True}
    assert b"cdpflow_api_requests" in client.get("/metrics").content


def test_the_openapi_document_holds_for_every_operation(seeded_store):
    # schemathesis over the app's own document, every check; the key has every scope
    app = _app(seeded_store)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(headers=_bearer(FULL), checks=EVERY_CHECK)

        try:
            check()
        except Exception as err:  # noqa: BLE001 - collected: every operation is checked
            failures.append(f"{operation.label}: {str(err)[:1500]}")
    assert not failures, "\n\n".join(failures)


def test_a_person_forgotten_in_the_warehouse_is_gone_from_every_answer(batch, redis_url, tmp_path, monkeypatch):
    # `cdpflow forget` on the warehouse alone (the profile store not told): the API, governed by
    # the warehouse and its identity store, answers as if the person were gone, drops them from
    # member pages, and its sweep forgets them in the store (so segment sizes drop them too).
    from cdpflow.activation.service import governance_view
    from cdpflow.cli import main
    from tests.warehouse.helpers import copy_warehouse
    folder, warehouse, profiles, changes = batch
    monkeypatch.setenv("CDPFLOW_DEMO", "1")
    own = tmp_path / "cdp.duckdb"
    copy_warehouse(warehouse, own)
    store = _store(redis_url, profiles, changes)
    identity_uri = "sqlite://" + str(tmp_path / "cdp.identity.sqlite")
    config = load_config(None)
    app = create_api(store, [ApiKey("full", FULL.encode(), ["profiles:read", "pii:read", "write"], 1000.0)], config,
                     None, redis_forgetter(store, config), governance_view(config, str(own), identity_uri))
    client = TestClient(app)
    person = next(p for p in profiles if p["email"] and store.segments_of(p["profile_id"]))
    pid, segment = person["profile_id"], store.segments_of(person["profile_id"])[0]
    size = next(s["members"] for s in client.get("/v1/segments", headers=_bearer(FULL)).json()["segments"]
                if s["name"] == segment)
    assert client.get(f"/v1/profiles/{pid}", headers=_bearer(FULL)).status_code == 200
    assert main(["forget", f"email:{person['email']}", "--warehouse", str(own)]) == 0
    time.sleep(1.1)  # the API looks at the identity store at most once a second
    members = client.get(f"/v1/segments/{segment}/members", params={"limit": 1000}, headers=_bearer(FULL)).json()
    assert pid not in members["members"]
    assert client.get(f"/v1/profiles/{pid}", headers=_bearer(FULL)).status_code == 404
    assert client.get("/v1/profiles", params={"email": person["email"]}, headers=_bearer(FULL)).status_code == 404
    assert client.post("/v1/classify", json={"profile_id": pid}, headers=_bearer(FULL)).status_code == 404
    deadline = time.monotonic() + 10
    while not store.is_forgotten(pid):
        assert time.monotonic() < deadline, "the sweep did not forget them in the store"
        time.sleep(0.1)
    listed = {s["name"]: s["members"] for s in client.get("/v1/segments", headers=_bearer(FULL)).json()["segments"]}
    assert listed[segment] == size - 1
    # someone forgotten before the API started is out from its first answer
    other = next(p for p in profiles if p["email"] and p["profile_id"] != pid)
    assert main(["forget", f"email:{other['email']}", "--warehouse", str(own)]) == 0
    fresh = TestClient(create_api(store, [ApiKey("full", FULL.encode(), ["profiles:read", "pii:read"], 1000.0)],
                                  config, None, None, governance_view(config, str(own), None)))
    assert fresh.get(f"/v1/profiles/{other['profile_id']}", headers=_bearer(FULL)).status_code == 404
    store.close()
