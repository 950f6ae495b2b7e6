"""Bounces and complaints: reading delivery status notifications (DSN, RFC 3464) and feedback
reports (ARF, RFC 5965), tying them to the recipient they are about, and applying what they mean.

Why the parser is hand-rolled on top of the email package rather than trusting its sub-parsers:
reports come from every mail system on the internet, many of them almost-standard. The parser
therefore never raises: whatever arrives becomes a :class:`Report` whose ``kind`` is ``dsn``,
``arf``, ``other`` (readable mail that is no report: a DMARC aggregate report, a human reply) or
``unparseable`` (with the reason), and the property tests feed it junk to keep it that way.

Matching never trusts an address. A report counts only when it names a VERP return path
(``b+<recipient id>.<mac>@bounces.<domain>``, see :func:`carepost.delivery.mime.verp_address`)
whose MAC verifies under the organization's VERP key: the envelope recipient of a bounce, the
``Original-Mail-From`` of a feedback report, or a ``Return-Path`` among the returned headers.
Anything else is ignored and logged by report id only (no addresses: they are PHI).

Effects (:func:`apply_report`):

* **hard bounce** (``Action: failed``, ``Status: 5.x.x``) — the recipient becomes ``bounced``
  and the address is suppressed for everything (reason ``bounce_hard``, scope ``all``);
* **soft bounce** (``Action: failed`` with ``4.x.x``, and the permanent codes that describe the
  message or the sending side rather than the mailbox: ``5.7.x`` policy/security rejections and
  ``5.2.2`` mailbox full) — the recipient becomes ``bounced``; once an address collects
  ``CAREPOST_SOFT_BOUNCE_THRESHOLD`` soft bounces (on different messages) within
  ``CAREPOST_SOFT_BOUNCE_WINDOW_DAYS``, it is suppressed (reason ``bounce_soft``, scope ``all``).
  A spam filter's verdict on one message should not silence a patient's address for good;
  repeated ones should;
* **delayed** (``Action: delayed``) — a ``deferred`` event only: a remote system is still
  retrying, the message may yet arrive, and nothing is counted;
* **complaint** (ARF ``abuse``, ``fraud``, ``virus``, ``other``) — a ``complained`` event and a
  suppression with scope ``marketing`` (reason ``complaint``). The choice is deliberate: a
  healthcare organization's treatment, care-coordination and operational messages (appointment
  reminders, results notices) are not marketing (45 CFR 164.501), and one click on "report spam"
  must not cut a patient off from their care. Marketing stops at once; the complaint shows in
  the recipient's events and webhooks, and staff can add a manual ``all`` suppression.
  ``not-spam`` and ``auth-failure`` reports are recorded and change nothing.

Synchronous rejections (a 5xx during the SMTP transaction) get the same treatment through
:func:`smtp_bounce_details` and :func:`after_bounce`, called by ``service.record_result``.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import Message
from email.parser import HeaderParser
from email.utils import parsedate_to_datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.crypto import get_keyring
from carepost.core.logging import get_logger
from carepost.delivery.mime import parse_verp, verp_address

log = get_logger("carepost.delivery.bounces")

VERP_PREFIX = "b"
# Anything shaped like one of our VERP addresses; each candidate is verified by its MAC.
_VERP_SHAPE = re.compile(r"[a-z0-9-]+\+[0-9a-f]{32}\.[0-9a-f]{16}@[a-z0-9.-]+", re.IGNORECASE)
_STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_CODE_RE = re.compile(r"(?<!\d)([245]\d\d)(?:[ -]|$)")
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (status notification|failure|has failed|incomplete)|returned mail|failure notice|"
    r"mail delivery (failed|subsystem)|non-?delivery|could not be delivered",
    re.IGNORECASE,
)
_DAEMON_FROM = re.compile(r"mailer-daemon|postmaster|mail delivery (subsystem|system)", re.IGNORECASE)

COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other"})
FEEDBACK_TYPES = COMPLAINT_TYPES | {"not-spam", "auth-failure"}
MAX_CANDIDATES = 20
MAX_RECIPIENT_BLOCKS = 100

# RFC 3463 enhanced status codes: what the subject and common details mean (for the reason shown
# to staff; the diagnostic text itself may quote the address, so it is never shown or logged).
_SUBJECTS = {
    "0": "other or undefined status", "1": "addressing status", "2": "mailbox status", "3": "mail system status",
    "4": "network and routing status", "5": "mail delivery protocol status", "6": "message content status",
    "7": "security or policy status",
}
_DETAILS = {
    "1.1": "bad destination mailbox address", "1.2": "bad destination system address",
    "1.3": "bad destination mailbox address syntax", "1.6": "destination mailbox has moved",
    "1.10": "recipient address has null MX", "2.1": "mailbox disabled", "2.2": "mailbox full",
    "2.3": "message length exceeds administrative limit", "3.0": "mail system error", "3.4": "message too big for system",
    "4.1": "no answer from host", "4.4": "unable to route", "4.7": "delivery time expired",
    "5.0": "other or undefined protocol status", "6.0": "other or undefined media error",
    "7.0": "other or undefined security status", "7.1": "delivery not authorized, message refused",
    "7.26": "multiple authentication checks failed", "7.27": "sender address has null MX",
}


# --------------------------------------------------------------------------- the parsed report


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of a DSN. ``diagnostic`` is the remote server's text: it may quote
    the address, so it is kept only inside the encrypted raw report, never logged or stored."""

    action: str = ""
    status: str | None = None
    diagnostic: str | None = field(default=None, repr=False)
    final_recipient: str | None = field(default=None, repr=False)
    original_recipient: str | None = field(default=None, repr=False)
    remote_mta: str | None = None

    @property
    def classification(self) -> str:
        """``hard``, ``soft``, ``delayed`` or ``success``."""
        action = self.action
        if action == "delayed":
            return "delayed"
        if action in ("delivered", "relayed", "expanded"):
            return "success"
        return classify_status(self.status, self.diagnostic)


@dataclass(frozen=True)
class Report:
    kind: str  # dsn | arf | other | unparseable
    reason: str = ""  # why it is "other" or "unparseable"
    standard: bool = True  # False for a non-RFC 3464 bounce read by heuristics
    recipients: tuple[RecipientStatus, ...] = ()
    feedback_type: str | None = None
    reporting_mta: str | None = None
    arrival_date: datetime | None = None
    original_mail_from: str | None = field(default=None, repr=False)
    reported_domain: str | None = None
    source_ip: str | None = None
    verp_candidates: tuple[str, ...] = ()

    @property
    def worst(self) -> RecipientStatus | None:
        """The block that decides the outcome: hard over soft over delayed over success."""
        order = {"hard": 0, "soft": 1, "delayed": 2, "success": 3}
        blocks = sorted(self.recipients, key=lambda r: order[r.classification])
        return blocks[0] if blocks else None


def classify_status(status: str | None, diagnostic: str | None = None) -> str:
    """``hard`` or ``soft`` for a failed delivery, from the enhanced status code (RFC 3463), or
    from the SMTP reply code in the diagnostic when the status is missing."""
    if status:
        m = _STATUS_RE.search(status)
        if m:
            klass, subject, detail = m.groups()
            if klass == "5":
                if subject == "7" or (subject, detail) == ("2", "2"):
                    return "soft"
                return "hard"
            return "soft"
    if diagnostic:
        m = _STATUS_RE.search(diagnostic)
        if m:
            return classify_status(".".join(m.groups()))
        m = _SMTP_CODE_RE.search(diagnostic)
        if m and m.group(1).startswith("5") and m.group(1) not in ("552", "554"):
            return "hard"
    return "soft"


def describe_status(status: str | None) -> str:
    """``5.1.1 (bad destination mailbox address)``: a reason without PHI."""
    if not status:
        return "no status code"
    m = _STATUS_RE.search(status)
    if not m:
        return "no status code"
    klass, subject, detail = m.groups()
    code = f"{klass}.{subject}.{detail}"
    text = _DETAILS.get(f"{subject}.{detail}") or _SUBJECTS.get(subject, "unknown status")
    return f"{code} ({text})"


# --------------------------------------------------------------------------- parsing


def _text(part: Message) -> str:
    """A part's payload as text, whatever its transfer encoding; never raises."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if payload is None:
        raw = part.get_payload()
        if isinstance(raw, list):
            return "\n\n".join(_message_text(m) for m in raw if isinstance(m, Message))
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


def _message_text(msg: Message) -> str:
    try:
        return msg.as_string()
    except Exception:
        return "\n".join(f"{k}: {v}" for k, v in msg.items())


def _field_blocks(text: str) -> list[dict[str, str]]:
    """RFC 822-style field groups separated by blank lines, names lower-cased, first value wins."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        if line[0] in " \t" and last is not None:
            current[last] = (current[last] + " " + line.strip()).strip()
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not name or " " in name:
            last = None
            continue
        if name not in current:
            current[name] = value.strip()
            last = name
        else:
            last = None
    if current:
        blocks.append(current)
    return blocks


def _typed_address(value: str | None) -> str | None:
    """``rfc822; user@example.com`` -> ``user@example.com``."""
    if not value:
        return None
    _, sep, address = value.partition(";")
    return (address if sep else value).strip().strip("<>") or None


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return clock.aware(parsed) if parsed is not None else None


def _candidates(*texts: str | None) -> tuple[str, ...]:
    found: list[str] = []
    for text in texts:
        for m in _VERP_SHAPE.finditer(text or ""):
            address = m.group(0).lower().rstrip(".")
            if address not in found:
                found.append(address)
            if len(found) >= MAX_CANDIDATES:
                return tuple(found)
    return tuple(found)


def _status_blocks(part: Message) -> list[dict[str, str]]:
    payload = part.get_payload()
    if isinstance(payload, list):
        # The email package splits message/delivery-status into one Message per field group.
        return [{k.lower(): " ".join(str(v).split()) for k, v in reversed(m.items())} for m in payload
                if isinstance(m, Message)]
    return _field_blocks(_text(part))


def _original_headers(part: Message | None) -> str:
    if part is None:
        return ""
    ctype = part.get_content_type()
    if ctype in ("message/rfc822", "message/global"):
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            return "\n".join(f"{k}: {v}" for k, v in inner[0].items())
    text = _text(part)
    head, _, _ = text.replace("\r\n", "\n").partition("\n\n")
    return head


def _report_parts(msg: Message) -> tuple[Message | None, Message | None]:
    """(the machine-readable part, the returned original) of a multipart/report."""
    machine = original = None
    for part in msg.get_payload() if isinstance(msg.get_payload(), list) else []:
        if not isinstance(part, Message):
            continue
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/global-delivery-status", "message/feedback-report"):
            machine = machine or part
        elif ctype in ("message/rfc822", "message/global", "text/rfc822-headers", "message/rfc822-headers",
                       "message/global-headers"):
            original = original or part
    return machine, original


def _parse_dsn(msg: Message, machine: Message | None, original: Message | None) -> Report:
    if machine is None:
        return Report("unparseable", "a delivery report without a message/delivery-status part")
    blocks = _status_blocks(machine)
    if not blocks:
        return Report("unparseable", "an empty delivery-status part")
    per_message, per_recipient = blocks[0], blocks[1:]
    if "final-recipient" in per_message or "action" in per_message:
        # No per-message block at all (seen in the wild): every block is a recipient.
        per_message, per_recipient = {}, blocks
    recipients = tuple(
        RecipientStatus(
            action=(b.get("action") or "").strip().lower().split(" ")[0],
            status=(_STATUS_RE.search(b.get("status") or "") or [None])[0],
            diagnostic=b.get("diagnostic-code"),
            final_recipient=_typed_address(b.get("final-recipient")),
            original_recipient=_typed_address(b.get("original-recipient")),
            remote_mta=_typed_address(b.get("remote-mta")),
        )
        for b in per_recipient[:MAX_RECIPIENT_BLOCKS]
        if b.get("action") or b.get("status") or b.get("final-recipient")
    )
    if not recipients:
        return Report("unparseable", "a delivery report without per-recipient fields")
    return Report(
        "dsn",
        recipients=recipients,
        reporting_mta=_typed_address(per_message.get("reporting-mta")),
        arrival_date=_date(per_message.get("arrival-date")),
        verp_candidates=_candidates(per_message.get("original-envelope-id"), _original_headers(original)),
    )


def _parse_arf(machine: Message | None, original: Message | None) -> Report:
    if machine is None:
        return Report("unparseable", "a feedback report without a message/feedback-report part")
    blocks = _field_blocks(_text(machine))
    fields = blocks[0] if blocks else {}
    feedback_type = (fields.get("feedback-type") or "").strip().lower()
    if not feedback_type:
        return Report("unparseable", "a feedback report without Feedback-Type")
    if feedback_type not in FEEDBACK_TYPES:
        feedback_type = "other"
    mail_from = fields.get("original-mail-from")
    return Report(
        "arf",
        feedback_type=feedback_type,
        reporting_mta=_typed_address(fields.get("reporting-mta")),
        arrival_date=_date(fields.get("arrival-date") or fields.get("received-date")),
        original_mail_from=(mail_from or "").strip().strip("<>") or None,
        reported_domain=(fields.get("reported-domain") or "").strip().lower() or None,
        source_ip=(fields.get("source-ip") or "").strip() or None,
        verp_candidates=_candidates(mail_from, _original_headers(original)),
    )


def _parse_heuristic(msg: Message) -> Report:
    """A bounce that is not RFC 3464 (qmail, old Exchange, some webmail systems): recognised by a
    daemon sender or a bounce-like subject, classified by the first status code in the text."""
    sender = str(msg.get("From") or "")
    subject = str(msg.get("Subject") or "")
    if not (_DAEMON_FROM.search(sender) or _BOUNCE_SUBJECT.search(subject)):
        return Report("other", "not a delivery status notification or feedback report")
    body = "\n".join(_text(p) for p in msg.walk() if p.get_content_maintype() == "text")[:200_000]
    status_match = _STATUS_RE.search(body)
    code_match = _SMTP_CODE_RE.search(body)
    if status_match is None and code_match is None:
        return Report("unparseable", "a bounce-like message without any status code", standard=False)
    status = ".".join(status_match.groups()) if status_match else None
    diagnostic = code_match.group(1) if code_match else None
    if status is None and diagnostic:
        status = f"{diagnostic[0]}.0.0"
    action = "failed" if status and status[0] in "45" else "delivered"
    return Report(
        "dsn", standard=False,
        recipients=(RecipientStatus(action=action, status=status, diagnostic=diagnostic),),
        verp_candidates=_candidates(body),
    )


def parse_report(raw: bytes) -> Report:
    """Read a report; never raises. See the module docstring for the kinds."""
    try:
        msg = email.message_from_bytes(raw or b"", policy=email.policy.compat32)
        if msg.get_content_type() == "multipart/report":
            report_type = (msg.get_param("report-type") or "")
            report_type = report_type.lower() if isinstance(report_type, str) else ""
            machine, original = _report_parts(msg)
            if report_type == "feedback-report" or (machine is not None and machine.get_content_type() == "message/feedback-report"):
                return _parse_arf(machine, original)
            if report_type in ("delivery-status", "global-delivery-status") or machine is not None:
                return _parse_dsn(msg, machine, original)
            if report_type:
                return Report("other", f"a {report_type[:40]} report")
        if not msg.keys() and not msg.get_payload():
            return Report("unparseable", "an empty message")
        return _parse_heuristic(msg)
    except Exception as exc:  # the parser must never take the inbound server or a task down
        return Report("unparseable", f"the report could not be read ({type(exc).__name__})")


def original_headers_of(raw: bytes) -> dict[str, str]:
    """The returned original's headers, for display to staff with permission (PHI inside)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    _, original = _report_parts(msg)
    return dict(HeaderParser().parsestr(_original_headers(original)).items()) if original is not None else {}


# --------------------------------------------------------------------------- VERP


def verp_secret(session: Session, org_id: str) -> bytes:
    """The organization's VERP MAC key (one per organization, created on first use, wrapped by
    the master key like every other key). The delivery pipeline signs return paths with it and
    the inbound server verifies them with it."""
    return get_keyring().named_key(session, org_id, "verp")


def return_path(session: Session, org_id: str, return_path_domain: str, recipient_id: str, *,
                secret: bytes | None = None) -> str:
    """The envelope sender for one recipient: ``b+<recipient id>.<mac>@<return-path domain>``.
    ``secret``: :func:`verp_secret`, when the caller looked it up once for a batch."""
    return verp_address(return_path_domain, recipient_id, secret or verp_secret(session, org_id), prefix=VERP_PREFIX)


UNSUBSCRIBE_PREFIX = "u"


def unsubscribe_mailbox(session: Session, org_id: str, return_path_domain: str, recipient_id: str, *,
                        secret: bytes | None = None) -> str:
    """The ``mailto:`` List-Unsubscribe address of one recipient: ``u+<recipient id>.<mac>@<return-path
    domain>`` — opaque (an id and a MAC, no PHI), received by ``carepost inbound``."""
    return verp_address(return_path_domain, recipient_id, secret or verp_secret(session, org_id),
                        prefix=UNSUBSCRIBE_PREFIX)


def _parse_any(session: Session, org_id: str, address: str, prefix: str) -> str | None:
    """Verify under every live version of the VERP secret, current first: return paths and
    unsubscribe mailboxes sent before ``carepost keys rotate-secret verp`` keep working."""
    verp_secret(session, org_id)  # created on first use
    for _version, secret in get_keyring().named_keys(session, org_id, "verp"):
        found = parse_verp(address, secret, prefix=prefix)
        if found is not None:
            return found
    return None


def unsubscribe_recipient_id(session: Session, org_id: str, address: str) -> str | None:
    """The recipient id an unsubscribe mailbox names when its MAC verifies for ``org_id``."""
    return _parse_any(session, org_id, address, UNSUBSCRIBE_PREFIX)


def verp_recipient_id(session: Session, org_id: str, address: str) -> str | None:
    """The recipient id a VERP address names when its MAC verifies for ``org_id``; else None."""
    return _parse_any(session, org_id, address, VERP_PREFIX)


def match_recipient(session: Session, org_id: str, addresses: list[str] | tuple[str, ...]):
    """The first recipient of ``org_id`` that one of ``addresses`` names by a verified VERP."""
    from carepost.delivery.models import MessageRecipient

    for address in addresses:
        recipient_id = verp_recipient_id(session, org_id, address)
        if recipient_id is None:
            continue
        row = session.scalars(
            select(MessageRecipient).where(MessageRecipient.id == recipient_id, MessageRecipient.org_id == org_id)
        ).first()
        if row is not None:
            return row
    return None


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Outcome:
    status: str  # applied | ignored
    detail: str  # no PHI: what happened, by code
    recipient_id: str | None = None
    effect: str | None = None  # hard_bounce | soft_bounce | delayed | complaint | success | none
    suppressed: str | None = None  # suppression reason, when one was added

    def to_dict(self) -> dict:
        return {"status": self.status, "detail": self.detail, "recipient_id": self.recipient_id,
                "effect": self.effect, "suppressed": self.suppressed}


def _address(session: Session, recipient) -> str:
    from carepost.delivery.models import MessageRecipient

    return get_keyring().decrypt_text(session, recipient.org_id, MessageRecipient.__tablename__, "address",
                                      recipient.id, recipient.address_enc)


def _suppress(session: Session, recipient, reason: str, scope: str, source: str, details: dict) -> None:
    """Address-level suppression by blind index, with an encrypted copy of the address for the
    suppression list when the consent capability accepts its form."""
    from carepost.delivery.suppressions import add_suppression, add_suppression_by_index
    from carepost.core.errors import ValidationFailed

    try:
        add_suppression(session, recipient.org_id, _address(session, recipient), reason, scope=scope, source=source,
                        details=details)
    except ValidationFailed:
        add_suppression_by_index(session, recipient.org_id, recipient.address_index, reason, scope=scope,
                                 source=source, details=details)


def soft_bounce_count(session: Session, org_id: str, address_index: str, since: datetime) -> int:
    """Distinct messages to this address that soft-bounced since ``since``."""
    from carepost.delivery.models import MessageEvent, MessageRecipient

    rows = session.execute(
        select(MessageEvent.recipient_id, MessageEvent.details)
        .join(MessageRecipient, MessageRecipient.id == MessageEvent.recipient_id)
        .where(MessageRecipient.org_id == org_id, MessageRecipient.address_index == address_index,
               MessageEvent.org_id == org_id, MessageEvent.type == "bounced", MessageEvent.created_at >= since)
    ).all()
    return len({rid for rid, details in rows if (details or {}).get("bounce_type") == "soft"})


def after_bounce(session: Session, recipient, details: dict, *, source: str) -> str | None:
    """Suppress the address when a bounce calls for it; returns the suppression reason or None.
    ``details`` are the bounce event's details (``bounce_type``, ``status``); the event itself must
    already be added (the soft-bounce count includes it)."""
    bounce_type = details.get("bounce_type")
    note = {"recipient_id": recipient.id, "message_id": recipient.message_id, "status": details.get("status")}
    if bounce_type == "hard":
        _suppress(session, recipient, "bounce_hard", "all", source, note)
        return "bounce_hard"
    if bounce_type == "soft":
        settings = get_settings()
        session.flush()
        since = clock.now() - timedelta(days=settings.soft_bounce_window_days)
        count = soft_bounce_count(session, recipient.org_id, recipient.address_index, since)
        if count >= settings.soft_bounce_threshold:
            _suppress(session, recipient, "bounce_soft", "all", source, {**note, "soft_bounces": count})
            return "bounce_soft"
    return None


def smtp_bounce_details(result) -> dict:
    """Event details for a 5xx refusal during the SMTP transaction (``RecipientResult``), with the
    same hard/soft classification as a DSN. Reads the enhanced status code from the reply text
    without keeping the text (it may quote the address)."""
    reply = getattr(getattr(result, "evidence", None), "reply", None) or ""
    m = _STATUS_RE.search(reply[:200])
    status = ".".join(m.groups()) if m else None
    code = getattr(result, "reply_code", None)
    if status is None and code is not None:
        status = f"{str(code)[0]}.0.0"
    if code is None:
        # No reply at all (NXDOMAIN, null MX, SMTPUTF8 not offered): counted, not suppressed at once.
        return {"bounce_type": "soft", "status": status, "source": "smtp"}
    bounce_type = classify_status(status) if str(code).startswith("5") else "soft"
    if status == "5.0.0" and code in (550, 551, 553):
        bounce_type = "hard"  # a mailbox refusal without an enhanced code
    elif status == "5.0.0":
        bounce_type = "soft"
    return {"bounce_type": bounce_type, "status": status, "source": "smtp"}


def apply_report(session: Session, org_id: str, report: Report, envelope_recipients: list[str], *,
                 report_id: str | None = None) -> Outcome:
    """Tie a parsed report to its recipient and apply it. The caller commits."""
    from carepost.delivery.service import add_event

    if report.kind not in ("dsn", "arf"):
        return Outcome("ignored", f"{report.kind}: {report.reason}", effect="none")
    recipient = match_recipient(session, org_id, list(envelope_recipients) + list(report.verp_candidates))
    if recipient is None:
        log.warning("bounce_report_unmatched", report_id=report_id, org_id=org_id, report_kind=report.kind,
                    candidate_count=len(envelope_recipients) + len(report.verp_candidates))
        return Outcome("ignored", "no verified VERP return path names a recipient", effect="none")

    if report.kind == "arf":
        feedback = report.feedback_type or "other"
        if feedback not in COMPLAINT_TYPES:
            add_event(session, recipient, "feedback_report", feedback_type=feedback, source="arf", report_id=report_id)
            return Outcome("applied", f"feedback report {feedback}: no action", recipient.id, "none")
        add_event(session, recipient, "complained", feedback_type=feedback, source="arf", report_id=report_id)
        _suppress(session, recipient, "complaint", "marketing", "arf",
                  {"recipient_id": recipient.id, "message_id": recipient.message_id, "feedback_type": feedback})
        return Outcome("applied", f"complaint ({feedback})", recipient.id, "complaint", "complaint")

    block = report.worst
    kind = block.classification
    source = "dsn" if report.standard else "dsn-heuristic"
    if kind == "success":
        add_event(session, recipient, "delivery_report", action=block.action, status=block.status, source=source,
                  report_id=report_id)
        return Outcome("applied", f"delivery report: {block.action}", recipient.id, "success")
    if kind == "delayed":
        add_event(session, recipient, "deferred", status=block.status, source=source, report_id=report_id,
                  remote_mta=block.remote_mta)
        return Outcome("applied", f"delayed: {describe_status(block.status)}", recipient.id, "delayed")
    reason = f"{kind} bounce: {describe_status(block.status)}"
    if recipient.status not in ("excluded",):
        recipient.status = "bounced"
        recipient.reason = reason
        recipient.next_attempt_at = None
    details = {"bounce_type": kind, "status": block.status, "source": source, "report_id": report_id,
               "remote_mta": block.remote_mta}
    add_event(session, recipient, "bounced", **details)
    suppressed = after_bounce(session, recipient, details, source=source)
    return Outcome("applied", reason, recipient.id, f"{kind}_bounce", suppressed)
