"""Bounces and complaints: the DSN (RFC 3464) and ARF (RFC 5965) parser on realistic samples
(Gmail, Microsoft, Yahoo, Postfix, qmail, Yahoo CFL and Microsoft JMRP feedback reports), its
robustness on junk (hypothesis), VERP matching that never trusts an address, and the effects:
suppressions, recipient status, events, the soft-bounce threshold."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from carepost.core import clock
from carepost.delivery import bounces
from carepost.delivery.bounces import classify_status, describe_status, parse_report
from tests.fixtures.delivery import prove_ownership

SAMPLES = Path(__file__).parent / "fixtures" / "bounces"
PATIENT = "pat.doe@gmail.example"
FROM_DOMAIN = "bar.example"
RETURN_DOMAIN = "bounces.bar.example"


def sample(name: str, verp: str, rcpt: str = PATIENT) -> bytes:
    text = (SAMPLES / name).read_text()
    for key, value in (("{{VERP}}", verp), ("{{RCPT}}", rcpt), ("{{FROM_DOMAIN}}", FROM_DOMAIN),
                       ("{{RETURN_DOMAIN}}", RETURN_DOMAIN)):
        text = text.replace(key, value)
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


FAKE_VERP = "b+0190f0a4c3b2aaaaaaaaaaaaaaaaaaaa.0123456789abcdef@bounces.bar.example"


# --------------------------------------------------------------------------- parsing samples


@pytest.mark.parametrize("name, action, status, classification", [
    ("gmail_hard.eml", "failed", "5.1.1", "hard"),
    ("microsoft_hard.eml", "failed", "5.1.10", "hard"),
    ("yahoo_hard.eml", "failed", "5.0.0", "hard"),
    ("postfix_soft.eml", "failed", "4.2.2", "soft"),
    ("delayed.eml", "delayed", "4.4.1", "delayed"),
])
def test_dsn_samples(name, action, status, classification):
    report = parse_report(sample(name, FAKE_VERP))
    assert report.kind == "dsn" and report.standard
    block = report.worst
    assert (block.action, block.status, block.classification) == (action, status, classification)
    assert block.final_recipient == PATIENT
    assert report.verp_candidates == (FAKE_VERP,)


def test_dsn_per_message_fields():
    report = parse_report(sample("gmail_hard.eml", FAKE_VERP))
    assert report.reporting_mta == "googlemail.com"
    assert report.arrival_date is not None and report.arrival_date.year == 2025
    assert "142.250.102.26" in (report.worst.remote_mta or "")
    assert "5.1.1" in report.worst.diagnostic


def test_non_standard_bounce_is_read_by_heuristics():
    report = parse_report(sample("qmail_nonstandard.eml", FAKE_VERP))
    assert report.kind == "dsn" and not report.standard
    assert report.worst.status == "5.1.1" and report.worst.classification == "hard"
    assert report.verp_candidates == (FAKE_VERP,)


@pytest.mark.parametrize("name, feedback_type", [
    ("yahoo_arf.eml", "abuse"), ("microsoft_jmrp.eml", "abuse"), ("arf_not_spam.eml", "not-spam"),
])
def test_arf_samples(name, feedback_type):
    report = parse_report(sample(name, FAKE_VERP))
    assert report.kind == "arf"
    assert report.feedback_type == feedback_type
    assert FAKE_VERP in report.verp_candidates


def test_arf_fields():
    report = parse_report(sample("yahoo_arf.eml", FAKE_VERP))
    assert report.original_mail_from == FAKE_VERP
    assert report.reported_domain == FROM_DOMAIN
    assert report.source_ip == "192.0.2.10"
    assert report.arrival_date is not None


def test_other_mail_is_not_a_report():
    assert parse_report(sample("dmarc_aggregate.eml", FAKE_VERP)).kind == "other"
    plain = b"From: someone@example.org\r\nSubject: hello\r\n\r\nJust saying hi.\r\n"
    assert parse_report(plain).kind == "other"


@pytest.mark.parametrize("raw, reason", [
    (b"", "an empty message"),
    (b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x\r\n"
     b"Content-Type: text/plain\r\n\r\nhi\r\n--x--\r\n", "without a message/delivery-status part"),
    (b"Content-Type: multipart/report; report-type=feedback-report; boundary=x\r\n\r\n--x\r\n"
     b"Content-Type: message/feedback-report\r\n\r\nUser-Agent: x\r\n--x--\r\n", "without Feedback-Type"),
    (b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x\r\n"
     b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; a\r\n\r\n--x--\r\n",
     "without per-recipient fields"),
    (b"From: MAILER-DAEMON@x.example\r\nSubject: Undeliverable\r\n\r\nno codes here\r\n", "without any status code"),
])
def test_unparseable_reports_say_why(raw, reason):
    report = parse_report(raw)
    assert report.kind == "unparseable"
    assert reason in report.reason


def test_dsn_without_per_message_block_and_several_recipients():
    raw = (b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: message/delivery-status\r\n\r\n"
           b"Final-Recipient: rfc822; a@x.example\r\nAction: delayed\r\nStatus: 4.4.7\r\n\r\n"
           b"Final-Recipient: rfc822; b@x.example\r\nAction: failed\r\nStatus: 5.7.1\r\n\r\n--b--\r\n")
    report = parse_report(raw)
    assert report.kind == "dsn" and len(report.recipients) == 2
    assert report.worst.status == "5.7.1" and report.worst.classification == "soft"


@pytest.mark.parametrize("status, diagnostic, expected", [
    ("5.1.1", None, "hard"), ("5.4.4", None, "hard"), ("5.7.1", None, "soft"), ("5.2.2", None, "soft"),
    ("4.2.2", None, "soft"), (None, "smtp; 550 user unknown", "hard"), (None, "smtp; 554 blocked", "soft"),
    (None, "smtp; 550-5.7.26 unauthenticated", "soft"), (None, None, "soft"), ("junk", None, "soft"),
])
def test_classification(status, diagnostic, expected):
    assert classify_status(status, diagnostic) == expected


def test_describe_status_names_the_code_without_the_text():
    assert describe_status("5.1.1") == "5.1.1 (bad destination mailbox address)"
    assert describe_status("4.7.0") == "4.7.0 (other or undefined security status)"
    assert describe_status(None) == "no status code"


# --------------------------------------------------------------------------- robustness (hypothesis)

_HEADER_NAMES = st.sampled_from(["Content-Type", "Action", "Status", "Final-Recipient", "Feedback-Type",
                                 "Original-Mail-From", "Arrival-Date", "From", "Subject", "X-Junk"])
_CTYPES = st.sampled_from([
    "multipart/report; report-type=delivery-status; boundary=b",
    "multipart/report; report-type=feedback-report; boundary=b",
    "multipart/report; boundary=b", "multipart/report; report-type=\"", "message/delivery-status",
    "text/plain; charset=x-unknown-charset", "multipart/report; report-type=delivery-status",
])
_LINE = st.one_of(
    st.builds(lambda n, v: f"{n}: {v}", _HEADER_NAMES, st.text(max_size=40)),
    st.builds(lambda c: f"Content-Type: {c}", _CTYPES),
    st.sampled_from(["--b", "--b--", "", " folded", "Action: failed", "Status: 5.1.1", "Action: delayed",
                     "Content-Type: message/delivery-status", "Content-Type: message/feedback-report",
                     "Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: quoted-printable",
                     "Arrival-Date: Thu, 99 Nov 2025 99:99:99 +9999", "Original-Mail-From: <" + FAKE_VERP + ">"]),
    st.text(max_size=60),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_parser_never_crashes_on_bytes(raw):
    report = parse_report(raw)
    assert report.kind in ("dsn", "arf", "other", "unparseable")
    if report.kind == "unparseable":
        assert report.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_LINE, max_size=40))
def test_parser_never_crashes_on_report_shaped_junk(lines):
    raw = "\r\n".join(lines).encode("utf-8", errors="surrogateescape")
    report = parse_report(raw)
    assert report.kind in ("dsn", "arf", "other", "unparseable")
    for block in report.recipients:
        assert block.classification in ("hard", "soft", "delayed", "success")


# --------------------------------------------------------------------------- with the database


@pytest.fixture
def sent(session, org):
    """A sending domain and a delivered message to PATIENT; returns a small namespace."""
    return make_sent(session, org.id)


class Sent:
    def __init__(self, org_id, domain, message_id, recipient_id, verp):
        self.org_id, self.domain, self.message_id, self.recipient_id, self.verp = org_id, domain, message_id, recipient_id, verp


def make_sent(session, org_id: str, address: str = PATIENT, *, domain_row=None) -> Sent:
    from carepost.core.crypto import get_keyring
    from carepost.core.ids import new_id
    from carepost.delivery.models import Message, MessageRecipient, SendingDomain
    from carepost.delivery.service import create_sending_domain

    ring = get_keyring()
    if domain_row is None:
        domain_row = session.scalars(select(SendingDomain).where(SendingDomain.org_id == org_id)).first()
    if domain_row is None:
        domain_row = create_sending_domain(session, org_id, FROM_DOMAIN, ed25519=False)
        prove_ownership(session, domain_row)  # only the domain's proven owner receives its reports
    message = Message(id=new_id(), org_id=org_id, from_address=f"care@{FROM_DOMAIN}", security="tls_required",
                      sending_domain_id=domain_row.id, purpose="treatment",
                      subject_enc=b"")
    message.subject_enc = ring.encrypt(session, org_id, "messages", "subject", message.id, "Your appointment")
    session.add(message)
    session.flush()
    rid = new_id()
    recipient = MessageRecipient(
        id=rid, org_id=org_id, message_id=message.id, kind="to",
        address_enc=ring.encrypt(session, org_id, "message_recipients", "address", rid, address),
        address_index=ring.blind_index(session, org_id, "email", address),
        domain_index=ring.blind_index(session, org_id, "domain", address.rsplit("@", 1)[1]),
        status="delivered", method="tls",
    )
    session.add(recipient)
    verp = bounces.return_path(session, org_id, domain_row.return_path_domain, rid)
    session.commit()
    return Sent(org_id, domain_row, message.id, rid, verp)


def _apply(session, s: Sent, name: str, *, envelope=True, rcpt=PATIENT):
    from carepost.core.database import org_session

    report = parse_report(sample(name, s.verp, rcpt))
    with org_session(s.org_id) as work:
        outcome = bounces.apply_report(work, s.org_id, report, [s.verp] if envelope else [], report_id=None)
        work.commit()
    session.rollback()
    return outcome


def _recipient(session, s: Sent):
    from carepost.delivery.models import MessageRecipient

    return session.get(MessageRecipient, s.recipient_id, populate_existing=True)


def _events(session, s: Sent):
    from carepost.delivery.models import MessageEvent

    return list(session.scalars(select(MessageEvent).where(MessageEvent.recipient_id == s.recipient_id)
                                .order_by(MessageEvent.created_at)))


def _suppressions(session, org_id):
    from carepost.consent.models import Suppression

    return list(session.scalars(select(Suppression).where(Suppression.org_id == org_id)))


@pytest.mark.parametrize("name", ["gmail_hard.eml", "microsoft_hard.eml", "yahoo_hard.eml", "qmail_nonstandard.eml"])
def test_hard_bounce_suppresses_and_marks_recipient(session, sent, name):
    from carepost.consent.service import is_suppressed

    outcome = _apply(session, sent, name)
    assert outcome.status == "applied" and outcome.effect == "hard_bounce" and outcome.suppressed == "bounce_hard"
    recipient = _recipient(session, sent)
    assert recipient.status == "bounced"
    assert recipient.reason.startswith("hard bounce: 5.")
    assert PATIENT not in recipient.reason
    [event] = _events(session, sent)
    assert event.type == "bounced" and event.details["bounce_type"] == "hard"
    assert PATIENT not in str(event.details)
    assert is_suppressed(session, sent.org_id, PATIENT, "all") == "bounce_hard"
    assert is_suppressed(session, sent.org_id, PATIENT.upper(), "marketing") == "bounce_hard"
    [row] = _suppressions(session, sent.org_id)
    assert row.scope == "all" and row.address_index == recipient.address_index


def test_complaint_suppresses_marketing_only(session, sent):
    from carepost.consent.service import is_suppressed

    outcome = _apply(session, sent, "yahoo_arf.eml", envelope=False)  # sent to fbl@: the VERP is inside
    assert outcome.effect == "complaint"
    assert _recipient(session, sent).status == "delivered"  # it was delivered; the complaint is an event
    [event] = _events(session, sent)
    assert event.type == "complained" and event.details["feedback_type"] == "abuse"
    assert is_suppressed(session, sent.org_id, PATIENT, "marketing") == "complaint"
    assert is_suppressed(session, sent.org_id, PATIENT, "all") is None


def test_microsoft_jmrp_complaint_matches_by_returned_return_path(session, sent):
    outcome = _apply(session, sent, "microsoft_jmrp.eml", envelope=False)
    assert outcome.effect == "complaint" and outcome.recipient_id == sent.recipient_id


def test_not_spam_report_changes_nothing(session, sent):
    outcome = _apply(session, sent, "arf_not_spam.eml", envelope=False)
    assert outcome.status == "applied" and outcome.effect == "none"
    assert [e.type for e in _events(session, sent)] == ["feedback_report"]
    assert _suppressions(session, sent.org_id) == []


def test_delayed_dsn_is_an_event_only(session, sent):
    outcome = _apply(session, sent, "delayed.eml")
    assert outcome.effect == "delayed"
    assert _recipient(session, sent).status == "delivered"
    assert [e.type for e in _events(session, sent)] == ["deferred"]
    assert _suppressions(session, sent.org_id) == []


def test_soft_bounces_count_toward_the_threshold(session, org, monkeypatch):
    from carepost.consent.service import is_suppressed
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_SOFT_BOUNCE_THRESHOLD", "3")
    monkeypatch.setenv("CAREPOST_SOFT_BOUNCE_WINDOW_DAYS", "7")
    reset_settings()
    first = make_sent(session, org.id)
    outcome = _apply(session, first, "postfix_soft.eml")
    assert outcome.effect == "soft_bounce" and outcome.suppressed is None
    assert _recipient(session, first).status == "bounced"
    assert _recipient(session, first).reason.startswith("soft bounce: 4.2.2")
    # The same message bouncing twice counts once.
    assert _apply(session, first, "postfix_soft.eml").suppressed is None
    # A bounce older than the window does not count.
    clock.advance(timedelta(days=8))
    second = make_sent(session, org.id)
    assert _apply(session, second, "postfix_soft.eml").suppressed is None
    third = make_sent(session, org.id)
    assert _apply(session, third, "postfix_soft.eml").suppressed is None
    assert is_suppressed(session, org.id, PATIENT, "all") is None
    fourth = make_sent(session, org.id)
    outcome = _apply(session, fourth, "postfix_soft.eml")
    assert outcome.suppressed == "bounce_soft"
    assert is_suppressed(session, org.id, PATIENT, "all") == "bounce_soft"
    # Another address is not affected.
    other = make_sent(session, org.id, "someone.else@gmail.example")
    assert _apply(session, other, "postfix_soft.eml", rcpt="someone.else@gmail.example").suppressed is None
    reset_settings()


def test_forged_verp_is_ignored_and_logged_without_phi(session, sent, caplog_json):
    forged = _forge(sent.verp)
    report = parse_report(sample("gmail_hard.eml", forged))
    from carepost.core.database import org_session

    with org_session(sent.org_id) as work:
        outcome = bounces.apply_report(work, sent.org_id, report, [forged], report_id="r" * 32)
        work.commit()
    assert outcome.status == "ignored" and "VERP" in outcome.detail
    session.rollback()
    assert _recipient(session, sent).status == "delivered"
    assert _events(session, sent) == [] and _suppressions(session, sent.org_id) == []
    logs = caplog_json()
    assert "bounce_report_unmatched" in logs
    assert PATIENT not in logs and forged not in logs


def test_verp_of_another_organization_does_not_match(session, sent):
    from carepost.accounts.service import create_organization
    from carepost.delivery.service import create_sending_domain

    other = create_organization(session, "Other Clinic")
    session.commit()
    # bar.example is proven by the first organization: the other sends from a domain of its own.
    other_domain = create_sending_domain(session, other.id, "baz.example", ed25519=False)
    other_sent = make_sent(session, other.id, domain_row=other_domain)
    report = parse_report(sample("gmail_hard.eml", other_sent.verp))
    from carepost.core.database import org_session

    # Org A receives a report naming org B's recipient: A's key does not verify B's MAC.
    with org_session(sent.org_id) as work:
        outcome = bounces.apply_report(work, sent.org_id, report, [other_sent.verp])
        work.commit()
    assert outcome.status == "ignored"
    session.rollback()
    assert _recipient(session, other_sent).status == "delivered"


def test_an_address_alone_never_matches(session, sent):
    """A bounce that names the patient's address but no VERP changes nothing."""
    report = parse_report(sample("gmail_hard.eml", "someone@bounces.bar.example"))
    from carepost.core.database import org_session

    with org_session(sent.org_id) as work:
        outcome = bounces.apply_report(work, sent.org_id, report, [f"postmaster@{RETURN_DOMAIN}"])
        work.commit()
    assert outcome.status == "ignored"
    assert _suppressions(session, sent.org_id) == []


def _forge(verp: str) -> str:
    local, domain = verp.split("@")
    head, mac = local.rsplit(".", 1)
    return f"{head}.{'0' * 16 if mac != '0' * 16 else '1' * 16}@{domain}"


@pytest.fixture
def caplog_json():
    """Log lines written from now on (JSON, through the real redacting pipeline), as one string."""
    import io

    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream)
    yield stream.getvalue
    configure_logging(get_settings().log_level, get_settings().log_json)


# --------------------------------------------------------------------------- synchronous rejections


class _Evidence:
    def __init__(self, reply):
        self.reply = reply


class _Result:
    def __init__(self, code, reply):
        self.reply_code = code
        self.evidence = _Evidence(reply)


@pytest.mark.parametrize("code, reply, bounce_type, status", [
    (550, "5.1.1 <pat@x> User unknown", "hard", "5.1.1"),
    (550, "Requested action not taken: mailbox unavailable", "hard", "5.0.0"),
    (554, "5.7.1 Message rejected as spam", "soft", "5.7.1"),
    (552, "5.2.2 Mailbox full", "soft", "5.2.2"),
    (554, "Transaction failed", "soft", "5.0.0"),
    (None, None, "soft", None),
])
def test_smtp_rejection_details(code, reply, bounce_type, status):
    details = bounces.smtp_bounce_details(_Result(code, reply))
    assert details == {"bounce_type": bounce_type, "status": status, "source": "smtp"}


def test_record_result_5xx_suppresses_the_address(session, sent):
    from carepost.consent.service import is_suppressed
    from carepost.core.database import org_session
    from carepost.delivery.models import MessageRecipient
    from carepost.delivery.service import record_result
    from carepost.delivery.smtp import Evidence, RecipientResult

    with org_session(sent.org_id) as work:
        recipient = work.get(MessageRecipient, sent.recipient_id)
        recipient.status = "queued"
        evidence = Evidence(mx_host="mx.gmail.example", reply_code=550, reply=f"5.1.1 <{PATIENT}> unknown")
        record_result(work, recipient, RecipientResult(PATIENT, "bounced", "recipient refused: 550", 550,
                                                       evidence=evidence), method="tls")
        work.commit()
    session.rollback()
    assert _recipient(session, sent).status == "bounced"
    [event] = _events(session, sent)
    assert event.details["bounce_type"] == "hard" and event.details["status"] == "5.1.1"
    assert is_suppressed(session, sent.org_id, PATIENT) == "bounce_hard"
