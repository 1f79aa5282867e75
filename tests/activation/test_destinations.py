"""Destinations' configuration, field policies and the webhook's signing and retry rules."""
from __future__ import annotations

import email.utils
import time

import pytest

from cdpflow.activation.destinations import destinations_from_config
from cdpflow.activation.destinations.webhook import retry_after_seconds, sign, verify_signature
from cdpflow.activation.policy import FieldPolicy, sha256_hex
from cdpflow.errors import BadInput

PROFILE = {"profile_id": "p1", "email": "Ann@Example.org", "phone": "+15551234567", "user_id": "u1",
           "traits": {"first_name": "Ann", "email": "Ann@Example.org", "plan": "pro"}}


def test_a_policy_passes_only_what_it_names_and_hashes_what_it_must():
    policy = FieldPolicy.from_config({"identifiers": ["user_id"], "hashed": ["email"], "traits": ["first_name", "email"]},
                                     "x")
    assert policy.profile_view(PROFILE) == {"user_id": "u1", "email_sha256": sha256_hex("ann@example.org"),
                                            "traits": {"first_name": "Ann"}}
    assert FieldPolicy.from_config(None, "x").profile_view(PROFILE) == {}


@pytest.mark.parametrize("fields, message", [
    ({"identifier": ["email"]}, "unknown key"),
    ({"identifiers": ["cookie"]}, "not one of"),
    ({"traits": "first_name"}, "list of names"),
])
def test_a_wrong_policy_is_refused_with_its_path(fields, message):
    with pytest.raises(BadInput, match=message):
        FieldPolicy.from_config(fields, "activation.destinations.crm")


def test_destinations_are_checked_when_built(monkeypatch):
    config = {"activation": {"destinations": {"crm": {"type": "webhook", "url": "https://crm.example.com/h",
                                                      "secret_env": "CRM_SECRET"}}}}
    with pytest.raises(BadInput, match="CRM_SECRET is not set"):
        destinations_from_config(config)
    monkeypatch.setenv("CRM_SECRET", "s")
    assert list(destinations_from_config(config)) == ["crm"]
    with pytest.raises(BadInput, match="no destination 'ads'"):
        destinations_from_config(config, ["ads"])
    for bad, message in (({"type": "fax"}, "not a destination type"),
                         ({"type": "webhook", "url": "ftp://x", "secret": "s"}, "http:// or https://"),
                         ({"type": "webhook", "url": "http://x", "secret": "s", "max_attempts": 0}, "above 0"),
                         ({"type": "webhook", "url": "http://x", "secret": "s", "retries": 3}, "unknown key")):
        with pytest.raises(BadInput, match=message):
            destinations_from_config({"activation": {"destinations": {"d": bad}}})


def test_the_signature_is_an_hmac_of_the_exact_body():
    body = b'{"a":1}'
    header = sign(b"secret", body)
    assert header.startswith("sha256=") and verify_signature(b"secret", body, header)
    assert not verify_signature(b"secret", b'{"a":2}', header)
    assert not verify_signature(b"other", body, header) and not verify_signature(b"secret", body, None)


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_seconds("7") == 7.0
    now = time.time()
    assert 29 <= retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) <= 31
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_an_email_audience_needs_the_email_in_clear_and_an_api_key(monkeypatch):
    base = {"type": "email_audience", "base_url": "https://mail.example.com/api", "api_key_env": "MAIL_KEY"}
    monkeypatch.setenv("MAIL_KEY", "k")
    with pytest.raises(BadInput, match="must include email"):
        destinations_from_config({"activation": {"destinations": {"mail": base}}})
    with pytest.raises(BadInput, match="must include email"):
        destinations_from_config({"activation": {"destinations": {"mail": dict(base, fields={"hashed": ["email"]})}}})
    built = destinations_from_config({"activation": {"destinations": {"mail": dict(
        base, fields={"identifiers": ["email"]}, audiences={"high_value": "aud_1"})}}})["mail"]
    assert built.audience_of("high_value") == "aud_1" and built.audience_of("vip") == "vip"
    monkeypatch.delenv("MAIL_KEY")
    with pytest.raises(BadInput, match="MAIL_KEY is not set"):
        destinations_from_config({"activation": {"destinations": {"mail": dict(base, fields={"identifiers": ["email"]})}}})


@pytest.mark.parametrize("profile, consented", [
    ({"unsubscribed": False, "traits": {}}, True),
    ({"unsubscribed": True, "traits": {}}, False),
    ({"unsubscribed": False, "traits": {"marketing_consent": False}}, False),
    ({"unsubscribed": False, "traits": {"email_opt_in": "no"}}, False),
    ({"unsubscribed": False, "traits": {"marketing_consent": "withdrawn"}}, False),
    ({"unsubscribed": False, "traits": {"marketing_consent": True}}, True),
    (None, False),
])
def test_the_consent_rule(profile, consented):
    from cdpflow.activation.consent import email_consent
    assert email_consent(profile) is consented


def test_an_unreachable_profile_store_is_said_in_words(tmp_path, monkeypatch, capsys):
    from cdpflow.cli import main
    from cdpflow.stack.base import free_port
    config = tmp_path / "activation.yaml"
    config.write_text("activation:\n  destinations:\n    crm: {type: webhook, url: 'http://127.0.0.1:9/h', secret: s}\n")
    monkeypatch.setenv("CDPFLOW_SUPPRESSION_SECRET", "a-secret-for-tests")
    assert main(["serve", "sidecar", "--config", str(config), "--bootstrap", f"127.0.0.1:{free_port()}",
                 "--profile-store", f"redis://127.0.0.1:{free_port()}/0"]) == 2
    assert "does not answer" in capsys.readouterr().err
