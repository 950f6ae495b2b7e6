"""Sending domains (API, CLI, live DNS check, doctor), recipient keys (upload checks, search by
address in the body, expiry flags), the security preview and the MTA-STS policy route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.core import clock

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def key(sender, delivery_queue):
    return sender.key()


def audit(session, org_id, action):
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.org_id == org_id, AuditEvent.action == action)
                                .order_by(AuditEvent.chain, AuditEvent.seq)))  # in the order written


def publish(dns, records: list[dict]) -> None:
    """Put a domain's records into the local DNS server, as its owner would (and forget the
    cached "does not exist" answers, as their TTL would)."""
    from carepost.delivery import dns as cpdns

    cpdns.reset()
    for r in records:
        if r["type"] == "TXT":
            value = r["value"]
            chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
            dns.add(r["name"], "TXT", " ".join(f'"{c}"' for c in chunks))
        elif r["type"] == "MX":
            dns.add(r["name"], "MX", r["value"] + ".")
        else:  # the CNAME to the web host; the test DNS server answers its address directly
            dns.add(r["name"], "A", "127.0.0.1")


# --------------------------------------------------------------------------- sending domains


def test_add_list_read_check_delete(client, sender, key, session, delivery_env):
    r = client.post("/api/v1/domains", json={"domain": "Clinic.Example"}, headers=key)
    assert r.status_code == 201, r.text
    domain = r.json()
    assert domain["domain"] == "clinic.example" and domain["dns_ok"] is False and domain["checks"] == []
    records = {x["purpose"]: x for x in domain["records"]}
    assert set(records) == {"dkim", "dkim-ed25519", "spf", "dmarc", "return-path-mx", "tls-rpt", "mta-sts", "mta-sts-host"}
    dkim_txt = records["dkim"]["value"]
    assert dkim_txt.startswith("v=DKIM1; k=rsa; p=") and len(dkim_txt) > 380  # the RSA-2048 key, in full
    assert records["dkim"]["name"] == f"{domain['selector']}._domainkey.clinic.example"
    assert records["return-path-mx"]["name"] == "bounces.clinic.example"

    assert client.post("/api/v1/domains", json={"domain": "clinic.example"}, headers=key).status_code == 409
    bad = client.post("/api/v1/domains", json={"domain": "not a domain"}, headers=key)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "domain"
    listed = client.get("/api/v1/domains", headers=key).json()["data"]
    assert sorted(d["domain"] for d in listed) == ["bar.example", "clinic.example"]

    # Nothing published yet: every record fails, with its reason.
    checked = client.post(f"/api/v1/domains/{domain['id']}/check", headers=key).json()
    assert checked["dns_ok"] is False and all(not c["ok"] for c in checked["checks"])
    assert {c["purpose"]: c["detail"] for c in checked["checks"]}["dkim"] == "not published"

    publish(delivery_env.dns, domain["records"])
    checked = client.post(f"/api/v1/domains/{domain['id']}/check", headers=key).json()
    assert checked["dns_ok"] is True, [c for c in checked["checks"] if not c["ok"]]
    assert client.get(f"/api/v1/domains/{domain['id']}", headers=key).json()["dns_ok"] is True
    assert [e.details["dns_ok"] for e in audit(session, sender.org_id, "sending_domain.check")] == [False, True]

    assert client.delete(f"/api/v1/domains/{domain['id']}", headers=key).status_code == 204
    assert client.get(f"/api/v1/domains/{domain['id']}", headers=key).status_code == 404
    assert [e.details["domain"] for e in audit(session, sender.org_id, "sending_domain.delete")] == ["clinic.example"]


def test_domains_need_domains_manage_and_stay_in_their_organization(client, sender, session):
    from carepost.accounts.service import create_organization
    from tests.fixtures.delivery import Sender

    sending_only = sender.key("messages:send")
    assert client.get("/api/v1/domains", headers=sending_only).status_code == 403
    other = create_organization(session, "Foo Health")
    session.commit()
    theirs = Sender(other.id, "", session).key("domains:manage")
    assert client.get(f"/api/v1/domains/{sender.domain_id}", headers=theirs).status_code == 404
    assert client.delete(f"/api/v1/domains/{sender.domain_id}", headers=theirs).status_code == 404
    assert client.get("/api/v1/domains", headers=theirs).json()["data"] == []
    # A domain whose ownership one organization proved cannot be claimed by another (issue 9
    # item 2): 409 naming the field, without naming the organization that holds it.
    taken = client.post("/api/v1/domains", json={"domain": "bar.example"}, headers=theirs)
    assert taken.status_code == 409 and taken.json()["error"]["field"] == "domain"
    assert taken.json()["error"]["code"] == "domain_taken" and sender.org_id not in taken.text


def test_mta_sts_policy_is_public_text(client, monkeypatch):
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_SMTP_HELO_NAME", "mail.carepost.example")
    reset_settings()
    r = client.get("/.well-known/mta-sts.txt")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == "version: STSv1\nmode: enforce\nmx: mail.carepost.example\nmax_age: 604800\n"


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAREPOST_LOG_JSON": "true", "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "carepost.cli", *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=120)


def test_cli_domain_add_prints_the_records_and_check_reports_each(storage, org, session, delivery_env):
    from carepost.core.database import org_session
    from carepost.delivery import service

    added = cli("domain", "add", "news.example", "--org", org.slug, env_extra=storage.env)
    assert added.returncode == 0, added.stderr
    with org_session(org.id) as s:
        row = service.get_sending_domain(s, "news.example")
        records = [r.__dict__ for r in service.records_to_check(row)]
    dkim = next(r for r in records if r["purpose"] == "dkim")
    assert dkim["value"] in added.stdout.replace("\n", "")  # the DKIM TXT record in full, unbroken
    assert "bounces.news.example" in added.stdout and "carepost domain check news.example" in added.stdout
    ownership = next(r for r in records if r["purpose"] == "ownership")
    assert ownership["name"] == "_carepost-challenge.news.example" and ownership["value"] in added.stdout

    failing = cli("domain", "check", "news.example", "--org", org.slug, env_extra=storage.env)
    assert failing.returncode == 1 and "fail" in failing.stdout
    publish(delivery_env.dns, records)
    passing = cli("domain", "check", "news.example", "--org", org.slug, env_extra=storage.env)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "All records check out." in passing.stdout
    listed = cli("domain", "list", "--org", org.slug, env_extra=storage.env)
    assert "news.example" in listed.stdout and "ok" in listed.stdout and "proven" in listed.stdout
    assert [e.details["via"] for e in audit(session, org.id, "sending_domain.verify")] == ["cli"]
    missing = cli("domain", "check", "nope.example", "--org", org.slug, env_extra=storage.env)
    assert missing.returncode == 1 and "No such sending domain" in missing.stderr
    assert [e.action for e in audit(session, org.id, "sending_domain.create")] == ["sending_domain.create"]


def test_doctor_flags_unverified_domains_and_outbound_overrides(sender, delivery_env):
    from carepost.core.config import Settings, get_settings
    from carepost.doctor import check_outbound_overrides, check_sending_domains

    [finding] = check_sending_domains(get_settings())
    assert finding.level == "warn" and "bar.example" in finding.message
    overrides = check_outbound_overrides(get_settings())  # the delivery_env sets all four
    assert sorted(f.message.split(" ")[0] for f in overrides) == [
        "CAREPOST_DNS_NAMESERVERS", "CAREPOST_EXTRA_CA_FILE", "CAREPOST_MTA_STS_OVERRIDES", "CAREPOST_MX_OVERRIDES"]
    assert all(f.level == "warn" for f in overrides)
    clean = Settings(dns_nameservers=None, mx_overrides=None, mta_sts_overrides=None, extra_ca_file=None)
    assert check_outbound_overrides(clean) == []


# --------------------------------------------------------------------------- recipient keys


def test_recipient_keys_upload_search_list_delete(client, sender, key, session, gpg, smime_ca):
    pgp = gpg.gen_key("Pat Doe <pat@valid.test>")
    r = client.post("/api/v1/recipient-keys", json={"address": "pat@valid.test", "kind": "pgp", "key": pgp}, headers=key)
    assert r.status_code == 201, r.text
    pgp_key = r.json()
    assert pgp_key["kind"] == "pgp" and len(pgp_key["fingerprint"]) == 40 and pgp_key["expiring_soon"] is False
    cert = smime_ca.issue("pat@valid.test", days=800)
    r = client.post("/api/v1/recipient-keys", json={"address": "pat@valid.test", "kind": "smime", "key": cert.pem}, headers=key)
    assert r.status_code == 201, r.text

    found = client.post("/api/v1/recipient-keys/search", json={"address": "PAT@valid.test"}, headers=key).json()
    assert sorted(k["kind"] for k in found["data"]) == ["pgp", "smime"] and found["data"][0]["address"] == "PAT@valid.test"
    masked = client.post("/api/v1/recipient-keys/search", json={"address": "pat@valid.test"},
                         headers=sender.key("messages:read")).json()
    assert {k["address"] for k in masked["data"]} == {"p***@valid.test"}
    assert client.post("/api/v1/recipient-keys/search", json={"address": "lee@valid.test"}, headers=key).json()["data"] == []

    listed = client.get("/api/v1/recipient-keys", headers=key).json()
    assert len(listed["data"]) == 2 and listed["expiring_soon"] == 0
    clock.advance(timedelta(days=340))  # the gpg key expires after a year
    soon = client.get("/api/v1/recipient-keys?expiring_only=true", headers=key).json()
    assert [k["kind"] for k in soon["data"]] == ["pgp"] and soon["expiring_soon"] == 1 and soon["data"][0]["expiring_soon"]
    clock.reset()

    assert client.delete(f"/api/v1/recipient-keys/{pgp_key['id']}", headers=key).status_code == 204
    assert client.delete(f"/api/v1/recipient-keys/{pgp_key['id']}", headers=key).status_code == 404
    actions = [e.action for e in audit(session, sender.org_id, "recipient_key.create")]
    assert actions == ["recipient_key.create"] * 2
    assert "pat@" not in json.dumps([e.details for e in audit(session, sender.org_id, "recipient_key.search")])


def test_recipient_key_upload_refusals_say_what_is_wrong(client, sender, key, gpg, smime_ca):
    other = gpg.gen_key("Lee <lee@valid.test>")
    cases = [
        ({"address": "pat@valid.test", "kind": "pgp", "key": other}, "key", "User ID"),
        ({"address": "pat@valid.test", "kind": "pgp", "key": "not a key"}, "key", None),
        ({"address": "pat@valid.test", "kind": "smime", "key": smime_ca.issue("lee@valid.test").pem}, "key", "address"),
        ({"address": "pat@valid.test", "kind": "smime", "key": smime_ca.issue("pat@valid.test", key="ec:P-256").pem}, "key", "RSA"),
        ({"address": "not an address", "kind": "pgp", "key": other}, "address", None),
        ({"address": "pat@valid.test", "kind": "x509", "key": other}, "kind", None),
        ({"address": "pat@valid.test", "kind": "pgp", "key": other, "extra": 1}, "extra", None),
    ]
    for payload, field, words in cases:
        r = client.post("/api/v1/recipient-keys", json=payload, headers=key)
        assert r.status_code == 422, (payload["kind"], r.text)
        error = r.json()["error"]
        assert error["field"] == field, error
        if words:
            assert words.lower() in error["message"].lower(), error
        assert "pat@" not in r.text


# --------------------------------------------------------------------------- security preview


def test_security_preview(client, sender, key, session, delivery_env, gpg):
    cert = gpg.gen_key("Kim <kim@plain.test>")
    client.post("/api/v1/recipient-keys", json={"address": "kim@plain.test", "kind": "pgp", "key": cert}, headers=key)
    r = client.post("/api/v1/security-preview",
                    json={"addresses": ["pat@valid.test", "lee@plain.test", "kim@plain.test", "sam@expired.test"]}, headers=key)
    assert r.status_code == 200, r.text
    rows = {x["address"]: x for x in r.json()["recipients"]}
    assert (rows["pat@valid.test"]["method"], rows["lee@plain.test"]["method"], rows["kim@plain.test"]["method"],
            rows["sam@expired.test"]["method"]) == ("tls", "portal", "pgp", "portal")
    assert "STARTTLS" in rows["lee@plain.test"]["reason"] and all(x["mode"] == "tls_required" for x in rows.values())

    exclusive = client.post("/api/v1/security-preview", json={"addresses": ["lee@plain.test"], "security": "tls_exclusive"},
                            headers=key).json()["recipients"][0]
    assert exclusive["method"] == "none" and exclusive["reason"].startswith("not sent")
    lower = client.post("/api/v1/security-preview", json={"addresses": ["pat@valid.test"], "security": "opportunistic"},
                        headers=key)
    assert lower.status_code == 422 and lower.json()["error"]["field"] == "security"
    bad = client.post("/api/v1/security-preview", json={"addresses": ["pat@valid.test", "nope"]}, headers=key)
    assert bad.status_code == 422 and "addresses" in bad.json()["error"]["field"] and "nope" not in bad.text
    [event, *_] = audit(session, sender.org_id, "message.security_preview")
    assert event.details["count"] == 4 and "valid.test" not in json.dumps(event.details)
