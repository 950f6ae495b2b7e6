"""Web UI to compose and send a message (issue 10 item 5): ``/app/compose``.

The page writes one message (recipients chosen among patients or typed, a template or free text
with merge fields, purpose, topic, security mode, attachments), previews the secure method each
recipient would get, sends a test to the signed-in person, and sends. The logic is
``delivery.compose``, which hands each recipient's message to the API's own service.

* Access: ``messages:send`` or ``campaigns:send`` (any of them; a denial is audited like
  ``require``'s), each also needing ``phi:read_masked``. Which purposes each may send is
  ``compose.allowed_purposes``.
* Everything travels in POST bodies (multipart, for the attachments); URLs carry ids only.
* Preview and test answer an htmx fragment (the form, attachments included, stays as typed);
  without JavaScript the same routes answer the whole page. Errors name the field; a whole page
  answers 422 (403 for a purpose the role may not send).
* Audited: ``message.create`` per stored message (``via: ui``, ``test`` for a test),
  ``security.preview``, ``contact.search`` for the name search, ``message.list`` for the page
  after sending, ``access.denied`` for a refusal.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from carepost.accounts.access import Principal, request_context, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record, record_for
from carepost.core import clock, purposes
from carepost.core.errors import CarePostError, NotFound, PermissionDenied, ValidationFailed
from carepost.core.ids import is_id
from carepost.delivery import compose, policy
from carepost.delivery.models import ComposedSend, Message, MessageRecipient, SendingDomain
from carepost.delivery.pages import STATUS_TONE, _address
from carepost.patients import masking
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

SEND_ANY = (P.MESSAGES_SEND, P.CAMPAIGNS_SEND)
MAX_FORM_TEXT = 512 * 1024


def _deny(request: Request, principal: Principal, reason: str) -> None:
    session = request.state.db
    session.rollback()
    record(session, org_id=principal.org_id, actor_type=principal.kind, actor_id=principal.actor_id,
           on_behalf_of=principal.on_behalf_of, action="access.denied", target_type="route",
           target_id=request.scope["route"].path if request.scope.get("route") else None, outcome="denied",
           details={"reason": reason, "needed": list(SEND_ANY), "method": request.method}, **request_context(request))
    session.commit()


async def composer(request: Request, principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> Principal:
    """``messages:send`` or ``campaigns:send`` (``require`` takes all-of; this is any-of)."""
    if not compose.may_compose(principal):
        await run_in_threadpool(_deny, request, principal, "missing:" + "|".join(SEND_ANY))
        raise PermissionDenied("You do not have permission to do this.")
    return principal


# --------------------------------------------------------------------------- reading the form


async def _read_form(request: Request) -> tuple[compose.Draft, list[tuple[int, str, str, bytes]], int]:
    form = await request.form()

    def text(name: str, limit: int = 400) -> str:
        value = form.get(name)
        return value[:limit] if isinstance(value, str) else ""

    draft = compose.Draft(
        sender=text("from").strip(), contact_ids=[v[:64] for v in form.getlist("contact_id") if isinstance(v, str)][:compose.MAX_RECIPIENTS + 1],
        addresses=text("addresses", compose.MAX_RECIPIENTS * 330), template_id=text("template_id", 64).strip(),
        subject=text("subject", 998), html=text("html", MAX_FORM_TEXT), text=text("text", MAX_FORM_TEXT),
        purpose=text("purpose", 64).strip(), topic=text("topic", 64).strip(), security=text("security", 32).strip(),
        contains_phi=text("contains_phi", 8) != "no",
    )
    uploads = [v for v in form.getlist("attachments") if isinstance(v, UploadFile) and v.filename]
    files = []
    for i, upload in enumerate(uploads[:compose.MAX_ATTACHMENTS]):
        content = await upload.read(compose.MAX_ATTACHMENT_BYTES + 1)
        files.append((i, upload.filename or "", upload.content_type or "", content))
    return draft, files, len(uploads)


def _attach(draft: compose.Draft, files, form_files_count: int) -> None:
    if form_files_count > compose.MAX_ATTACHMENTS:
        raise ValidationFailed(f"At most {compose.MAX_ATTACHMENTS} attachments.", field="attachments")
    draft.attachments = [compose.attachment(name, ctype, content, i) for i, name, ctype, content in files]


# --------------------------------------------------------------------------- the page


def _choices(session, principal: Principal) -> dict:
    from carepost.content.service import list_templates

    allowed = compose.allowed_purposes(principal)
    settings = compose.messages.delivery_settings(session, principal.org_id)
    domains = [d.domain for d in session.scalars(select(SendingDomain).order_by(SendingDomain.domain))]
    return {
        "templates": [{"id": t.id, "name": t.name, "purpose": t.purpose} for t in list_templates(session, principal.org_id)],
        "purposes": [(k, purposes.PURPOSES[k]) for k in allowed],
        "marketer_only": not principal.can(P.MESSAGES_SEND),
        "topics": compose.topic_choices(session, principal.org_id),
        "modes": policy.MODES, "org_mode": settings["security_mode"],
        "default_purpose": settings.get("default_purpose") if settings.get("default_purpose") in allowed else "",
        "domains": domains, "merge_fields": compose.MERGE_FIELDS, "max_recipients": compose.MAX_RECIPIENTS,
        "max_attachments": compose.MAX_ATTACHMENTS, "can_search": masking.may_unmask(principal),
    }


def _chosen(session, principal: Principal, contact_ids: list[str]) -> list[dict]:
    """The patients already chosen, shown again as checked boxes (masked unless allowed)."""
    from carepost.patients import service as patients

    out = []
    for contact_id in contact_ids:
        if not is_id(contact_id):
            out.append({"id": contact_id, "label": "(not a patient id)"})
            continue
        try:
            contact = patients.contact_dict(session, patients.get_contact(session, contact_id))
        except NotFound:
            out.append({"id": contact_id, "label": "(no such patient)"})
            continue
        out.append({"id": contact_id, "label": _contact_label(contact, masking.may_unmask(principal))})
    return out


def _contact_label(contact: dict, unmasked: bool) -> str:
    if not unmasked:
        return f"Patient {contact['id'][:8]}… " + ("(email on file)" if contact.get("email") else "(no email on file)")
    name = " ".join(p for p in (contact.get("given_name"), contact.get("family_name")) if p) or "(no name)"
    return f"{name} — {contact.get('email') or 'no email on file'}"


def _page(request: Request, principal: Principal, draft: compose.Draft | None = None, *, error: str | None = None,
          field: str | None = None, rows=None, test_sent: dict | None = None, found: list | None = None,
          status_code: int = 200):
    session = request.state.db
    draft = draft or compose.Draft()
    ctx = _choices(session, principal)
    if not draft.sender and ctx["domains"]:
        draft.sender = f"no-reply@{ctx['domains'][0]}"
    if not draft.purpose and not draft.template_id:
        draft.purpose = ctx["default_purpose"]
    chosen = _chosen(session, principal, draft.contact_ids) if draft.contact_ids else []
    session.commit()
    return render(request, "delivery/compose.html", {
        **ctx, "d": draft, "chosen": chosen, "error": error, "field": field, "rows": rows, "test_sent": test_sent,
        "had_files": bool(draft.attachments), "found": found or [],
    }, status_code=status_code)


def _result(request: Request, principal: Principal, draft: compose.Draft, *, error: str | None = None,
            field: str | None = None, rows=None, test_sent: dict | None = None, status_code: int = 200):
    """An htmx request gets the result fragment (200, so htmx swaps it in); a plain form post
    gets the whole page with the status."""
    if request.headers.get("hx-request") == "true":
        return render(request, "delivery/_compose_result.html", {
            "error": error, "field": field, "rows": rows, "test_sent": test_sent})
    return _page(request, principal, draft, error=error, field=field, rows=rows, test_sent=test_sent,
                 status_code=status_code)


def _refused(request: Request, principal: Principal, draft: compose.Draft, exc: CarePostError):
    session = request.state.db
    session.rollback()
    if isinstance(exc, PermissionDenied):
        _deny(request, principal, f"purpose_not_allowed:{draft.purpose or 'default'}")
    # A template or patient id from the form that names nothing is bad input (422), not a 404 page.
    status = 422 if isinstance(exc, NotFound) else exc.status_code
    return _result(request, principal, draft, error=exc.message, field=exc.field, status_code=status)


@router.get("/compose")
def compose_page(request: Request, principal: Principal = Depends(composer)):
    return _page(request, principal)


@router.post("/compose/contacts")
async def compose_contact_search(request: Request, principal: Principal = Depends(composer)):
    """Find patients by name (the blind-index name search of the contacts page; needs
    ``phi:read_unmasked``). Answers checkboxes the form then submits as ``contact_id``."""
    form = await request.form()
    name = form.get("contact_name")
    name = name.strip()[:200] if isinstance(name, str) else ""
    draft = None
    if request.headers.get("hx-request") != "true":
        draft, _files, _count = await _read_form(request)  # without JavaScript: the whole page again
    return await run_in_threadpool(_search, request, principal, name, draft)


def _search(request: Request, principal: Principal, name: str, draft: compose.Draft | None = None):
    from carepost.patients import service as patients

    session = request.state.db
    error, found = None, []
    try:
        if not masking.may_unmask(principal):
            raise ValidationFailed("Searching by name needs the permission to see unmasked PHI; add patients by id.",
                                   field="contact_name")
        ids = patients.find_contact_ids_by_name(session, principal.org_id, name)[:25]
        contacts = patients.contact_dicts(session, [patients.get_contact(session, i) for i in ids])
        found = [{"id": c["id"], "label": _contact_label(c, True), "has_email": bool(c.get("email"))} for c in contacts]
        record_for(session, principal, request, "contact.search", target_type="contact_list",
                   details={"by": ["name"], "count": len(found), "view": "unmasked", "via": "compose"})
        session.commit()
    except CarePostError as exc:
        session.rollback()
        error = exc.message
    if draft is None:
        return render(request, "delivery/_compose_contacts.html", {"found": found, "error": error})
    return _page(request, principal, draft, error=error, field="contact_name" if error else None, found=found,
                 status_code=422 if error else 200)


def _prepare(request: Request, principal: Principal, draft: compose.Draft, files, count: int):
    session = request.state.db
    _attach(draft, files, count)
    purpose = compose.check_allowed(session, principal.org_id, principal, draft)
    compose.check_content(session, principal.org_id, draft)
    return purpose


@router.post("/compose/preview")
async def compose_preview(request: Request, principal: Principal = Depends(composer)):
    draft, files, count = await _read_form(request)
    return await run_in_threadpool(_preview, request, principal, draft, files, count)


def _preview(request: Request, principal: Principal, draft: compose.Draft, files, count: int):
    session = request.state.db
    try:
        purpose = _prepare(request, principal, draft, files, count)
        recipients = compose.resolve_recipients(session, principal.org_id, draft, unmasked=masking.may_unmask(principal))
        record_for(session, principal, request, "security.preview", target_type="security_preview",
                   details={"count": len(recipients), "security": draft.security or "organization", "via": "compose",
                            "contains_phi": draft.contains_phi, "purpose": purpose})
        rows = compose.preview(session, principal.org_id, draft, purpose, recipients)  # commits before probing
    except CarePostError as exc:
        return _refused(request, principal, draft, exc)
    return _result(request, principal, draft, rows=rows)


@router.post("/compose/test")
async def compose_test(request: Request, principal: Principal = Depends(composer)):
    draft, files, count = await _read_form(request)
    return await run_in_threadpool(_test, request, principal, draft, files, count)


def _test(request: Request, principal: Principal, draft: compose.Draft, files, count: int):
    session = request.state.db
    try:
        purpose = _prepare(request, principal, draft, files, count)
        own = compose.own_address(session, principal)
        message = compose.send_test(session, principal.org_id, draft, purpose, own, created_by=principal.actor_id)
        record_for(session, principal, request, "message.create", target_type="message", target_id=message.id,
                   details={"recipients_count": 1, "purpose": message.purpose, "security": message.security,
                            "contains_phi": message.contains_phi, "sandbox": False, "via": "ui", "test": True})
        message_id = message.id
        session.commit()
    except CarePostError as exc:
        return _refused(request, principal, draft, exc)
    compose.enqueue([message_id])
    return _result(request, principal, draft, test_sent={"id": message_id, "to": masking.mask_email(own)
                                                         if not masking.may_unmask(principal) else own})


@router.post("/compose/send")
async def compose_send(request: Request, principal: Principal = Depends(composer)):
    draft, files, count = await _read_form(request)
    return await run_in_threadpool(_send, request, principal, draft, files, count)


def _send(request: Request, principal: Principal, draft: compose.Draft, files, count: int):
    session = request.state.db
    try:
        purpose = _prepare(request, principal, draft, files, count)
        recipients = compose.resolve_recipients(session, principal.org_id, draft, unmasked=masking.may_unmask(principal))
        stored = compose.send(session, principal.org_id, draft, purpose, recipients, created_by=principal.actor_id)
    except CarePostError as exc:
        return _refused(request, principal, draft, exc)
    for message in stored:
        record_for(session, principal, request, "message.create", target_type="message", target_id=message.id,
                   details={"recipients_count": 1, "purpose": message.purpose, "security": message.security,
                            "contains_phi": message.contains_phi, "sandbox": False, "via": "ui"})
    ids = [m.id for m in stored]
    batch = ComposedSend(org_id=principal.org_id, message_ids=ids, created_by=principal.actor_id)
    session.add(batch)
    session.flush()
    batch_id = batch.id
    session.commit()
    compose.enqueue(ids)
    if len(ids) == 1:
        return RedirectResponse(f"/app/deliveries/{ids[0]}", status_code=303)
    return RedirectResponse(f"/app/compose/sent/{batch_id}", status_code=303)


@router.get("/compose/sent/{send_id}")
def compose_sent(request: Request, send_id: str,
                 principal: Principal = Depends(require(P.MESSAGES_READ, P.PHI_READ_MASKED))):
    """What one "Send" stored: each recipient's message, its status and secure method, with a
    link to the message page."""
    session = request.state.db
    batch = session.get(ComposedSend, send_id) if is_id(send_id) else None
    if batch is None or batch.org_id != principal.org_id:
        raise NotFound("No such send.", field="id")
    unmasked = masking.wants_unmasked(principal)
    ids = list(batch.message_ids or [])
    rows = []
    if ids:
        by_message = {m.id: m for m in session.scalars(select(Message).where(Message.id.in_(ids)))}
        for r in session.scalars(select(MessageRecipient).where(MessageRecipient.message_id.in_(ids))
                                 .order_by(MessageRecipient.id)):
            m = by_message.get(r.message_id)
            rows.append({
                "message_id": r.message_id, "status": r.status, "method": r.method, "reason": r.reason,
                "tone": STATUS_TONE.get(r.status, ""), "purpose": m.purpose if m else None,
                "address": _address(session, r.org_id, MessageRecipient.__tablename__, r.id, r.address_enc, unmasked),
            })
        order = {mid: i for i, mid in enumerate(ids)}
        rows.sort(key=lambda row: order.get(row["message_id"], 0))
    record_for(session, principal, request, "message.list", target_type="message_list",
               details={"view": "unmasked" if unmasked else "masked", "count": len(rows), "message_ids": ids,
                        "via": "ui", "page": "compose_sent"})
    session.commit()
    return render(request, "delivery/compose_sent.html", {
        "rows": rows, "created_at": clock.aware(batch.created_at), "send_id": batch.id,
        "counts": {s: sum(1 for r in rows if r["status"] == s) for s in sorted({r["status"] for r in rows})},
    })
