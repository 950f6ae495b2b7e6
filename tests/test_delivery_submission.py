"""SMTP submission (``carepost smtp``): STARTTLS required, AUTH by API credentials only after TLS,
failures audited, submitted mail accepted like an API message and delivered by the pipeline with
the X-CarePost-* headers gone."""

from __future__ import annotations

import asyncio
import base64
import email
import smtplib
import ssl
from email import policy as email_policy
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.delivery import pipeline
from carepost.delivery.models import Message, MessageRecipient
from tests.fixtures.delivery import free_port

PHI = "Your HbA1c is 7.9 %; please call about your insulin dose."


class Submission:
    def __init__(self, port: int, ca_file: str, sender):
        self.port, self.ca_file, self.sender = port, ca_file, sender

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def connect(self, tls: bool = True) -> smtplib.SMTP:
        client = smtplib.SMTP("localhost", self.port, timeout=10)
        client.ehlo("app.bar.example")
        if tls:
            client.starttls(context=self.context())
            client.ehlo("app.bar.example")
        return client

    def credential(self, *scopes: str, sandbox: bool = False) -> tuple[str, str]:
        header = self.sender.key(*(scopes or ("messages:send",)), sandbox=sandbox)["Authorization"]
        key_id, secret = header.split(" ", 1)[1].split(".", 1)
        return key_id, secret


@pytest.fixture
def submission(sender, delivery_queue, tls_ca, monkeypatch):
    from carepost.core.config import get_settings, reset_settings
    from carepost.delivery.submission import start_server

    monkeypatch.setenv("CAREPOST_SMTP_SUBMISSION_MAX_BYTES", str(256 * 1024))
    reset_settings()
    cert, key = tls_ca.issue(["localhost"])
    port = free_port()
    controller = start_server(get_settings(), cert, key, host="127.0.0.1", port=port)
    yield Submission(port, str(tls_ca.ca_file), sender)
    controller.stop()


def message(**headers) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Bar Clinic <care@bar.example>"
    msg["To"] = "Pat Doe <pat@valid.test>"
    msg["Cc"] = "lee@valid.test"
    msg["Subject"] = "From your care team"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(PHI)
    msg.add_alternative(f"<p>{PHI}</p>", subtype="html")
    return msg


def stored(session) -> list[Message]:
    session.rollback()
    return session.scalars(select(Message)).all()


def test_nothing_but_starttls_before_tls(submission):
    client = submission.connect(tls=False)
    try:
        assert "starttls" in client.esmtp_features and "auth" not in client.esmtp_features
        key_id, secret = submission.credential()
        token = base64.b64encode(f"\0{key_id}\0{secret}".encode()).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {token}")
        assert code == 530
        assert client.docmd("MAIL", "FROM:<care@bar.example>")[0] == 530
    finally:
        client.close()


def test_after_tls_authentication_is_still_required(submission):
    client = submission.connect()
    try:
        assert "auth" in client.esmtp_features and "PLAIN" in client.esmtp_features["auth"]
        assert client.docmd("MAIL", "FROM:<care@bar.example>")[0] == 530
    finally:
        client.quit()


def test_bad_credentials_are_refused_and_audited(submission, session):
    key_id, secret = submission.credential()
    for user, password in ((key_id, "cp_sk_" + "x" * 43), ("cpk_000000000000000000000000", secret), (key_id, "short")):
        client = submission.connect()
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            client.login(user, password)
        assert exc.value.smtp_code == 535
        client.close()
    session.rollback()
    failures = session.scalars(select(AuditEvent).where(AuditEvent.action == "api_credential.auth_failed")).all()
    assert len(failures) == 6  # smtplib's login tries PLAIN, then LOGIN: each attempt is audited
    assert all(e.details["http_method"] == "SMTP-AUTH" and e.user_agent == "carepost-smtp-submission" for e in failures)
    assert {e.details["reason"] for e in failures} == {"wrong_secret", "unknown_key", "malformed"}


def test_a_credential_without_messages_send_is_refused(submission, session):
    key_id, secret = submission.credential("messages:read")
    client = submission.connect()
    with pytest.raises(smtplib.SMTPAuthenticationError):
        client.login(key_id, secret)
    client.close()
    session.rollback()
    denied = session.scalars(select(AuditEvent).where(AuditEvent.action == "access.denied")).all()
    assert len(denied) == 2  # PLAIN, then LOGIN
    assert all(d.details["reason"] == "missing:messages:send" and d.target_type == "smtp_submission" for d in denied)


def test_a_submitted_message_is_delivered_without_the_carepost_headers(submission, delivery_env, session):
    key_id, secret = submission.credential()
    client = submission.connect()
    client.login(key_id, secret)
    msg = message(X_CarePost_Purpose="payment", X_CarePost_Security="tls_exclusive", In_Reply_To="<abc@app.bar.example>")
    refused = client.send_message(msg, to_addrs=["pat@valid.test", "lee@valid.test", "audit@valid.test"])
    assert refused == {}
    client.quit()

    [row] = stored(session)
    assert (row.source, row.purpose, row.security, row.contains_phi) == ("smtp", "payment", "tls_exclusive", True)
    kinds = sorted(r.kind for r in session.scalars(select(MessageRecipient).where(MessageRecipient.message_id == row.id)))
    assert kinds == ["bcc", "cc", "to"]
    [created] = session.scalars(select(AuditEvent).where(AuditEvent.action == "message.create")).all()
    assert created.target_id == row.id and created.details["source"] == "smtp"

    pipeline.deliver([row.id])
    received = delivery_env.mx["valid"].recorder.messages
    assert len(received) == 3 and all(m.tls for m in received)
    parsed = email.message_from_bytes(received[0].data, policy=email_policy.default)
    assert not [h for h in parsed.keys() if h.lower().startswith("x-carepost")]
    assert b"X-CarePost" not in received[0].data and b"audit@" not in received[0].data.split(b"\r\n\r\n", 1)[0]
    assert parsed["In-Reply-To"] == "<abc@app.bar.example>" and "Pat Doe" in str(parsed["To"])
    assert PHI in parsed.get_body(("plain",)).get_content()


def test_defaults_apply_without_carepost_headers(submission, session):
    key_id, secret = submission.credential()
    with submission.connect() as client:
        client.login(key_id, secret)
        client.send_message(message(), to_addrs=["pat@valid.test"])
    [row] = stored(session)
    assert (row.purpose, row.security, row.contains_phi) == ("treatment", "tls_required", True)


def test_refusals_name_the_field_and_store_nothing(submission, session):
    key_id, secret = submission.credential()
    injected = "=?utf-8?b?" + base64.b64encode(b"Hello\r\nBcc: evil@attacker.test").decode() + "?="
    cases = [
        (message(X_CarePost_Security="opportunistic"), "security"),
        (message(X_CarePost_Purpose="advertising"), "purpose"),
        (message(X_CarePost_Contains_PHI="maybe"), "x_carepost_contains_phi"),
    ]
    wrong_from = message()
    wrong_from.replace_header("From", "care@elsewhere.example")
    cases.append((wrong_from, "from"))
    # An encoded word that decodes to CR LF (raw bytes: Python's own generator would write the
    # decoded line break out as a second header line).
    raw = message().as_bytes().replace(b"Subject: From your care team", f"Subject: {injected}".encode())
    cases.append((raw, "subject"))
    with submission.connect() as client:
        client.login(key_id, secret)
        for msg, field in cases:
            with pytest.raises(smtplib.SMTPDataError, match="5.6.0") as exc:
                if isinstance(msg, bytes):
                    client.sendmail("care@bar.example", ["pat@valid.test"], msg)
                else:
                    client.send_message(msg, to_addrs=["pat@valid.test"])
                pytest.fail(f"accepted: {field}")
            assert exc.value.smtp_code == 550, (field, exc.value)
            text = exc.value.smtp_error.decode()
            assert text.startswith(f"5.6.0 {field}:"), text
            assert "attacker" not in text and "pat@" not in text
        code, _ = client.docmd("RSET")
        client.docmd("MAIL", "FROM:<care@bar.example>")
        assert client.docmd("RCPT", "TO:<not an address>")[0] == 553
    assert stored(session) == []


def test_size_limit(submission, session):
    key_id, secret = submission.credential()
    big = message()
    big.add_attachment(b"\0" * (300 * 1024), maintype="application", subtype="octet-stream", filename="scan.bin")
    with submission.connect() as client:
        client.login(key_id, secret)
        assert client.esmtp_features["size"] == str(256 * 1024)
        with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)) as exc:
            client.send_message(big, to_addrs=["pat@valid.test"])
        assert exc.value.smtp_code == 552
    assert stored(session) == []


def test_attachments_and_sandbox_over_aiosmtplib(submission, session):
    import aiosmtplib

    key_id, secret = submission.credential(sandbox=True)
    msg = message()
    msg.add_attachment(b"%PDF-1.4 results", maintype="application", subtype="pdf", filename="results.pdf")

    async def go():
        return await aiosmtplib.send(msg, hostname="localhost", port=submission.port, start_tls=True,
                                     tls_context=submission.context(),
                                     username=key_id, password=secret, recipients=["pat@valid.test"])

    errors, reply = asyncio.run(go())
    assert errors == {} and reply.startswith("2.0.0 Queued as")
    [row] = stored(session)
    assert row.sandbox is True and reply.endswith(row.id)
    from carepost.delivery.models import MessageAttachment

    [attachment] = session.scalars(select(MessageAttachment)).all()
    assert attachment.content_type == "application/pdf" and attachment.size == 16


def test_self_signed_certificate_for_carepost_run(tmp_path):
    from cryptography import x509

    from carepost.delivery.submission import ensure_self_signed

    cert, key = ensure_self_signed(tmp_path / "smtp-tls", ["localhost", "mail.bar.example"])
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["localhost", "mail.bar.example"]
    assert ensure_self_signed(tmp_path / "smtp-tls", ["localhost"]) == (cert, key)  # kept, not remade


def test_carepost_smtp_needs_a_certificate_or_self_signed(storage, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, **storage.env, "CAREPOST_SMTP_SUBMISSION_PORT": str(free_port())}
    env.pop("CAREPOST_SMTP_SUBMISSION_CERT_FILE", None)
    result = subprocess.run([sys.executable, "-m", "carepost.cli", "smtp"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "CAREPOST_SMTP_SUBMISSION_CERT_FILE" in result.stderr


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HEADER_LINES = st.lists(st.sampled_from([
    b"From: Bar <care@bar.example>", b"From: =?utf-8?b?AAAA?= <x@y>", b"To: a@b.test, \"q\\\"x\" <c@d.test>",
    b"Subject: =?utf-8?q?caf=C3=A9?=", b"Subject: =?bogus?x?zz?=", b"Content-Type: multipart/mixed; boundary=b",
    b"Content-Type: text/plain; charset=unknown-8bit", b"Content-Transfer-Encoding: base64",
    b"X-CarePost-Contains-PHI: yes", b"X-CarePost-Purpose: treatment", b"Cc: ,,,", b"--b", b"--b--",
    b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.pdf", b"Content-ID: <logo>",
]), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=HEADER_LINES, body=st.binary(max_size=300))
def test_parsing_hostile_submissions_never_raises_anything_but_a_clear_refusal(head, body):
    from carepost.core.errors import ValidationFailed
    from carepost.delivery.submission import message_request

    raw = b"\r\n".join(head) + b"\r\n\r\n" + body
    try:
        data = message_request(raw, ["pat@valid.test"])
    except ValidationFailed as exc:
        assert exc.field
        return
    assert data["to"] + data["cc"] + data["bcc"] and isinstance(data["contains_phi"], bool)


def test_the_rate_limit_counts_messages_not_authentications(submission, session):
    """``--rate-limit N`` accepts exactly N messages a minute, however many times the client
    authenticates (AUTH used to count too: a client that logs in per message got N/2)."""
    from carepost.accounts.credentials import create_credential

    cred, secret = create_credential(session, submission.sender.org_id, name="limited", scopes=["messages:send"],
                                     rate_limit_per_minute=3)
    session.commit()
    for _ in range(3):  # a new session, and a new AUTH, for every message
        with submission.connect() as client:
            client.login(cred.key_id, secret)
            assert client.send_message(message(), to_addrs=["pat@valid.test"]) == {}
    with submission.connect() as client:
        client.login(cred.key_id, secret)  # authenticating is not a message: still allowed
        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.send_message(message(), to_addrs=["pat@valid.test"])
        assert exc.value.smtp_code == 451 and b"4.7.1" in exc.value.smtp_error
    assert len(stored(session)) == 3


def test_phi_in_the_subject_is_refused_on_the_smtp_path(submission, session):
    """Issue 9 item 9: SMTP submission runs the same PHI lint on the subject of a message that
    carries PHI (the default): a 550 naming the field, nothing stored, the text never echoed."""
    key_id, secret = submission.credential()
    with submission.connect() as client:
        client.login(key_id, secret)
        for subject in ("Your biopsy result", "Pat, your results are in", "Results of 03/12/2026"):
            msg = message()
            msg.replace_header("Subject", subject)
            with pytest.raises(smtplib.SMTPDataError) as exc:
                client.send_message(msg, to_addrs=["pat@valid.test"])
            text = exc.value.smtp_error.decode()
            assert exc.value.smtp_code == 550 and text.startswith("5.6.0 subject:"), text
            assert "biopsy" not in text and "03/12" not in text and "Pat," not in text
        # Marked as carrying no PHI, the same subject is accepted.
        msg = message(X_CarePost_Contains_PHI="false")
        msg.replace_header("Subject", "Flu shots on 10/14")
        client.send_message(msg, to_addrs=["pat@valid.test"])
    assert [m.contains_phi for m in stored(session)] == [False]
