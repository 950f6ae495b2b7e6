"""The compliance program in the web UI (``/app/compliance/...``), issue 16 items 5, 6, 9, 10:

* ``/acknowledge`` (any signed-in person): the current policies and training to read and
  acknowledge — where the training gate sends a person who may not open PHI yet;
* ``/policies``: publish a policy or training module (a new version), the acknowledgement period
  and reminders, the per-person report;
* ``/business-associates``: the register, the PHI flows without a BAA, the responsibility matrix;
* ``/breaches``: the incident register, an incident with its affected patients, the guided
  four-factor risk assessment, the 60-day clock, the thresholds and the notice drafts;
* ``/reports``: the compliance reports, with CSV and PDF downloads.

Forms post back here; errors are shown next to the field they concern (422).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from carepost.accounts.access import Principal, authenticated, require
from carepost.accounts.permissions import Permission as P
from carepost.compliance import associates, breach, training
from carepost.compliance.api import actor_fields
from carepost.compliance.pages import _form
from carepost.core.errors import CarePostError
from carepost.web.rendering import render

router = APIRouter(prefix="/app/compliance", include_in_schema=False)


def _safe_next(value: str | None) -> str:
    value = value or ""
    if value.startswith("/app/") and not value.startswith("//") and "\\" not in value and "\n" not in value:
        return value
    return "/app"


# --------------------------------------------------------------------------- acknowledgement


def _ack_page(request: Request, principal: Principal, *, errors: dict | None = None, status_code: int = 200,
              next_: str | None = None):
    session = request.state.db
    person = training._person_of(session, principal)
    docs = training.current_documents(session, principal.org_id)
    st = training.status(session, principal.org_id, person, docs=docs) if person else {"documents": [], "current": False}
    bodies = {d.id: d.body for d in docs}
    return render(request, "compliance/acknowledge.html", {
        "docs": [{**d, "body": bodies.get(d["id"], "")} for d in st["documents"]], "current": st.get("current"),
        "gated": bool(docs), "next": _safe_next(next_ or request.query_params.get("next")),
        "blocked": bool(docs) and not st.get("current") and principal.can(P.PHI_READ_UNMASKED), "errors": errors or {},
        "period_days": training.settings_of(session, principal.org_id)["period_days"],
    }, status_code=status_code)


@router.get("/acknowledge")
def acknowledge_page(request: Request, principal: Principal = Depends(authenticated())):
    return _ack_page(request, principal)


@router.post("/acknowledge")
async def acknowledge_post(request: Request, principal: Principal = Depends(authenticated())):
    form = await request.form()
    ids = [v for v in form.getlist("document_id") if isinstance(v, str)]
    confirmed = form.get("confirm") == "yes"
    return await run_in_threadpool(_acknowledge, request, principal, ids, confirmed, str(form.get("next") or ""))


def _acknowledge(request: Request, principal: Principal, ids: list[str], confirmed: bool, next_: str):
    session = request.state.db
    if not confirmed:
        return _ack_page(request, principal, errors={"confirm": "Tick the box to confirm you have read them."},
                         status_code=422, next_=next_)
    try:
        person = training._person_of(session, principal)
        training.acknowledge(session, principal.org_id, person, ids or None, actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _ack_page(request, principal, errors={exc.field or "confirm": exc.message}, status_code=422,
                         next_=next_)
    session.commit()
    return RedirectResponse(_safe_next(next_) if next_ else "/app/compliance/acknowledge", status_code=303)


# --------------------------------------------------------------------------- policies


def _policies_page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
                   status_code: int = 200):
    session = request.state.db
    return render(request, "compliance/policies.html", {
        "report": training.report(session, principal.org_id), "errors": errors or {}, "form": form or {},
    }, status_code=status_code)


@router.get("/policies")
def policies(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    return _policies_page(request, principal)


@router.post("/policies")
async def publish_policy(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_publish, request, principal, form)


def _publish(request: Request, principal: Principal, form: dict):
    session = request.state.db
    try:
        training.publish(session, principal.org_id, key=form.get("key"), kind=form.get("kind"), title=form.get("title"),
                         body=form.get("body"), actor=actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _policies_page(request, principal, errors={exc.field or "key": exc.message}, form=form, status_code=422)
    session.commit()
    return RedirectResponse("/app/compliance/policies", status_code=303)


@router.post("/policies/settings")
async def policy_settings(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_policy_settings, request, principal, form)


def _policy_settings(request: Request, principal: Principal, form: dict):
    session = request.state.db
    try:
        training.update_settings(session, principal.org_id, form.get("period_days") or None,
                                 form.get("reminder_days") or None, actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _policies_page(request, principal, errors={exc.field or "period_days": exc.message}, form=form,
                              status_code=422)
    session.commit()
    return RedirectResponse("/app/compliance/policies", status_code=303)


# --------------------------------------------------------------------------- business associates


def _associates_page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
                     status_code: int = 200):
    session = request.state.db
    return render(request, "compliance/associates.html", {
        "matrix": associates.responsibility_matrix(session, principal.org_id), "kinds": associates.KINDS,
        "errors": errors or {}, "form": form or {},
    }, status_code=status_code)


@router.get("/business-associates")
def associates_page(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    return _associates_page(request, principal)


@router.post("/business-associates")
async def add_associate(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_add_associate, request, principal, form)


def _add_associate(request: Request, principal: Principal, form: dict):
    session = request.state.db
    try:
        associates.create(session, principal.org_id, form, actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _associates_page(request, principal, errors={exc.field or "name": exc.message}, form=form,
                                status_code=422)
    session.commit()
    return RedirectResponse("/app/compliance/business-associates", status_code=303)


# --------------------------------------------------------------------------- breach incidents


def _breaches_page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
                   status_code: int = 200):
    from carepost.core import clock

    session = request.state.db
    return render(request, "compliance/breaches.html", {
        "incidents": [breach.incident_dict(session, i, with_assessment=False)
                      for i in breach.list_incidents(session, principal.org_id)],
        "kinds": breach.KINDS, "errors": errors or {}, "form": form or {}, "today": clock.now().date().isoformat(),
    }, status_code=status_code)


@router.get("/breaches")
def breaches(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    return _breaches_page(request, principal)


@router.post("/breaches")
async def open_breach(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_open_breach, request, principal, form)


def _open_breach(request: Request, principal: Principal, form: dict):
    session = request.state.db
    try:
        inc = breach.open_incident(session, principal.org_id, form, actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _breaches_page(request, principal, errors={exc.field or "title": exc.message}, form=form,
                              status_code=422)
    session.commit()
    return RedirectResponse(f"/app/compliance/breaches/{inc.id}", status_code=303)


def _incident_page(request: Request, principal: Principal, incident_id: str, *, errors: dict | None = None,
                   form: dict | None = None, notices: list | None = None, status_code: int = 200):
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    data = breach.incident_dict(session, inc)
    step = inc.assessment_step
    editing = (form or {}).get("factor") or request.query_params.get("factor")
    current = editing if editing in breach.FACTOR_KEYS[:step + 1] else (breach.FACTOR_KEYS[step] if step < 4 else None)
    return render(request, "compliance/breach.html", {
        "inc": data, "factors": breach.FACTORS, "current": current, "errors": errors or {}, "form": form or {},
        "notices": notices, "can_read_phi": principal.can(P.PHI_READ_UNMASKED),
        "description": breach._dec(session, inc, "description", inc.description_enc),
    }, status_code=status_code)


@router.get("/breaches/{incident_id}")
def incident(request: Request, incident_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    return _incident_page(request, principal, incident_id)


@router.post("/breaches/{incident_id}/assessment")
async def assess(request: Request, incident_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_assess, request, principal, incident_id, form)


def _assess(request: Request, principal: Principal, incident_id: str, form: dict):
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    try:
        breach.answer_factor(session, principal.org_id, inc, form.get("factor"), form.get("rating"), form.get("notes"),
                             actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _incident_page(request, principal, incident_id, errors={exc.field or "rating": exc.message}, form=form,
                              status_code=422)
    session.commit()
    return RedirectResponse(f"/app/compliance/breaches/{incident_id}#assessment", status_code=303)


@router.post("/breaches/{incident_id}/notifications")
async def notifications(request: Request, incident_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    form = await _form(request)
    return await run_in_threadpool(_notifications, request, principal, incident_id, form)


def _notifications(request: Request, principal: Principal, incident_id: str, form: dict):
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    try:
        breach.record_notifications(session, principal.org_id, inc, {k: v for k, v in form.items() if v},
                                    actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _incident_page(request, principal, incident_id, errors={exc.field or "individuals_notified_on": exc.message},
                              form=form, status_code=422)
    session.commit()
    return RedirectResponse(f"/app/compliance/breaches/{incident_id}#notifications", status_code=303)


@router.post("/breaches/{incident_id}/notices")
def notices(request: Request, incident_id: str,
            principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    try:
        drafted = breach.draft_notices(session, principal.org_id, inc, actor_fields(principal, request))
    except CarePostError as exc:
        session.rollback()
        return _incident_page(request, principal, incident_id, errors={"notices": exc.message}, status_code=409)
    session.commit()
    return _incident_page(request, principal, incident_id, notices=drafted)


# --------------------------------------------------------------------------- reports


@router.get("/reports")
def reports_page(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    from carepost.compliance import reports

    session = request.state.db
    start, end = request.query_params.get("start"), request.query_params.get("end")
    try:
        report = reports.build(session, principal.org_id, start, end)
    except CarePostError as exc:
        session.rollback()
        return render(request, "compliance/reports.html", {"report": None, "errors": {exc.field or "start": exc.message},
                                                           "form": {"start": start, "end": end}}, status_code=422)
    return render(request, "compliance/reports.html", {"report": report, "rows": reports.rows(report), "errors": {},
                                                       "form": {"start": report["period_start"], "end": report["period_end"]}})


@router.get("/reports/download")
def reports_download(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    from carepost.compliance.program_api import report_response

    fmt = request.query_params.get("format")
    if fmt not in ("csv", "pdf"):
        from carepost.core.errors import ValidationFailed

        raise ValidationFailed("Choose csv or pdf.", field="format")
    return report_response(request, principal, request.query_params.get("start"), request.query_params.get("end"), fmt)
