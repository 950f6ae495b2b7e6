"""The secure portal's logic: storing a recipient's copy, the notification without PHI, the
recipient's second factor (a one-time code or the sender's question), lockout, portal sessions,
reading, replies, recall and expiry.

Plain functions taking a session; the caller commits (ARCHITECTURE.md section 3).

How the pieces fit (REFERENCE.md, "Secure delivery as the market does it"):

* The delivery pipeline calls :func:`store_portal_message` for a recipient whose method is
  ``portal`` and sends :func:`notification_email` instead of the message. The notification
  carries the organization's own subject and body and a link ``<base url>/p/<token>``; nothing
  about the patient or the message.
* The link token is an HMAC of the portal message's id under an organization secret kept by the
  keyring (``named_key(org, "portal")``): as unguessable as a random 256-bit value, and
  derivable again, so a retried notification carries the same link. Only its SHA-256 is stored
  (``token_hash``) and looked up.
* A link alone opens nothing. The recipient proves the address with a one-time code mailed to it
  (8 digits, Argon2id-hashed, valid ``CAREPOST_PORTAL_CODE_MINUTES``) or answers the sender's
  question (the answer Argon2id-hashed, compared ignoring case and spacing).
* ``CAREPOST_PORTAL_MAX_ATTEMPTS`` wrong codes or answers lock the message for
  ``CAREPOST_PORTAL_LOCKOUT_MINUTES`` and void the current code; after
  :data:`MAX_LOCKOUTS` lockouts it stays locked until the sender unlocks it (or recalls it).
* Every view is audited (actor type ``portal_recipient``); the first one is the read receipt:
  the recipient's status becomes ``portal_viewed`` with an event.
* Recall and expiry wipe the stored copy (subject, bodies, attachments); replies stay with the
  sender's organization.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html as html_lib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, inspect, select, update
from sqlalchemy.orm import Session

from carepost.accounts.models import Organization
from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.crypto import get_keyring
from carepost.core.database import ALL_ORGANIZATIONS
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.delivery.mime import check_header_value, parse_address
from carepost.delivery.models import MessageRecipient
from carepost.delivery.portal_answer import hash_answer, is_answer_hash, normalize_answer
from carepost.portal.models import AUTH_METHODS, PortalAttachment, PortalMessage, PortalReply, PortalSession

CODE_DIGITS = 8
CODE_MIN_INTERVAL = timedelta(seconds=30)  # between two codes for one message
MAX_CODES = 20  # codes one message may ever send; then the recipient asks the sender
MAX_LOCKOUTS = 3  # lockouts before the message stays locked until the sender unlocks it
MAX_REPLY_CHARS = 20_000
MAX_QUESTION_CHARS = 300
SESSION_ABSOLUTE_FACTOR = 4  # a portal session lives at most 4 x the idle timeout
ACTOR = "portal_recipient"

DEFAULT_SUBJECT = "You have a secure message from {organization}"
DEFAULT_BODY = (
    "{organization} sent you a secure message.\n\n"
    "Open it here:\n{link}\n\n"
    "You will be asked to confirm it is you before the message is shown. "
    "The message can be opened until {expires}.\n\n"
    "If you did not expect this message, you can ignore this email."
)
PLACEHOLDERS = ("organization", "link", "expires")
_PLACEHOLDER_RE = re.compile(r"\{(organization|link|expires)\}")
_SOURCELESS_IMG = re.compile(r"<img(?![^>]*\ssrc=)[^>]*>", re.I)


# --------------------------------------------------------------------------- storing


def _attachment_parts(item) -> tuple[str, str, bytes]:
    """(filename, content type, bytes) from a ``mime.Attachment``-like object or a mapping."""
    get = item.get if isinstance(item, dict) else (lambda k, d=None: getattr(item, k, d))
    filename = get("filename") or "attachment"
    content = get("content")
    ctype = get("content_type") or "application/octet-stream"
    if isinstance(content, str):
        content = content.encode()
    if not isinstance(content, (bytes, bytearray)):
        raise ValidationFailed("An attachment has no content.", field="attachments")
    check_header_value("attachment filename", str(filename))
    return str(filename)[:255], str(ctype)[:255], bytes(content)


def _hasher():
    from carepost.accounts.passwords import hasher

    return hasher()


def _verify_hash(stored: str | None, candidate: str) -> bool:
    if not stored or not candidate:
        return False
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return _hasher().verify(stored, candidate)
    except (VerificationError, InvalidHashError):
        return False


def store_portal_message(
    session: Session,
    *,
    org_id: str,
    message_id: str,
    recipient_id: str | None,
    recipient_address: str,
    subject: str,
    html: str | None,
    text: str | None,
    attachments: list | tuple = (),
    sender_user_or_credential_id: str | None = None,
    expires_at: datetime | None = None,
    auth: str = "code",
    question: str | None = None,
    answer: str | None = None,
    inline_images: list | tuple = (),
    answer_hash: str | None = None,
) -> PortalMessage:
    """Keep one recipient's copy for pickup, encrypted and bound to its row; returns the row.

    ``attachments`` are ``mime.Attachment``-like objects or mappings (filename, content,
    content_type); ``inline_images`` are ``mime.InlineImage``-like (cid, content, content_type):
    the HTML's ``cid:`` references show them (as ``data:`` URIs, never fetched from anywhere).

    Idempotent per recipient: a second call for the same ``recipient_id`` (a retried delivery
    task) returns the existing row unchanged."""
    if recipient_id:
        existing = session.scalars(
            select(PortalMessage).where(PortalMessage.org_id == org_id, PortalMessage.recipient_id == recipient_id)
        ).first()
        if existing is not None:
            return existing
    if auth not in AUTH_METHODS:
        raise ValidationFailed("The portal sign-in must be code or question.", field="auth")
    address = parse_address(recipient_address, field_name="to", allow_display_name=False).addr_spec
    if html is None and text is None:
        raise ValidationFailed("A message needs a text or an html body.", field="text")
    now = clock.now()
    settings = get_settings()
    if expires_at is None:
        expires_at = now + timedelta(days=settings.portal_expiry_days)
    if clock.aware(expires_at) <= now:
        raise ValidationFailed("The portal expiry must be in the future.", field="expires_at")
    if auth != "question":
        answer_hash = None
    if auth == "question":
        if not question or not question.strip():
            raise ValidationFailed("A portal question is needed when the recipient answers a question.", field="question")
        if len(question) > MAX_QUESTION_CHARS:
            raise ValidationFailed(f"The portal question is longer than {MAX_QUESTION_CHARS} characters.", field="question")
        if answer_hash is not None:
            # Hashed at acceptance (delivery.portal_answer): the answer itself never reaches us.
            if not is_answer_hash(answer_hash):
                raise ValidationFailed("The portal answer hash is not an Argon2id hash.", field="answer")
        else:
            answer_hash = hash_answer(answer or "", field="answer")
    birth_date_hash = _birth_date_hash(session, recipient_id) if auth == "code" else None
    files = [(*_attachment_parts(a), None) for a in attachments or ()]
    for image in inline_images or ():
        get = image.get if isinstance(image, dict) else (lambda k, d=None, _i=image: getattr(_i, k, d))
        cid = str(get("cid") or "")
        if not cid or len(cid) > 200 or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+", cid):
            raise ValidationFailed("An inline image has no usable content id.", field="inline")
        filename, ctype, content = _attachment_parts({"filename": get("filename") or cid, "content": get("content"),
                                                      "content_type": get("content_type") or "image/png"})
        files.append((filename, ctype, content, cid))

    ring = get_keyring()
    row_id = new_id()
    table = PortalMessage.__tablename__

    def enc(column: str, value: str | bytes | None) -> bytes | None:
        return None if value is None else ring.encrypt(session, org_id, table, column, row_id, value)

    # Encrypt (and derive the link) before adding the row: the keyring reads key rows, which
    # would autoflush a half-filled row.
    values = {
        "address_enc": enc("address", address),
        "address_index": ring.blind_index(session, org_id, "email", address),
        "subject_enc": enc("subject", subject or ""),
        "html_enc": enc("html", html),
        "text_enc": enc("text", text),
        "question_enc": enc("question", question.strip()) if auth == "question" else None,
        "token_hash": _hash_token(_derive_token(session, org_id, row_id)),
    }
    encrypted_files = []
    for position, (filename, ctype, content, cid) in enumerate(files):
        att_id = new_id()
        encrypted_files.append(PortalAttachment(
            id=att_id, org_id=org_id, portal_message_id=row_id, position=position, content_type=ctype, size=len(content),
            inline_cid=cid,
            filename_enc=ring.encrypt(session, org_id, PortalAttachment.__tablename__, "filename", att_id, filename),
            content_enc=ring.encrypt(session, org_id, PortalAttachment.__tablename__, "content", att_id, content),
        ))
    row = PortalMessage(
        id=row_id, org_id=org_id, message_id=message_id, recipient_id=recipient_id, sender_id=sender_user_or_credential_id,
        auth=auth, answer_hash=answer_hash, birth_date_hash=birth_date_hash, expires_at=expires_at, created_at=now, codes_sent=0, failed_attempts=0,
        lockouts=0, view_count=0, **values,
    )
    session.add(row)
    session.flush()
    session.add_all(encrypted_files)
    session.flush()
    return row


# --------------------------------------------------------------------------- the link and the notification


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _derive_token(session: Session, org_id: str, row_id: str, key: bytes | None = None) -> str:
    key = key or get_keyring().named_key(session, org_id, "portal")
    digest = hmac.new(key, f"portal-link\x00{row_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def link_token(session: Session, pm: PortalMessage) -> str:
    """The message's link, derived again with the version of the portal secret that made it
    (the one whose hash the row holds): a rotation never changes a link already sent."""
    get_keyring().named_key(session, pm.org_id, "portal")
    for _version, key in get_keyring().named_keys(session, pm.org_id, "portal"):
        token = _derive_token(session, pm.org_id, pm.id, key)
        if hmac.compare_digest(_hash_token(token), pm.token_hash):
            return token
    return _derive_token(session, pm.org_id, pm.id)


def portal_link(session: Session, pm: PortalMessage) -> str:
    return f"{get_settings().base_url}/p/{link_token(session, pm)}"


def notification_templates(org: Organization) -> tuple[str, str]:
    settings = org.settings or {}
    subject = settings.get("portal_notification_subject") or DEFAULT_SUBJECT
    body = settings.get("portal_notification_body") or DEFAULT_BODY
    return subject, body


def check_notification_templates(subject: str | None, body: str | None) -> None:
    """Refuse organization templates that would break the email: a subject with a line break
    (header injection) or unknown placeholders."""
    for name, value in (("portal_notification_subject", subject), ("portal_notification_body", body)):
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > (200 if name.endswith("subject") else 5000):
            raise ValidationFailed("The notification text is too long.", field=name)
        unknown = {m for m in re.findall(r"\{([^{}]*)\}", value)} - set(PLACEHOLDERS)
        if unknown:
            raise ValidationFailed(
                "Unknown placeholder; use {organization}, {link} or {expires}.", field=name)
    if subject is not None:
        check_header_value("portal_notification_subject", subject)
        if "{link}" in subject:
            raise ValidationFailed("The link belongs in the body, not the subject.", field="portal_notification_subject")


def set_notification_templates(org: Organization, subject: str | None, body: str | None) -> None:
    """Store the organization's wording (an empty value restores the default)."""
    subject = (subject or "").strip() or None
    body = (body or "").strip() or None
    check_notification_templates(subject, body)
    settings = dict(org.settings or {})
    for key, value in (("portal_notification_subject", subject), ("portal_notification_body", body)):
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    org.settings = settings


def _fill(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


def _expires_text(pm: PortalMessage) -> str:
    expires = clock.aware(pm.expires_at)
    return f"{expires:%B} {expires.day}, {expires:%Y} {expires:%H:%M} UTC" if expires else "the sender recalls it"


def notification_email(session: Session, portal_message: PortalMessage) -> tuple[str, str, str]:
    """(subject, text, html) of the email that tells the recipient a secure message waits.

    It holds the organization's name and its own wording, the link and the expiry — no PHI:
    not the patient's name, not the message's subject, not the address (ARCHITECTURE.md
    section 5)."""
    org = session.get(Organization, portal_message.org_id)
    subject_t, body_t = notification_templates(org)
    link = portal_link(session, portal_message)
    values = {"organization": org.name, "link": link, "expires": _expires_text(portal_message)}
    subject = " ".join(_fill(subject_t, {**values, "link": ""}).split())
    check_header_value("Subject", subject)
    text = _fill(body_t, values)
    if link not in text:
        text = f"{text.rstrip()}\n\n{link}\n"
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        escaped = html_lib.escape(block).replace(html_lib.escape(link), f'<a href="{html_lib.escape(link)}">{html_lib.escape(link)}</a>')
        paragraphs.append("<p>" + escaped.replace("\n", "<br>\n") + "</p>")
    html = (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>" + html_lib.escape(subject) + "</title></head><body>"
        + "\n".join(paragraphs) + "</body></html>"
    )
    return subject, text, html


# --------------------------------------------------------------------------- finding and state


def find_by_token(session: Session, token: str) -> PortalMessage | None:
    """The portal message a link token opens, or None. On success the session is scoped to the
    message's organization (public routes start unscoped)."""
    if not token or len(token) > 100 or not re.fullmatch(r"[A-Za-z0-9_-]+", token):
        return None
    pm = session.scalars(
        select(PortalMessage).where(PortalMessage.token_hash == _hash_token(token)).execution_options(**ALL_ORGANIZATIONS)
    ).first()
    if pm is None:
        return None
    if session.info.get("org_id") not in (None, pm.org_id):
        return None
    session.info.pop("scope", None)
    session.info["org_id"] = pm.org_id
    return pm


def get_portal_message(session: Session, portal_message_id: str) -> PortalMessage:
    """By id, in the session's organization (staff routes, tasks)."""
    pm = session.get(PortalMessage, portal_message_id) if is_id(portal_message_id) else None
    if pm is None or (session.info.get("org_id") and pm.org_id != session.info["org_id"]):
        raise NotFound("No such portal message.", field="id")
    return pm


def organization_name(session: Session, pm: PortalMessage) -> str:
    org = session.get(Organization, pm.org_id)
    return org.name if org else "CarePost"


def is_expired(pm: PortalMessage) -> bool:
    expires = clock.aware(pm.expires_at)
    return expires is not None and expires <= clock.now()


def permanently_locked(pm: PortalMessage) -> bool:
    return pm.lockouts >= MAX_LOCKOUTS


def locked_until(pm: PortalMessage) -> datetime | None:
    until = clock.aware(pm.locked_until)
    return until if until is not None and until > clock.now() else None


def state(pm: PortalMessage) -> str:
    """recalled | expired | locked | open."""
    if pm.recalled_at is not None:
        return "recalled"
    if is_expired(pm) or pm.wiped_at is not None:
        return "expired"
    if permanently_locked(pm) or locked_until(pm):
        return "locked"
    return "open"


def _recipient(session: Session, pm: PortalMessage) -> MessageRecipient | None:
    return session.get(MessageRecipient, pm.recipient_id) if pm.recipient_id else None


def _audit(session: Session, pm: PortalMessage, action: str, ctx: dict | None, outcome: str = "success", **details):
    from carepost.audit.service import record

    record(session, org_id=pm.org_id, actor_type=ACTOR, actor_id=pm.recipient_id or pm.id, action=action,
           outcome=outcome, target_type="portal_message", target_id=pm.id, details=details, **(ctx or {}))


def masked_address(session: Session, pm: PortalMessage) -> str:
    """``j•••@example.com``: enough for the recipient to recognise where the code went."""
    address = get_keyring().decrypt_text(session, pm.org_id, PortalMessage.__tablename__, "address", pm.id, pm.address_enc)
    local, _, domain = address.partition("@")
    return f"{local[:1]}•••@{domain}"


def recipient_address(session: Session, pm: PortalMessage) -> str:
    return get_keyring().decrypt_text(session, pm.org_id, PortalMessage.__tablename__, "address", pm.id, pm.address_enc)


def question_text(session: Session, pm: PortalMessage) -> str | None:
    return get_keyring().decrypt_text(session, pm.org_id, PortalMessage.__tablename__, "question", pm.id, pm.question_enc)


def record_opened(session: Session, pm: PortalMessage, ctx: dict | None) -> None:
    """The link was opened (before any sign-in): audited, nothing shown yet."""
    _audit(session, pm, "portal.link.open", ctx, state=state(pm))


def mark_expired_if_due(session: Session, pm: PortalMessage) -> bool:
    """Expire and wipe a message whose time is up (idempotent). Returns True when it is expired."""
    if not is_expired(pm) or pm.recalled_at is not None:
        return state(pm) == "expired"
    if pm.wiped_at is None:
        _wipe(session, pm)
        recipient = _recipient(session, pm)
        if recipient is not None and recipient.status not in ("recalled", "expired"):
            from carepost.delivery.service import add_event

            recipient.status = "expired"
            add_event(session, recipient, "expired", method="portal", portal_message_id=pm.id)
    return True


def _wipe(session: Session, pm: PortalMessage) -> None:
    pm.subject_enc = None
    pm.html_enc = None
    pm.text_enc = None
    pm.code_hash = None
    pm.wiped_at = clock.now()
    session.execute(delete(PortalAttachment).where(PortalAttachment.portal_message_id == pm.id))
    session.execute(update(PortalSession).where(PortalSession.portal_message_id == pm.id).values(revoked=True))


# --------------------------------------------------------------------------- the second factor


class CodeNotSent(ValidationFailed):
    """A code cannot be sent now; the message says why (a person reads it)."""


def check_code_request(pm: PortalMessage) -> None:
    """May a new code be sent now? Raises :class:`CodeNotSent` with the reason."""
    if pm.auth != "code":
        raise CodeNotSent("This message is opened with the sender's question, not a code.", field="code")
    if state(pm) != "open":
        raise CodeNotSent("This message cannot be opened now.", field="code")
    if pm.codes_sent >= MAX_CODES:
        raise CodeNotSent("Too many codes were sent for this message. Ask the sender to send it again.", field="code")
    last = clock.aware(pm.last_code_sent_at)
    if last is not None and clock.now() - last < CODE_MIN_INTERVAL:
        wait = int((CODE_MIN_INTERVAL - (clock.now() - last)).total_seconds()) + 1
        raise CodeNotSent(f"A code was just sent. Wait {wait} seconds before asking for another.", field="code")


def reserve_code(session: Session, pm: PortalMessage, ctx: dict | None) -> None:
    """Note that a code email is owed; the queue task draws the code itself (the queue carries
    ids, never a secret)."""
    now = clock.now()
    pm.code_requested_at = now
    pm.last_code_sent_at = now
    _audit(session, pm, "portal.code.request", ctx)


def code_pending(pm: PortalMessage) -> bool:
    """A code was asked for or sent and can still be entered."""
    expires = clock.aware(pm.code_expires_at)
    return pm.code_requested_at is not None or (pm.code_hash is not None and expires is not None and expires > clock.now())


def normalize_birth_date(value: str) -> str | None:
    """``1980-01-02`` (a date input), ``01/02/1980`` (US order) or ``1980/1/2`` -> ``1980-01-02``;
    None when it is not a date."""
    from datetime import date

    text = (value or "").strip()
    m = re.fullmatch(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})", text)
    if m:
        y, mo, d = m.groups()
    else:
        m = re.fullmatch(r"(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})", text)
        if not m:
            return None
        mo, d, y = m.groups()
    try:
        return date(int(y), int(mo), int(d)).isoformat()
    except ValueError:
        return None


def _birth_date_hash(session: Session, recipient_id: str | None) -> str | None:
    """Argon2id of the recipient contact's date of birth, when the organization holds one."""
    if not recipient_id:
        return None
    recipient = session.get(MessageRecipient, recipient_id)
    if recipient is None or not recipient.contact_id:
        return None
    from carepost.patients.service import get_contact

    try:
        contact = get_contact(session, recipient.contact_id)
    except NotFound:
        return None
    if contact is None or contact.birth_date is None:
        return None
    return _hasher().hash(contact.birth_date.isoformat())


# Issue 9 item 21: the second-factor checks read and write the message's counters (failed
# attempts, lockouts, the one-time code); two attempts racing on PostgreSQL would both read the
# same count and one wrong try would be lost. Each check first locks the row (SELECT ... FOR
# UPDATE; SQLite's writer lock serializes anyway) and re-reads what it decides on, so N wrong
# tries count N and the lockout applies, and a code is accepted once.
_AUTH_STATE = ["failed_attempts", "locked_until", "lockouts", "code_hash", "code_expires_at", "recalled_at",
               "expires_at", "wiped_at"]


def _lock_for_auth(session: Session, pm: PortalMessage) -> None:
    if inspect(pm).persistent:
        session.flush()  # what this transaction already wrote must survive the re-read
        session.refresh(pm, attribute_names=_AUTH_STATE, with_for_update=True)


def verify_birth_date(session: Session, pm: PortalMessage, value: str, ctx: dict | None = None) -> AuthResult:
    """The knowledge check: the recipient's date of birth as the organization holds it. Wrong
    dates count toward the same lockout as wrong codes and answers."""
    _lock_for_auth(session, pm)
    if pm.auth != "code" or not pm.birth_date_hash or state(pm) != "open":
        return AuthResult(False, "This message cannot be opened now.")
    normalized = normalize_birth_date(value[:40])
    if normalized is None or not _verify_hash(pm.birth_date_hash, normalized):
        return _fail(session, pm, ctx, "birth_date")
    pm.failed_attempts = 0
    _audit(session, pm, "portal.auth", ctx, method="birth_date")
    return AuthResult(True)


def code_not_sent_unverified(session: Session, pm: PortalMessage) -> None:
    """The code email found no verified TLS and was not sent: void the code drawn for it."""
    pm.code_hash = None
    pm.code_expires_at = None
    pm.code_tls_unavailable = True


def issue_code(session: Session, pm: PortalMessage) -> str:
    """A fresh one-time code (the previous one stops working); only its hash is kept."""
    code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
    pm.code_hash = _hasher().hash(code)
    pm.code_expires_at = clock.now() + timedelta(minutes=get_settings().portal_code_minutes)
    pm.codes_sent += 1
    pm.last_code_sent_at = clock.now()
    return code


def code_email(session: Session, pm: PortalMessage, code: str) -> tuple[str, str, str]:
    """(subject, text, html) of the one-time code email: the code and the organization, no PHI."""
    org = organization_name(session, pm)
    minutes = get_settings().portal_code_minutes
    shown = f"{code[:4]} {code[4:]}"
    subject = f"Your code for the secure message from {org}"
    text = (f"Your one-time code is: {shown}\n\nEnter it on the page where you asked for it. "
            f"It works once, for {minutes} minutes.\n\nIf you did not ask for a code, ignore this email.\n")
    html = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html_lib.escape(subject)}</title></head><body>"
            f"<p>Your one-time code is:</p><p><strong>{shown}</strong></p>"
            f"<p>Enter it on the page where you asked for it. It works once, for {minutes} minutes.</p>"
            "<p>If you did not ask for a code, ignore this email.</p></body></html>")
    return subject, text, html


@dataclass
class AuthResult:
    ok: bool
    reason: str = ""  # why not, in words for the recipient
    attempts_left: int | None = None


def _fail(session: Session, pm: PortalMessage, ctx: dict | None, how: str) -> AuthResult:
    settings = get_settings()
    pm.failed_attempts += 1
    left = settings.portal_max_attempts - pm.failed_attempts
    _audit(session, pm, "portal.auth", ctx, outcome="failure", method=how, failed_attempts=pm.failed_attempts)
    if left > 0:
        word = {"code": "code", "birth_date": "date of birth"}.get(how, "answer")
        return AuthResult(False, f"That {word} is not right. {left} {'try' if left == 1 else 'tries'} left.", left)
    pm.failed_attempts = 0
    pm.lockouts += 1
    pm.code_hash = None  # a locked message's code never works again
    if permanently_locked(pm):
        pm.locked_until = None
        _audit(session, pm, "portal.locked", ctx, outcome="failure", permanent=True, lockouts=pm.lockouts)
        return AuthResult(False, "Too many wrong tries. This message is locked: ask the sender to unlock or resend it.", 0)
    pm.locked_until = clock.now() + timedelta(minutes=settings.portal_lockout_minutes)
    _audit(session, pm, "portal.locked", ctx, outcome="failure", permanent=False, lockouts=pm.lockouts,
           minutes=settings.portal_lockout_minutes)
    new = " and ask for a new code" if how == "code" else ""
    return AuthResult(False, f"Too many wrong tries. Try again in {settings.portal_lockout_minutes} minutes{new}.", 0)


def verify_code(session: Session, pm: PortalMessage, code: str, ctx: dict | None = None) -> AuthResult:
    _lock_for_auth(session, pm)
    if pm.auth != "code" or state(pm) != "open":
        return AuthResult(False, "This message cannot be opened now.")
    candidate = re.sub(r"[\s-]", "", code or "")
    expires = clock.aware(pm.code_expires_at)
    if pm.code_hash is None or expires is None:
        return AuthResult(False, "Ask for a code first.")
    if expires <= clock.now():
        pm.code_hash = None
        _audit(session, pm, "portal.auth", ctx, outcome="failure", method="code", reason="code expired")
        return AuthResult(False, "That code has expired. Ask for a new one.")
    if not re.fullmatch(rf"\d{{{CODE_DIGITS}}}", candidate) or not _verify_hash(pm.code_hash, candidate):
        return _fail(session, pm, ctx, "code")
    pm.code_hash = None  # a code works once
    pm.code_expires_at = None
    pm.failed_attempts = 0
    _audit(session, pm, "portal.auth", ctx, method="code")
    return AuthResult(True)


def verify_answer(session: Session, pm: PortalMessage, answer: str, ctx: dict | None = None) -> AuthResult:
    _lock_for_auth(session, pm)
    if pm.auth != "question" or state(pm) != "open":
        return AuthResult(False, "This message cannot be opened now.")
    normalized = normalize_answer((answer or "")[:1000])
    if not normalized or not _verify_hash(pm.answer_hash, normalized):
        return _fail(session, pm, ctx, "question")
    pm.failed_attempts = 0
    _audit(session, pm, "portal.auth", ctx, method="question")
    return AuthResult(True)


def unlock(session: Session, pm: PortalMessage) -> None:
    """The sender lets the recipient try again (after a permanent lock)."""
    pm.lockouts = 0
    pm.failed_attempts = 0
    pm.locked_until = None
    pm.codes_sent = 0


# --------------------------------------------------------------------------- portal sessions


def create_session(session: Session, pm: PortalMessage) -> tuple[str, PortalSession]:
    """A new portal session for a recipient who just proved the address; returns the cookie
    token (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    minutes = get_settings().portal_session_minutes
    now = clock.now()
    row = PortalSession(id=_hash_token(token), org_id=pm.org_id, portal_message_id=pm.id, csrf_secret=secrets.token_urlsafe(24),
                        created_at=now, last_seen_at=now, expires_at=now + timedelta(minutes=minutes * SESSION_ABSOLUTE_FACTOR))
    session.add(row)
    session.flush()
    return token, row


def session_for(session: Session, pm: PortalMessage, token: str | None) -> PortalSession | None:
    """The live portal session of this cookie for this message, or None (idle or absolute
    timeout, revoked, another message's cookie, message no longer open)."""
    if not token or len(token) > 100:
        return None
    row = session.get(PortalSession, _hash_token(token))
    if row is None or row.portal_message_id != pm.id or row.revoked:
        return None
    now = clock.now()
    idle = timedelta(minutes=get_settings().portal_session_minutes)
    if clock.aware(row.expires_at) <= now or now - clock.aware(row.last_seen_at) > idle:
        row.revoked = True
        return None
    if state(pm) != "open":
        return None
    row.last_seen_at = now
    return row


def end_session(session: Session, row: PortalSession) -> None:
    row.revoked = True


# --------------------------------------------------------------------------- reading


def sanitize_html(html: str) -> str:
    """HTML safe to show: no scripts, event handlers, forms, frames, styles or remote resources.

    Images survive only as ``data:`` URIs (embedded in the message); every remote image is
    dropped, so opening a message tells no tracker anything. Links open outside the portal
    without a referrer."""
    import nh3

    tags = set(nh3.ALLOWED_TAGS) - {"img"} | {"img", "center", "font"}
    attributes = {
        "*": {"title", "align", "dir", "lang"},
        "a": {"href", "title"},
        "img": {"src", "alt", "width", "height"},
        "td": {"colspan", "rowspan", "align", "valign"},
        "th": {"colspan", "rowspan", "align", "valign", "scope"},
        "table": {"summary"},
        "ol": {"start", "type"},
        "font": {"color"},
    }

    def keep(tag: str, attribute: str, value: str) -> str | None:
        if tag == "img" and attribute == "src":
            return value if value.lower().startswith("data:image/") else None
        if tag == "a" and attribute == "href":
            return value if value.lower().startswith(("https://", "http://", "mailto:")) else None
        return value

    clean = nh3.clean(
        html,
        tags=tags,
        clean_content_tags={"script", "style"},
        attributes=attributes,
        attribute_filter=keep,
        url_schemes={"http", "https", "mailto", "data"},
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )
    # An image whose remote source was dropped would show as a broken icon: drop it whole.
    return _SOURCELESS_IMG.sub("", clean)


def frame_document(clean_html: str) -> str:
    """The sandboxed frame's document around sanitized HTML (its own stylesheet; the page's
    Content-Security-Policy applies inside too)."""
    return ('<!doctype html><html><head><meta charset="utf-8"><link rel="stylesheet" href="/static/portal-frame.css">'
            "</head><body>" + clean_html + "</body></html>")


MAX_INLINE_IMAGE_BYTES = 2 * 1024 * 1024


def _inline_images(session: Session, pm: PortalMessage, html: str, images: list[PortalAttachment]) -> str:
    """``cid:`` references of the HTML become ``data:`` URIs of the stored inline images, so
    they show without any request leaving the page (the sanitizer keeps only ``data:image/``)."""
    if not images:
        return html
    ring = get_keyring()
    for image in images:
        if not image.content_type.lower().startswith("image/") or image.size > MAX_INLINE_IMAGE_BYTES:
            continue
        content = ring.decrypt(session, pm.org_id, PortalAttachment.__tablename__, "content", image.id, image.content_enc)
        uri = f"data:{image.content_type.lower()};base64,{base64.b64encode(content).decode()}"
        html = re.sub(rf"""(["'])cid:{re.escape(image.inline_cid)}\1""", lambda m: f"{m.group(1)}{uri}{m.group(1)}", html)
    return html


def message_content(session: Session, pm: PortalMessage) -> dict:
    """Subject, sanitized HTML, text and attachment list, decrypted in memory for display."""
    ring = get_keyring()
    table = PortalMessage.__tablename__
    html = ring.decrypt_text(session, pm.org_id, table, "html", pm.id, pm.html_enc)
    rows = session.scalars(
        select(PortalAttachment).where(PortalAttachment.portal_message_id == pm.id).order_by(PortalAttachment.position)
    ).all()
    attachments = [a for a in rows if a.inline_cid is None]
    if html:
        html = _inline_images(session, pm, html, [a for a in rows if a.inline_cid is not None])
    clean = sanitize_html(html) if html else None
    return {
        "subject": ring.decrypt_text(session, pm.org_id, table, "subject", pm.id, pm.subject_enc) or "",
        "html": clean,
        "frame": frame_document(clean) if clean is not None else None,
        "text": ring.decrypt_text(session, pm.org_id, table, "text", pm.id, pm.text_enc),
        "attachments": [
            {"id": a.id, "size": a.size, "content_type": a.content_type,
             "filename": ring.decrypt_text(session, pm.org_id, PortalAttachment.__tablename__, "filename", a.id, a.filename_enc)}
            for a in attachments
        ],
    }


def record_view(session: Session, pm: PortalMessage, ctx: dict | None) -> bool:
    """Audit a view; the first one is the read receipt. Returns True on the first view."""
    first = pm.first_viewed_at is None
    pm.view_count += 1
    if first:
        pm.first_viewed_at = clock.now()
        recipient = _recipient(session, pm)
        if recipient is not None:
            from carepost.delivery.service import add_event

            recipient.status = "portal_viewed"
            add_event(session, recipient, "portal_viewed", method="portal", portal_message_id=pm.id)
    # Staff answers in the thread (issue 10 item 13) get their read receipt now.
    seen = [r for r in replies(session, pm) if r.author == "staff" and r.read_at is None]
    for r in seen:
        r.read_at, r.read_by = clock.now(), "portal_recipient"
    _audit(session, pm, "portal.message.read", ctx, first_view=first, view=pm.view_count,
           **({"answers_seen": [r.id for r in seen]} if seen else {}))
    return first


def attachment(session: Session, pm: PortalMessage, attachment_id: str, ctx: dict | None) -> tuple[str, str, bytes]:
    """(filename, content type, bytes) of one attachment of this message; audited."""
    row = session.get(PortalAttachment, attachment_id) if is_id(attachment_id) else None
    if row is None or row.portal_message_id != pm.id:
        raise NotFound("No such attachment.", field="attachment")
    ring = get_keyring()
    filename = ring.decrypt_text(session, pm.org_id, PortalAttachment.__tablename__, "filename", row.id, row.filename_enc)
    content = ring.decrypt(session, pm.org_id, PortalAttachment.__tablename__, "content", row.id, row.content_enc)
    # The same allow-list as acceptance: a file stored before it (or by another path) is not served.
    from carepost.delivery.attachments import check_attachment

    check_attachment(filename, row.content_type, content, "attachment")
    _audit(session, pm, "portal.attachment.download", ctx, attachment_id=row.id, size=row.size)
    return filename, row.content_type, content


# --------------------------------------------------------------------------- replies


def add_reply(session: Session, pm: PortalMessage, text: str, ctx: dict | None) -> PortalReply:
    body = (text or "").strip()
    if not body:
        raise ValidationFailed("Write a reply first.", field="reply")
    if len(body) > MAX_REPLY_CHARS:
        raise ValidationFailed(f"The reply is longer than {MAX_REPLY_CHARS:,} characters.", field="reply")
    if state(pm) != "open":
        raise Conflict("This message can no longer be answered.", field="reply")
    reply_id = new_id()
    enc = get_keyring().encrypt(session, pm.org_id, PortalReply.__tablename__, "text", reply_id, body)
    row = PortalReply(id=reply_id, org_id=pm.org_id, portal_message_id=pm.id, text_enc=enc, created_at=clock.now())
    session.add(row)
    session.flush()
    recipient = _recipient(session, pm)
    if recipient is not None:
        from carepost.delivery.service import add_event

        add_event(session, recipient, "portal_reply", portal_message_id=pm.id, reply_id=row.id)
    _audit(session, pm, "portal.reply.create", ctx, reply_id=row.id)
    return row


def replies(session: Session, pm: PortalMessage) -> list[PortalReply]:
    return list(session.scalars(
        select(PortalReply).where(PortalReply.portal_message_id == pm.id).order_by(PortalReply.created_at, PortalReply.id)
    ))


def reply_text(session: Session, row: PortalReply) -> str:
    return get_keyring().decrypt_text(session, row.org_id, PortalReply.__tablename__, "text", row.id, row.text_enc)


def reply_dict(session: Session, row: PortalReply) -> dict:
    """One entry of the thread: ``author`` is ``recipient`` (the patient's reply) or ``staff``
    (an answer of the organization's, ``portal.threads``)."""
    return {"id": row.id, "portal_message_id": row.portal_message_id, "text": reply_text(session, row),
            "author": row.author or "recipient",
            "created_at": clock.aware(row.created_at).isoformat(),
            "read_at": clock.aware(row.read_at).isoformat() if row.read_at else None}


def reply_notice(session: Session, pm: PortalMessage) -> tuple[str, str, str]:
    """(subject, text, html) telling the sender a secure reply arrived: a link into CarePost, no PHI."""
    base = get_settings().base_url
    link = f"{base}/app/portal/{pm.id}"
    subject = "A secure reply arrived in CarePost"
    text = f"A recipient replied to a secure message you sent.\n\nRead the reply in CarePost (sign-in required):\n{link}\n"
    html = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>" + subject + "</title></head><body>"
            "<p>A recipient replied to a secure message you sent.</p>"
            f"<p>Read the reply in CarePost (sign-in required):<br><a href=\"{html_lib.escape(link)}\">{html_lib.escape(link)}</a></p>"
            "</body></html>")
    return subject, text, html


# --------------------------------------------------------------------------- sender actions


def recall(session: Session, pm: PortalMessage, actor_id: str | None) -> bool:
    """Withdraw the message: the link shows "recalled", the stored copy is wiped. Returns False
    when it was recalled already (idempotent)."""
    if pm.recalled_at is not None:
        return False
    pm.recalled_at = clock.now()
    pm.recalled_by = actor_id
    _wipe(session, pm)
    recipient = _recipient(session, pm)
    if recipient is not None:
        from carepost.delivery.service import add_event

        recipient.status = "recalled"
        add_event(session, recipient, "recalled", method="portal", portal_message_id=pm.id)
    return True


def portal_state(session: Session, message_id: str) -> dict[str, dict]:
    """``{recipient id: portal_dict}`` of a message's portal copies (the delivery message page)."""
    return {pm.recipient_id: portal_dict(session, pm) for pm in portal_messages_of(session, message_id) if pm.recipient_id}


def portal_dict(session: Session, pm: PortalMessage) -> dict:
    """For the sender's organization (API and UI): state and receipts, never the content."""
    until = locked_until(pm)
    rows = replies(session, pm)
    return {
        "id": pm.id,
        "message_id": pm.message_id,
        "recipient_id": pm.recipient_id,
        "auth": pm.auth,
        "state": state(pm),
        "expires_at": clock.aware(pm.expires_at).isoformat() if pm.expires_at else None,
        "recalled_at": clock.aware(pm.recalled_at).isoformat() if pm.recalled_at else None,
        "first_viewed_at": clock.aware(pm.first_viewed_at).isoformat() if pm.first_viewed_at else None,
        "view_count": pm.view_count,
        "locked_until": until.isoformat() if until else None,
        "locked": permanently_locked(pm) or until is not None,
        "codes_sent": pm.codes_sent,
        "reply_count": sum(1 for r in rows if (r.author or "recipient") == "recipient"),
        "answer_count": sum(1 for r in rows if r.author == "staff"),
        "created_at": clock.aware(pm.created_at).isoformat(),
    }


def portal_messages_of(session: Session, message_id: str) -> list[PortalMessage]:
    return list(session.scalars(select(PortalMessage).where(PortalMessage.message_id == message_id)))


def due_for_expiry(session: Session, limit: int = 500) -> list[str]:
    """Ids of messages past their expiry whose copy is not wiped yet (all organizations)."""
    return list(session.scalars(
        select(PortalMessage.id).where(PortalMessage.expires_at <= clock.now(), PortalMessage.wiped_at.is_(None),
                                       PortalMessage.recalled_at.is_(None)).limit(limit)
        .execution_options(**ALL_ORGANIZATIONS)
    ))
