"""Sending domains, recipient keys, security preview and recorded outcomes, on both databases."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import dkim as dkimpy
import pytest
from sqlalchemy import select

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.database import org_session
from carepost.core.errors import Conflict, ValidationFailed
from carepost.core.ids import new_id
from carepost.delivery import dkim, service
from carepost.delivery.mime import compose
from carepost.delivery.models import Message, MessageEvent, MessageRecipient, RecipientKey, SendingDomain
from carepost.delivery.smtp import Evidence, RecipientResult


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def other_org(session):
    from carepost.accounts.service import create_organization

    o = create_organization(session, "Foo Health")
    session.commit()
    return o


@pytest.fixture(scope="module")
def pat_pgp(gpg):
    return gpg.gen_key("Pat Doe <pat@plain.test>")


def add_domain(org_id: str, name: str = "bar.example") -> str:
    with org_session(org_id) as s:
        row = service.create_sending_domain(s, org_id, name)
        s.commit()
        return row.id


# --- sending domains ---------------------------------------------------------------------------


def test_sending_domain_keys_encrypted_and_signing_verifies(db, org, session):
    domain_id = add_domain(org.id)
    raw = session.get(SendingDomain, domain_id)
    assert b"PRIVATE KEY" not in raw.dkim_rsa_private_enc and b"PRIVATE KEY" not in raw.dkim_ed25519_private_enc
    assert raw.return_path_domain == "bounces.bar.example" and raw.selector.startswith("cp")
    records = {r.purpose: r for r in service.dns_records(raw)}
    with org_session(org.id) as s:
        keys = service.dkim_keys(s, service.get_sending_domain(s, "BAR.example"))
    assert [k.algorithm for k in keys] == ["rsa-sha256", "ed25519-sha256"]
    message = compose(sender="news@bar.example", to=["pat@example.org"], subject="Hi", text="x").as_bytes()
    signed = dkim.sign(message, keys)
    published = {f"{r.name}.".encode(): r.value.encode() for r in records.values() if r.type == "TXT"}
    d = dkimpy.DKIM(signed)
    for i in (0, 1):
        assert d.verify(idx=i, dnsfunc=lambda name, timeout=5: published.get(name if isinstance(name, bytes) else name.encode()))


def test_sending_domain_validation_and_uniqueness(db, org, other_org):
    add_domain(org.id)
    with pytest.raises(Conflict):
        add_domain(org.id)
    add_domain(other_org.id)  # another organization may add the same name
    for bad in ("not a domain", "localhost", "-x.example"):
        with org_session(org.id) as s, pytest.raises(ValidationFailed) as err:
            service.create_sending_domain(s, org.id, bad)
        assert err.value.field == "domain"


def test_dns_records_are_exact(db, org, session, monkeypatch):
    monkeypatch.setenv("CAREPOST_SMTP_HELO_NAME", "mail.carepost.example")
    monkeypatch.setenv("CAREPOST_BASE_URL", "https://carepost.bar.example")
    from carepost.core.config import reset_settings

    reset_settings()
    try:
        row = session.get(SendingDomain, add_domain(org.id))
        records = {r.purpose: r for r in service.dns_records(row)}
    finally:
        monkeypatch.undo()
        reset_settings()
    assert records["dkim"].name == f"{row.selector}._domainkey.bar.example"
    assert records["dkim"].value == row.dkim_rsa_record and records["dkim"].value.startswith("v=DKIM1; k=rsa; p=MIIB")
    assert records["dkim-ed25519"].name == f"{row.selector}e._domainkey.bar.example"
    assert (records["spf"].name, records["spf"].value) == ("bounces.bar.example", "v=spf1 a:mail.carepost.example -all")
    assert records["dmarc"].name == "_dmarc.bar.example" and records["dmarc"].value.startswith("v=DMARC1; p=none")
    assert (records["return-path-mx"].type, records["return-path-mx"].value) == ("MX", "10 mail.carepost.example")
    assert records["mta-sts"].value == f"v=STSv1; id={row.mta_sts_id}"
    assert (records["mta-sts-host"].type, records["mta-sts-host"].value) == ("CNAME", "carepost.bar.example")


def txt(value: str) -> str:
    """A TXT rdata in zone-file syntax, split into 255-character strings."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def test_dns_check_pass_and_fail_per_record(db, org, session, delivery_env):
    row = session.get(SendingDomain, add_domain(org.id))
    records = service.dns_records(row)
    by = {r.purpose: r for r in records}
    dns = delivery_env.dns
    dns.add(by["dkim"].name, "TXT", txt(by["dkim"].value))
    dns.add(by["spf"].name, "TXT", txt("v=spf1 mx -all"))  # present but does not authorize CarePost
    dns.add(by["dmarc"].name, "TXT", txt("v=DMARC1; p=quarantine"))
    dns.add(by["return-path-mx"].name, "MX", by["return-path-mx"].value + ".")
    results = {r.purpose: r for r in run(service.check_dns(records))}
    assert results["dkim"].ok and results["dmarc"].ok and results["return-path-mx"].ok
    assert results["dmarc"].detail == "published (p=quarantine)"
    assert not results["spf"].ok and "does not contain a:carepost.bar.example" in results["spf"].detail
    assert not results["dkim-ed25519"].ok and results["dkim-ed25519"].detail == "not published"
    assert not results["mta-sts"].ok and not results["mta-sts-host"].ok
    with org_session(org.id) as s:
        sd = service.get_sending_domain(s, "bar.example")
        service.apply_dns_check(sd, list(results.values()))
        s.commit()
    session.rollback()
    stored = session.get(SendingDomain, row.id)
    assert stored.dns_ok is False and stored.check_results["dkim"]["ok"] is True and stored.checked_at

    # Publish everything correctly: every record passes.
    dns.clear()
    from carepost.delivery import dns as cpdns

    cpdns.reset()
    for r in records:
        if r.type == "TXT":
            dns.add(r.name, "TXT", txt(r.value))
        elif r.type == "MX":
            dns.add(r.name, "MX", r.value + ".")
        else:
            dns.add(r.name, "A", "127.0.0.1")
    results = run(service.check_dns(records))
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_wrong_dkim_key_published_is_reported(db, org, session, delivery_env):
    row = session.get(SendingDomain, add_domain(org.id))
    other = dkim.public_key_record(dkim.generate_rsa_key())
    [dkim_record] = [r for r in service.dns_records(row) if r.purpose == "dkim"]
    delivery_env.dns.add(dkim_record.name, "TXT", txt(other))
    [result] = run(service.check_dns([dkim_record]))
    assert not result.ok and result.detail == "a different DKIM key is published"


# --- recipient keys ----------------------------------------------------------------------------


def test_recipient_keys_stored_encrypted_and_found_by_blind_index(db, org, other_org, session, smime_ca, pat_pgp):
    cert = smime_ca.issue("pat@plain.test")
    with org_session(org.id) as s:
        pgp_info = service.add_recipient_key(s, org.id, "pat@plain.test", "pgp", pat_pgp, actor_id="u1")
        smime_info = service.add_recipient_key(s, org.id, "Pat@PLAIN.test", "smime", cert.pem)
        s.commit()
    assert pgp_info.kind == "pgp" and len(pgp_info.fingerprint) == 40 and not pgp_info.expiring_soon
    assert smime_info.expiring_soon  # the test certificate is valid for 30 days
    rows = session.scalars(select(RecipientKey).where(RecipientKey.org_id == org.id)).all()
    assert len(rows) == 2
    for row in rows:
        assert b"BEGIN" not in row.key_enc and b"plain.test" not in row.address_enc
        assert row.address_index == get_keyring().blind_index(session, org.id, "email", "pat@plain.test")
    with org_session(org.id) as s:
        keys = service.recipient_keys(s, org.id, "PAT@plain.test")
        assert set(keys) == {"pgp", "smime"}
        assert service.recipient_key_material(s, keys["pgp"]).startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
        assert service.keys_on_file(s, org.id, ["pat@plain.test", "x@plain.test"]) == {
            "pat@plain.test": {"pgp": True, "smime": True}, "x@plain.test": {"pgp": False, "smime": False}}
        assert [k.kind for k in service.expiring_recipient_keys(s)] == ["smime"]
    # Another organization sees nothing, even for the same address.
    with org_session(other_org.id) as s:
        assert service.recipient_keys(s, other_org.id, "pat@plain.test") == {}
        assert s.scalars(select(RecipientKey)).all() == []


def test_recipient_key_replaced_and_refused(db, org, session, smime_ca):
    first, second = smime_ca.issue("sam@plain.test"), smime_ca.issue("sam@plain.test")
    with org_session(org.id) as s:
        a = service.add_recipient_key(s, org.id, "sam@plain.test", "smime", first.pem)
        b = service.add_recipient_key(s, org.id, "sam@plain.test", "smime", second.pem)
        s.commit()
    assert a.id == b.id and a.fingerprint != b.fingerprint
    assert len(session.scalars(select(RecipientKey)).all()) == 1
    with org_session(org.id) as s:
        with pytest.raises(ValidationFailed) as err:
            service.add_recipient_key(s, org.id, "other@plain.test", "smime", first.pem)
        assert err.value.field == "key" and "does not name this address" in err.value.message
        with pytest.raises(ValidationFailed) as err:
            service.add_recipient_key(s, org.id, "sam@plain.test", "x509", first.pem)
        assert err.value.field == "kind"
        with pytest.raises(ValidationFailed) as err:
            service.add_recipient_key(s, org.id, "Sam <sam@plain.test>", "smime", first.pem)
        assert err.value.field == "address"


def test_expired_keys_are_not_used(db, org, smime_ca):
    cert = smime_ca.issue("short@plain.test", days=2)
    with org_session(org.id) as s:
        service.add_recipient_key(s, org.id, "short@plain.test", "smime", cert.pem)
        s.commit()
    clock.advance(timedelta(days=3))
    with org_session(org.id) as s:
        assert service.recipient_keys(s, org.id, "short@plain.test") == {}


# --- security preview --------------------------------------------------------------------------


def test_security_preview(db, org, delivery_env, pat_pgp):
    with org_session(org.id) as s:
        service.add_recipient_key(s, org.id, "pat@plain.test", "pgp", pat_pgp)
        s.commit()
        keys = service.keys_on_file(s, org.id, ["a@valid.test", "pat@plain.test", "b@plain.test", "c@expired.test"])
    rows = run(service.security_preview(keys, org_mode="tls_required"))
    got = {r.address: (r.method, r.reason) for r in rows}
    assert got["a@valid.test"][0] == "tls" and "verified TLSv1" in got["a@valid.test"][1]
    assert got["pat@plain.test"][0] == "pgp"
    assert got["b@plain.test"] == ("portal", "verified TLS unavailable (mx.plain.test does not offer STARTTLS): secure portal")
    assert got["c@expired.test"][0] == "portal" and "certificate has expired" in got["c@expired.test"][1]
    rows = run(service.security_preview(keys, org_mode="tls_required", override="tls_exclusive"))
    assert {r.address: r.method for r in rows}["b@plain.test"] == "none"
    rows = run(service.security_preview(keys, org_mode="secure"))
    assert {r.address: r.method for r in rows} == {"a@valid.test": "portal", "pat@plain.test": "pgp",
                                                    "b@plain.test": "portal", "c@expired.test": "portal"}
    with pytest.raises(ValidationFailed) as err:
        run(service.security_preview(keys, org_mode="opportunistic"))
    assert err.value.field == "security"
    with pytest.raises(ValidationFailed):
        run(service.security_preview(keys, org_mode="secure", override="tls_required"))
    with org_session(org.id) as s, pytest.raises(ValidationFailed) as err:
        service.keys_on_file(s, org.id, ["ok@valid.test", "bad address"])
    assert err.value.field == "addresses[1]"


# --- outcomes ----------------------------------------------------------------------------------


def make_recipient(org_id: str) -> str:
    ring = get_keyring()
    with org_session(org_id) as s:
        message = Message(id=new_id(), org_id=org_id,
                          from_address="news@bar.example", security="tls_required", purpose="care",
                          subject_enc=b"")
        message.subject_enc = ring.encrypt(s, org_id, "messages", "subject", message.id, "Your results")
        s.add(message)
        rid = new_id()
        s.add(MessageRecipient(
            id=rid, org_id=org_id, message_id=message.id,
            address_enc=ring.encrypt(s, org_id, "message_recipients", "address", rid, "pat@valid.test"),
            address_index=ring.blind_index(s, org_id, "email", "pat@valid.test"),
            domain_index=ring.blind_index(s, org_id, "domain", "valid.test"),
        ))
        s.commit()
        return rid


def test_record_delivered_with_evidence(db, org, other_org, session):
    rid = make_recipient(org.id)
    evidence = Evidence(mx_host="mx.valid.test", address="127.0.0.1", port=25, tls_version="TLSv1.3",
                        cipher="TLS_AES_256_GCM_SHA384", cert_fingerprint="ab" * 32, cert_verified=True,
                        reply_code=250, reply="2.0.0 Ok: queued as X for <pat@valid.test>", at=clock.now())
    with org_session(org.id) as s:
        recipient = s.get(MessageRecipient, rid)
        service.record_result(s, recipient, RecipientResult("pat@valid.test", "delivered", "accepted: 250", 250,
                                                            evidence=evidence), method="tls")
        s.commit()
    row = session.get(MessageRecipient, rid)
    assert (row.status, row.method, row.attempts, row.next_attempt_at) == ("delivered", "tls", 1, None)
    assert row.evidence["tls_version"] == "TLSv1.3" and row.evidence["cert_verified"] is True
    assert "reply" not in row.evidence and b"pat@valid.test" not in row.reply_enc
    with org_session(org.id) as s:
        assert "queued as X" in get_keyring().decrypt_text(s, org.id, "message_recipients", "reply", rid, row.reply_enc)
    [event] = session.scalars(select(MessageEvent).where(MessageEvent.recipient_id == rid)).all()
    assert event.type == "delivered" and event.details == {"method": "tls", "reply_code": 250, "possible_duplicate": False}
    with org_session(other_org.id) as s:
        assert s.scalars(select(MessageRecipient)).all() == [] and s.scalars(select(MessageEvent)).all() == []


def test_deferred_retries_with_backoff_then_fails(db, org, session):
    rid = make_recipient(org.id)
    deferred = RecipientResult("pat@valid.test", "deferred", "no reply after the message was sent", None,
                               possible_duplicate=True)
    with org_session(org.id) as s:
        service.record_result(s, s.get(MessageRecipient, rid), deferred, method="tls")
        s.commit()
    row = session.get(MessageRecipient, rid)
    assert row.status == "deferred" and row.possible_duplicate
    delay = clock.aware(row.next_attempt_at) - clock.aware(row.first_attempt_at)
    assert timedelta(minutes=4) < delay < timedelta(minutes=6)
    clock.advance(timedelta(hours=73))
    with org_session(org.id) as s:
        service.record_result(s, s.get(MessageRecipient, rid),
                              RecipientResult("pat@valid.test", "deferred", "RCPT TO failed: timed out"), method="tls")
        s.commit()
    session.rollback()
    row = session.get(MessageRecipient, rid)
    assert row.status == "failed" and row.reason.startswith("gave up after retrying") and row.possible_duplicate
    types = [e.type for e in session.scalars(select(MessageEvent).where(MessageEvent.recipient_id == rid)
                                             .order_by(MessageEvent.created_at))]
    assert types == ["deferred", "failed"]
