"""SMTP submission for applications (``carepost smtp``): port-587-style submission (RFC 6409)
with STARTTLS required (RFC 3207) and AUTH PLAIN or LOGIN by API credentials (RFC 4954).

* Nothing but EHLO, STARTTLS, NOOP and QUIT is accepted before TLS; AUTH is not even offered
  in clear, so a credential never crosses the network unencrypted.
* The user name is the credential's key id (``cpk_...``), the password its secret; the
  credential needs the ``messages:send`` scope. Failures answer one generic 535 and are audited
  (``api_credential.auth_failed``) exactly like a failed API request; rate limits apply per
  credential as on the API.
* A submitted message goes through the same acceptance as ``POST /api/v1/messages`` (sending
  domain, security mode, purpose, validation) and the same pipeline. The recipients are the
  envelope's (RCPT TO); To and Cc headers say who is shown, everyone else is Bcc.
  ``X-CarePost-Purpose``, ``X-CarePost-Security`` and ``X-CarePost-Contains-PHI`` set what the
  API's fields set; without them the organization's defaults apply and the message is assumed
  to carry PHI. They, and every other header of the submitted message except In-Reply-To and
  References, are not sent on: CarePost composes the outgoing message itself.
* Refusals name the field (``550 5.6.0 subject: ...``) and never echo a value (it may be PHI).
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import ipaddress
import os
import signal
import ssl
import threading
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from types import SimpleNamespace

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import ValidationError

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.errors import CarePostError, RateLimited, ValidationFailed
from carepost.core.ids import new_id
from carepost.core.logging import get_logger

log = get_logger("carepost.delivery.submission")

MAX_RECIPIENTS = 1000
PASSED_HEADERS = ("In-Reply-To", "References")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Submitter:
    """Who authenticated on an SMTP session (kept in ``session.auth_data``)."""

    org_id: str
    credential_id: str
    sandbox: bool
    rate_limit_per_minute: int | None
    peer: str | None


class _AuthRequest:
    """What ``accounts.credentials.principal_from_authorization`` reads of a request, for an
    SMTP AUTH: the same checks, rate limit and audit of failures as the API."""

    method = "SMTP-AUTH"

    def __init__(self, peer: str | None, key_id: str, secret: str):
        self.headers = {"authorization": f"Bearer {key_id}.{secret}", "user-agent": "carepost-smtp-submission"}
        self.scope = {"route": None}
        self.client = SimpleNamespace(host=peer) if peer else None
        self.state = SimpleNamespace(request_id=new_id())
        self.url = SimpleNamespace(path="smtp-submission")


def authenticate(key_id: str, secret: str, peer: str | None) -> Submitter | None:
    """The credential behind a key id and secret, if valid and allowed to send; else None
    (every failure is audited)."""
    from carepost.accounts.credentials import principal_from_authorization
    from carepost.accounts.permissions import Permission
    from carepost.audit.service import record
    from carepost.core.database import session_factory

    session = session_factory()()
    try:
        # Not counted against the rate limit: the limit is per message (accept_submission).
        principal = principal_from_authorization(_AuthRequest(peer, key_id, secret), session, count_request=False)
        if principal is None:
            return None
        if not principal.can(Permission.MESSAGES_SEND):
            session.rollback()
            session.info["scope"] = "system"
            record(session, org_id=principal.org_id, actor_type="api_credential", actor_id=principal.actor_id,
                   action="access.denied", outcome="denied", target_type="smtp_submission", ip=peer,
                   user_agent="carepost-smtp-submission", details={"reason": "missing:messages:send", "needed": ["messages:send"]})
            session.commit()
            return None
        return Submitter(principal.org_id, principal.credential_id, principal.sandbox, principal.rate_limit_per_minute, peer)
    finally:
        session.close()


# --------------------------------------------------------------------------- reading a submission


def _flag(value: str | None, field: str) -> bool | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValidationFailed("Use true or false.", field=field)


def _mailbox(name: str, address: str) -> str:
    if not name:
        return address
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + f'" <{address}>'


def _header_text(msg: EmailMessage, name: str) -> str | None:
    values = msg.get_all(name)
    if not values:
        return None
    if len(values) > 1:
        raise ValidationFailed(f"More than one {name} header.", field=name.lower().replace("-", "_"))
    return str(values[0])


def message_request(raw: bytes, rcpt_tos: list[str]) -> dict:
    """The ``POST /api/v1/messages`` body a submitted message amounts to."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception:  # noqa: BLE001 - the email package raises many kinds on hostile input
        raise ValidationFailed("The message cannot be parsed.", field="message") from None
    try:
        sender = _header_text(msg, "From")
        subject = _header_text(msg, "Subject") or ""
        shown = {}
        for kind in ("To", "Cc"):
            for name, address in getaddresses([str(v) for v in msg.get_all(kind) or []]):
                if address:
                    shown.setdefault(address.lower(), (kind.lower(), _mailbox(name, address)))
        purpose = _header_text(msg, "X-CarePost-Purpose")
        topic = _header_text(msg, "X-CarePost-Topic")
        security = _header_text(msg, "X-CarePost-Security")
        phi = _flag(_header_text(msg, "X-CarePost-Contains-PHI"), "x_carepost_contains_phi")
    except ValidationFailed:
        raise
    except Exception:  # noqa: BLE001 - malformed header values
        raise ValidationFailed("A header cannot be parsed.", field="headers") from None
    if not sender:
        raise ValidationFailed("The message has no From header.", field="from")
    data: dict = {"from": sender, "to": [], "cc": [], "bcc": [], "subject": subject}
    for rcpt in rcpt_tos:
        kind, mailbox = shown.get(rcpt.lower(), ("bcc", rcpt))
        data[kind].append(mailbox)
    if purpose:
        data["purpose"] = purpose.strip()
    if topic and topic.strip():
        data["topic"] = topic.strip()
    if security:
        data["security"] = security.strip().lower()
    data["contains_phi"] = True if phi is None else phi
    headers = {name: str(msg[name]) for name in PASSED_HEADERS if msg[name] is not None}
    if headers:
        data["headers"] = headers
    try:
        text, html, attachments = _parts(msg)
    except Exception:  # noqa: BLE001 - a structure the email package cannot walk
        raise ValidationFailed("The message body cannot be read.", field="message") from None
    if text is None and html is None:
        text = ""
    data["text"], data["html"] = text, html
    if attachments:
        data["attachments"] = attachments
    return data


def _parts(msg: EmailMessage) -> tuple[str | None, str | None, list[dict]]:
    text = html = None
    attachments: list[dict] = []
    parts = msg.walk() if msg.is_multipart() else [msg]
    for part in parts:
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        disposition = part.get_content_disposition()
        filename = part.get_filename()
        cid = (part.get("Content-ID") or "").strip().strip("<>") or None
        if disposition != "attachment" and filename is None and ctype in ("text/plain", "text/html"):
            content = _text_of(part)
            if ctype == "text/plain" and text is None:
                text = content
                continue
            if ctype == "text/html" and html is None:
                html = content
                continue
        payload = part.get_payload(decode=True) or b""
        attachments.append({
            "filename": filename or (cid or "attachment"), "content_type": ctype,
            "content": base64.b64encode(payload).decode("ascii"),
            **({"content_id": cid} if cid and disposition != "attachment" and ctype.startswith("image/") else {}),
        })
    return text, html, attachments


def _text_of(part) -> str:
    """A text part's content; an unknown or lying charset is read as UTF-8 with replacements
    rather than refusing the message."""
    try:
        return part.get_content()
    except (LookupError, UnicodeError, ValueError, AssertionError):
        return (part.get_payload(decode=True) or b"").decode("utf-8", "replace")


def accept_submission(submitter: Submitter, raw: bytes, rcpt_tos: list[str]) -> str:
    """Store a submitted message like an API message; returns its id (delivery is queued)."""
    from carepost.accounts.ratelimit import enforce
    from carepost.audit.service import record
    from carepost.core.database import org_session
    from carepost.delivery import service
    from carepost.delivery.schemas import MessageIn
    from carepost.delivery.tasks import enqueue_delivery

    limit = submitter.rate_limit_per_minute or get_settings().rate_limit_per_minute
    enforce(f"credential:{submitter.credential_id}", limit)
    data = message_request(raw, rcpt_tos)
    try:
        body = MessageIn.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise ValidationFailed(first.get("msg", "invalid"), field=field) from None
    with org_session(submitter.org_id) as session:
        accepted = service.accept_message(session, submitter.org_id, body, source="smtp",
                                          created_by=submitter.credential_id, sandbox=submitter.sandbox)
        message = accepted.message
        record(session, org_id=submitter.org_id, actor_type="api_credential", actor_id=submitter.credential_id,
               action="message.create", target_type="message", target_id=message.id, ip=submitter.peer,
               user_agent="carepost-smtp-submission",
               details={"source": "smtp", "recipients_count": len(rcpt_tos), "purpose": message.purpose,
                        "security": message.security, "contains_phi": message.contains_phi, "sandbox": message.sandbox})
        session.commit()
        message_id = message.id
    enqueue_delivery([message_id])
    return message_id


# --------------------------------------------------------------------------- the server


class SubmissionHandler:
    """aiosmtpd handler: authentication, recipient limits, and acceptance off the event loop."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def authenticator(self, server, session, envelope, mechanism: str, auth_data) -> AuthResult:
        if mechanism not in ("PLAIN", "LOGIN") or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        try:
            key_id = auth_data.login.decode("utf-8")
            secret = auth_data.password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        peer = session.peer[0] if session.peer else None
        try:
            submitter = authenticate(key_id, secret, peer)
        except RateLimited:
            return AuthResult(success=False, handled=False, message="454 4.7.0 Too many attempts; try again later")
        if submitter is None:
            return AuthResult(success=False, handled=False)
        log.info("smtp_authenticated", credential_id=submitter.credential_id)
        return AuthResult(success=True, auth_data=submitter)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        from carepost.delivery.mime import parse_address

        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 At most {MAX_RECIPIENTS} recipients per message"
        try:
            parse_address(address, field_name="to", allow_display_name=False)
        except ValidationFailed:
            return "553 5.1.3 The recipient address is not valid"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        submitter = session.auth_data
        if not isinstance(submitter, Submitter):
            return "530 5.7.0 Authentication required"
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        loop = asyncio.get_running_loop()
        try:
            message_id = await loop.run_in_executor(None, accept_submission, submitter, raw, list(envelope.rcpt_tos))
        except RateLimited:
            return "451 4.7.1 Rate limit exceeded; try again later"
        except ValidationFailed as exc:
            return _refusal(exc)
        except CarePostError as exc:
            return f"550 5.7.1 {exc.message}"[:500]
        except Exception as exc:  # noqa: BLE001 - the client retries a 4xx; nothing was stored
            log.error("smtp_submission_failed", error_type=type(exc).__name__)
            return "451 4.3.0 Temporary failure; try again later"
        log.info("smtp_message_accepted", message_id=message_id, credential_id=submitter.credential_id,
                 recipients_count=len(envelope.rcpt_tos))
        return f"250 2.0.0 Queued as {message_id}"


def _refusal(exc: ValidationFailed) -> str:
    text = " ".join(f"{exc.field + ': ' if exc.field else ''}{exc.message}".split())
    return f"550 5.6.0 {text}"[:500]


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def start_server(settings: Settings, cert_file: Path, key_file: Path, *, host: str | None = None,
                 port: int | None = None) -> Controller:
    handler = SubmissionHandler(settings)
    from carepost.delivery.service import mail_host

    controller = Controller(
        handler,
        hostname=host or settings.smtp_submission_host,
        port=port or settings.smtp_submission_port,
        server_hostname=mail_host(settings),
        ident="CarePost submission",
        tls_context=server_tls_context(cert_file, key_file),
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=handler.authenticator,
        data_size_limit=settings.smtp_submission_max_bytes,
        decode_data=False,
        command_call_limit={"AUTH": 5, "RCPT": MAX_RECIPIENTS + 10, "*": 1000},
    )
    controller.start()
    return controller


# --------------------------------------------------------------------------- certificates


def self_signed_dir(settings: Settings) -> Path:
    return settings.data_dir / "smtp-tls"


def ensure_self_signed(directory: Path, names: list[str]) -> tuple[Path, Path]:
    """A self-signed certificate for ``names`` (and 127.0.0.1), made once (key 0600). For
    ``carepost run`` on one machine; a real deployment sets CAREPOST_SMTP_SUBMISSION_CERT_FILE."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert_file, key_file = directory / "submission.pem", directory / "submission.key"
    if cert_file.exists() and key_file.exists():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        if cert.not_valid_after_utc > clock.now() + timedelta(days=7):
            return cert_file, key_file
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = clock.now() - timedelta(minutes=5)
    sans = [x509.DNSName(n) for n in dict.fromkeys(names)] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    for path, data in ((key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption())),
                       (cert_file, cert.public_bytes(serialization.Encoding.PEM))):
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return cert_file, key_file


def certificate_files(settings: Settings, *, self_signed: bool) -> tuple[Path, Path]:
    if settings.smtp_submission_cert_file and settings.smtp_submission_key_file:
        return settings.smtp_submission_cert_file, settings.smtp_submission_key_file
    if not self_signed:
        raise ValueError("SMTP submission needs CAREPOST_SMTP_SUBMISSION_CERT_FILE and CAREPOST_SMTP_SUBMISSION_KEY_FILE "
                         "(or --self-signed for a machine of its own)")
    from carepost.delivery.service import mail_host

    names = ["localhost", mail_host(settings)]
    return ensure_self_signed(self_signed_dir(settings), names)


def serve(settings: Settings | None = None, *, self_signed: bool = False) -> None:
    """Run until SIGTERM or SIGINT (``carepost smtp``)."""
    import logging

    settings = settings or get_settings()
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every peer and command
    cert_file, key_file = certificate_files(settings, self_signed=self_signed)
    controller = start_server(settings, cert_file, key_file)
    log.info("smtp_submission_started", host=settings.smtp_submission_host, port=settings.smtp_submission_port)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    controller.stop()
    log.info("smtp_submission_stopped")
