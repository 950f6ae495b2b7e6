"""The sender's side of the secure portal in the staff UI: a portal message's state, its thread
— which patient wrote, their replies (read receipts recorded) and staff answers in the same
thread (``threads``) —, recall and unlock, and the organization's portal notification wording.
(The patient's side is ``pages.py`` under ``/p``.)"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.models import Organization
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core import clock
from carepost.core.errors import CarePostError
from carepost.patients import masking
from carepost.portal import service, threads
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _thread_page(request: Request, principal: Principal, pm, *, answer_text: str = "", error: str | None = None,
                 field: str | None = None, status_code: int = 200):
    """The thread as staff see it: who the patient is (masked unless ``phi:read_unmasked``),
    the patient's replies and the staff answers in order, and the answer form. Audited as a
    read of the replies (``portal.reply.read``) with the reply ids and the view."""
    session = request.state.db
    unmasked = masking.wants_unmasked(principal)
    rows = threads.thread(session, pm)
    now = clock.now()
    for row in rows:
        if (row.author or "recipient") == "recipient" and row.read_at is None:
            row.read_at, row.read_by = now, principal.actor_id
    names = threads.staff_authors(session, rows)
    items = [threads.item(session, r, names=names) for r in rows]
    data = service.portal_dict(session, pm)
    patient = threads.patient(session, pm, unmasked=unmasked)
    record_for(session, principal, request, "portal.reply.read", target_type="portal_message", target_id=pm.id,
               details={"reply_ids": [r.id for r in rows], "via": "ui", "view": "unmasked" if unmasked else "masked",
                        "contact_id": patient["contact_id"]})
    session.commit()
    return render(request, "portal/sender.html", {
        "pm": data, "replies": items, "patient": patient, "can_send": principal.can(P.MESSAGES_SEND),
        "can_answer": principal.can(P.MESSAGES_SEND) and data["state"] in ("open", "locked"),
        "done": request.query_params.get("done"), "answer_text": answer_text, "error": error, "field": field,
        "max_answer": threads.MAX_ANSWER_CHARS,
    }, status_code=status_code)


@router.get("/portal/{portal_message_id}")
def portal_message_page(request: Request, portal_message_id: str,
                        principal: Principal = Depends(require(P.MESSAGES_READ, P.PHI_READ_MASKED))):
    pm = service.get_portal_message(request.state.db, portal_message_id)
    return _thread_page(request, principal, pm)


@router.post("/portal/{portal_message_id}/answer")
def portal_answer(request: Request, portal_message_id: str, text: str = Form(""),
                  principal: Principal = Depends(require(P.MESSAGES_SEND, P.PHI_READ_MASKED))):
    """A staff answer in the same thread (issue 10 item 13): stored encrypted, the patient told
    by an email without PHI (``tasks.notify_answer``), read in the portal."""
    from carepost.portal import tasks

    session = request.state.db
    pm = service.get_portal_message(session, portal_message_id)
    kept = text[: threads.MAX_ANSWER_CHARS + 1]
    try:
        row = threads.add_staff_reply(session, pm, kept, author_id=principal.user_id or principal.actor_id)
    except CarePostError as exc:
        session.rollback()
        return _thread_page(request, principal, pm, answer_text=kept[: threads.MAX_ANSWER_CHARS], error=exc.message,
                            field=exc.field, status_code=exc.status_code)
    record_for(session, principal, request, "portal.staff_reply.create", target_type="portal_message", target_id=pm.id,
               details={"reply_id": row.id, "via": "ui"})
    reply_id = row.id
    session.commit()
    tasks.notify_answer(reply_id)
    return _see_other(f"/app/portal/{pm.id}?done=answered#thread")


@router.post("/portal/{portal_message_id}/recall")
def portal_recall(request: Request, portal_message_id: str, principal: Principal = Depends(require(P.MESSAGES_SEND))):
    session = request.state.db
    pm = service.get_portal_message(session, portal_message_id)
    changed = service.recall(session, pm, principal.actor_id)
    record_for(session, principal, request, "portal.recall", target_type="portal_message", target_id=pm.id,
               details={"already_recalled": not changed, "via": "ui"})
    session.commit()
    return _see_other(f"/app/portal/{pm.id}?done=recalled")


@router.post("/portal/{portal_message_id}/unlock")
def portal_unlock(request: Request, portal_message_id: str, principal: Principal = Depends(require(P.MESSAGES_SEND))):
    session = request.state.db
    pm = service.get_portal_message(session, portal_message_id)
    service.unlock(session, pm)
    record_for(session, principal, request, "portal.unlock", target_type="portal_message", target_id=pm.id,
               details={"via": "ui"})
    session.commit()
    return _see_other(f"/app/portal/{pm.id}?done=unlocked")


@router.get("/portal-settings")
def portal_settings_page(request: Request, principal: Principal = Depends(require(P.ORG_MANAGE))):
    org = request.state.db.get(Organization, principal.org_id)
    subject, body = service.notification_templates(org)
    return render(request, "portal/settings.html", {
        "subject": subject, "body": body, "error": None, "field": None, "saved": request.query_params.get("saved") == "1",
        "placeholders": service.PLACEHOLDERS,
    })


@router.post("/portal-settings")
def portal_settings_save(request: Request, subject: str = Form(""), body: str = Form(""),
                         principal: Principal = Depends(require(P.ORG_MANAGE))):
    session = request.state.db
    org = session.get(Organization, principal.org_id)
    try:
        service.set_notification_templates(org, subject[:400], body[:10000])
    except CarePostError as exc:
        session.rollback()
        return render(request, "portal/settings.html", {
            "subject": subject[:400], "body": body[:10000], "error": exc.message, "field": exc.field, "saved": False,
            "placeholders": service.PLACEHOLDERS,
        }, status_code=422)
    record_for(session, principal, request, "portal.settings.update", target_type="organization", target_id=org.id,
               details={"via": "ui"})
    session.commit()
    return _see_other("/app/portal-settings?saved=1")
