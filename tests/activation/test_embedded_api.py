"""The profile API of the embedded demo: `cdpflow serve api --warehouse FILE`, no Redis or Kafka.

Every answer is checked against the warehouse's tables read with DuckDB directly; the forget is
checked in the warehouse, its identity store, and against a replay of the same input.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest
from fastapi.testclient import TestClient

from cdpflow.activation import api
from cdpflow.activation.warehouse_store import WarehouseProfileStore
from cdpflow.cli import main
from cdpflow.config import load_config
from cdpflow.core.governance import DEMO_ENV
from cdpflow.core.identity import open_identity_store
from cdpflow.stack.base import free_port
from cdpflow.synthetic import generate
from tests.warehouse.helpers import query


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedded-api")
    sample = folder / "sample"
    generate(sample, customers=30, days=60, seed=8)
    warehouse = folder / "cdp.duckdb"
    mp = pytest.MonkeyPatch()
    mp.setenv(DEMO_ENV, "1")
    run = ["run", "--input", str(sample / "events"), "--warehouse", str(warehouse),
           "--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv")]
    assert main(run) == 0
    yield warehouse, run
    mp.undo()


def _client(warehouse):
    config = load_config(None)
    demo_key, = api.keys_from_config(config, api.demo_key_file(str(warehouse)))
    # the demo key's own limit (50/s) is tested elsewhere; these tests ask faster
    keys = [api.ApiKey("demo", demo_key.secret, list(demo_key.scopes), 100_000.0)]
    store = WarehouseProfileStore(str(warehouse), config)
    app = api.create_api(store, keys, config, None, lambda pid: store.forget(pid)["unconfirmed"])
    key = demo_key.secret.decode()
    return TestClient(app), {"Authorization": f"Bearer {key}"}


def test_the_demo_key_is_made_once_beside_the_warehouse_and_only_in_the_demo(demo, monkeypatch):
    warehouse, _ = demo
    path = api.demo_key_file(str(warehouse))
    first = api.keys_from_config(load_config(None), path)
    assert [k.name for k in first] == ["demo"] and first[0].scopes == set(api.SCOPES)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert api.keys_from_config(load_config(None), path)[0].secret == first[0].secret
    monkeypatch.delenv(DEMO_ENV)
    with pytest.raises(Exception, match="no API keys configured"):
        api.keys_from_config(load_config(None), path)


def test_profiles_lookups_and_segments_are_the_warehouses(demo):
    warehouse, _ = demo
    client, auth = _client(warehouse)
    rows = query(warehouse, "SELECT profile_id, email, event_count, revenue_total::VARCHAR, epoch_us(as_of) "
                              "FROM profiles ORDER BY profile_id")
    assert rows
    for profile_id, email, events, revenue, as_of in rows:
        got = client.get(f"/v1/profiles/{profile_id}", headers=auth).json()
        assert (got["profile_id"], got["email"], got["event_count"], got["as_of"]) == (profile_id, email, events, as_of)
        assert (got["revenue_total"] is None and revenue is None) or float(got["revenue_total"]) == float(revenue)
    # every identifier of every kind finds its profile, as identity_links says
    links = query(warehouse, "SELECT identifier_type, identifier_value, profile_id FROM identity_links "
                               "WHERE identifier_type IN ('email', 'user_id', 'anonymous_id', 'loyalty_id')")
    assert {kind for kind, _, _ in links} >= {"email", "user_id", "anonymous_id"}
    for kind, value, profile_id in links:
        asked = value.upper() if kind == "email" else value
        found = client.get("/v1/profiles", params={kind: asked}, headers=auth)
        assert found.status_code == 200 and found.json()["profile_id"] == profile_id, (kind, value)
    assert client.get("/v1/profiles", params={"anonymous_id": "nobody-has-this"}, headers=auth).status_code == 404
    # segments and their members: the open memberships
    open_rows = query(warehouse, "SELECT segment, profile_id FROM segment_memberships WHERE exited_at IS NULL")
    sizes = {}
    for segment, _ in open_rows:
        sizes[segment] = sizes.get(segment, 0) + 1
    listed = client.get("/v1/segments", headers=auth).json()["segments"]
    assert {s["name"]: s["members"] for s in listed} == sizes
    segment = max(sizes, key=sizes.get)
    members, cursor = [], None
    while True:
        page = client.get(f"/v1/segments/{segment}/members", params={"limit": 3, **({"cursor": cursor} if cursor else {})},
                          headers=auth).json()
        members += page["members"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert members == sorted(p for s, p in open_rows if s == segment)
    # classifying a stored profile by the rules gives the segments the run gave it (money compared as numbers)
    for (profile_id, *_rest) in rows:
        classified = client.post("/v1/classify", json={"profile_id": profile_id}, headers=auth).json()["segments"]
        assert classified == sorted(s for s, p in open_rows if p == profile_id), profile_id
    some = open_rows[0][1]
    assert client.get(f"/v1/profiles/{some}/segments", headers=auth).json()["segments"] == \
        sorted(s for s, p in open_rows if p == some)


def test_the_forget_runs_on_the_warehouse_and_a_replay_does_not_bring_them_back(demo):
    warehouse, run = demo
    client, auth = _client(warehouse)
    (profile_id, email), = query(warehouse, "SELECT profile_id, email FROM profiles WHERE email IS NOT NULL "
                                              "ORDER BY event_count DESC LIMIT 1")
    identifiers = query(warehouse, "SELECT identifier_type, identifier_value FROM identity_links "
                                     "WHERE profile_id = ?", [profile_id])
    anonymous = next(v for t, v in identifiers if t == "anonymous_id")
    suppressed_before = query(warehouse, "SELECT count(*) FROM identity_suppressions")[0][0]
    done = client.delete(f"/v1/profiles/{profile_id}", headers=auth)
    assert done.status_code == 200 and done.json() == {"profile_id": profile_id, "forgotten": True, "unconfirmed": []}
    assert client.get(f"/v1/profiles/{profile_id}", headers=auth).status_code == 404
    assert client.get("/v1/profiles", params={"email": email}, headers=auth).status_code == 404
    assert client.get("/v1/profiles", params={"anonymous_id": anonymous}, headers=auth).status_code == 404
    for table in ("profiles", "identity_links", "events", "segment_memberships"):
        assert query(warehouse, f"SELECT count(*) FROM {table} WHERE profile_id = ?", [profile_id])[0][0] == 0, table
    assert query(warehouse, "SELECT count(*) FROM identity_suppressions")[0][0] == suppressed_before + len(identifiers)
    # the identity store kept with the warehouse forgot them too
    identity = open_identity_store("sqlite://" + str(warehouse).replace(".duckdb", ".identity.sqlite"))
    try:
        assert all(identity.profile_of(tuple(i)) is None for i in identifiers)
    finally:
        identity.close()
    # the same input again: the person stays forgotten, in the warehouse and in the API (which reads it anew)
    assert main(run) == 0
    assert query(warehouse, "SELECT count(*) FROM identity_links WHERE identifier_value = ?", [email])[0][0] == 0
    assert query(warehouse, "SELECT count(*) FROM identity_links WHERE identifier_value = ?", [anonymous])[0][0] == 0
    time.sleep(1.1)  # the store looks at the file at most once a second
    assert client.get("/v1/profiles", params={"email": email}, headers=auth).status_code == 404
    assert client.get("/v1/profiles", params={"anonymous_id": anonymous}, headers=auth).status_code == 404
    # and a profile the run changed is read anew: the snapshot follows the file
    (other, events), = query(warehouse, "SELECT profile_id, event_count FROM profiles ORDER BY profile_id LIMIT 1")
    assert client.get(f"/v1/profiles/{other}", headers=auth).json()["event_count"] == events


def test_serve_api_on_the_demo_warehouse_answers_over_http(demo, tmp_path):
    warehouse, _ = demo
    copy = tmp_path / "cdp.duckdb"
    shutil.copy(warehouse, copy)
    port = free_port()
    env = {**os.environ, DEMO_ENV: "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cdpflow.cli", "serve", "api", "--warehouse", str(copy),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    assert orjson.loads(answer.read())["status"] == "ok"
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the API did not start"
                time.sleep(0.3)
        key = (tmp_path / "cdp.api.key").read_text().strip()
        asked = urllib.request.Request(f"http://127.0.0.1:{port}/v1/segments", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(asked, timeout=5) as answer:
            listed = orjson.loads(answer.read())["segments"]
        sizes = dict(query(copy, "SELECT segment, count(*) FROM segment_memberships WHERE exited_at IS NULL "
                                   "GROUP BY segment"))
        assert {s["name"]: s["members"] for s in listed} == sizes
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert b"Traceback" not in proc.stderr.read()


def test_serve_api_without_keys_outside_the_demo_says_so(demo, tmp_path, monkeypatch, capsys):
    warehouse, _ = demo
    monkeypatch.delenv(DEMO_ENV)
    assert main(["serve", "api", "--warehouse", str(warehouse), "--port", str(free_port())]) == 2
    assert "no API keys configured" in capsys.readouterr().err
