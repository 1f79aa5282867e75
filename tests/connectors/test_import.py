"""`cdpflow import crm|pos`: files of other systems become tracking events the pipeline resolves.

A CRM export (CSV) and a POS file (JSON lines, loyalty cards, local times) with good and bad
rows: the good ones become profiles with the CRM's identifiers and traits and the shop's orders,
the bad ones dead letters naming their row, and importing again changes nothing.
"""
import uuid

import duckdb
import orjson
import pytest

from cdpflow.cli import main

pytestmark = pytest.mark.e2e

CRM = """customer_no,email,mobile,fname,town,dob,updated_at
C-1, Ann.Lee@Mailbox.de ,(415) 555-0101,Ann,Berlin,1990-02-03,2026-09-01T10:00:00Z
C-2,bob@shop.test,,Bob,Paris,,2026-09-02
C-3,,,Nobody,Rome,,not a date
,,,,Nowhere,,2026-09-03T00:00:00Z
"""
CRM_MAPPING = """
source: store-crm
timestamp: updated_at
identifiers: {user_id: customer_no, email: email, phone: mobile}
traits: {first_name: fname, city: town, birthday: dob}
"""
POS_MAPPING = """
source: tills
timestamp: sold_at
timezone: Europe/Berlin
identifiers: {loyalty_id: card, email: email}
order_id: receipt
revenue: total
default_currency: EUR
"""


def pos_lines():
    rows = [{"receipt": "R-100", "card": "L-77", "email": "ann.lee@mailbox.de", "total": "19.90", "sold_at": "2026-09-05T18:30:00"},
            {"receipt": "R-101", "card": "L-77", "email": "", "total": "5.00", "sold_at": "2026-09-06T09:00:00"},
            {"receipt": "R-102", "card": "L-99", "email": "", "total": "lots", "sold_at": "2026-09-06T09:00:00"}]
    return b"".join(orjson.dumps(r) + b"\n" for r in rows) + b"[not, an object]\n"


def read_jsonl(path):
    return [orjson.loads(line) for line in open(path, "rb") if line.strip()]


def test_crm_and_pos_files_become_profiles_and_a_reimport_changes_nothing(tmp_path):
    (tmp_path / "crm.csv").write_text(CRM)
    (tmp_path / "crm.yaml").write_text(CRM_MAPPING)
    (tmp_path / "pos.jsonl").write_bytes(pos_lines())
    (tmp_path / "pos.yaml").write_text(POS_MAPPING)
    crm_out, pos_out = tmp_path / "events" / "crm.jsonl", tmp_path / "events" / "pos.jsonl"
    assert main(["import", "crm", str(tmp_path / "crm.csv"), "--mapping", str(tmp_path / "crm.yaml"),
                 "--to", str(crm_out)]) == 0
    assert main(["import", "pos", str(tmp_path / "pos.jsonl"), "--mapping", str(tmp_path / "pos.yaml"),
                 "--to", str(pos_out)]) == 0
    crm, pos = read_jsonl(crm_out), read_jsonl(pos_out)
    assert [e["userId"] for e in crm] == ["C-1", "C-2"]
    assert crm[0]["traits"] == {"first_name": "Ann", "city": "Berlin", "birthday": "1990-02-03",
                                "email": "Ann.Lee@Mailbox.de", "phone": "(415) 555-0101"}
    assert crm[0]["context"]["source"] == {"name": "store-crm"} and crm[1]["timestamp"] == "2026-09-02T00:00:00.000Z"
    assert [e["properties"]["order_id"] for e in pos] == ["R-100", "R-101"]
    assert pos[0]["timestamp"] == "2026-09-05T16:30:00.000Z"  # Berlin summer time, read as local
    assert pos[0]["context"]["externalIds"] == [{"id": "L-77", "type": "loyalty_id", "collection": "users",
                                                 "encoding": "none"}]
    # every bad row is a dead letter with its row number (CSV rows count from 2, under the header)
    crm_letters = read_jsonl(tmp_path / "events" / "crm.deadletters.jsonl")
    pos_letters = read_jsonl(tmp_path / "events" / "pos.deadletters.jsonl")
    assert [(l["row"], l["stage"]) for l in crm_letters] == [(4, "map"), (5, "normalize")]
    assert [(l["row"], l["stage"]) for l in pos_letters] == [(3, "validate"), (4, "parse")]
    assert all(l["raw"] and l["error"] for l in crm_letters + pos_letters)

    # the same rows imported again are the same events to the byte
    again = tmp_path / "again.jsonl"
    assert main(["import", "crm", str(tmp_path / "crm.csv"), "--mapping", str(tmp_path / "crm.yaml"),
                 "--to", str(again)]) == 0
    assert again.read_bytes() == crm_out.read_bytes()

    # through the pipeline: the card's purchases and the CRM person are one profile
    wh = tmp_path / "wh.duckdb"
    assert main(["run", "--input", str(tmp_path / "events" / "crm.jsonl"), str(pos_out), "--warehouse", str(wh)]) == 0
    con = duckdb.connect(str(wh), read_only=True)
    ann = con.execute("SELECT profile_id FROM identity_links WHERE identifier_type = 'user_id' AND identifier_value = 'C-1'"
                      ).fetchone()[0]
    ids = {tuple(r) for r in con.execute("SELECT identifier_type, identifier_value FROM identity_links "
                                         "WHERE profile_id = ?", [ann]).fetchall()}
    assert ids == {("user_id", "C-1"), ("email", "ann.lee@mailbox.de"), ("phone", "+14155550101"), ("loyalty_id", "L-77")}
    orders, city = con.execute("SELECT orders_total, traits->>'city' FROM profiles WHERE profile_id = ?", [ann]).fetchone()
    revenue, currencies = con.execute("SELECT sum(revenue), list(DISTINCT currency) FROM events WHERE profile_id = ? "
                                      "AND event = 'Order Completed'", [ann]).fetchone()
    assert (orders, float(revenue), currencies, city) == (2, 24.9, ["EUR"], "Berlin")
    con.close()
    # a re-import through the pipeline: nothing new
    assert main(["run", "--input", str(again), "--warehouse", str(wh)]) == 0
    con = duckdb.connect(str(wh), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == len(crm) + len(pos)
    con.close()


def test_bad_mappings_are_clear_errors(tmp_path, capsys):
    (tmp_path / "crm.csv").write_text(CRM)
    (tmp_path / "m.yaml").write_text("identifiers: {user_id: customer_no}\nsource: x\ntimestamp: updated_at\ncolums: {}\n")
    assert main(["import", "crm", str(tmp_path / "crm.csv"), "--mapping", str(tmp_path / "m.yaml"),
                 "--to", str(tmp_path / "o.jsonl")]) == 2
    assert "unknown key(s) colums" in " ".join(capsys.readouterr().err.split())  # (the console wraps lines)
    (tmp_path / "p.yaml").write_text("identifiers: {loyalty_id: card}\ntimestamp: sold_at\n")
    assert main(["import", "pos", str(tmp_path / "crm.csv"), "--mapping", str(tmp_path / "p.yaml"),
                 "--to", str(tmp_path / "o.jsonl")]) == 2
    assert "order_id" in " ".join(capsys.readouterr().err.split())
    assert main(["import", "crm", str(tmp_path / "none.csv"), "--mapping", str(tmp_path / "m.yaml"),
                 "--to", str(tmp_path / "o.jsonl")]) == 2


def test_import_to_kafka_keys_events_by_person_and_dead_letters_to_their_topic(tmp_path, kafka_bootstrap):
    from kafka import KafkaConsumer
    run = uuid.uuid4().hex[:8]
    (tmp_path / "crm.csv").write_text(CRM.replace("C-1", f"C-1-{run}").replace("C-3", f"C-3-{run}"))
    (tmp_path / "crm.yaml").write_text(CRM_MAPPING)
    assert main(["import", "crm", str(tmp_path / "crm.csv"), "--mapping", str(tmp_path / "crm.yaml"),
                 "--to", "kafka", "--bootstrap", kafka_bootstrap]) == 0
    found = {}
    for topic in ("cdp.events.raw", "cdp.events.deadletter"):
        consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                                 group_id=f"t-{run}-{topic}", consumer_timeout_ms=3000)
        found[topic] = [(r.key.decode(), orjson.loads(r.value)) for r in consumer if run.encode() in r.value]
        consumer.close()
    assert [(k, e["userId"]) for k, e in found["cdp.events.raw"]] == [(f"C-1-{run}", f"C-1-{run}")]
    assert [e["row"] for _, e in found["cdp.events.deadletter"]] == [4]
