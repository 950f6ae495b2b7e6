"""The message archive over the database (issue 16 item 8; docs/archive.md).

* :func:`check_criteria` — a search's criteria checked, each refusal naming its field.
* :func:`sensitivity` — whether a search or export needs a second approver: it spans the whole
  organization (no patient, address, sender, campaign, journey or word narrows it) or more than a
  year (or an open date range).
* :func:`search` — messages matching the criteria, newest first (subjects decrypted for the
  caller, addresses masked).
* requests (:func:`create_request`, :func:`decide`, :func:`request_results`) — the second-approver
  workflow: the approver is a different user holding the compliance officer role.
* productions (:func:`build_production`) — a ZIP of EML files, an MBOX, per-message records
  (recipients, protection evidence, events), a manifest of SHA-256 hashes and a chain of custody.

Plain functions taking a session; the caller commits. Audit events are written here (the actor
is given), with criteria *names* and counts only — never an address, a word or a name.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carepost import __version__ as CAREPOST_VERSION
from carepost.archive import index
from carepost.archive.models import ArchiveRequest, ArchiveTerm
from carepost.audit import service as audit
from carepost.audit.models import AuditEvent
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from carepost.core.ids import is_id
from carepost.delivery.models import (
    Message,
    MessageAttachment,
    MessageEvent,
    MessageRecipient,
)

APPROVER_ROLE = "compliance_officer"
SENSITIVE_SPAN_DAYS = 366
MAX_QUERY_WORDS = 12
NARROWING = ("contact_id", "address", "sender", "campaign_id", "journey_id", "words")
CRITERIA = ("contact_id", "address", "date_from", "date_to", "sender", "campaign_id", "journey_id", "purpose",
            "method", "words")
METHODS = ("tls", "pgp", "smime", "portal", "none")
_WILDCARD = re.compile(r"[*?%_\\\[\]{}()<>|~^$#@&+=\"/:;]")


@dataclass
class Actor:
    """Who acts (for audit events and the approval rule)."""

    kind: str
    id: str
    role: str | None = None
    context: dict | None = None

    @classmethod
    def of(cls, principal, request=None) -> Actor:
        from carepost.accounts.access import request_context

        return cls(principal.kind, principal.actor_id, principal.role,
                   request_context(request) if request is not None else {})


SYSTEM = Actor("system", "cli", None, {})


def _audit(session: Session, org_id: str, actor: Actor, action: str, target_id: str | None, details: dict,
           outcome: str = "success") -> None:
    audit.record(session, org_id=org_id, actor_type=actor.kind, actor_id=actor.id, action=action, outcome=outcome,
                 target_type="archive", target_id=target_id, details=details, **(actor.context or {}))


# --------------------------------------------------------------------------- criteria


def query_words(text: str | None) -> list[str]:
    """The words of a search (whole words only), or ValidationFailed(field="words")."""
    if text is None or not text.strip():
        return []
    bad = sorted(set(_WILDCARD.findall(text)))
    if bad:
        raise ValidationFailed(
            "Only whole words can be searched in encrypted bodies: no wildcards, operators or punctuation "
            f"({' '.join(bad)}).", field="words")
    for raw in re.split(r"\s+", text.strip()):
        cleaned = index.normalize(raw).strip(".,!'-")
        if cleaned and len(cleaned) > index.MAX_WORD:
            raise ValidationFailed(f"A word is at most {index.MAX_WORD} characters.", field="words")
    found = index.words(text)
    if not found:
        raise ValidationFailed(f"No searchable word: words are {index.MIN_WORD} to {index.MAX_WORD} letters or "
                               "digits.", field="words")
    if len(found) > MAX_QUERY_WORDS:
        raise ValidationFailed(f"At most {MAX_QUERY_WORDS} words per search.", field="words")
    return found


def check_criteria(session: Session, org_id: str, data) -> dict:
    """The criteria of a search (an ``ArchiveSearchIn`` or a dict) checked: returns a plain dict
    (dates as ISO text); raises ValidationFailed naming the field."""
    raw = data.model_dump(mode="json") if hasattr(data, "model_dump") else dict(data)
    c = {k: raw.get(k) for k in CRITERIA}
    c = {k: (v.strip() if isinstance(v, str) else v) or None for k, v in c.items()}
    for name in ("date_from", "date_to"):
        if c[name] is not None:
            try:
                c[name] = date.fromisoformat(str(c[name])).isoformat()
            except ValueError:
                raise ValidationFailed("A date is YYYY-MM-DD.", field=name) from None
    today = clock.now().date()
    if c["date_from"] and date.fromisoformat(c["date_from"]) > today:
        raise ValidationFailed("The start date is in the future.", field="date_from")
    if c["date_from"] and c["date_to"] and c["date_to"] < c["date_from"]:
        raise ValidationFailed("The end date is before the start date.", field="date_to")
    for name in ("date_from", "date_to"):
        if c[name] and not 1990 <= date.fromisoformat(c[name]).year <= 2100:
            raise ValidationFailed("A date is between 1990 and 2100.", field=name)
    if c["contact_id"]:
        from carepost.patients.models import Contact

        if not is_id(c["contact_id"]) or session.scalar(
                select(Contact.id).where(Contact.id == c["contact_id"], Contact.org_id == org_id)) is None:
            raise ValidationFailed("No such patient in the organization.", field="contact_id")
    if c["address"]:
        from carepost.delivery.mime import parse_address

        c["address"] = parse_address(c["address"], field_name="address", allow_display_name=False).addr_spec
    if c["sender"]:
        from carepost.delivery.mime import parse_address

        c["sender"] = parse_address(c["sender"], field_name="sender", allow_display_name=False).addr_spec.lower()
    if c["campaign_id"]:
        from carepost.campaigns.models import Campaign

        if not is_id(c["campaign_id"]) or session.scalar(
                select(Campaign.id).where(Campaign.id == c["campaign_id"], Campaign.org_id == org_id)) is None:
            raise ValidationFailed("No such campaign in the organization.", field="campaign_id")
    if c["journey_id"]:
        from carepost.journeys.models import Journey

        if not is_id(c["journey_id"]) or session.scalar(
                select(Journey.id).where(Journey.id == c["journey_id"], Journey.org_id == org_id)) is None:
            raise ValidationFailed("No such journey in the organization.", field="journey_id")
    if c["purpose"]:
        from carepost.delivery.settings import check_purpose

        check_purpose(c["purpose"], "purpose")
    if c["method"] and c["method"] not in METHODS:
        raise ValidationFailed(f"The secure method is one of {', '.join(METHODS)}.", field="method")
    query_words(c["words"])
    return c


def sensitivity(criteria: dict) -> str | None:
    """Why a search or export needs a second approver, or None."""
    reasons = []
    if not any(criteria.get(k) for k in NARROWING):
        reasons.append("it spans the whole organization (no patient, address, sender, campaign, journey or words)")
    start, end = criteria.get("date_from"), criteria.get("date_to")
    if not start:
        reasons.append("it has no start date (all time)")
    else:
        last = date.fromisoformat(end) if end else clock.now().date()
        if (last - date.fromisoformat(start)).days >= SENSITIVE_SPAN_DAYS:
            reasons.append("it covers more than a year")
    return "; ".join(reasons) or None


def scope_of(criteria: dict) -> dict:
    """What an audit event and the plain ``scope`` column may hold: the names of the criteria
    used, the date range, the purpose and method (codes) — never an address, a word or an id of
    a patient."""
    return {"criteria": sorted(k for k in CRITERIA if criteria.get(k)), "date_from": criteria.get("date_from"),
            "date_to": criteria.get("date_to"), "purpose": criteria.get("purpose"), "method": criteria.get("method"),
            "campaign_id": criteria.get("campaign_id"), "journey_id": criteria.get("journey_id"),
            "word_count": len(query_words(criteria.get("words")))}


# --------------------------------------------------------------------------- searching


def _day_start(value: str) -> datetime:
    return datetime.combine(date.fromisoformat(value), time.min, tzinfo=UTC)


def _matching(session: Session, org_id: str, c: dict):
    q = select(Message).where(Message.org_id == org_id, Message.sandbox.is_(False))
    if c.get("date_from"):
        q = q.where(Message.created_at >= _day_start(c["date_from"]))
    if c.get("date_to"):
        q = q.where(Message.created_at < _day_start(c["date_to"]) + timedelta(days=1))
    if c.get("sender"):
        q = q.where(func.lower(Message.from_address) == c["sender"].lower())
    if c.get("campaign_id"):
        q = q.where(Message.campaign_id == c["campaign_id"])
    if c.get("journey_id"):
        from carepost.journeys.models import JourneyVersion, step_key

        keys = [step_key(v.id, sid) for v in session.scalars(
                    select(JourneyVersion).where(JourneyVersion.org_id == org_id,
                                                 JourneyVersion.journey_id == c["journey_id"]))
                for sid in ((v.definition or {}).get("steps") or {})]
        q = q.where(Message.journey_step_id.in_(keys or ["-"]))
    if c.get("purpose"):
        q = q.where(Message.purpose == c["purpose"])
    recipients = select(MessageRecipient.message_id).where(MessageRecipient.org_id == org_id)
    if c.get("contact_id"):
        q = q.where(Message.id.in_(recipients.where(MessageRecipient.contact_id == c["contact_id"])))
    if c.get("address"):
        indexes = get_keyring().blind_indexes(session, org_id, "email", c["address"])
        q = q.where(Message.id.in_(recipients.where(MessageRecipient.address_index.in_(indexes))))
    if c.get("method"):
        q = q.where(Message.id.in_(recipients.where(MessageRecipient.method == c["method"])))
    words = query_words(c.get("words"))
    for tokens in index.query_tokens(session, org_id, words):
        q = q.where(Message.id.in_(select(ArchiveTerm.message_id).where(ArchiveTerm.org_id == org_id,
                                                                        ArchiveTerm.token.in_(tokens))))
    return q.order_by(Message.created_at.desc(), Message.id.desc())


def run_search(session: Session, org_id: str, criteria: dict, limit: int) -> tuple[list[dict], bool]:
    """(rows, more): per message its id, time, sender, subject (decrypted), purpose, security,
    campaign and journey step, and its recipients' kinds, statuses and methods with masked
    addresses."""
    from carepost.patients.masking import mask_email

    found = session.scalars(_matching(session, org_id, criteria).limit(limit + 1)).all()
    page, more = found[:limit], len(found) > limit
    decrypt = get_keyring().text_decryptor(session, org_id)
    by_message: dict[str, list] = {m.id: [] for m in page}
    if page:
        for r in session.scalars(select(MessageRecipient).where(MessageRecipient.message_id.in_(list(by_message)))
                                 .order_by(MessageRecipient.id)):
            address = decrypt(MessageRecipient.__tablename__, "address", r.id, r.address_enc) or ""
            by_message[r.message_id].append({"address": mask_email(address), "kind": r.kind, "status": r.status,
                                             "method": r.method, "contact_id": r.contact_id})
    rows = [{
        "id": m.id, "created_at": clock.aware(m.created_at).isoformat(), "from": m.from_address,
        "subject": decrypt(Message.__tablename__, "subject", m.id, m.subject_enc) or "", "purpose": m.purpose,
        "security": m.security, "source": m.source, "campaign_id": m.campaign_id, "journey_step_id": m.journey_step_id,
        "contains_phi": m.contains_phi, "recipients": by_message[m.id],
    } for m in page]
    return rows, more


def search(session: Session, org_id: str, criteria: dict, limit: int, actor: Actor, *,
           request_id: str | None = None) -> tuple[list[dict], bool]:
    """A search the caller may run now (not sensitive, or approved as ``request_id``); audited."""
    rows, more = run_search(session, org_id, criteria, limit)
    _audit(session, org_id, actor, "archive.search", request_id,
           {**scope_of(criteria), "results": len(rows), "more": more, "request_id": request_id,
            "sensitive": bool(sensitivity(criteria))})
    return rows, more


# --------------------------------------------------------------------------- requests and approvals


def _enc(session, org_id, row_id, column, value: str) -> bytes:
    return get_keyring().encrypt(session, org_id, ArchiveRequest.__tablename__, column, row_id, value)


def _dec(session, row: ArchiveRequest, column: str) -> str | None:
    blob = getattr(row, f"{column}_enc")
    return get_keyring().decrypt_text(session, row.org_id, ArchiveRequest.__tablename__, column, row.id, blob)


def request_criteria(session: Session, row: ArchiveRequest) -> dict:
    return json.loads(_dec(session, row, "criteria"))


def create_request(session: Session, org_id: str, kind: str, criteria: dict, actor: Actor, *, purpose: str,
                   reason: str | None, limit: int) -> ArchiveRequest:
    """A search or export request. A sensitive one waits for a second approver (and must say
    why: ``reason``); an export that is not sensitive is built at once."""
    from carepost.core.ids import new_id

    why = sensitivity(criteria)
    if why and not (reason and reason.strip()):
        raise ValidationFailed(f"This {kind} needs a second approver because {why}: give the reason (the matter).",
                               field="reason")
    row_id = new_id()
    row = ArchiveRequest(
        id=row_id, org_id=org_id, kind=kind, purpose=purpose,
        criteria_enc=_enc(session, org_id, row_id, "criteria", json.dumps({**criteria, "limit": limit})),
        reason_enc=_enc(session, org_id, row_id, "reason", reason.strip()) if reason and reason.strip() else None,
        scope=scope_of(criteria), sensitive=bool(why), sensitive_why=(why or None) and why[:200],
        status="pending_approval" if why else "approved", requested_by=actor.id, requested_at=clock.now())
    session.add(row)
    session.flush()
    _audit(session, org_id, actor, f"archive.{kind}_requested", row.id,
           {**row.scope, "sensitive": bool(why), "purpose": purpose, "limit": limit})
    if kind == "export" and not why:
        build_production(session, row, actor)
    return row


def get_request(session: Session, org_id: str, request_id: str) -> ArchiveRequest:
    row = session.get(ArchiveRequest, request_id) if is_id(request_id) else None
    if row is None or row.org_id != org_id:
        raise NotFound("No such archive request.", field="request_id")
    return row


def list_requests(session: Session, org_id: str, *, status: str | None = None, limit: int = 100) -> list[ArchiveRequest]:
    q = select(ArchiveRequest).where(ArchiveRequest.org_id == org_id)
    if status:
        q = q.where(ArchiveRequest.status == status)
    return list(session.scalars(q.order_by(ArchiveRequest.requested_at.desc(), ArchiveRequest.id.desc()).limit(limit)))


def decide(session: Session, org_id: str, request_id: str, actor: Actor, *, approve: bool,
           note: str | None = None) -> ArchiveRequest:
    """A second person's decision on a sensitive request: a different user with the compliance
    officer role. Approving an export builds it."""
    row = get_request(session, org_id, request_id)
    if row.status != "pending_approval":
        raise Conflict(f"The request is {row.status.replace('_', ' ')}, not waiting for approval.", field="status",
                       code="archive_request_decided")
    if actor.kind != "user" or actor.role != APPROVER_ROLE:
        raise PermissionDenied("Only a user with the compliance officer role may approve or reject an archive "
                               "request.", field="approver")
    if actor.id == row.requested_by:
        raise PermissionDenied("The second approver must be a different person from the requester.",
                               field="approver")
    row.status = "approved" if approve else "rejected"
    row.decided_by, row.decided_at = actor.id, clock.now()
    row.decision_note = (note or "").strip()[:500] or None
    session.flush()
    _audit(session, org_id, actor, "archive.request_approved" if approve else "archive.request_rejected", row.id,
           {"kind": row.kind, "requested_by": row.requested_by, **row.scope})
    if approve and row.kind == "export":
        build_production(session, row, actor)
    return row


def request_results(session: Session, org_id: str, request_id: str, actor: Actor) -> tuple[list[dict], bool]:
    row = get_request(session, org_id, request_id)
    if row.kind != "search":
        raise ValidationFailed("This request is an export: download it instead.", field="request_id")
    if row.status not in ("approved", "completed"):
        raise Conflict(f"The search is {row.status.replace('_', ' ')}; it runs once a second person approved it.",
                       field="status", code="archive_request_not_approved")
    criteria = request_criteria(session, row)
    limit = int(criteria.pop("limit", 50))
    rows, more = search(session, org_id, criteria, limit, actor, request_id=row.id)
    row.status, row.message_count, row.completed_at = "completed", len(rows), clock.now()
    return rows, more


def request_dict(session: Session, row: ArchiveRequest, *, with_criteria: bool = False) -> dict:
    out = {
        "id": row.id, "kind": row.kind, "purpose": row.purpose, "status": row.status, "sensitive": row.sensitive,
        "sensitive_why": row.sensitive_why, "scope": row.scope, "requested_by": row.requested_by,
        "requested_at": clock.aware(row.requested_at).isoformat(), "decided_by": row.decided_by,
        "decided_at": clock.aware(row.decided_at).isoformat() if row.decided_at else None,
        "decision_note": row.decision_note, "message_count": row.message_count, "sha256": row.sha256,
        "size_bytes": row.size_bytes, "downloads": row.downloads,
        "completed_at": clock.aware(row.completed_at).isoformat() if row.completed_at else None,
    }
    if with_criteria:
        out["criteria"] = request_criteria(session, row)
        out["reason"] = _dec(session, row, "reason")
    return out


# --------------------------------------------------------------------------- productions (EML, MBOX)


def _message_record(session: Session, m: Message, decrypt) -> tuple[EmailMessage, dict]:
    """One archived message as an RFC 5322 message, and its record (recipients with their
    status, method, protection evidence and events)."""
    ring = get_keyring()
    mt, rt, at = Message.__tablename__, MessageRecipient.__tablename__, MessageAttachment.__tablename__
    recipients = session.scalars(select(MessageRecipient).where(MessageRecipient.message_id == m.id)
                                 .order_by(MessageRecipient.id)).all()
    events = session.scalars(select(MessageEvent).where(MessageEvent.message_id == m.id)
                             .order_by(MessageEvent.created_at, MessageEvent.id)).all()
    by_kind: dict[str, list[str]] = {"to": [], "cc": [], "bcc": []}
    rec_rows = []
    for r in recipients:
        address = decrypt(rt, "address", r.id, r.address_enc) or ""
        name = decrypt(rt, "display_name", r.id, r.display_name_enc)
        by_kind.setdefault(r.kind, []).append(f"{name} <{address}>" if name else address)
        rec_rows.append({
            "address": address, "display_name": name, "kind": r.kind, "status": r.status, "method": r.method,
            "reason": r.reason, "attempts": r.attempts, "contact_id": r.contact_id,
            "key_fingerprint": r.key_fingerprint, "portal_message_id": r.portal_message_id,
            "evidence": r.evidence or {},
            "events": [{"type": e.type, "at": clock.aware(e.created_at).isoformat(), "details": e.details or {}}
                       for e in events if e.recipient_id == r.id],
        })
    msg = EmailMessage(policy=SMTP)
    from_name = decrypt(mt, "from_name", m.id, m.from_name_enc)
    msg["From"] = f"{from_name} <{m.from_address}>" if from_name else m.from_address
    for kind, header in (("to", "To"), ("cc", "Cc"), ("bcc", "Bcc")):
        if by_kind.get(kind):
            msg[header] = ", ".join(by_kind[kind])
    reply_to = decrypt(mt, "reply_to", m.id, m.reply_to_enc)
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = decrypt(mt, "subject", m.id, m.subject_enc) or ""
    msg["Date"] = format_datetime(clock.aware(m.created_at))
    if m.message_id_header:
        msg["Message-ID"] = m.message_id_header
    extra = decrypt(mt, "headers", m.id, m.headers_enc)
    for name, value in (json.loads(extra) if extra else {}).items():
        if name.lower() not in {"from", "to", "cc", "bcc", "subject", "date", "message-id", "reply-to"}:
            msg[name] = value
    msg["X-CarePost-Archive-Id"] = m.id
    msg["X-CarePost-Purpose"] = m.purpose or ""
    msg["X-CarePost-Security"] = m.security
    text = decrypt(mt, "text", m.id, m.text_enc)
    html = decrypt(mt, "html", m.id, m.html_enc)
    msg.set_content(text if text is not None else "")
    if html is not None:
        msg.add_alternative(html, subtype="html")
    attachments = []
    for a in session.scalars(select(MessageAttachment).where(MessageAttachment.message_id == m.id)
                             .order_by(MessageAttachment.id)):
        content = ring.decrypt(session, m.org_id, at, "content", a.id, a.content_enc)
        filename = decrypt(at, "filename", a.id, a.filename_enc) or "attachment"
        maintype, _, subtype = (a.content_type or "application/octet-stream").partition("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype or "octet-stream", filename=filename,
                           cid=f"<{a.inline_cid}>" if a.inline_cid else None)
        attachments.append({"filename": filename, "content_type": a.content_type, "size": a.size,
                            "sha256": hashlib.sha256(content).hexdigest(), "inline_cid": a.inline_cid})
    record = {
        "id": m.id, "message_id_header": m.message_id_header, "created_at": clock.aware(m.created_at).isoformat(),
        "source": m.source, "from": m.from_address, "purpose": m.purpose, "security": m.security,
        "contains_phi": m.contains_phi, "campaign_id": m.campaign_id, "journey_step_id": m.journey_step_id,
        "template_id": m.template_id, "template_version_id": m.template_version_id, "created_by": m.created_by,
        "attachments": attachments, "recipients": rec_rows,
    }
    return msg, record


def _mbox_entry(msg: EmailMessage, when: datetime, sender: str) -> bytes:
    """One mboxrd entry: a ``From `` separator line, the message with LF endings and every line
    starting with ``>*From `` quoted with one more ``>``."""
    raw = msg.as_bytes().replace(b"\r\n", b"\n")
    lines = [b">" + line if re.match(rb"^>*From ", line) else line for line in raw.split(b"\n")]
    stamp = clock.aware(when).astimezone(UTC).strftime("%a %b %d %H:%M:%S %Y")
    return f"From {sender} {stamp}\n".encode() + b"\n".join(lines).rstrip(b"\n") + b"\n\n"


README = """CarePost message production
===========================

This archive was produced by CarePost {version} on {generated_at} (UTC) for {purpose}.
It contains {count} message(s). Nothing in it needs CarePost to be read:

  messages/*.eml        each message as an RFC 5322 file (open with any email program)
  messages.mbox         all messages in one mboxrd file (Thunderbird, mutt, Apple Mail, Python mailbox)
  records/*.json        per message: recipients, delivery status, secure method, protection
                        evidence (TLS version, cipher, certificate, key fingerprint) and events
  chain_of_custody.json who asked, who approved, when, what criteria, which audit events
  manifest.json         SHA-256 and size of every file above
  manifest.sha256       the same hashes for `sha256sum -c manifest.sha256`

Bcc recipients are listed in the Bcc header of these archive copies (they were not shown to the
other recipients). The message bodies are as submitted to CarePost; each recipient's copy may
have been encrypted (PGP, S/MIME) or delivered through the portal, as the records say.
"""


def build_production(session: Session, row: ArchiveRequest, actor: Actor) -> ArchiveRequest:
    """Build the production ZIP of an approved export request and keep it encrypted on the row."""
    if row.kind != "export" or row.status != "approved":
        raise Conflict("Only an approved export can be built.", field="status")
    criteria = request_criteria(session, row)
    limit = int(criteria.pop("limit", 10000))
    messages = session.scalars(_matching(session, row.org_id, criteria).limit(limit + 1)).all()
    if len(messages) > limit:
        raise ValidationFailed(f"More than {limit} messages match: narrow the criteria or raise the limit.",
                               field="limit")
    messages = list(reversed(messages))  # oldest first
    decrypt = get_keyring().text_decryptor(session, row.org_id)
    generated_at = clock.now()
    files: list[tuple[str, bytes]] = []
    mbox = io.BytesIO()
    for m in messages:
        msg, record = _message_record(session, m, decrypt)
        stamp = clock.aware(m.created_at).strftime("%Y%m%dT%H%M%SZ")
        files.append((f"messages/{stamp}_{m.id}.eml", msg.as_bytes()))
        files.append((f"records/{m.id}.json", json.dumps(record, indent=2, sort_keys=True).encode()))
        mbox.write(_mbox_entry(msg, m.created_at, m.from_address))
    files.append(("messages.mbox", mbox.getvalue()))
    purpose_text = {"legal_discovery": "legal discovery", "patient_request": "a patient's request",
                    "audit": "an audit", "other": "another purpose"}.get(row.purpose, row.purpose)
    files.append(("README.txt", README.format(version=CAREPOST_VERSION, generated_at=generated_at.isoformat(),
                                              purpose=purpose_text, count=len(messages)).encode()))
    audit_events = [str(e) for e in session.scalars(
        select(AuditEvent.id).where(AuditEvent.org_id == row.org_id,
                                          AuditEvent.target_id == row.id).order_by(AuditEvent.seq))]
    custody = {
        "request_id": row.id, "organization_id": row.org_id, "purpose": row.purpose,
        "reason": _dec(session, row, "reason"), "criteria": criteria, "sensitive": row.sensitive,
        "sensitive_why": row.sensitive_why, "requested_by": row.requested_by,
        "requested_at": clock.aware(row.requested_at).isoformat(), "approved_by": row.decided_by,
        "approved_at": clock.aware(row.decided_at).isoformat() if row.decided_at else None,
        "produced_by": actor.id, "produced_at": generated_at.isoformat(), "software": f"CarePost {CAREPOST_VERSION}",
        "message_count": len(messages), "audit_events": audit_events,
        "method": "Decrypted from the CarePost database (AES-256-GCM per field) inside one database transaction; "
                  "each file's SHA-256 recorded in manifest.json at production time.",
        "transfers": "Each download of this production is an audit event (archive.export_downloaded) in the "
                     "organization's audit chain.",
    }
    files.append(("chain_of_custody.json", json.dumps(custody, indent=2, sort_keys=True).encode()))
    manifest = {"generated_at": generated_at.isoformat(), "request_id": row.id, "algorithm": "sha256",
                "files": [{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for p, b in files]}
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    sums = "".join(f"{f['sha256']}  {f['path']}\n" for f in manifest["files"]) + \
        f"{hashlib.sha256(manifest_bytes).hexdigest()}  manifest.json\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files:
            z.writestr(path, data)
        z.writestr("manifest.json", manifest_bytes)
        z.writestr("manifest.sha256", sums)
    content = buf.getvalue()
    row.content_enc = get_keyring().encrypt(session, row.org_id, ArchiveRequest.__tablename__, "content", row.id, content)
    row.sha256, row.size_bytes = hashlib.sha256(content).hexdigest(), len(content)
    row.message_count, row.status, row.completed_at = len(messages), "completed", clock.now()
    session.flush()
    _audit(session, row.org_id, actor, "archive.export_built", row.id,
           {**row.scope, "messages": len(messages), "sha256": row.sha256, "bytes": row.size_bytes})
    return row


def download(session: Session, org_id: str, request_id: str, actor: Actor) -> tuple[str, bytes]:
    row = get_request(session, org_id, request_id)
    if row.kind != "export":
        raise ValidationFailed("This request is a search: read its results instead.", field="request_id")
    if row.status != "completed" or row.content_enc is None:
        raise Conflict(f"The export is {row.status.replace('_', ' ')}; it is built once a second person approved it.",
                       field="status", code="archive_request_not_approved")
    content = get_keyring().decrypt(session, org_id, ArchiveRequest.__tablename__, "content", row.id, row.content_enc)
    row.downloads = (row.downloads or 0) + 1
    _audit(session, org_id, actor, "archive.export_downloaded", row.id, {"sha256": row.sha256, "bytes": len(content)})
    return f"carepost-production-{row.id}.zip", content


def message_eml(session: Session, org_id: str, message_id: str, actor: Actor) -> bytes:
    """One archived message as an EML file (audited)."""
    m = session.get(Message, message_id) if is_id(message_id) else None
    if m is None or m.org_id != org_id:
        raise NotFound("No such message.", field="message_id")
    msg, _record = _message_record(session, m, get_keyring().text_decryptor(session, org_id))
    _audit(session, org_id, actor, "archive.message_read", m.id, {"format": "eml"})
    return msg.as_bytes()
