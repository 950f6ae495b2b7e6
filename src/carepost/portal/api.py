"""REST routes of the secure portal for the sender's organization.

* State and receipts (``GET /api/v1/portal-messages``, ``/{id}``) need ``messages:read``; they
  never include the content.
* Replies are written by patients, so reading them is PHI access: ``messages:read`` and
  ``phi:read_masked``, audited (``portal.reply.read``) with the reply ids.
* Recall and unlock need ``messages:send``: the sender's side of a message it sent.
* A staff answer in the thread (``POST .../answers``, issue 10 item 13) needs ``messages:send``
  and ``phi:read_masked`` (those who may send a message with PHI); the patient is told by an
  email without PHI and reads the answer in the portal. Audited (``portal.staff_reply.create``).
* The notification wording (``/api/v1/portal-settings``) needs ``org:manage``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from carepost.accounts.access import Principal, require
from carepost.accounts.models import Organization
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.core.ids import is_id
from carepost.portal import service

router = APIRouter(prefix="/api/v1", tags=["portal"])


class PortalMessageOut(BaseModel):
    id: str
    message_id: str
    recipient_id: str | None
    auth: str = Field(description="code (one-time code by email) or question (the sender's question)")
    state: str = Field(description="open, locked, expired or recalled")
    expires_at: str | None
    recalled_at: str | None
    first_viewed_at: str | None = Field(description="the read receipt: when the recipient first opened the message")
    view_count: int
    locked: bool
    locked_until: str | None
    codes_sent: int
    reply_count: int = Field(description="the recipient's replies")
    answer_count: int = Field(0, description="staff answers in the thread")
    created_at: str


class PortalMessageList(BaseModel):
    items: list[PortalMessageOut]


class ReplyOut(BaseModel):
    id: str
    portal_message_id: str
    text: str
    author: str = Field("recipient", description="recipient (the patient's reply) or staff (an answer)")
    created_at: str
    read_at: str | None = Field(description="recipient replies: first read by staff; staff answers: first seen by the recipient")


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="The answer; kept encrypted in the portal, never emailed")


class ReplyList(BaseModel):
    items: list[ReplyOut]


class PortalSettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    portal_notification_subject: str | None = Field(
        None, max_length=200, description="Subject of the notification email; placeholders {organization} {expires}. "
        "Empty: the default. Never put patient information here.")
    portal_notification_body: str | None = Field(
        None, max_length=5000, description="Body of the notification; placeholders {organization} {link} {expires} "
        "(the link is added at the end when missing).")


class PortalSettingsOut(BaseModel):
    portal_notification_subject: str
    portal_notification_body: str
    placeholders: list[str]


def _load(request: Request, portal_message_id: str):
    return service.get_portal_message(request.state.db, portal_message_id)


@router.get("/portal-messages", response_model=PortalMessageList, summary="Portal copies of a message (state and read receipts)")
def list_portal_messages(request: Request, message_id: str = Query(..., description="the message id"),
                         principal: Principal = Depends(require(P.MESSAGES_READ))):
    if not is_id(message_id):
        raise ValidationFailed("Not a message id.", field="message_id")
    session = request.state.db
    items = [service.portal_dict(session, pm) for pm in service.portal_messages_of(session, message_id)]
    return {"items": items}


@router.get("/portal-messages/{portal_message_id}", response_model=PortalMessageOut, summary="One portal message's state")
def get_portal_message(request: Request, portal_message_id: str, principal: Principal = Depends(require(P.MESSAGES_READ))):
    return service.portal_dict(request.state.db, _load(request, portal_message_id))


@router.get("/portal-messages/{portal_message_id}/replies", response_model=ReplyList,
            summary="The recipient's secure replies (PHI: audited)")
def list_replies(request: Request, portal_message_id: str,
                 principal: Principal = Depends(require(P.MESSAGES_READ, P.PHI_READ_MASKED))):
    session = request.state.db
    pm = _load(request, portal_message_id)
    rows = service.replies(session, pm)
    now = clock.now()
    for row in rows:
        if (row.author or "recipient") == "recipient" and row.read_at is None and principal.user_id:
            row.read_at, row.read_by = now, principal.actor_id
    items = [service.reply_dict(session, r) for r in rows]
    record_for(session, principal, request, "portal.reply.read", target_type="portal_message", target_id=pm.id,
               details={"reply_ids": [r.id for r in rows], "via": "api"})
    session.commit()
    return {"items": items}


@router.post("/portal-messages/{portal_message_id}/answers", response_model=ReplyOut, status_code=201,
             summary="Answer the recipient in the same thread (PHI: audited)")
def answer(request: Request, portal_message_id: str, body: AnswerIn,
           principal: Principal = Depends(require(P.MESSAGES_SEND, P.PHI_READ_MASKED))):
    from carepost.portal import tasks, threads

    session = request.state.db
    pm = _load(request, portal_message_id)
    row = threads.add_staff_reply(session, pm, body.text[: threads.MAX_ANSWER_CHARS + 1],
                                  author_id=principal.user_id or principal.actor_id)
    record_for(session, principal, request, "portal.staff_reply.create", target_type="portal_message", target_id=pm.id,
               details={"reply_id": row.id, "via": "api"})
    out = service.reply_dict(session, row)
    session.commit()
    tasks.notify_answer(row.id)
    return out


@router.post("/portal-messages/{portal_message_id}/recall", response_model=PortalMessageOut,
             summary="Recall: the link stops working and the stored copy is wiped")
def recall(request: Request, portal_message_id: str, principal: Principal = Depends(require(P.MESSAGES_SEND))):
    session = request.state.db
    pm = _load(request, portal_message_id)
    changed = service.recall(session, pm, principal.actor_id)
    record_for(session, principal, request, "portal.recall", target_type="portal_message", target_id=pm.id,
               details={"already_recalled": not changed})
    session.commit()
    return service.portal_dict(session, pm)


@router.post("/portal-messages/{portal_message_id}/unlock", response_model=PortalMessageOut,
             summary="Let the recipient try again after a lockout")
def unlock(request: Request, portal_message_id: str, principal: Principal = Depends(require(P.MESSAGES_SEND))):
    session = request.state.db
    pm = _load(request, portal_message_id)
    service.unlock(session, pm)
    record_for(session, principal, request, "portal.unlock", target_type="portal_message", target_id=pm.id)
    session.commit()
    return service.portal_dict(session, pm)


def _settings_out(org: Organization) -> dict:
    subject, body = service.notification_templates(org)
    return {"portal_notification_subject": subject, "portal_notification_body": body,
            "placeholders": [f"{{{p}}}" for p in service.PLACEHOLDERS]}


@router.get("/portal-settings", response_model=PortalSettingsOut, summary="The portal notification's wording")
def get_portal_settings(request: Request, principal: Principal = Depends(require(P.ORG_MANAGE))):
    return _settings_out(request.state.db.get(Organization, principal.org_id))


@router.put("/portal-settings", response_model=PortalSettingsOut, summary="Set the portal notification's wording")
def put_portal_settings(request: Request, body: PortalSettingsIn, principal: Principal = Depends(require(P.ORG_MANAGE))):
    session = request.state.db
    org = session.get(Organization, principal.org_id)
    service.set_notification_templates(org, body.portal_notification_subject, body.portal_notification_body)
    record_for(session, principal, request, "portal.settings.update", target_type="organization", target_id=org.id,
               details={"fields": sorted(body.model_fields_set)})
    session.commit()
    return _settings_out(org)
