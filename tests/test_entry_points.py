"""Every real entry point, started as its own process, does its real work (issue 8 item 3).

Each command goes through the one composition root (``assembly.assemble()``, called by the CLI's
callback), so what it does cannot depend on what happened to be imported:

* ``carepost inbound`` takes a real DSN with full SMTP DATA (250, not the 451 of a process whose
  models were never loaded) and ``carepost worker`` applies it: the address ends up suppressed;
* ``carepost smtp`` (STARTTLS required, AUTH by API key) excludes a marketing message to a contact
  without a marketing authorization (``no_authorization``);
* ``carepost worker`` defers a marketing message inside the organization's quiet hours
  (``quiet_hours``), for a contact who did sign an authorization.

Arranging (organizations, sending domain, contacts, the first delivery to the local MX sink)
happens in this process; the behaviour under test happens only in the subprocesses.
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import select

from carepost.core import clock
from carepost.core.database import org_session
from carepost.delivery import pipeline
from carepost.delivery.models import Message, MessageRecipient
from tests.fixtures.delivery import free_port
from tests.test_bounces import RETURN_DOMAIN, sample

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 60  # seconds, for each wait on a subprocess

pytestmark = pytest.mark.slow


class Process:
    """A ``carepost ...`` command in its own process, its output in a file (read on failure)."""

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", *args], env=env, cwd=str(ROOT),
                                         stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text()[-4000:]

    def alive(self) -> None:
        assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output()}"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def processes(tmp_path):
    started: list[Process] = []

    def start(*args: str, env: dict) -> Process:
        p = Process(list(args), env, tmp_path / f"{args[0]}-{len(started)}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def _env(storage, **extra) -> dict:
    """The test's environment (delivery peers and queue name set by the fixtures) and storage."""
    return {**os.environ, **storage.env, "CAREPOST_LOG_JSON": "true", **extra}


def _wait_port(process: Process, port: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        process.alive()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                smtp.noop()
            return
        except (OSError, smtplib.SMTPException):
            assert time.monotonic() < deadline, f"not listening on {port}:\n{process.output()}"
            time.sleep(0.2)


def _wait_for(check, what: str, *processes: Process):
    deadline = time.monotonic() + DEADLINE
    while True:
        for p in processes:
            p.alive()
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n".join(p.output() for p in processes)
        time.sleep(0.25)


def _contact(org_id: str, address: str, *, authorized: bool) -> str:
    from carepost.consent import authorizations
    from carepost.patients import service as patients

    with org_session(org_id) as s:
        contact = patients.save_contact(s, org_id, {"given_name": "Pat", "email": address}).contact
        if authorized:
            authorizations.record_authorization(s, org_id, contact_id=contact.id, purpose="marketing", method="api",
                                                signature_name="Pat Doe", send_copy=False)
        s.commit()
        return contact.id


def _recipient_rows(session, message_id: str) -> list[MessageRecipient]:
    session.rollback()
    return list(session.scalars(select(MessageRecipient).where(MessageRecipient.message_id == message_id)))


# --------------------------------------------------------------------------- carepost inbound


def test_carepost_inbound_stores_a_real_dsn_and_the_worker_suppresses_the_address(
        storage, delivery_env, sender, delivery_queue, client, session, processes):
    from carepost.delivery.models import InboundReport
    from carepost.delivery.suppressions import is_suppressed

    patient = "pat@valid.test"
    # A real message, really delivered to the local MX: its envelope sender is the VERP address.
    key = sender.key()
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "Bar Clinic <care@bar.example>", "to": [patient], "subject": "Your appointment",
        "text": "See you on Monday.", "purpose": "treatment"})
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]
    assert pipeline.deliver([message_id]).statuses == {"delivered": 1}
    [received] = delivery_env.mx["valid"].recorder.messages
    verp = received.mail_from
    assert verp.startswith("b+") and verp.endswith(f"@{RETURN_DOMAIN}")

    port = free_port()
    env = _env(storage, CAREPOST_SMTP_HELO_NAME="mx.carepost.example")
    inbound = processes("inbound", "--host", "127.0.0.1", "--port", str(port), env=env)
    _wait_port(inbound, port)

    dsn = sample("gmail_hard.eml", verp, rcpt=patient)
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("mta.gmail.example")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the return path's self-signed certificate
        smtp.starttls(context=context)
        smtp.ehlo("mta.gmail.example")
        assert smtp.mail("")[0] == 250  # MAIL FROM:<> (a DSN has the null sender)
        assert smtp.rcpt(verp)[0] == 250
        code, reply = smtp.data(dsn)
        assert code == 250, (code, reply, inbound.output())  # stored, not 451 4.3.0

    def stored():
        session.rollback()
        return session.scalars(select(InboundReport)).all()

    [report] = _wait_for(stored, "the stored report", inbound)
    assert report.null_sender and report.tls and report.size == len(dsn)

    # The worker (its own process) parses and applies it.
    worker = processes("worker", "--threads", "1", "--no-periodic", env=_env(storage))

    def applied():
        session.rollback()
        row = session.get(InboundReport, report.id, populate_existing=True)
        return row if row.status != "pending" else None

    row = _wait_for(applied, "the report applied by the worker", worker, inbound)
    assert (row.kind, row.status, row.outcome["effect"]) == ("dsn", "applied", "hard_bounce"), row.outcome
    [recipient] = _recipient_rows(session, message_id)
    assert recipient.status == "bounced" and row.recipient_id == recipient.id
    with org_session(sender.org_id) as s:
        assert is_suppressed(s, sender.org_id, patient) == "bounce_hard"
    assert inbound.stop() == 0 and worker.stop() == 0
    for text in (patient, "pat@"):
        assert text not in inbound.output() + worker.output()


# --------------------------------------------------------------------------- carepost smtp


def test_carepost_smtp_excludes_marketing_without_an_authorization(
        storage, delivery_env, sender, delivery_queue, session, processes):
    _contact(sender.org_id, "sam@valid.test", authorized=False)
    header = sender.key("messages:send")["Authorization"]
    key_id, secret = header.split(" ", 1)[1].split(".", 1)

    port = free_port()
    env = _env(storage, CAREPOST_SMTP_SUBMISSION_HOST="127.0.0.1", CAREPOST_SMTP_SUBMISSION_PORT=str(port))
    smtp_process = processes("smtp", "--self-signed", env=env)
    _wait_port(smtp_process, port)
    cert = storage.data_dir / "smtp-tls" / "submission.pem"  # made by the process for localhost

    msg = EmailMessage()
    msg["From"] = "Bar Clinic <care@bar.example>"
    msg["To"] = "Sam <sam@valid.test>"
    msg["Subject"] = "Flu clinic on Saturdays"
    msg["X-CarePost-Purpose"] = "marketing"
    msg["X-CarePost-Contains-PHI"] = "false"
    msg.set_content("Our flu clinic is open on Saturdays this month.")
    with smtplib.SMTP("localhost", port, timeout=20) as client:
        client.ehlo("app.bar.example")
        assert "auth" not in client.esmtp_features  # STARTTLS first
        client.starttls(context=ssl.create_default_context(cafile=str(cert)))
        client.ehlo("app.bar.example")
        client.login(key_id, secret)
        assert client.send_message(msg, to_addrs=["sam@valid.test"]) == {}
        code, reply = client.noop()
        assert code == 250

    session.rollback()
    [message] = session.scalars(select(Message).where(Message.org_id == sender.org_id)).all()
    assert (message.source, message.purpose) == ("smtp", "marketing")
    [recipient] = _recipient_rows(session, message.id)
    assert (recipient.status, recipient.reason) == ("excluded", "no_authorization")
    assert delivery_env.mx["valid"].recorder.messages == []
    assert smtp_process.stop() == 0
    assert "sam@" not in smtp_process.output()


# --------------------------------------------------------------------------- carepost worker


def test_carepost_worker_defers_marketing_inside_quiet_hours(
        storage, delivery_env, sender, delivery_queue, client, session, processes):
    from carepost.consent.service import set_consent_settings

    _contact(sender.org_id, "pat@valid.test", authorized=True)
    now = clock.now()
    with org_session(sender.org_id) as s:  # quiet from an hour ago to an hour from now, in UTC
        set_consent_settings(s, sender.org_id, {
            "default_time_zone": "UTC", "quiet_hours_start": (now - timedelta(hours=1)).strftime("%H:%M"),
            "quiet_hours_end": (now + timedelta(hours=1)).strftime("%H:%M")})
        s.commit()

    key = sender.key("messages:send", "messages:read")
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "Bar Clinic <care@bar.example>", "to": ["pat@valid.test"], "subject": "Flu clinic",
        "text": "Our flu clinic is open on Saturdays this month.", "purpose": "marketing", "contains_phi": False})
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]
    [recipient] = _recipient_rows(session, message_id)
    assert recipient.status == "queued"  # eligible (authorized): waits for the worker

    worker = processes("worker", "--threads", "1", "--no-periodic", env=_env(storage))

    def settled():
        [row] = _recipient_rows(session, message_id)
        return row if row.status != "queued" else None

    row = _wait_for(settled, "the worker's delivery run", worker)
    assert (row.status, row.reason) == ("deferred", "quiet_hours"), (row.status, row.reason)
    assert row.next_attempt_at is not None
    assert clock.aware(row.next_attempt_at) > now  # resumes when the quiet hours end
    assert delivery_env.mx["valid"].recorder.messages == []
    assert worker.stop() == 0
