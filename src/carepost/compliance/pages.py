"""The compliance center in the web UI (``/app/compliance``).

* the overview: start a de-identified export of a saved segment (the button), the exports with
  their status and download; track a new accounting-of-disclosures request; the requests, soonest
  due first, overdue ones flagged;
* a request: its dates and status, the one extension (with the reason), fulfilment, disclosures
  recorded by hand for the patient, and the accounting itself (with ``phi:read_unmasked``) —
  inline, as a printable page (print to PDF from the browser) and as plain text.

Forms post back here; errors are shown next to the field they concern (422).
"""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit import disclosures
from carepost.compliance import accounting, service
from carepost.compliance.api import actor_fields, start_export
from carepost.compliance.api import evidence_pack as api_evidence_pack
from carepost.core import clock
from carepost.core.errors import CarePostError
from carepost.segments import service as segments
from carepost.segments.service import Actor
from carepost.web.rendering import render, templates

router = APIRouter(prefix="/app/compliance", include_in_schema=False)


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v.strip() for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}


def _date(raw: dict, name: str, errors: dict, *, required: bool = False) -> date | None:
    value = raw.get(name) or ""
    if not value:
        if required:
            errors[name] = "Required."
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        errors[name] = "Use a date (YYYY-MM-DD)."
        return None


def _overview(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
              status_code: int = 200):
    session = request.state.db
    actor = Actor.of(principal, request)
    segs = [{"id": s.id, "name": s.name} for s in segments.list_segments(session, principal.org_id, actor)]
    exports = [service.export_dict(j) for j in service.list_exports(session, principal.org_id)]
    names = {s["id"]: s["name"] for s in segs}
    requests_ = [accounting.request_dict(session, r) for r in accounting.list_requests(session, principal.org_id)]
    return render(request, "compliance/index.html", {
        "segments": segs, "segment_names": names, "exports": exports, "requests": requests_,
        "overdue_count": sum(1 for r in requests_ if r["overdue"]), "errors": errors or {}, "form": form or {},
        "today": clock.now().date().isoformat(),
    }, status_code=status_code)


@router.get("")
def overview(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    return _overview(request, principal)


@router.post("/deidentified-exports")
async def start_deidentified_export(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_start_export, request, principal, form)


def _start_export(request: Request, principal: Principal, form: dict):
    session = request.state.db
    try:
        job = service.create_export(session, principal.org_id, form.get("segment_id", ""), form.get("format", "jsonl"),
                                    Actor.of(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _overview(request, principal, errors={exc.field or "segment_id": exc.message}, form=form, status_code=422)
    session.commit()
    start_export(job.id, principal.org_id)
    return RedirectResponse("/app/compliance#exports", status_code=303)


@router.get("/deidentified-exports/{export_id}/download")
def download_export(request: Request, export_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    session = request.state.db
    name, media_type, data = service.download(session, principal.org_id, export_id, Actor.of(principal, request))
    session.commit()
    return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/accounting-requests")
async def create_request(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_create_request, request, principal, form)


def _create_request(request: Request, principal: Principal, form: dict):
    session = request.state.db
    errors: dict[str, str] = {}
    received = _date(form, "received_on", errors, required=True)
    start = _date(form, "period_start", errors)
    end = _date(form, "period_end", errors)
    if not form.get("contact_id"):
        errors["contact_id"] = "Required."
    if not errors:
        try:
            req = accounting.create_request(session, principal.org_id, contact_id=form["contact_id"], received_on=received,
                                            period_start=start, period_end=end, actor=actor_fields(principal, request))
            session.commit()
            return RedirectResponse(f"/app/compliance/accounting-requests/{req.id}", status_code=303)
        except CarePostError as exc:
            session.rollback()
            errors[exc.field or "contact_id"] = exc.message
    return _overview(request, principal, errors=errors, form=form, status_code=422)


def _detail(request: Request, principal: Principal, request_id: str, *, errors: dict | None = None,
            form: dict | None = None, status_code: int = 200):
    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    acc = None
    if principal.can(P.PHI_READ_UNMASKED):
        acc, _text = accounting.produce(session, principal.org_id, req, actor_fields(principal, request))
        acc["patient"] = accounting.patient_label(session, principal.org_id, req.contact_id)
        acc["organization"] = accounting.organization_name(session, principal.org_id)
        session.commit()
    return render(request, "compliance/request.html", {
        "req": accounting.request_dict(session, req), "acc": acc, "errors": errors or {}, "form": form or {},
        "can_read_phi": principal.can(P.PHI_READ_UNMASKED), "methods": accounting.DELIVERY_METHODS,
        "today": clock.now().date().isoformat(),
    }, status_code=status_code)


@router.get("/accounting-requests/{request_id}")
def request_detail(request: Request, request_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    return _detail(request, principal, request_id)


@router.post("/accounting-requests/{request_id}/extension")
async def extend_request(request: Request, request_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_extend, request, principal, request_id, form)


def _extend(request: Request, principal: Principal, request_id: str, form: dict):
    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    try:
        accounting.extend(session, principal.org_id, req, form.get("reason"), actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _detail(request, principal, request_id, errors={exc.field or "reason": exc.message}, form=form,
                       status_code=422 if exc.status_code == 422 else exc.status_code)
    session.commit()
    return RedirectResponse(f"/app/compliance/accounting-requests/{request_id}", status_code=303)


@router.post("/accounting-requests/{request_id}/fulfil")
async def fulfil_request(request: Request, request_id: str,
                         principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    form = await _form(request)
    return await run_in_threadpool(_fulfil, request, principal, request_id, form)


def _fulfil(request: Request, principal: Principal, request_id: str, form: dict):
    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    errors: dict[str, str] = {}
    when = _date(form, "fulfilled_on", errors)
    if not errors:
        try:
            accounting.fulfil(session, principal.org_id, req, fulfilled_on=when,
                              delivery_method=form.get("delivery_method") or None, actor=actor_fields(principal, request))
            session.commit()
            return RedirectResponse(f"/app/compliance/accounting-requests/{request_id}", status_code=303)
        except CarePostError as exc:
            session.rollback()
            errors[exc.field or "fulfilled_on"] = exc.message
    return _detail(request, principal, request_id, errors=errors, form=form, status_code=422)


@router.post("/accounting-requests/{request_id}/disclosures")
async def add_disclosure(request: Request, request_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_add_disclosure, request, principal, request_id, form)


def _add_disclosure(request: Request, principal: Principal, request_id: str, form: dict):
    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    errors: dict[str, str] = {}
    when = _date(form, "disclosed_at", errors, required=True)
    if not errors:
        try:
            disclosures.record_disclosure(
                session, principal.org_id, contact_id=req.contact_id, disclosed_at=when,
                recipient_name=form.get("recipient_name", ""), recipient_address=form.get("recipient_address"),
                description=form.get("description", ""), purpose=form.get("purpose", ""), source="manual",
                recorded_by=principal.actor_id, actor_type=principal.kind,
                context={k: v for k, v in actor_fields(principal, request).items() if k not in ("actor_type", "actor_id")})
            session.commit()
            return RedirectResponse(f"/app/compliance/accounting-requests/{request_id}#disclosures", status_code=303)
        except CarePostError as exc:
            session.rollback()
            errors[exc.field or "description"] = exc.message
    return _detail(request, principal, request_id, errors=errors, form=form, status_code=422)


def accounting_html(request: Request, session, req, acc: dict) -> str:
    """The accounting as a standalone printable page (the API's ``format=html`` and the UI's
    printable version)."""
    acc = {**acc, "patient": accounting.patient_label(session, req.org_id, req.contact_id),
           "organization": accounting.organization_name(session, req.org_id)}
    return templates.get_template("compliance/accounting_document.html").render({"acc": acc, "req": req})


@router.get("/accounting-requests/{request_id}/document")
def printable(request: Request, request_id: str,
              principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    from fastapi.responses import HTMLResponse

    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    acc, _text = accounting.produce(session, principal.org_id, req, actor_fields(principal, request))
    session.commit()
    return HTMLResponse(accounting_html(request, session, req, acc))


@router.get("/accounting-requests/{request_id}/accounting.txt")
def plain_text(request: Request, request_id: str,
               principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    _acc, text = accounting.produce(session, principal.org_id, req, actor_fields(principal, request))
    session.commit()
    return PlainTextResponse(text, headers={"Content-Disposition": f'attachment; filename="accounting-{req.id}.txt"'})


@router.post("/evidence-pack")
def evidence_pack(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    """The "Build evidence pack" button: the signed ZIP, downloaded (issue 16 item 11), built as
    the API builds it."""
    return api_evidence_pack(request, principal)
