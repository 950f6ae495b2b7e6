"""The message archive in the web UI (``/app/archive``; docs/archive.md).

One page: the search form (patient, address, dates, sender, campaign, journey, purpose, secure
method, words), its results, the "Request production export" button for the same criteria, and
the requests — sensitive ones wait for a second person with the compliance officer role, who
approves or rejects them here; a built production is downloaded here. Errors are shown next to
the field they concern (422). Every action is audited by the service.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.archive import service
from carepost.core.errors import CarePostError
from carepost.web.rendering import render

router = APIRouter(prefix="/app/archive", include_in_schema=False)
FIELDS = ("contact_id", "address", "date_from", "date_to", "sender", "campaign_id", "journey_id", "purpose", "method",
          "words", "reason", "purpose_of_export")


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v.strip() for k, v in form.items() if isinstance(v, str) and k in FIELDS}


def _page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
          results: list | None = None, more: bool = False, notice: str | None = None, status_code: int = 200):
    session = request.state.db
    rows = [service.request_dict(session, r) for r in service.list_requests(session, principal.org_id)]
    return render(request, "archive/index.html", {
        "errors": errors or {}, "form": form or {}, "results": results, "more": more, "notice": notice,
        "requests": rows, "me": principal.actor_id, "may_approve": principal.role == service.APPROVER_ROLE,
        "methods": service.METHODS,
    }, status_code=status_code)


@router.get("")
def archive_page(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    return _page(request, principal)


@router.post("/search")
async def search(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    form = await _form(request)
    return await run_in_threadpool(_search, request, principal, form)


def _search(request: Request, principal: Principal, form: dict):
    session = request.state.db
    actor = service.Actor.of(principal, request)
    try:
        criteria = service.check_criteria(session, principal.org_id, form)
        if service.sensitivity(criteria):
            row = service.create_request(session, principal.org_id, "search", criteria, actor, purpose="audit",
                                         reason=form.get("reason"), limit=100)
            session.commit()
            return _page(request, principal, form=form, notice=f"This search needs a second approver because "
                         f"{row.sensitive_why}. Request {row.id} waits for a compliance officer.", status_code=202)
        rows, more = service.search(session, principal.org_id, criteria, 100, actor)
    except CarePostError as exc:
        session.rollback()
        return _page(request, principal, errors={exc.field or "words": exc.message}, form=form, status_code=422)
    session.commit()
    return _page(request, principal, form=form, results=rows, more=more)


@router.post("/exports")
async def export(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    form = await _form(request)
    return await run_in_threadpool(_export, request, principal, form)


def _export(request: Request, principal: Principal, form: dict):
    session = request.state.db
    errors = {}
    purpose = form.get("purpose_of_export") or ""
    if purpose not in ("legal_discovery", "patient_request", "audit", "other"):
        errors["purpose_of_export"] = "Choose what the production is for."
    if len(form.get("reason") or "") < 3:
        errors["reason"] = "Give the matter or request the production answers (3 characters or more)."
    if errors:
        return _page(request, principal, errors=errors, form=form, status_code=422)
    try:
        criteria = service.check_criteria(session, principal.org_id, form)
        row = service.create_request(session, principal.org_id, "export", criteria,
                                     service.Actor.of(principal, request), purpose=purpose, reason=form["reason"],
                                     limit=10000)
    except CarePostError as exc:
        session.rollback()
        return _page(request, principal, errors={exc.field or "reason": exc.message}, form=form, status_code=422)
    session.commit()
    return RedirectResponse(f"/app/archive#request-{row.id}", status_code=303)


def _decide(request: Request, principal: Principal, request_id: str, approve: bool):
    session = request.state.db
    try:
        service.decide(session, principal.org_id, request_id, service.Actor.of(principal, request), approve=approve)
    except CarePostError as exc:
        session.rollback()
        return _page(request, principal, errors={"approver": exc.message}, status_code=exc.status_code)
    session.commit()
    return RedirectResponse(f"/app/archive#request-{request_id}", status_code=303)


@router.post("/requests/{request_id}/approve")
async def approve(request: Request, request_id: str,
                  principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    return await run_in_threadpool(_decide, request, principal, request_id, True)


@router.post("/requests/{request_id}/reject")
async def reject(request: Request, request_id: str,
                 principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    return await run_in_threadpool(_decide, request, principal, request_id, False)


@router.get("/requests/{request_id}/results")
def results(request: Request, request_id: str,
            principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    rows, more = service.request_results(session, principal.org_id, request_id, service.Actor.of(principal, request))
    session.commit()
    return _page(request, principal, results=rows, more=more, notice=f"Results of approved search {request_id}.")


@router.get("/requests/{request_id}/download")
def download(request: Request, request_id: str,
             principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    name, data = service.download(session, principal.org_id, request_id, service.Actor.of(principal, request))
    session.commit()
    return Response(data, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/messages/{message_id}.eml")
def message_eml(request: Request, message_id: str,
                principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    data = service.message_eml(session, principal.org_id, message_id, service.Actor.of(principal, request))
    session.commit()
    return Response(data, media_type="message/rfc822",
                    headers={"Content-Disposition": f'attachment; filename="message-{message_id}.eml"'})
