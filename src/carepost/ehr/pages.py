"""The EHR error queue page (issue 15 item 3): messages received from clinical systems that could
not be recorded, with their reason (a sentence naming the field — never the message), retried or
discarded by a person holding ``phi:write``; other statuses listed too. Paged by ``before`` (the
last id shown), 50 a page. The same service functions as ``/api/v1/ehr/messages`` — a retry or a
discard is audited there and here alike. The message itself is never shown (it stays encrypted)."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core.errors import CarePostError
from carepost.ehr import service
from carepost.web.rendering import render

router = APIRouter(prefix="/app/ehr", include_in_schema=False)
PAGE_SIZE = 50
STATUS_CHOICES = ("error", "recorded", "ignored", "discarded", "queued", "all")
DONE = {"retried": "The message was recorded.", "still": "The message still cannot be recorded; see its reason.",
        "queued": "The resource will be read again from the organization's FHIR server.",
        "discarded": "The message was discarded (its content destroyed)."}


@router.get("/messages")
def messages_page(request: Request, status: str = Query("error", max_length=12),
                  before: str | None = Query(None, max_length=32, pattern=r"^[0-9a-f]{32}$"),
                  principal: Principal = Depends(require(P.PHI_READ_MASKED))):
    session = request.state.db
    if status not in STATUS_CHOICES:
        status = "error"
    error = None
    try:
        rows = service.list_messages(session, principal.org_id, status=None if status == "all" else status,
                                     limit=PAGE_SIZE + 1, before=before)
    except CarePostError as exc:
        rows, error = [], {"field": exc.field, "message": exc.message}
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    older = f"/app/ehr/messages?{urlencode({'status': status, 'before': rows[-1].id})}" if more and rows else None
    return render(request, "ehr/messages.html", {
        "rows": [service.message_out(r) for r in rows], "status": status, "choices": STATUS_CHOICES,
        "older": older, "first_page": before is None, "can_write": principal.can(P.PHI_WRITE), "error": error,
        "notice": DONE.get(request.query_params.get("done") or ""),
    })


@router.post("/messages/{message_id}/retry")
def retry(request: Request, message_id: str, principal: Principal = Depends(require(P.PHI_WRITE))):
    session = request.state.db
    row = service.get_message(session, principal.org_id, message_id)
    outcome = service.retry_message(session, principal.org_id, row, actor_type=principal.kind,
                                    actor_id=principal.actor_id, ip=request.client.host if request.client else None)
    session.commit()
    done = {"recorded": "retried", "queued": "queued"}.get(outcome.status, "still")
    return RedirectResponse(f"/app/ehr/messages?done={done}", status_code=303)


@router.post("/messages/{message_id}/discard")
def discard(request: Request, message_id: str, principal: Principal = Depends(require(P.PHI_WRITE))):
    session = request.state.db
    row = service.get_message(session, principal.org_id, message_id)
    service.discard_message(session, row)
    record_for(session, principal, request, "ehr_message.discard", target_type="ehr_message", target_id=row.id,
               details={"source": row.source, "reason_code": row.reason_code})
    session.commit()
    return RedirectResponse("/app/ehr/messages?done=discarded", status_code=303)
