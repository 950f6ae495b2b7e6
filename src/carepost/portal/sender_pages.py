"""The sender's side of the secure portal in the staff UI: a portal message's state, the
patient's replies (read receipts recorded), recall and unlock, and the organization's portal
notification wording. (The patient's side is ``pages.py`` under ``/p``.)"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.models import Organization
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core import clock
from carepost.core.errors import CarePostError
from carepost.portal import service
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.get("/portal/{portal_message_id}")
def portal_message_page(request: Request, portal_message_id: str,
                        principal: Principal = Depends(require(P.MESSAGES_READ, P.PHI_READ_MASKED))):
    session = request.state.db
    pm = service.get_portal_message(session, portal_message_id)
    replies = service.replies(session, pm)
    now = clock.now()
    for row in replies:
        if row.read_at is None:
            row.read_at, row.read_by = now, principal.actor_id
    data = service.portal_dict(session, pm)
    items = [service.reply_dict(session, r) for r in replies]
    record_for(session, principal, request, "portal.reply.read", target_type="portal_message", target_id=pm.id,
               details={"reply_ids": [r.id for r in replies], "via": "ui"})
    session.commit()
    return render(request, "portal/sender.html", {
        "pm": data, "replies": items, "can_send": principal.can(P.MESSAGES_SEND),
        "done": request.query_params.get("done"),
    })


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
