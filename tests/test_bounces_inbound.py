"""The inbound return-path server end to end with smtplib: recipients checked at RCPT (return-path
domains only, verified VERP or role mailboxes), STARTTLS offered, size limit, reports stored
encrypted and applied by the queued task (suppression, recipient status, events), and the
``carepost inbound`` command as a real process."""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from carepost.core import clock
from tests.fixtures.delivery import free_port
from tests.test_bounces import PATIENT, RETURN_DOMAIN, _forge, _recipient, make_sent, sample

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def inbound(db, monkeypatch):
    """The return-path server in this process, with the queue running tasks at once."""
    from carepost.core.config import get_settings, reset_settings
    from carepost.core.queue import huey
    from carepost.delivery.inbound import start_inbound

    monkeypatch.setenv("CAREPOST_SMTP_HELO_NAME", "mx.carepost.example")
    monkeypatch.setenv("CAREPOST_INBOUND_MAX_BYTES", "200000")
    reset_settings()
    huey.immediate = True
    port = free_port()
    controller = start_inbound(get_settings(), host="127.0.0.1", port=port)
    yield port
    controller.stop()
    huey.immediate = False
    monkeypatch.undo()
    reset_settings()


def _client(port: int) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
    smtp.ehlo("mta.gmail.example")
    assert smtp.has_extn("starttls")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a self-signed certificate made for the return path
    smtp.starttls(context=context)
    smtp.ehlo("mta.gmail.example")
    return smtp


def _reports(session):
    from carepost.tracking.models import InboundReport

    session.rollback()
    return list(session.scalars(select(InboundReport).order_by(InboundReport.received_at)))


def test_a_bounce_over_smtp_suppresses_the_address(session, org, inbound):
    from carepost.consent.service import is_suppressed
    from carepost.delivery.models import MessageEvent

    sent = make_sent(session, org.id)
    with _client(inbound) as smtp:
        refused = smtp.sendmail("", [sent.verp], sample("gmail_hard.eml", sent.verp))
        assert refused == {}
    assert _recipient(session, sent).status == "bounced"
    assert is_suppressed(session, org.id, PATIENT) == "bounce_hard"
    [report] = _reports(session)
    assert report.status == "applied" and report.kind == "dsn" and report.recipient_id == sent.recipient_id
    assert report.null_sender and report.tls and report.peer == "127.0.0.1"
    assert report.outcome["effect"] == "hard_bounce"
    assert PATIENT.encode() not in report.raw_enc  # stored encrypted
    events = session.scalars(select(MessageEvent).where(MessageEvent.recipient_id == sent.recipient_id)).all()
    assert [e.type for e in events] == ["bounced"]


def test_a_complaint_to_the_fbl_mailbox(session, org, inbound):
    from carepost.consent.service import is_suppressed

    sent = make_sent(session, org.id)
    with _client(inbound) as smtp:
        smtp.sendmail("feedback@arf.mail.yahoo.example", [f"fbl@{RETURN_DOMAIN}"], sample("yahoo_arf.eml", sent.verp))
    assert is_suppressed(session, org.id, PATIENT, "marketing") == "complaint"
    [report] = _reports(session)
    assert report.kind == "arf" and report.status == "applied" and not report.null_sender


def test_recipients_are_checked_at_rcpt(session, org, inbound):
    sent = make_sent(session, org.id)
    with _client(inbound) as smtp:
        smtp.mail("")
        assert smtp.rcpt("someone@elsewhere.example")[0] == 550  # not a relay
        assert smtp.rcpt(f"info@{RETURN_DOMAIN}")[0] == 550  # no such mailbox
        assert smtp.rcpt(_forge(sent.verp))[0] == 550  # forged VERP
        assert smtp.rcpt(f"b+{'0' * 32}.{'0' * 16}@{RETURN_DOMAIN}")[0] == 550
        assert smtp.rcpt(f"postmaster@{RETURN_DOMAIN}")[0] == 250
        assert smtp.rcpt(sent.verp.upper())[0] == 250  # case does not matter
        smtp.rset()
    assert _reports(session) == []


def test_starttls_is_offered_not_required(session, org, inbound):
    """Some bounce senders cannot do TLS; a plain-text DSN is still taken in."""
    sent = make_sent(session, org.id)
    with smtplib.SMTP("127.0.0.1", inbound, timeout=10) as smtp:
        smtp.ehlo("old-mta.example")
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        smtp.sendmail("", [sent.verp], sample("postfix_soft.eml", sent.verp))
    [report] = _reports(session)
    assert report.tls is False and report.outcome["effect"] == "soft_bounce"


def test_no_auth_is_offered_even_after_starttls(session, org, inbound):
    """The return path authenticates no one: AUTH is advertised neither in clear nor after
    STARTTLS (it used to offer AUTH LOGIN PLAIN and then answer 535 to everything)."""
    with _client(inbound) as smtp:  # EHLO again after STARTTLS
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert not smtp.has_extn("auth"), smtp.esmtp_features
        assert smtp.ehlo_resp and b"AUTH" not in smtp.ehlo_resp.upper()
        code, _ = smtp.docmd("AUTH", "PLAIN AGZvbwBiYXI=")
        assert code in (502, 504)  # not offered: never a 535 as if credentials could work
        assert smtp.noop()[0] == 250


def test_oversized_reports_are_refused(session, org, inbound):
    sent = make_sent(session, org.id)
    big = sample("gmail_hard.eml", sent.verp) + (b"X" * 76 + b"\r\n") * 3300
    with _client(inbound) as smtp:
        # A client that announces the size (SIZE, RFC 1870) is refused at MAIL FROM...
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            smtp.sendmail("", [sent.verp], big)
        assert exc.value.smtp_code == 552
        # ...one that does not, after the data.
        smtp.mail("")
        smtp.rcpt(sent.verp)
        code, _ = smtp.data(big)
        assert code == 552
    assert _reports(session) == []


def test_junk_is_stored_and_ignored(session, org, inbound):
    sent = make_sent(session, org.id)
    with _client(inbound) as smtp:
        smtp.sendmail("", [f"postmaster@{RETURN_DOMAIN}"], b"Subject: hello\r\n\r\n\x00\xff garbage\r\n")
        smtp.sendmail("", [f"dmarc@{RETURN_DOMAIN}"], sample("dmarc_aggregate.eml", sent.verp))
    reports = _reports(session)
    # the sample DMARC report's zip is damaged: read as feedback and refused with the reason
    assert [(r.kind, r.status) for r in reports] == [("other", "ignored"), ("feedback", "ignored")]
    assert reports[1].outcome["reason"] == "the zip file is damaged"
    assert _recipient(session, sent).status == "delivered"


def test_processing_is_idempotent_and_reports_are_purged(session, org, monkeypatch):
    from carepost.core.config import reset_settings
    from carepost.core.database import system_session
    from carepost.delivery.inbound import process_report, purge_reports, store_report
    from carepost.delivery.models import MessageEvent
    from carepost.delivery import tasks

    sent = make_sent(session, org.id)
    queued = []
    monkeypatch.setattr(tasks, "process_inbound_report", lambda report_id: queued.append(report_id))
    [report_id] = store_report({sent.verp: [org.id]}, sample("gmail_hard.eml", sent.verp), null_sender=True,
                               peer="192.0.2.1", tls=True)
    assert queued == [report_id]
    assert process_report(report_id) == "applied"
    assert process_report(report_id) is None  # a second run (a retried task) changes nothing
    session.rollback()
    assert len(session.scalars(select(MessageEvent).where(MessageEvent.recipient_id == sent.recipient_id)).all()) == 1

    monkeypatch.setenv("CAREPOST_INBOUND_REPORT_RETENTION_DAYS", "30")
    reset_settings()
    with system_session() as s:
        assert purge_reports(s) == 0
        s.commit()
    clock.advance(timedelta(days=31))
    with system_session() as s:
        assert purge_reports(s) == 1
        s.commit()
    assert _reports(session) == []
    reset_settings()


def test_pending_reports_are_queued_again(session, org, monkeypatch):
    from carepost.delivery.inbound import pending_report_ids, store_report
    from carepost.delivery import tasks

    sent = make_sent(session, org.id)

    def queue_down(report_id):
        raise ConnectionError("queue unreachable")

    monkeypatch.setattr(tasks, "process_inbound_report", queue_down)
    [report_id] = store_report({sent.verp: [org.id]}, sample("gmail_hard.eml", sent.verp), null_sender=True,
                               peer=None, tls=False)
    assert pending_report_ids(older_than=timedelta(minutes=10)) == []
    clock.advance(timedelta(minutes=11))
    assert pending_report_ids(older_than=timedelta(minutes=10)) == [report_id]


def test_carepost_inbound_command(storage, session, org):
    """``carepost inbound`` as a real process: it listens, offers STARTTLS, refuses strangers and
    stops cleanly on SIGTERM."""
    make_sent(session, org.id)
    port = free_port()
    env = {**os.environ, **storage.env, "CAREPOST_SMTP_HELO_NAME": "mx.carepost.example"}
    proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "inbound", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                smtp = smtplib.SMTP("127.0.0.1", port, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "carepost inbound did not start"
                time.sleep(0.2)
        with smtp:
            code, banner = smtp.ehlo("mta.example")
            assert code == 250 and b"mx.carepost.example" in banner and smtp.has_extn("starttls")
            smtp.mail("")
            assert smtp.rcpt("user@not-ours.example")[0] == 550
            assert smtp.rcpt(f"postmaster@{RETURN_DOMAIN}")[0] == 250
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
