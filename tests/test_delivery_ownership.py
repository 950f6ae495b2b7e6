"""Sending-domain ownership (issue 9 item 2): a domain sends, and receives its reports, only for
the organization that proved it owns it by publishing its random token in DNS.

* verification is a real TXT look-up against the local DNS server (``delivery_env``): the right
  token verifies, a missing or wrong one does not;
* a domain one organization proved cannot be added (409 on ``domain``, naming no organization)
  or proven by another; unproven claims of several organizations coexist until one proves it;
* an unproven domain cannot send through the API (single and batch), SMTP submission or the
  delivery pipeline — except with a sandbox credential, and under the local capture of
  ``carepost run`` (a flag that counts only with a loopback relay);
* bounces, complaints and DMARC reports to the return-path domain are stored for the proven
  owner only; a domain only claimed receives nothing.
"""

from __future__ import annotations

import smtplib

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from tests.fixtures.delivery import Sender, prove_ownership
from tests.test_bounces import RETURN_DOMAIN, make_sent, sample
from tests.test_bounces_inbound import _client, _reports, inbound  # noqa: F401 (the inbound fixture)
from tests.test_delivery_submission import message, submission  # noqa: F401 (the submission fixture)


def _audit(session, action: str) -> list[AuditEvent]:
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def _publish_txt(env, name: str, value: str) -> None:
    from carepost.delivery import dns as cpdns

    env.dns.records.pop((name.lower() + ".", "TXT"), None)
    env.dns.add(name, "TXT", f'"{value}"')
    cpdns.reset()  # forget cached answers, as their TTL would


def _other_org(session, name: str = "Foo Health") -> Sender:
    from carepost.accounts.service import create_organization

    other = create_organization(session, name)
    session.commit()
    return Sender(other.id, "", session)


def _claim(org_id: str, domain: str, *, proven: bool = False) -> str:
    from carepost.core.database import org_session
    from carepost.delivery import service

    with org_session(org_id) as s:
        row = service.create_sending_domain(s, org_id, domain)
        if proven:
            prove_ownership(s, row)
        s.commit()
        return row.id


def _api_message(sender_address: str) -> dict:
    return {"from": f"Bar Clinic <{sender_address}>", "to": ["pat@valid.test"], "subject": "From your care team",
            "text": "Please call us.", "purpose": "treatment"}


# --------------------------------------------------------------------------- verification


def test_verification_succeeds_with_the_right_txt_record_and_fails_with_a_wrong_one(client, sender, session,
                                                                                     delivery_env, delivery_queue):
    key = sender.key()
    created = client.post("/api/v1/domains", json={"domain": "clinic.example"}, headers=key)
    assert created.status_code == 201, created.text
    domain = created.json()
    assert domain["verified"] is False and domain["verified_at"] is None
    record = domain["ownership_record"]
    assert record["type"] == "TXT" and record["name"] == "_carepost-challenge.clinic.example"
    token = record["value"].removeprefix("carepost-verify=")
    assert len(token) == 32 and record["value"] == f"carepost-verify={token}"

    # Nothing published: not verified, and why.
    r = client.post(f"/api/v1/domains/{domain['id']}/verify", headers=key)
    assert r.status_code == 200 and r.json()["verified"] is False
    assert {c["purpose"]: c["detail"] for c in r.json()["checks"]}["ownership"] == "not published"
    # Another token (another organization's, or a typo): still not verified.
    _publish_txt(delivery_env, record["name"], "carepost-verify=" + "0" * 32)
    r = client.post(f"/api/v1/domains/{domain['id']}/verify", headers=key)
    assert r.json()["verified"] is False
    assert {c["purpose"]: c["detail"] for c in r.json()["checks"]}["ownership"] == "a different ownership token is published"
    # The right token: verified.
    _publish_txt(delivery_env, record["name"], record["value"])
    r = client.post(f"/api/v1/domains/{domain['id']}/verify", headers=key)
    assert r.status_code == 200 and r.json()["verified"] is True and r.json()["verified_at"]
    assert client.get(f"/api/v1/domains/{domain['id']}", headers=key).json()["verified"] is True
    assert ("_carepost-challenge.clinic.example.", "TXT") in delivery_env.dns.queries  # a real look-up
    events = _audit(session, "sending_domain.verify")
    assert [e.details["outcome"] for e in events] == ["failed", "failed", "verified"]
    assert [e.details["ownership"] for e in _audit(session, "sending_domain.create")] == ["claimed"]


def test_each_claim_has_its_own_random_token(session, org):
    from carepost.core.database import org_session
    from carepost.delivery import service

    other = _other_org(session)
    ids = [_claim(org.id, "shared.example"), _claim(other.org_id, "shared.example")]
    tokens = []
    for org_id, domain_id in zip((org.id, other.org_id), ids):
        with org_session(org_id) as s:
            tokens.append(service.sending_domain_by_id(s, domain_id).ownership_token)
    assert len(set(tokens)) == 2


# --------------------------------------------------------------------------- one owner per domain


def test_second_organization_cannot_register_or_prove_a_verified_domain(client, sender, session, delivery_env,
                                                                       delivery_queue):
    ours = sender.key()
    other = _other_org(session)
    theirs = other.key("domains:manage", "messages:send")
    # Before anyone proves it, both organizations may claim the domain (a claim that never
    # verifies blocks no one).
    mine = client.post("/api/v1/domains", json={"domain": "contested.example"}, headers=ours).json()
    early = client.post("/api/v1/domains", json={"domain": "contested.example"}, headers=theirs)
    assert early.status_code == 201, early.text
    early = early.json()
    assert early["ownership_record"]["value"] != mine["ownership_record"]["value"]

    # We publish our token and prove it.
    _publish_txt(delivery_env, mine["ownership_record"]["name"], mine["ownership_record"]["value"])
    assert client.post(f"/api/v1/domains/{mine['id']}/verify", headers=ours).json()["verified"] is True

    # Now a third claim is refused: 409 naming the field, not the organization.
    third = _other_org(session, "Qux Care").key("domains:manage")
    taken = client.post("/api/v1/domains", json={"domain": "Contested.Example"}, headers=third)
    assert taken.status_code == 409
    error = taken.json()["error"]
    assert error["field"] == "domain" and error["code"] == "domain_taken"
    assert sender.org_id not in taken.text and "Bar" not in taken.text

    # The early claim can never be proven, even with its own token published.
    _publish_txt(delivery_env, early["ownership_record"]["name"], early["ownership_record"]["value"])
    refused = client.post(f"/api/v1/domains/{early['id']}/verify", headers=theirs)
    assert refused.status_code == 409 and refused.json()["error"]["field"] == "domain"
    checked = client.post(f"/api/v1/domains/{early['id']}/check", headers=theirs).json()
    assert checked["verified"] is False
    assert {c["purpose"]: c for c in checked["checks"]}["ownership"]["detail"] == \
        "another organization has proven ownership of this domain"
    # ...so it cannot send.
    r = client.post("/api/v1/messages", json=_api_message("care@contested.example"), headers=theirs)
    assert r.status_code == 422 and r.json()["error"]["field"] == "from"
    refusals = [e for e in _audit(session, "sending_domain.verify") if e.details.get("outcome") == "refused"]
    assert [e.org_id for e in refusals] == [other.org_id]


def test_the_database_allows_one_verified_claim_per_domain(session, org):
    """The partial unique index is the last word, on both databases, even past the service."""
    from sqlalchemy.exc import IntegrityError

    from carepost.core import clock
    from carepost.delivery.models import SendingDomain

    other = _other_org(session)
    winner = _claim(org.id, "race.example")
    loser = _claim(other.org_id, "race.example")  # both claims exist while neither is proven
    session.rollback()
    prove_ownership(session, session.get(SendingDomain, winner))
    session.commit()
    row = session.get(SendingDomain, loser)
    row.verified_at = clock.now()
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


# --------------------------------------------------------------------------- sending


def test_unverified_domain_cannot_send_through_the_api(client, sender, session, delivery_queue):
    from carepost.delivery.models import Message

    _claim(sender.org_id, "unproven.example")
    key = sender.key()
    sandbox = sender.key("messages:send", sandbox=True)
    r = client.post("/api/v1/messages", json=_api_message("care@unproven.example"), headers=key)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["field"] == "from" and error["code"] == "sending_domain_unverified"
    assert "ownership" in error["message"]
    batch = client.post("/api/v1/messages/batch", headers=key, json={"messages": [
        _api_message("care@bar.example"), _api_message("news@mail.unproven.example")]})
    assert batch.status_code == 422 and batch.json()["error"]["field"] == "messages.1.from"
    session.rollback()
    assert session.scalars(select(Message)).all() == []  # all or nothing
    # The proven domain of the same organization sends.
    assert client.post("/api/v1/messages", json=_api_message("care@bar.example"), headers=key).status_code == 202
    # A sandbox credential may use the unproven domain: its messages are captured, never sent.
    assert client.post("/api/v1/messages", json=_api_message("care@unproven.example"), headers=sandbox).status_code == 202


def test_unverified_domain_cannot_send_through_smtp_submission(submission, session):  # noqa: F811
    from carepost.delivery.models import Message

    _claim(submission.sender.org_id, "unproven.example")
    key_id, secret = submission.credential()
    msg = message()
    msg.replace_header("From", "Bar Clinic <care@unproven.example>")
    with submission.connect() as client:
        client.login(key_id, secret)
        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.send_message(msg)
    assert exc.value.smtp_code == 550
    assert exc.value.smtp_error.decode().startswith("5.6.0 from: The organization has not proven ownership")
    session.rollback()
    assert session.scalars(select(Message)).all() == []
    # With a sandbox credential it is accepted (and captured by the worker, not sent).
    key_id, secret = submission.credential(sandbox=True)
    with submission.connect() as client:
        client.login(key_id, secret)
        client.send_message(msg)
    session.rollback()
    [stored] = session.scalars(select(Message)).all()
    assert stored.sandbox is True


def test_the_pipeline_refuses_a_message_whose_domain_is_not_proven(client, sender, session, delivery_env,
                                                                   delivery_queue, monkeypatch):
    """A message accepted under the local capture of ``carepost run`` (the flag with a loopback
    relay) is refused at delivery once mail would really leave: the pipeline checks again."""
    from carepost.core.config import reset_settings
    from carepost.delivery import pipeline
    from carepost.delivery.models import MessageRecipient

    _claim(sender.org_id, "unproven.example")
    key = sender.key()
    # The capture flag alone does not open sending: the relay must be a loopback address.
    monkeypatch.setenv("CAREPOST_MAIL_CAPTURE", "true")
    monkeypatch.setenv("CAREPOST_SMTP_RELAY", "relay.valid.test@192.0.2.7:587")
    reset_settings()
    r = client.post("/api/v1/messages", json=_api_message("care@unproven.example"), headers=key)
    assert r.status_code == 422 and r.json()["error"]["code"] == "sending_domain_unverified"
    monkeypatch.setenv("CAREPOST_SMTP_RELAY", "localhost@127.0.0.1:2525")
    reset_settings()
    r = client.post("/api/v1/messages", json=_api_message("care@unproven.example"), headers=key)
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]

    monkeypatch.delenv("CAREPOST_MAIL_CAPTURE")
    monkeypatch.delenv("CAREPOST_SMTP_RELAY")
    reset_settings()
    pipeline.deliver([message_id])
    session.rollback()
    [rcpt] = session.scalars(select(MessageRecipient).where(MessageRecipient.message_id == message_id)).all()
    assert rcpt.status == "failed" and rcpt.reason.startswith("sending_domain_unverified:")
    assert delivery_env.mx["valid"].recorder.messages == []  # nothing left the machine


# --------------------------------------------------------------------------- reports


def test_reports_go_to_the_verified_owner_only(session, org, inbound):  # noqa: F811
    """Org A proved bar.example; org B merely claims it. Bounces, complaints and DMARC reports to
    the return path are stored for A, never for B."""
    hijacker = _other_org(session, "Hijack Health")
    _claim(hijacker.org_id, "bar.example")  # an unproven claim on A's domain, made before A's
    sent = make_sent(session, org.id)  # org A: bar.example, ownership proven
    session.commit()
    with _client(inbound) as smtp:
        smtp.sendmail("noreply-dmarc@google.example", [f"dmarc@{RETURN_DOMAIN}"],
                      sample("dmarc_aggregate.eml", sent.verp))
        smtp.sendmail("feedback@arf.mail.yahoo.example", [f"fbl@{RETURN_DOMAIN}"], sample("yahoo_arf.eml", sent.verp))
        smtp.sendmail("", [sent.verp], sample("gmail_hard.eml", sent.verp))
    reports = _reports(session)
    assert len(reports) == 3 and {r.org_id for r in reports} == {org.id}
    assert {r.kind for r in reports} == {"feedback", "arf", "dsn"}  # the sample DMARC zip is damaged: read, refused

    # A domain that is only claimed (nobody proved it) receives nothing at all.
    _claim(hijacker.org_id, "victim.example")
    with _client(inbound) as smtp:
        smtp.mail("")
        for mailbox in ("dmarc", "postmaster", "abuse", "fbl"):
            assert smtp.rcpt(f"{mailbox}@bounces.victim.example")[0] == 550
        smtp.rset()
    assert {r.org_id for r in _reports(session)} == {org.id}


def test_doctor_names_domains_whose_ownership_is_not_proven(sender, delivery_env):
    from carepost.core.config import get_settings
    from carepost.doctor import check_sending_domains

    _claim(sender.org_id, "unproven.example")
    [finding] = check_sending_domains(get_settings())
    assert finding.level == "warn"
    unproven = finding.message.split("whose ownership is not proven")[1]
    assert "unproven.example" in unproven and "bar.example" not in unproven  # bar.example is proven
