"""REST routes of the message archive (``/api/v1/archive``; docs/archive.md).

Every route needs ``compliance:manage`` and ``phi:read_unmasked`` (results show subjects, and
productions hold whole messages). Every search, request, decision, download and message read is
an audit event (criteria names and counts, never a word or an address).

* ``POST /search`` — run a search now (200), or, when it needs a second approver (whole
  organization, more than a year, no start date), record it as a request (202).
* ``POST /exports`` — a production (EML + MBOX + records + manifest + chain of custody, in a
  ZIP): built at once (201), or waiting for a second approver (202).
* ``GET /requests``, ``GET /requests/{id}``; ``POST /requests/{id}/approve`` and ``/reject`` (a
  different user with the compliance officer role); ``GET /requests/{id}/results`` (an approved
  search); ``GET /requests/{id}/download`` (a built production).
* ``GET /messages/{id}.eml`` — one archived message.

Bad input is 422 naming the field (``words``, ``date_to``, ``contact_id``, ``address``...).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.archive import service
from carepost.archive.schemas import ArchiveExportIn, ArchiveSearchRequestIn, DecisionIn

router = APIRouter(prefix="/api/v1/archive", tags=["archive"])


@router.post("/search", summary="Search the message archive (or ask a second approver for a sensitive search)",
             responses={202: {"description": "The search needs a second approver: a request was recorded"}})
def search(request: Request, body: ArchiveSearchRequestIn, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    actor = service.Actor.of(principal, request)
    criteria = service.check_criteria(session, principal.org_id, body)
    if service.sensitivity(criteria):
        row = service.create_request(session, principal.org_id, "search", criteria, actor, purpose="audit",
                                     reason=body.reason, limit=body.limit)
        session.commit()
        return JSONResponse({"status": "pending_approval", "request": service.request_dict(session, row)}, 202)
    rows, more = service.search(session, principal.org_id, criteria, body.limit, actor)
    session.commit()
    return {"status": "completed", "data": rows, "more": more}


@router.post("/exports", status_code=201,
             summary="Request a production export (EML, MBOX, manifest, chain of custody)",
             responses={202: {"description": "The export needs a second approver: a request was recorded"}})
def create_export(request: Request, body: ArchiveExportIn, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    criteria = service.check_criteria(session, principal.org_id, body)
    row = service.create_request(session, principal.org_id, "export", criteria, service.Actor.of(principal, request),
                                 purpose=body.purpose_of_export, reason=body.reason, limit=body.limit)
    session.commit()
    out = service.request_dict(session, row)
    return JSONResponse(out, 202 if row.status == "pending_approval" else 201)


@router.get("/requests", summary="Archive search and export requests, newest first")
def list_requests(request: Request, status: Literal["pending_approval", "approved", "rejected", "completed"] | None = None,
                  principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> dict:
    session = request.state.db
    return {"data": [service.request_dict(session, r) for r in service.list_requests(session, principal.org_id,
                                                                                     status=status)]}


@router.get("/requests/{request_id}", summary="An archive request, with its criteria (audited)")
def read_request(request: Request, request_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> dict:
    session = request.state.db
    row = service.get_request(session, principal.org_id, request_id)
    out = service.request_dict(session, row, with_criteria=True)
    service._audit(session, principal.org_id, service.Actor.of(principal, request), "archive.request_read", row.id, {})
    session.commit()
    return out


def _decide(request: Request, request_id: str, body: DecisionIn | None, principal: Principal, approve: bool) -> dict:
    session = request.state.db
    row = service.decide(session, principal.org_id, request_id, service.Actor.of(principal, request), approve=approve,
                         note=body.note if body else None)
    session.commit()
    return service.request_dict(session, row)


@router.post("/requests/{request_id}/approve",
             summary="Approve a sensitive request (a different user with the compliance officer role)")
def approve(request: Request, request_id: str, body: DecisionIn | None = None,
            principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> dict:
    return _decide(request, request_id, body, principal, True)


@router.post("/requests/{request_id}/reject", summary="Reject a sensitive request")
def reject(request: Request, request_id: str, body: DecisionIn | None = None,
           principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> dict:
    return _decide(request, request_id, body, principal, False)


@router.get("/requests/{request_id}/results", summary="The results of an approved search (audited)")
def results(request: Request, request_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> dict:
    session = request.state.db
    rows, more = service.request_results(session, principal.org_id, request_id, service.Actor.of(principal, request))
    session.commit()
    return {"status": "completed", "data": rows, "more": more}


@router.get("/requests/{request_id}/download", summary="Download a built production (ZIP; audited)",
            response_class=Response)
def download(request: Request, request_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> Response:
    session = request.state.db
    name, data = service.download(session, principal.org_id, request_id, service.Actor.of(principal, request))
    session.commit()
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/messages/{message_id}.eml", summary="One archived message as an EML file (audited)",
            response_class=Response)
def message_eml(request: Request, message_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> Response:
    session = request.state.db
    data = service.message_eml(session, principal.org_id, message_id, service.Actor.of(principal, request))
    session.commit()
    return Response(data, media_type="message/rfc822",
                    headers={"Content-Disposition": f'attachment; filename="message-{message_id}.eml"'})
