"""Accepting messages (API, batch, SMTP submission): validation, idempotency, storage, the eligibility check at acceptance; and reading them back.

(Split out of ``delivery.service``, which still exports every public name.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core import events as domain_events
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.content import phi_lint
from carepost.delivery import policy, portal_answer
from carepost.delivery.mime import MailAddress, message_id_for, parse_address
from carepost.delivery.domains import may_send, sending_domain_for
from carepost.delivery.outcomes import add_event
from carepost.delivery.settings import check_purpose, delivery_settings
from carepost.delivery.models import Message, MessageAttachment, MessageEvent, MessageRecipient, SendingDomain
from carepost.delivery.schemas import MAX_ATTACHMENT_BYTES

# --- accepting a message (API, batch, SMTP submission) ---------------------------------------
# Everything is validated before anything is written, so a refused message (or one refused
# message of a batch) leaves nothing behind, and the error names the field (with its index).

# Attachments are checked by declared type, by file name and by content: executable content is
# refused whatever it claims to be, and a type with a well-known signature must carry it.
BLOCKED_EXTENSIONS = frozenset({
    "exe", "com", "bat", "cmd", "scr", "pif", "msi", "msp", "mst", "vbs", "vbe", "js", "jse", "wsf", "wsh", "ps1",
    "psm1", "jar", "cpl", "hta", "lnk", "reg", "dll", "scf", "apk", "app", "dmg", "iso", "sh", "py",
})
BLOCKED_TYPES = frozenset({
    "application/x-msdownload", "application/x-msdos-program", "application/x-dosexec", "application/x-executable",
    "application/vnd.microsoft.portable-executable", "application/x-sh", "application/x-csh", "application/java-archive",
    "application/x-ms-installer", "application/x-msi", "application/hta", "text/javascript", "application/javascript",
    "application/x-javascript", "application/vbscript", "text/vbscript", "application/x-bat", "application/x-python",
})
_SIGNATURES = {
    "image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",), "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",), "image/webp": (b"RIFF",),
}
_EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xca\xfe\xba\xbe", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"#!")
_RESERVED_HEADER_PREFIX = "x-carepost-"



from carepost.core.ports import Port  # noqa: E402

topic_of: Port = Port(
    "delivery.topic_of",
    "A message's topic named by id or short name -> the topic id; ValidationFailed(field='topic') for an "
    "unknown or archived one (consent).")

archive_index: Port = Port(
    "delivery.archive_index",
    "(session, org_id, [(message id, subject, text, html)]) -> tokens written: the archive's keyed word index of "
    "a batch of stored messages, in the same transaction (archive.index.index_messages; one executemany).")

engagement_summary: Port = Port(
    "delivery.engagement_summary",
    "(session, org_id, message_id) -> {privacy_mode, totals, recipients: {recipient id: {opened, clicked}}}: a "
    "message's opens and clicks for GET /api/v1/messages/{id} (tracking.message_engagement).")

@dataclass
class PreparedMessage:
    """A message that passed every check, ready to store."""

    sender: MailAddress
    sending_domain: SendingDomain
    recipients: list[tuple[str, MailAddress]]  # (to | cc | bcc, address), each address once
    reply_to: MailAddress | None
    subject: str
    html: str | None
    text: str | None
    attachments: list  # AttachmentIn
    headers: dict[str, str]
    purpose: str
    security: str
    contains_phi: bool
    tags: list[str]
    portal: dict | None
    request_hash: str
    topic_id: str | None = None
    track_opens: bool = False
    track_clicks: bool = False
    template_id: str | None = None
    template_version_id: str | None = None  # the immutable template version it was rendered from
    campaign_id: str | None = None  # the campaign that planned it (campaigns.sending)
    journey_step_id: str | None = None  # the journey step that sent it (journeys.models.step_key)


def request_fingerprint(data) -> str:
    """SHA-256 of a message request, for Idempotency-Key: same key + same request = same
    message; attachment bodies enter as their hashes."""
    payload = data.model_dump(mode="python", by_alias=True)
    if isinstance(payload.get("portal"), dict):
        # A fast hash over the answer would be an oracle for it beside the Argon2id hash.
        payload["portal"].pop("answer", None)
    for attachment in payload.get("attachments") or []:
        attachment["content"] = hashlib.sha256(attachment["content"]).hexdigest()
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def idempotency_hash(key: str) -> str:
    return hashlib.sha256(f"idempotency\x00{key}".encode()).hexdigest()


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not (1 <= len(key) <= 200) or not key.isascii() or not key.isprintable():
        raise ValidationFailed("The Idempotency-Key is 1 to 200 printable ASCII characters.", field="Idempotency-Key")
    return key


def _check_attachment(attachment, field_name: str, *, inline: bool) -> None:
    # The one allow-list, shared with the portal's downloads (delivery/attachments.py).
    from carepost.delivery.attachments import check_attachment

    check_attachment(attachment.filename, attachment.content_type, bytes(attachment.content), field_name, inline=inline)


def _prefixed(exc: ValidationFailed, prefix: str) -> ValidationFailed:
    return ValidationFailed(exc.message, field=f"{prefix}{exc.field}" if exc.field else prefix.rstrip(".") or None,
                            code=exc.code)


def prepare_message(session: Session, org_id: str, data, *, prefix: str = "", org_settings: dict | None = None,
                    domain_cache: dict | None = None, sandbox: bool = False) -> PreparedMessage:
    """Check a message request (a :class:`schemas.MessageIn`) completely; raises
    ValidationFailed naming ``prefix`` + the field (``to.2``, ``attachments.0``, ``security``...).
    ``sandbox``: a sandbox credential's message, which may come from a domain whose ownership is
    not proven yet (it is captured, never sent)."""
    from carepost.delivery.mime import Attachment, InlineImage, compose

    try:
        return _prepare(session, org_id, data, org_settings or delivery_settings(session, org_id),
                        domain_cache if domain_cache is not None else {}, Attachment, InlineImage, compose,
                        sandbox=sandbox)
    except ValidationFailed as exc:
        raise _prefixed(exc, prefix) from None


def _prepare(session, org_id, data, org_settings, domain_cache, Attachment, InlineImage, compose, *,
             sandbox: bool = False) -> PreparedMessage:
    template_purpose = None
    template_ref: tuple[str | None, str | None] = (None, None)
    request = data  # the Idempotency-Key fingerprint is of the request, not of its rendering
    if data.template_id is not None:
        # A template renders once per message with its data (which may hold PHI: the result is
        # stored encrypted like any body). Its PHI flag can only raise the message's.
        from carepost.content.service import render_template

        if data.html is not None or data.text is not None or data.subject is not None:
            raise ValidationFailed("Give either a template_id with data, or subject and html/text — not both.",
                                   field="template_id")
        rendered = render_template(session, org_id, data.template_id, data.data)
        data = data.model_copy(update={
            "subject": rendered.subject, "html": rendered.html or None, "text": rendered.text or None,
            "contains_phi": bool(data.contains_phi) or rendered.contains_phi,
        })
        template_purpose = rendered.purpose
        template_ref = (rendered.template_id, rendered.version_id)
        # Templates saved before the link guard: their URLs are checked for merge fields here too.
        from carepost.content import link_guard
        from carepost.content.service import get_template

        source = get_template(session, org_id, data.template_id)
        link_guard.check_template_links({"html": source.html, "text": source.text})
    purpose = data.purpose or template_purpose or org_settings.get("default_purpose")
    if not purpose:
        raise ValidationFailed("A purpose is required (the organization sets no default purpose).", field="purpose")
    check_purpose(purpose)
    if template_ref[1] is not None and purpose != template_purpose:
        # Another purpose than the template's: its merge-field helpers must fit that one too.
        from carepost.content.service import check_purpose_fit

        check_purpose_fit(session, org_id, template_ref[1], purpose)
    topic_id = topic_of(session, org_id, data.topic) if data.topic else None
    mode = policy.effective_mode(org_settings["security_mode"], data.security)
    if data.contains_phi is not False and mode == "opportunistic" and data.security is None:
        # The organization's floor is opportunistic, but this message carries PHI: it gets the
        # least mode PHI may travel in (raising, never lowering). Asking for opportunistic
        # explicitly with PHI is refused below.
        mode = "tls_required"
    if data.contains_phi is not False and mode == "opportunistic":
        raise ValidationFailed(
            "Opportunistic TLS is only for messages marked as carrying no PHI; set contains_phi to false or choose "
            "a stronger security mode.", field="security")
    sender = parse_address(data.sender, field_name="from")
    domain = domain_cache.get(sender.domain, False)
    if domain is False:
        domain = domain_cache[sender.domain] = sending_domain_for(session, org_id, sender.domain)
    if domain is None:
        raise ValidationFailed("The From address is not in a sending domain of the organization; add the domain first.",
                               field="from")
    if not may_send(domain, sandbox=sandbox):
        # Issue 9 item 2: a domain sends only for the organization that proved it owns it.
        raise ValidationFailed("The organization has not proven ownership of the From domain: publish the domain's "
                               "ownership TXT record and check the domain first.", field="from",
                               code="sending_domain_unverified")
    recipients: list[tuple[str, MailAddress]] = []
    seen: set[str] = set()
    for kind in ("to", "cc", "bcc"):
        for i, value in enumerate(getattr(data, kind)):
            address = parse_address(value, field_name=f"{kind}.{i}")
            key = address.addr_spec.lower()
            if key not in seen:
                seen.add(key)
                recipients.append((kind, address))
    reply_to = parse_address(data.reply_to, field_name="reply_to") if data.reply_to else None
    headers = dict(data.headers or {})
    for name in headers:
        if name.lower().startswith(_RESERVED_HEADER_PREFIX):
            raise ValidationFailed("X-CarePost-* headers are for SMTP submission only.", field="headers")
    inline, files = [], []
    for i, attachment in enumerate(data.attachments):
        _check_attachment(attachment, f"attachments.{i}", inline=attachment.content_id is not None)
        if attachment.content_id is not None:
            inline.append(InlineImage(attachment.content_id, attachment.content, attachment.content_type, attachment.filename))
        else:
            files.append(Attachment(attachment.filename, attachment.content, attachment.content_type))
    subject = data.subject or ""
    # The link guard (issue 13 item 3): no email address or merge field in any URL, tracked or not.
    from carepost.content import link_guard

    link_guard.check_links(data.html, data.text)
    if data.contains_phi is not False:
        # The subject is shown outside the protected content (inbox lists, notifications, and
        # outside clients that ignore header protection): no PHI in it, on every path (API, SMTP
        # submission, templates). The error names the kind of finding, never the text.
        phi_lint.check_subject(subject, names=[a.display_name for _, a in recipients if a.display_name])
    # A trial composition: every header value, name, file name and part is checked exactly as
    # the pipeline will build it later (header injection, reserved headers, content types).
    compose(sender=data.sender, to=[a.addr_spec for k, a in recipients if k == "to"],
            cc=[a.addr_spec for k, a in recipients if k == "cc"], bcc=[a.addr_spec for k, a in recipients if k == "bcc"],
            subject=subject, text=data.text, html=data.html, reply_to=data.reply_to, inline_images=inline,
            attachments=files, headers=headers, max_attachment_bytes=MAX_ATTACHMENT_BYTES)
    portal = None
    if data.portal is not None:
        portal = data.portal.model_dump(mode="json")
        if data.portal.expires_at is not None and clock.aware(data.portal.expires_at) <= clock.now():
            raise ValidationFailed("The portal expiry must be in the future.", field="portal.expires_at")
        # The question's answer is hashed (Argon2id) before anything is stored: portal_enc never
        # holds it readable. One hash per distinct answer in a batch (the memo rides in the
        # batch's shared cache under a key no domain name can take).
        portal = portal_answer.protect(portal, domain_cache.setdefault(" portal-answers", {}))
    return PreparedMessage(
        sender=sender, sending_domain=domain, recipients=recipients, reply_to=reply_to, subject=subject,
        html=data.html, text=data.text, attachments=list(data.attachments), headers=headers, purpose=purpose,
        security=mode, contains_phi=data.contains_phi is not False, tags=list(data.tags), portal=portal,
        request_hash=request_fingerprint(request), topic_id=topic_id,
        track_opens=bool(getattr(data, "track_opens", False)), track_clicks=bool(getattr(data, "track_clicks", False)),
        template_id=template_ref[0], template_version_id=template_ref[1],
    )


def find_idempotent(session: Session, org_id: str, key_hash: str) -> Message | None:
    return session.scalars(select(Message).where(Message.org_id == org_id, Message.idempotency_key == key_hash)).first()


def store_message(session: Session, org_id: str, prepared: PreparedMessage, *, source: str, created_by: str | None,
                  sandbox: bool = False, idempotency_key: str | None = None) -> Message:
    """Write a prepared message: encrypted content, one recipient row per address (encrypted,
    blind-indexed, linked to the contact with that address), a ``queued`` event each. Flushes;
    the caller commits and then enqueues delivery (:func:`carepost.delivery.tasks.enqueue_delivery`)."""
    return store_messages(session, org_id, [prepared], source=source, created_by=created_by, sandbox=sandbox,
                          idempotency_keys=[idempotency_key])[0]


def store_messages(session: Session, org_id: str, prepared: list[PreparedMessage], *, source: str,
                   created_by: str | None, sandbox: bool = False,
                   idempotency_keys: list[str | None] | None = None, as_rows: bool = False) -> list[Message]:
    """:func:`store_message` for many messages at once, set-based (issue 11 item 7): the data key
    is looked up once and each domain's blind index computed once per call; the messages go in
    with one flush, their recipients and ``queued`` events with one INSERT each (executemany, no
    ORM objects), the recipients' contacts in one look-up per 500 addresses, the eligibility check
    once for all, and the excluded recipients with one UPDATE and one INSERT of their events.

    This is also the entry point for pre-rendered per-recipient messages (campaign sending builds
    one :class:`PreparedMessage` per recipient and stores a chunk of them in one call). Returns
    the :class:`Message` rows (ORM objects in the session), in the order given; with ``as_rows``
    the messages go in with one INSERT (executemany) too and what is returned are their columns
    as attributes, not ORM objects (campaign sending: building and flushing a batch's ``Message``
    objects was about 0.09 ms of a campaign worker's CPU per message, docs/performance.md)."""
    ring = get_keyring()
    now = clock.now()
    keys = idempotency_keys or [None] * len(prepared)
    # Message content, attachments and recipients are sealed under the organization's key for
    # messages created this month (crypto-shredding by the retention purge, docs/keys.md).
    encrypt = ring.encryptor(session, org_id, period=("messages", now))

    def enc(table: str, column: str, row_id: str, value) -> bytes | None:
        return None if value is None else encrypt(table, column, row_id, value)

    domain_indexes: dict[str, str] = {}

    def domain_index(domain: str) -> str:
        found = domain_indexes.get(domain)
        if found is None:
            found = domain_indexes[domain] = ring.blind_index(session, org_id, "domain", domain)
        return found

    mt, at, rt = Message.__tablename__, MessageAttachment.__tablename__, MessageRecipient.__tablename__
    messages, dependents, recipients, addresses = [], [], [], []
    for p, key in zip(prepared, keys):
        message_id = new_id()
        messages.append(dict(  # noqa: C408 (the Message constructor's keywords, as before)
            id=message_id, org_id=org_id, source=source, sending_domain_id=p.sending_domain.id,
            from_address=p.sender.addr_spec, from_name_enc=enc(mt, "from_name", message_id, p.sender.display_name or None),
            reply_to_enc=enc(mt, "reply_to", message_id, _mailbox_text(p.reply_to) if p.reply_to else None),
            subject_enc=enc(mt, "subject", message_id, p.subject), html_enc=enc(mt, "html", message_id, p.html),
            text_enc=enc(mt, "text", message_id, p.text), contains_phi=p.contains_phi, security=p.security,
            purpose=p.purpose, topic_id=p.topic_id, tags=p.tags, idempotency_key=idempotency_hash(key) if key else None,
            request_hash=p.request_hash if key else None, sandbox=bool(sandbox), created_by=created_by, created_at=now,
            message_id_header=message_id_for(p.sending_domain.domain),
            headers_enc=enc(mt, "headers", message_id, json.dumps(p.headers)) if p.headers else None,
            portal_enc=enc(mt, "portal", message_id, json.dumps(p.portal)) if p.portal else None,
            track_opens=p.track_opens, track_clicks=p.track_clicks,
            template_id=p.template_id, template_version_id=p.template_version_id, campaign_id=p.campaign_id,
            journey_step_id=p.journey_step_id,
        ))
        for attachment in p.attachments:
            att_id = new_id()
            dependents.append(MessageAttachment(
                id=att_id, org_id=org_id, message_id=message_id, filename_enc=enc(at, "filename", att_id, attachment.filename),
                content_type=attachment.content_type, content_enc=enc(at, "content", att_id, bytes(attachment.content)),
                size=len(attachment.content), inline_cid=attachment.content_id,
            ))
        for kind, address in p.recipients:
            rid = new_id()
            addresses.append(address.addr_spec)
            recipients.append({
                "id": rid, "org_id": org_id, "message_id": message_id, "kind": kind,
                "address_enc": enc(rt, "address", rid, address.addr_spec),
                "display_name_enc": enc(rt, "display_name", rid, address.display_name or None),
                "address_index": ring.blind_index(session, org_id, "email", address.addr_spec),
                "domain_index": domain_index(address.domain), "contact_id": None, "status": "queued", "method": None, "reason": None,
                "attempts": 0, "evidence": {}, "possible_duplicate": False, "updated_at": now, "enqueued_at": now,
                "next_attempt_at": None,
            })
    _link_contacts(session, org_id, recipients)
    if as_rows:
        if messages:
            session.execute(insert(Message), messages)
        messages = [_Row(m) for m in messages]
    else:
        messages = [Message(**m) for m in messages]
        session.add_all(messages)
        session.flush()
    if dependents:
        session.add_all(dependents)
        session.flush()
    if recipients:
        session.execute(insert(MessageRecipient), recipients)
    details = {"source": source, "sandbox": bool(sandbox)}
    events = [{"id": new_id(), "org_id": org_id, "message_id": r["message_id"], "recipient_id": r["id"], "type": "queued",
                   "details": details, "created_at": now} for r in recipients]
    if events:
        session.execute(insert(MessageEvent), events)
    rows = [_Row(r) for r in recipients]
    by_message = {m.id: m for m in messages}
    for row in rows:  # the stored message at hand for the subscribers (analytics' dimensions): no read back
        row.stored_message = by_message[row.message_id]
    for recipient, event in zip(rows, events):  # message.queued to the organization's webhooks
        domain_events.publish("message.recipient_event", session, recipient, _Row(event))
    _exclude_rows(session, messages, rows, addresses, now)
    # The archive's word index (issue 16 item 8): one INSERT for the batch, no clear text kept.
    archive_index(session, org_id, [(m.id, p.subject, p.text, p.html) for m, p in zip(messages, prepared)])
    return messages


class _Row:
    """A stored row's columns as attributes (what the ``message.recipient_event`` subscribers
    read), for rows written without ORM objects. A recipient's also carries ``stored_message``,
    its message (row or ORM object), so that a subscriber needs no read of it per recipient."""

    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


def _exclude_rows(session: Session, messages: list[Message], recipients: list[_Row], addresses: list[str],
                  now) -> None:
    """:func:`exclude_ineligible` for rows stored by :func:`store_messages`: one UPDATE
    (executemany) of the excluded recipients and one INSERT of their ``excluded`` events."""
    from carepost.delivery import pipeline

    by_id = {m.id: m for m in messages}
    candidates = [
        pipeline.Candidate(r.id, r.message_id, r.org_id, address, r.address_index, r.contact_id,
                           by_id[r.message_id].purpose, by_id[r.message_id].source, by_id[r.message_id].contains_phi)
        for r, address in zip(recipients, addresses)
    ]
    excluded = (pipeline.eligibility(session, candidates) or {}) if candidates else {}
    changes, events, published = [], [], []
    for recipient in recipients:
        reason = excluded.get(recipient.id)
        if not reason:
            continue
        recipient.status, recipient.reason, recipient.method, recipient.next_attempt_at = \
            "excluded", str(reason)[:200], None, None
        changes.append({"id": recipient.id, "status": "excluded", "reason": recipient.reason, "method": None,
                        "next_attempt_at": None})
        event = {"id": new_id(), "org_id": recipient.org_id, "message_id": recipient.message_id, "recipient_id": recipient.id,
                     "type": "excluded", "details": {"reason": str(reason).split(":", 1)[0]}, "created_at": now}
        events.append(event)
        published.append((recipient, _Row(event)))
    if changes:
        session.execute(update(MessageRecipient), changes)
        session.execute(insert(MessageEvent), events)
        for recipient, event in published:
            domain_events.publish("message.recipient_event", session, recipient, event)


def exclude_ineligible(session: Session, messages: list[Message], recipients: list[MessageRecipient],
                       addresses: list[str]) -> int:
    """The eligibility check at acceptance (the pipeline checks again when it claims a
    recipient). An ineligible recipient is still accepted — the message answers 202 — but is
    ``excluded`` at once with the reason code, and never queued for delivery."""
    from carepost.delivery import pipeline

    by_id = {m.id: m for m in messages}
    candidates = [
        pipeline.Candidate(r.id, r.message_id, r.org_id, address, r.address_index, r.contact_id,
                           by_id[r.message_id].purpose, by_id[r.message_id].source, by_id[r.message_id].contains_phi)
        for r, address in zip(recipients, addresses)
    ]
    excluded = pipeline.eligibility(session, candidates) or {}
    for recipient in recipients:
        reason = excluded.get(recipient.id)
        if reason:
            recipient.status = "excluded"
            recipient.reason = str(reason)[:200]
            recipient.method = None
            recipient.next_attempt_at = None
            add_event(session, recipient, "excluded", reason=str(reason).split(":", 1)[0])
    session.flush()
    return len(excluded)


def _mailbox_text(address: MailAddress) -> str:
    return f"{address.display_name} <{address.addr_spec}>" if address.display_name else address.addr_spec


def _link_contacts(session: Session, org_id: str, recipients: list[MessageRecipient]) -> None:
    """Tie each recipient to the contact whose email has the same blind index (if any)."""
    try:
        from carepost.patients.service import contacts_by_index
    except ImportError:
        return
    def index(r):
        return r["address_index"] if isinstance(r, dict) else r.address_index

    found = contacts_by_index(session, org_id, "email", [index(r) for r in recipients])
    for recipient in recipients:
        if isinstance(recipient, dict):
            recipient["contact_id"] = found.get(recipient["address_index"])
        else:
            recipient.contact_id = found.get(recipient.address_index)


@dataclass
class Accepted:
    message: Message
    created: bool  # False: an earlier request with the same Idempotency-Key


def accept_message(session: Session, org_id: str, data, *, source: str, created_by: str | None, sandbox: bool = False,
                   idempotency_key: str | None = None, prefix: str = "") -> Accepted:
    """Check and store one message. With an Idempotency-Key the same request returns the
    message stored the first time; a different request with the same key is a 409."""
    key = check_idempotency_key(idempotency_key)
    prepared = prepare_message(session, org_id, data, prefix=prefix, sandbox=sandbox)
    if key is not None:
        existing = find_idempotent(session, org_id, idempotency_hash(key))
        if existing is not None:
            if existing.request_hash != prepared.request_hash:
                raise Conflict("This Idempotency-Key was used with a different request.", field="Idempotency-Key",
                               code="idempotency_conflict")
            return Accepted(existing, False)
    return Accepted(store_message(session, org_id, prepared, source=source, created_by=created_by, sandbox=sandbox,
                                  idempotency_key=key), True)


def accept_batch(session: Session, org_id: str, messages: list, *, source: str, created_by: str | None,
                 sandbox: bool = False) -> list[Message]:
    """All or nothing: every message is checked first (the error names ``messages.<i>.<field>``),
    then all are stored."""
    org_settings = delivery_settings(session, org_id)
    domain_cache: dict = {}
    prepared = [prepare_message(session, org_id, m, prefix=f"messages.{i}.", org_settings=org_settings,
                                domain_cache=domain_cache, sandbox=sandbox) for i, m in enumerate(messages)]
    return store_messages(session, org_id, prepared, source=source, created_by=created_by, sandbox=sandbox)


# --- reading messages ------------------------------------------------------------------------


def get_message(session: Session, message_id: str) -> Message:
    row = session.get(Message, message_id) if is_id(message_id) else None
    if row is None or (session.info.get("org_id") and row.org_id != session.info["org_id"]):
        raise NotFound("No such message.", field="message_id")
    return row


def recipient_address(session: Session, recipient: MessageRecipient) -> str:
    return get_keyring().decrypt_text(session, recipient.org_id, MessageRecipient.__tablename__, "address",
                                      recipient.id, recipient.address_enc)


def _evidence_view(recipient: MessageRecipient, sandbox: bool) -> dict:
    evidence = dict(recipient.evidence or {})
    return {
        "mx_host": evidence.get("mx_host"), "address": evidence.get("address"), "port": evidence.get("port"),
        "tls_version": evidence.get("tls_version"), "cipher": evidence.get("cipher"),
        "cert_fingerprint": evidence.get("cert_fingerprint"), "cert_verified": bool(evidence.get("cert_verified")),
        "mta_sts": evidence.get("mta_sts"), "relay": bool(evidence.get("relay")), "reply_code": evidence.get("reply_code"),
        "key_fingerprint": recipient.key_fingerprint, "portal_message_id": recipient.portal_message_id,
        "sandbox": bool(evidence.get("sandbox") or (sandbox and recipient.status != "queued")),
    }


def message_view(session: Session, message: Message, *, unmasked: bool) -> dict:
    """The API shape of a message (``schemas.MessageOut``): per recipient the address (masked
    unless ``unmasked``), status, method, reason, evidence and timestamped events."""
    from carepost.patients.masking import mask_email

    recipients = session.scalars(
        select(MessageRecipient).where(MessageRecipient.message_id == message.id).order_by(MessageRecipient.id)
    ).all()
    events: dict[str, list[dict]] = {}
    for event in session.scalars(
        select(MessageEvent).where(MessageEvent.message_id == message.id).order_by(MessageEvent.created_at, MessageEvent.id)
    ):
        events.setdefault(event.recipient_id, []).append(
            {"type": event.type, "at": clock.aware(event.created_at), "details": event.details or {}})
    engagement = engagement_summary(session, message.org_id, message.id)
    out = []
    for r in recipients:
        address = recipient_address(session, r)
        out.append({
            "address": address if unmasked else mask_email(address), "kind": r.kind, "status": r.status,
            "method": r.method, "reason": r.reason, "possible_duplicate": bool(r.possible_duplicate),
            "evidence": _evidence_view(r, message.sandbox), "events": events.get(r.id, []),
            "engagement": engagement["recipients"].get(r.id),
        })
    return {"id": message.id, "created_at": clock.aware(message.created_at), "purpose": message.purpose,
            "topic": message.topic_id, "security": message.security, "contains_phi": message.contains_phi,
            "engagement": {"privacy_mode": engagement["privacy_mode"], "totals": engagement["totals"]},
            "recipients": out}


def list_messages(session: Session, *, limit: int = 50, cursor: str | None = None, status: str | None = None,
                  source: str | None = None) -> tuple[list[dict], str | None]:
    """Newest first, for the API and the delivery log: per message the count of recipients by
    status (no addresses, no content). ``cursor`` is the last id of the previous page."""
    from sqlalchemy import func

    q = select(Message).order_by(Message.created_at.desc(), Message.id.desc())
    if cursor:
        last = get_message(session, cursor)
        q = q.where((Message.created_at < last.created_at) | ((Message.created_at == last.created_at) & (Message.id < last.id)))
    if source:
        q = q.where(Message.source == source)
    if status:
        q = q.where(Message.id.in_(select(MessageRecipient.message_id).where(MessageRecipient.status == status)))
    rows = session.scalars(q.limit(limit + 1)).all()
    page = rows[:limit]
    counts: dict[str, dict[str, int]] = {m.id: {} for m in page}
    if page:
        for message_id, st, n in session.execute(
            select(MessageRecipient.message_id, MessageRecipient.status, func.count())
            .where(MessageRecipient.message_id.in_([m.id for m in page]))
            .group_by(MessageRecipient.message_id, MessageRecipient.status)
        ):
            counts[message_id][st] = n
    data = [{
        "id": m.id, "created_at": clock.aware(m.created_at), "source": m.source, "purpose": m.purpose,
        "security": m.security, "contains_phi": m.contains_phi, "sandbox": m.sandbox,
        "recipients": sum(counts[m.id].values()), "statuses": counts[m.id],
    } for m in page]
    return data, (page[-1].id if len(rows) > limit else None)


def sandbox_captures(session: Session, message_id: str) -> list[tuple[str, str, bytes]]:
    """(recipient id, method, wire bytes) of what a sandbox message would have sent."""
    from carepost.delivery.models import SandboxCapture

    rows = session.scalars(select(SandboxCapture).where(SandboxCapture.message_id == message_id)
                           .order_by(SandboxCapture.created_at)).all()
    ring = get_keyring()
    return [(r.recipient_id, r.method, ring.decrypt(session, r.org_id, SandboxCapture.__tablename__, "raw", r.id, r.raw_enc))
            for r in rows]
