"""Compose and send from the staff UI (issue 10 item 5): the logic behind ``/app/compose``.

A composed message goes through the same service as ``POST /api/v1/messages``: every recipient
becomes a :class:`schemas.MessageIn`, checked by :func:`messages.prepare_message` (sender and
sending domain, purpose, topic, security mode, PHI in the subject, attachments' allow-list and
size, a trial MIME composition) and stored by :func:`messages.store_messages` (encrypted, the
eligibility check at acceptance), then queued for the pipeline. Nothing here re-implements those
checks; this module only turns the form into those requests.

* **One message per recipient.** No patient ever sees another's address, and merge fields are
  filled with each recipient's own data (:data:`MERGE_FIELDS`, from the patient record when the
  address belongs to a patient). Free text is rendered by the same sandbox as templates
  (``content.rendering``); a template is rendered by ``prepare_message`` itself.
* **Who may send what.** ``messages:send`` sends any purpose. ``campaigns:send`` (the Marketer
  role) sends commercial purposes only (:data:`MARKETER_PURPOSES`, the purposes that carry an
  opt-out); anything else is refused naming ``purpose``.
* **The preview** runs the security policy (:func:`preview.security_preview`, the same function
  as ``/app/security-preview``) and the consent eligibility check (a port filled by consent) for
  each recipient, before anything is stored.
* **A test** goes to the signed-in person's own address only, as an administrative message,
  with each merge field shown as its name in brackets (never a patient's data).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from carepost.accounts.permissions import Permission as P
from carepost.core import purposes
from carepost.core.crypto import get_keyring
from carepost.core.errors import CarePostError, NotFound, PermissionDenied, ValidationFailed
from carepost.core.ids import is_id
from carepost.core.ports import Port
from carepost.delivery import messages
from carepost.delivery.mime import parse_address
from carepost.delivery.schemas import MAX_ATTACHMENT_BYTES, AttachmentIn, MessageIn

topic_choices: Port = Port(
    "delivery.compose.topic_choices",
    "The organization's topics a message may name, for the compose page: [{id, key, name}] (consent.service).")
recipient_eligibility: Port = Port(
    "delivery.compose.recipient_eligibility",
    "(session, org_id, rows [{id, contact_id, address_index}], purpose, topic_id) -> {id: 'eligible' | reason code}: "
    "the delivery eligibility check for a message not stored yet (consent.eligibility).")
reason_text: Port = Port(
    "delivery.compose.reason_text",
    "An exclusion reason code -> the sentence the preview shows (consent.eligibility.REASON_TEXT).")

MAX_RECIPIENTS = 100
MAX_ATTACHMENTS = 10
# Merge fields a composed message may use, filled from the patient record (empty for an address
# that belongs to no patient).
MERGE_FIELDS = ("first_name", "last_name", "full_name", "name_prefix")
# What ``campaigns:send`` without ``messages:send`` may send: commercial messages (each carries
# an opt-out), never treatment, payment, operations or administrative mail.
MARKETER_PURPOSES = purposes.COMMERCIAL_PURPOSES
# The consent topic is required for marketing (its opt-outs then apply, and its link unsubscribes).
TOPIC_REQUIRED_PURPOSES = purposes.MARKETING_PURPOSES
TEST_SUBJECT_PREFIX = "[Test] "


def may_compose(principal) -> bool:
    return principal.can(P.MESSAGES_SEND) or principal.can(P.CAMPAIGNS_SEND)


def allowed_purposes(principal) -> tuple[str, ...]:
    """The purposes this person may send from the compose page."""
    if principal.can(P.MESSAGES_SEND):
        return tuple(purposes.PURPOSES)
    if principal.can(P.CAMPAIGNS_SEND):
        return tuple(MARKETER_PURPOSES)
    return ()


@dataclass
class Draft:
    """The compose form as submitted (kept to show it again; holds PHI: never logged)."""

    sender: str = ""
    contact_ids: list[str] = field(default_factory=list)
    addresses: str = ""
    template_id: str = ""
    subject: str = ""
    html: str = ""
    text: str = ""
    purpose: str = ""
    topic: str = ""
    security: str = ""
    contains_phi: bool = True
    attachments: list[AttachmentIn] = field(default_factory=list)

    def typed_addresses(self) -> list[str]:
        text = self.addresses[: MAX_RECIPIENTS * 330]
        return [a.strip() for line in text.splitlines() for a in line.replace(";", ",").split(",") if a.strip()]


@dataclass
class Recipient:
    address: str
    contact_id: str | None
    label: str  # what the page shows: masked unless the person may see PHI unmasked
    data: dict

    @property
    def mailbox(self) -> str:
        """``Name <address>`` for a patient: the To header greets them by name, and the PHI
        subject check knows the name to refuse (as the API's does with display names)."""
        from email.utils import formataddr

        name = self.data.get("full_name") or ""
        return formataddr((name, self.address)) if name else self.address


def attachment(filename: str, content_type: str, content: bytes, index: int) -> AttachmentIn:
    """An uploaded file as the API takes it; the allow-list and size checks run in
    ``prepare_message`` (``attachments.<i>``)."""
    if len(content) > MAX_ATTACHMENT_BYTES:
        raise ValidationFailed(f"The file is larger than {MAX_ATTACHMENT_BYTES // (1024 * 1024)} MiB.",
                               field=f"attachments.{index}")
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1][:255] or "attachment"
    try:
        return AttachmentIn(filename=name, content_type=(content_type or "application/octet-stream")[:255],
                            content=base64.b64encode(content).decode())
    except ValueError:
        raise ValidationFailed("The file could not be read as an attachment.", field=f"attachments.{index}") from None


def _merge_data(contact: dict | None) -> dict:
    if not contact:
        return {name: "" for name in MERGE_FIELDS}
    first, last = contact.get("given_name") or "", contact.get("family_name") or ""
    return {"first_name": first, "last_name": last, "full_name": " ".join(p for p in (first, last) if p),
            "name_prefix": contact.get("name_prefix") or ""}


def _label(contact: dict | None, address: str, unmasked: bool) -> str:
    from carepost.patients.masking import mask_email

    if not unmasked:
        return mask_email(address) or "***"
    if contact:
        name = " ".join(p for p in (contact.get("given_name"), contact.get("family_name")) if p)
        return f"{name} <{address}>" if name else address
    return address


def resolve_recipients(session: Session, org_id: str, draft: Draft, *, unmasked: bool) -> list[Recipient]:
    """Patients chosen by id (their email on file) and typed addresses (each validated, tied to
    the patient with that address if there is one), each address once. Errors name
    ``contacts.<i>``, ``addresses.<i>`` or ``recipients``."""
    from carepost.patients import service as patients

    out: list[Recipient] = []
    seen: set[str] = set()
    contact_ids = list(dict.fromkeys(c.strip() for c in draft.contact_ids if c.strip()))
    for i, contact_id in enumerate(contact_ids):
        if not is_id(contact_id):
            raise ValidationFailed("This is not a patient id (32 letters and digits from the contacts list).",
                                   field=f"contacts.{i}")
        try:
            contact = patients.contact_dict(session, patients.get_contact(session, contact_id))
        except NotFound:
            raise ValidationFailed("No such patient in this organization.", field=f"contacts.{i}") from None
        if not contact.get("email"):
            raise ValidationFailed("This patient has no email address on file.", field=f"contacts.{i}")
        address = parse_address(contact["email"], field_name=f"contacts.{i}", allow_display_name=False).addr_spec
        if address.lower() not in seen:
            seen.add(address.lower())
            out.append(Recipient(address, contact_id, _label(contact, address, unmasked), _merge_data(contact)))
    typed = draft.typed_addresses()
    ring = get_keyring()
    parsed = []
    for i, value in enumerate(typed):
        address = parse_address(value, field_name=f"addresses.{i}", allow_display_name=False).addr_spec
        if address.lower() not in seen:
            seen.add(address.lower())
            parsed.append(address)
    if parsed:
        indexes = {a: ring.blind_index(session, org_id, "email", a) for a in parsed}
        found = patients.contacts_by_index(session, org_id, "email", indexes.values())
        for address in parsed:
            contact_id = found.get(indexes[address])
            contact = patients.contact_dict(session, patients.get_contact(session, contact_id)) if contact_id else None
            out.append(Recipient(address, contact_id, _label(contact, address, unmasked), _merge_data(contact)))
    if not out:
        raise ValidationFailed("Choose at least one patient or type an address.", field="recipients")
    if len(out) > MAX_RECIPIENTS:
        raise ValidationFailed(f"At most {MAX_RECIPIENTS} recipients at a time; send to a segment with a campaign.",
                               field="recipients")
    return out


def effective_purpose(session: Session, org_id: str, draft: Draft) -> str:
    """The form's purpose, else the template's, else the organization's default."""
    if draft.purpose:
        return draft.purpose
    if draft.template_id:
        from carepost.content.service import get_template

        template = get_template(session, org_id, draft.template_id)
        if template.purpose:
            return template.purpose
    default = messages.delivery_settings(session, org_id).get("default_purpose")
    if not default:
        raise ValidationFailed("Choose a purpose (the organization sets no default purpose).", field="purpose")
    return default


def check_allowed(session: Session, org_id: str, principal, draft: Draft) -> str:
    """The purpose this message will have, once the person may send it: raises
    PermissionDenied naming ``purpose`` for a purpose the role does not allow, and
    ValidationFailed for a marketing message without a topic."""
    purpose = effective_purpose(session, org_id, draft)
    messages.check_purpose(purpose)
    if purpose not in allowed_purposes(principal):
        raise PermissionDenied(
            "Your role may send only commercial messages (own products and services, marketing); treatment, "
            "payment, operations and administrative messages need the messages:send permission.",
            field="purpose", code="purpose_not_allowed")
    if purpose in TOPIC_REQUIRED_PURPOSES and not draft.topic:
        raise ValidationFailed("Choose the topic of this marketing message: its opt-outs apply and its link "
                               "unsubscribes from it.", field="topic")
    return purpose


_FIELD_NAMES = {"template.subject": "subject", "template.html": "html", "template.text": "text",
                "template.preheader": "subject"}


def _content_field(exc: ValidationFailed) -> ValidationFailed:
    """Free text is rendered like a template: name the form's field, not ``template.<part>``."""
    name = exc.field or ""
    if name in _FIELD_NAMES:
        return ValidationFailed(exc.message, field=_FIELD_NAMES[name], code=exc.code)
    if name.startswith("data."):
        return ValidationFailed(f"{exc.message}. Merge fields you can use: {', '.join(MERGE_FIELDS)}.",
                                field="html", code=exc.code)
    return exc


def check_content(session: Session, org_id: str, draft: Draft) -> None:
    """A template or free text, never both; merge fields only from :data:`MERGE_FIELDS`."""
    from carepost.content import rendering
    from carepost.content.service import get_template, template_variables

    if draft.template_id:
        if draft.subject.strip() or draft.html.strip() or draft.text.strip():
            raise ValidationFailed("Choose a template or write the message, not both.", field="template_id")
        template = get_template(session, org_id, draft.template_id)
        unknown = sorted(set(template_variables(template)) - set(MERGE_FIELDS))
        if unknown:
            raise ValidationFailed(f"This template needs data the compose page cannot fill ({', '.join(unknown)}); "
                                   f"it can use {', '.join(MERGE_FIELDS)}. Send it through the API instead.",
                                   field="template_id")
        return
    if not draft.subject.strip():
        raise ValidationFailed("Enter a subject.", field="subject")
    if not draft.html.strip() and not draft.text.strip():
        raise ValidationFailed("Write the message (text, HTML or both), or choose a template.", field="text")
    parts = {"subject": draft.subject, "preheader": "", "html": draft.html, "text": draft.text}
    try:
        rendering.check_template(parts, contains_phi=draft.contains_phi)
        unknown = set()
        for part in rendering.PARTS:
            unknown |= rendering.variables(part, parts[part])
        unknown -= set(MERGE_FIELDS)
    except ValidationFailed as exc:
        raise _content_field(exc) from None
    if unknown:
        raise ValidationFailed(f"Unknown merge field {', '.join(sorted(unknown))}; you can use "
                               f"{', '.join(MERGE_FIELDS)}.", field="html" if draft.html.strip() else "text")


def message_in(draft: Draft, purpose: str, to: str, data: dict) -> MessageIn:
    """The API request for one recipient: a template with ``data`` (rendered by
    ``prepare_message``), or the free text rendered with ``data`` in the same sandbox."""
    from carepost.content import rendering

    common = {"from": draft.sender, "to": [to], "purpose": purpose, "topic": draft.topic or None,
              "security": draft.security or None, "contains_phi": draft.contains_phi, "attachments": draft.attachments}
    if draft.template_id:
        return MessageIn(template_id=draft.template_id, data=data, **common)
    try:
        parts = rendering.render_parts({"subject": draft.subject, "preheader": "", "html": draft.html, "text": draft.text},
                                       data)
    except ValidationFailed as exc:
        raise _content_field(exc) from None
    return MessageIn(subject=parts.subject, html=parts.html or None, text=parts.text or None, **common)


def _prefixed(exc: CarePostError, recipient_index: int, count: int) -> CarePostError:
    """An error about one recipient's message names the form's field; ``to.0`` is that recipient."""
    name = exc.field or ""
    if name.startswith("to."):
        exc.field = f"recipients.{recipient_index}" if count > 1 else "recipients"
    return exc


def build_messages(session: Session, org_id: str, draft: Draft, purpose: str, recipients: list[Recipient]) -> list:
    """Every recipient's message checked by the API's ``prepare_message`` (nothing stored yet)."""
    settings = messages.delivery_settings(session, org_id)
    cache: dict = {}
    prepared = []
    for i, r in enumerate(recipients):
        try:
            prepared.append(messages.prepare_message(session, org_id, message_in(draft, purpose, r.mailbox, r.data),
                                                     org_settings=settings, domain_cache=cache))
        except CarePostError as exc:
            raise _prefixed(exc, i, len(recipients)) from None
    return prepared


def send(session: Session, org_id: str, draft: Draft, purpose: str, recipients: list[Recipient], *,
         created_by: str) -> list:
    """Store one message per recipient (the API's path: ``store_messages`` encrypts, links the
    patient, checks eligibility at acceptance). The caller audits, commits and enqueues."""
    prepared = build_messages(session, org_id, draft, purpose, recipients)
    return messages.store_messages(session, org_id, prepared, source="ui", created_by=created_by)


def placeholder_data() -> dict:
    return {name: f"[{name}]" for name in MERGE_FIELDS}


def send_test(session: Session, org_id: str, draft: Draft, purpose: str, own: str, *, created_by: str):
    """The composed message to the person's own address only: subject marked ``[Test]``, merge
    fields as their names in brackets, purpose administrative (no authorization is needed to
    mail oneself, and no topic); security mode, PHI flag and attachments are the composed ones."""
    data = placeholder_data()
    request = message_in(draft, purpose, own, data)
    if request.template_id:
        from carepost.content.service import render_template

        rendered = render_template(session, org_id, request.template_id, data)
        request = request.model_copy(update={
            "template_id": None, "data": {}, "subject": rendered.subject, "html": rendered.html or None,
            "text": rendered.text or None, "contains_phi": request.contains_phi or rendered.contains_phi})
    request = request.model_copy(update={"subject": TEST_SUBJECT_PREFIX + (request.subject or ""), "topic": None,
                                         "purpose": "transactional", "tags": ["compose-test"]})
    try:
        prepared = messages.prepare_message(session, org_id, request)
    except CarePostError as exc:
        if (exc.field or "").startswith("to."):
            exc.field = "test"
        raise
    return messages.store_messages(session, org_id, [prepared], source="ui", created_by=created_by)[0]


@dataclass
class PreviewRow:
    label: str
    method: str  # tls | pgp | smime | portal | none | excluded
    reason: str


def eligibility(session: Session, org_id: str, recipients: list[Recipient], purpose: str, topic_id: str | None) -> dict[int, str]:
    """{recipient index: reason code} of the recipients the consent check would exclude now."""
    ring = get_keyring()
    rows = [{"id": str(i), "contact_id": r.contact_id, "address_index": ring.blind_index(session, org_id, "email", r.address)}
            for i, r in enumerate(recipients)]
    checked = recipient_eligibility(session, org_id, rows, purpose, topic_id)
    return {int(k): v for k, v in checked.items() if v != "eligible"}


def preview(session: Session, org_id: str, draft: Draft, purpose: str, recipients: list[Recipient]) -> list[PreviewRow]:
    """Per recipient, the secure method and why — or the exclusion and why — before sending.
    Checks the whole message first (the same errors as sending would give). Commits before
    the TLS probes, so no transaction is held while remote servers answer."""
    import asyncio

    from carepost.delivery.preview import keys_on_file, security_preview

    prepared = build_messages(session, org_id, draft, purpose, recipients)
    first = prepared[0]
    excluded = eligibility(session, org_id, recipients, purpose, first.topic_id)
    keys = keys_on_file(session, org_id, [r.address for r in recipients])
    from carepost.delivery.settings import delivery_settings

    org_relay = delivery_settings(session, org_id)["relay"]
    session.commit()
    # ``first.security`` is the effective mode prepare_message chose (the organization's, raised).
    rows = asyncio.run(security_preview(keys, org_mode=first.security, contains_phi=first.contains_phi,
                                          org_relay=org_relay))
    by_address = {row.address.lower(): row for row in rows}
    out = []
    for i, r in enumerate(recipients):
        if i in excluded:
            out.append(PreviewRow(r.label, "excluded", f"{excluded[i]}: {reason_text(excluded[i])}"))
            continue
        row = by_address[r.address.lower()]
        out.append(PreviewRow(r.label, row.method, row.reason))
    return out


def enqueue(message_ids: list[str]) -> None:
    """Queue delivery of committed messages (ids only), as the API does."""
    from carepost.delivery.tasks import enqueue_delivery

    enqueue_delivery(message_ids)


def own_address(session: Session, principal) -> str:
    from carepost.accounts.models import User

    user = session.get(User, principal.user_id) if principal.user_id else None
    if user is None or not user.email:
        raise ValidationFailed("Your account has no email address to send a test to.", field="test")
    return user.email

