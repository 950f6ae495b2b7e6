"""The inbound return path: an SMTP server (``carepost inbound``) that receives bounces and
complaints for the organizations' return-path domains (``bounces.<sending domain>``, whose MX
record points here — see ``service.dns_records``).

What it accepts, and why:

* only recipients at the return-path domain of a sending domain whose ownership an organization
  has proven (``_carepost-challenge`` TXT record; at most one organization per domain) — anything
  else, a domain merely claimed included, is refused with 550 (this is not an open relay, no other
  mail is taken in, and a claim on another's domain never receives its reports);
* at those domains, only a VERP address whose MAC verifies for the domain's owner
  (``b+<recipient id>.<mac>@``, where bounces arrive; ``u+<recipient id>.<mac>@``, the
  List-Unsubscribe ``mailto:`` — a mail there unsubscribes that recipient through the
  ``unsubscribe_request`` port, its content unread), or the role mailboxes ``postmaster``,
  ``abuse``, ``fbl`` (feedback loops) and ``dmarc`` (the DMARC ``rua`` address). A forged VERP is
  refused and logged without the address;
* at most ``CAREPOST_INBOUND_MAX_BYTES`` a message (552 above); STARTTLS is offered (not
  required: some bounce senders cannot do TLS; the MTA-STS policy for the return-path domain asks
  senders that can to insist on it).

A received message is stored encrypted (one :class:`~carepost.delivery.models.InboundReport` per
organization it was addressed to) and its id queued; the worker parses and applies it
(:func:`process_report` via ``delivery.tasks.process_inbound_report``). The SMTP conversation never
waits for parsing, and a report whose processing fails stays stored for a retry.

``inbound_handler()`` is the aiosmtpd handler, for a server that wants to mount it on a port of
its own; ``run_inbound()`` is the ``carepost inbound`` command's loop.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import delete, select

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.crypto import get_keyring
from carepost.core.database import org_session, read_only_session, system_session
from carepost.core.ids import new_id
from carepost.core.logging import get_logger
from carepost.delivery import bounces
from carepost.delivery.models import InboundReport

log = get_logger("carepost.delivery.inbound")

ROLE_MAILBOXES = frozenset({"postmaster", "abuse", "fbl", "dmarc", "tlsrpt"})

from carepost.core.ports import Port  # noqa: E402

unsubscribe_request: Port = Port(
    "delivery.unsubscribe_request",
    "A mail to a recipient's List-Unsubscribe mailto address: (session, org_id, recipient_id) -> None (consent).")
feedback_report: Port = Port(
    "delivery.feedback_report",
    "A received mail that is no bounce or complaint, read as DMARC aggregate or SMTP TLS reports: "
    "(session, org_id, raw, report_id) -> {kind, status, outcome} or None (tracking).")
MAX_RECIPIENTS = 50


# --------------------------------------------------------------------------- acceptance


class Refusal(Exception):
    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


def _return_path_orgs(session, domain: str) -> list[str]:
    """The organization that proved ownership of the sending domain whose return path this is
    (at most one, issue 9 item 2). An organization that merely claims a domain gets none of its
    bounces, complaints or DMARC reports: a claim on another's domain must not read its reports."""
    from carepost.delivery.models import SendingDomain

    return sorted(set(session.scalars(select(SendingDomain.org_id).where(SendingDomain.return_path_domain == domain,
                                                                         SendingDomain.verified_at.is_not(None)))))


def accept_recipient(address: str) -> list[str]:
    """The organizations a recipient address belongs to; raises :class:`Refusal` with the SMTP
    reply otherwise. Runs in a worker thread (database access)."""
    local, sep, domain = (address or "").strip().strip("<>").rpartition("@")
    domain = domain.lower().rstrip(".")
    if not sep or not local or not domain:
        raise Refusal("553 5.1.3 Bad recipient address syntax")
    with system_session() as session:
        orgs = _return_path_orgs(session, domain)
        if not orgs:
            raise Refusal("550 5.7.1 Relaying denied: not a return-path domain of this server")
        local = local.lower()
        if local in ROLE_MAILBOXES:
            return orgs
        if "+" in local:
            matching = [org_id for org_id in orgs if bounces.verp_recipient_id(session, org_id, address) is not None
                        or bounces.unsubscribe_recipient_id(session, org_id, address) is not None]
            session.commit()  # a VERP key created on first use is kept
            if matching:
                return matching
            log.warning("inbound_forged_verp_refused", org_count=len(orgs))
        raise Refusal("550 5.1.1 No such recipient here")


def store_report(rcpt_orgs: dict[str, list[str]], raw: bytes, *, null_sender: bool, peer: str | None,
                 tls: bool) -> list[str]:
    """Store a received message encrypted, once per organization, and queue it for processing."""
    per_org: dict[str, list[str]] = {}
    for rcpt, orgs in rcpt_orgs.items():
        for org_id in orgs:
            per_org.setdefault(org_id, []).append(rcpt.lower())
    ids = []
    with system_session() as session:
        ring = get_keyring()
        for org_id, rcpts in per_org.items():
            report_id = new_id()
            session.add(InboundReport(
                id=report_id, org_id=org_id, received_at=clock.now(), envelope_recipients=rcpts,
                null_sender=null_sender, peer=(peer or "")[:64] or None, tls=tls, size=len(raw), status="pending",
                raw_enc=ring.encrypt(session, org_id, InboundReport.__tablename__, "raw", report_id, raw),
            ))
            ids.append(report_id)
        session.commit()
    from carepost.delivery.tasks import process_inbound_report

    for report_id in ids:
        try:
            process_inbound_report(report_id)
        except Exception as exc:  # stored: the periodic re-queue (delivery.tasks) picks it up
            log.warning("inbound_enqueue_failed", report_id=report_id, error_type=type(exc).__name__)
    return ids


# --------------------------------------------------------------------------- processing


def process_report(report_id: str) -> str | None:
    """Parse a stored report and apply it; idempotent (a processed report is left alone)."""
    with read_only_session() as session:
        org_id = session.scalar(select(InboundReport.org_id).where(InboundReport.id == report_id))
    if org_id is None:
        return None
    with org_session(org_id) as session:
        q = select(InboundReport).where(InboundReport.id == report_id)
        if session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update()
        row = session.scalars(q).first()
        if row is None or row.status != "pending" or row.raw_enc is None:
            return None
        unsubscribing = [rid for rid in (bounces.unsubscribe_recipient_id(session, org_id, a)
                                         for a in (row.envelope_recipients or [])) if rid]
        if unsubscribing:
            # RFC 2369 mailto: unsubscribe: the mail itself is not read (its content is the sender's).
            for rid in unsubscribing:
                unsubscribe_request(session, org_id, rid)
            row.kind = "unsubscribe"
            row.status = "unsubscribed"
            row.recipient_id = unsubscribing[0]
            row.outcome = {"status": "unsubscribed", "recipient_id": unsubscribing[0]}
            row.processed_at = clock.now()
            session.commit()
            log.info("inbound_unsubscribe_processed", report_id=report_id, org_id=org_id, recipient_id=unsubscribing[0])
            return "unsubscribed"
        raw = get_keyring().decrypt(session, org_id, InboundReport.__tablename__, "raw", row.id, row.raw_enc)
        report = bounces.parse_report(raw)
        if report.kind not in ("dsn", "arf"):
            # Mail to the dmarc@ and tlsrpt@ mailboxes (the rua addresses of the domain's records).
            feedback = feedback_report(session, org_id, raw, row.id)
            if feedback is not None:
                row.kind, row.status, row.outcome = feedback["kind"][:16], feedback["status"], feedback["outcome"]
                row.processed_at = clock.now()
                session.commit()
                log.info("inbound_report_processed", report_id=report_id, org_id=org_id, report_kind=row.kind,
                         outcome_status=row.status)
                return row.status
        outcome = bounces.apply_report(session, org_id, report, list(row.envelope_recipients or []), report_id=row.id)
        row.kind = report.kind
        row.status = outcome.status
        row.outcome = outcome.to_dict()
        row.recipient_id = outcome.recipient_id
        row.processed_at = clock.now()
        session.commit()
    log.info("inbound_report_processed", report_id=report_id, org_id=org_id, report_kind=report.kind,
             outcome_status=outcome.status, effect_kind=outcome.effect, recipient_id=outcome.recipient_id)
    return outcome.status


def purge_reports(session, *, now: datetime | None = None) -> int:
    """Delete received reports older than ``CAREPOST_INBOUND_REPORT_RETENTION_DAYS``."""
    cutoff = (now or clock.now()) - timedelta(days=get_settings().inbound_report_retention_days)
    return session.execute(delete(InboundReport).where(InboundReport.received_at < cutoff)
                           .execution_options(synchronize_session=False)).rowcount or 0


def pending_report_ids(*, older_than: timedelta = timedelta(0), limit: int = 1000) -> list[str]:
    """Reports still waiting, received at least ``older_than`` ago (a queue outage left them)."""
    with read_only_session() as session:
        return list(session.scalars(
            select(InboundReport.id)
            .where(InboundReport.status == "pending", InboundReport.received_at <= clock.now() - older_than)
            .order_by(InboundReport.received_at).limit(limit)
        ))


# --------------------------------------------------------------------------- the SMTP server


class InboundHandler:
    """aiosmtpd handler: recipients checked at RCPT, the message stored at DATA. The return path
    takes mail from anyone and authenticates no one: AUTH is never advertised (aiosmtpd would
    offer ``AUTH LOGIN PLAIN`` after STARTTLS and then answer 535 to every attempt)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [line for line in responses if not line[4:].upper().startswith("AUTH")]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        loop = asyncio.get_running_loop()
        try:
            orgs = await loop.run_in_executor(None, accept_recipient, address)
        except Refusal as refusal:
            return refusal.reply
        except Exception as exc:
            log.error("inbound_rcpt_error", error_type=type(exc).__name__)
            return "451 4.3.0 Temporary failure, try again later"
        envelope.rcpt_tos.append(address)
        mapping = getattr(envelope, "carepost_orgs", None)
        if mapping is None:
            mapping = envelope.carepost_orgs = {}
        mapping[address] = orgs
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", errors="surrogateescape")
        peer = session.peer[0] if isinstance(session.peer, tuple) and session.peer else None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                None,
                lambda: store_report(getattr(envelope, "carepost_orgs", {}), raw,
                                     null_sender=envelope.mail_from in ("", "<>", None), peer=peer,
                                     tls=session.ssl is not None),
            )
        except Exception as exc:
            log.error("inbound_store_error", error_type=type(exc).__name__)
            return "451 4.3.0 Temporary failure, try again later"
        return "250 2.0.0 Ok: queued"


def inbound_handler() -> InboundHandler:
    return InboundHandler()


def _self_signed(settings: Settings, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for STARTTLS in the data dir (made once, renewed when it expires)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path = settings.data_dir / "inbound-tls.crt"
    key_path = settings.data_dir / "inbound-tls.key"
    now = datetime.now(timezone.utc)
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc > now + timedelta(days=7):
            return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def tls_context(settings: Settings | None = None) -> ssl.SSLContext:
    from carepost.delivery.service import mail_host

    settings = settings or get_settings()
    if settings.inbound_cert_file and settings.inbound_key_file:
        cert, key = settings.inbound_cert_file, settings.inbound_key_file
    elif settings.smtp_submission_cert_file and settings.smtp_submission_key_file:
        cert, key = settings.smtp_submission_cert_file, settings.smtp_submission_key_file
    else:
        cert, key = _self_signed(settings, mail_host(settings))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def create_controller(settings: Settings | None = None, *, host: str | None = None, port: int | None = None):
    """An aiosmtpd controller (not started) serving the return path."""
    from aiosmtpd.controller import Controller

    from carepost.delivery.service import mail_host

    settings = settings or get_settings()
    return Controller(
        inbound_handler(), hostname=host or settings.inbound_host, port=port or settings.inbound_port,
        server_hostname=mail_host(settings), tls_context=tls_context(settings), require_starttls=False,
        data_size_limit=settings.inbound_max_bytes, enable_SMTPUTF8=True, decode_data=False,
        ident="CarePost return path", auth_exclude_mechanism=["LOGIN", "PLAIN"],
    )


def start_inbound(settings: Settings | None = None, *, host: str | None = None, port: int | None = None):
    """Start the return-path server in a background thread; returns the controller (``stop()`` it).
    For ``carepost inbound``, or for another SMTP process that serves the return path on a second
    port. Reports left pending (a queue outage) are queued again first."""
    import logging

    from carepost.delivery.tasks import process_inbound_report

    settings = settings or get_settings()
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every peer and command
    for report_id in pending_report_ids():
        process_inbound_report(report_id)
    controller = create_controller(settings, host=host, port=port)
    controller.start()
    log.info("inbound_listening", host=host or settings.inbound_host, port=port or settings.inbound_port)
    return controller


def run_inbound(settings: Settings | None = None, *, host: str | None = None, port: int | None = None) -> None:
    """``carepost inbound``: serve until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    controller = start_inbound(settings, host=host, port=port)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        controller.stop()
        log.info("inbound_stopped")
