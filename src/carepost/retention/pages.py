"""Retention in the compliance area of the web UI (``/app/compliance/retention``), needing
``compliance:manage``: schedules per record class (set min and max; a HIPAA class below six
years is refused next to the field), legal holds (place; approve, ask for release and approve
the release — approvals by a second person with the compliance officer role), purges (dry run,
start, runs with their signed certificates). Held contacts are marked on the contact page
(:func:`contact_hold_rows`, a contact-page section wired by the composition root), held messages
on the message page (:func:`message_hold_rows`, filling delivery's ``delivery.legal_holds_of`` port)."""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.core.errors import CarePostError
from carepost.retention import purge, service
from carepost.retention.api import start_purge
from carepost.web.rendering import render

router = APIRouter(prefix="/app/compliance/retention", include_in_schema=False)
NEED = require(P.COMPLIANCE_MANAGE)


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v.strip() for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}


def _page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
          plan: dict | None = None, notice: str | None = None, status_code: int = 200):
    session = request.state.db
    org_id = principal.org_id
    return render(request, "retention/index.html", {
        "schedules": service.list_schedules(session, org_id),
        "holds": [service.hold_dict(h) for h in service.list_holds(session, org_id)],
        "runs": purge.list_runs(session, org_id, limit=20),
        "scopes": service.HOLD_SCOPES, "plan": plan, "notice": notice,
        "me": principal.user_id or principal.actor_id, "errors": errors or {}, "form": form or {},
    }, status_code=status_code)


@router.get("")
def index(request: Request, principal: Principal = Depends(NEED)):
    return _page(request, principal)


def _int(raw: dict, name: str, errors: dict) -> int | None:
    try:
        return int(raw.get(name, ""))
    except ValueError:
        errors[name] = "A whole number of days."
        return None


@router.post("/schedules")
async def set_schedule(request: Request, principal: Principal = Depends(NEED)):
    raw = await _form(request)
    errors: dict = {}
    lo, hi = _int(raw, "min_days", errors), _int(raw, "max_days", errors)
    months = raw.get("inactive_months") or None
    if not errors:
        try:
            service.set_schedule(request.state.db, principal.org_id, raw.get("record_class", ""), min_days=lo,
                                 max_days=hi, inactive_months=int(months) if months and months.isdigit() else None,
                                 actor=service.Actor.of(principal, request))
            request.state.db.commit()
            return RedirectResponse("/app/compliance/retention#schedules", status_code=303)
        except CarePostError as exc:
            request.state.db.rollback()
            errors[exc.field or "record_class"] = str(exc)
    return _page(request, principal, errors=errors, form=raw, status_code=422)


@router.post("/holds")
async def place_hold(request: Request, principal: Principal = Depends(NEED)):
    raw = await _form(request)
    errors: dict = {}
    dates = {}
    for name in ("starts_on", "ends_on"):
        try:
            dates[name] = date.fromisoformat(raw[name]) if raw.get(name) else None
        except ValueError:
            errors[name] = "Use a date (YYYY-MM-DD)."
    if not errors:
        try:
            service.place_hold(request.state.db, principal.org_id, scope=raw.get("scope", ""), matter=raw.get("matter", ""),
                               reason=raw.get("reason", ""), actor=service.Actor.of(principal, request),
                               contact_id=raw.get("contact_id") or None, campaign_id=raw.get("campaign_id") or None,
                               message_id=raw.get("message_id") or None, **dates)
            request.state.db.commit()
            return RedirectResponse("/app/compliance/retention#holds", status_code=303)
        except CarePostError as exc:
            request.state.db.rollback()
            errors[exc.field or "scope"] = str(exc)
    return _page(request, principal, errors=errors, form=raw, status_code=422)


async def _hold_action(request: Request, principal: Principal, hold_id: str, action: str):
    raw = await _form(request)
    session = request.state.db
    actor = service.Actor.of(principal, request)
    try:
        if action == "approve":
            service.approve_hold(session, principal.org_id, hold_id, actor)
        elif action == "release":
            service.request_release(session, principal.org_id, hold_id, raw.get("reason", ""), actor)
        else:
            service.approve_release(session, principal.org_id, hold_id, actor)
    except CarePostError as exc:
        session.commit()  # the audit event of a refused approval stays
        return _page(request, principal, errors={f"hold-{hold_id}": str(exc)}, status_code=exc.status_code)
    session.commit()
    return RedirectResponse("/app/compliance/retention#holds", status_code=303)


@router.post("/holds/{hold_id}/approve")
async def approve_hold(request: Request, hold_id: str, principal: Principal = Depends(NEED)):
    return await _hold_action(request, principal, hold_id, "approve")


@router.post("/holds/{hold_id}/release")
async def request_release(request: Request, hold_id: str, principal: Principal = Depends(NEED)):
    return await _hold_action(request, principal, hold_id, "release")


@router.post("/holds/{hold_id}/release/approve")
async def approve_release(request: Request, hold_id: str, principal: Principal = Depends(NEED)):
    return await _hold_action(request, principal, hold_id, "release-approve")


@router.post("/purges")
async def start(request: Request, principal: Principal = Depends(NEED)):
    raw = await _form(request)
    session = request.state.db
    actor = service.Actor.of(principal, request)
    if raw.get("dry_run") == "1":
        plan = purge.plan(session, principal.org_id)
        service._audit(session, principal.org_id, actor, "retention.purge_dry_run", "organization", principal.org_id,
                       {"classes": {c["record_class"]: c["count"] for c in plan["classes"]}})
        session.commit()
        return _page(request, principal, plan=plan)
    if purge.running_run(principal.org_id) is not None:
        return _page(request, principal, errors={"purge": "A purge of this organization is already running; only one "
                                                          "runs at a time."}, status_code=409)
    start_purge(principal.org_id, actor.id)
    return _page(request, principal, notice="Purge queued: the worker runs it; refresh to follow its progress.",
                 status_code=202)


@router.get("/purges/{run_id}/certificate")
def certificate(request: Request, run_id: str, principal: Principal = Depends(NEED)):
    bundle = purge.certificate_bundle(request.state.db, principal.org_id, run_id)
    return JSONResponse(bundle, headers={"Content-Disposition": f'attachment; filename="destruction-{run_id}.json"'})


def contact_hold_rows(session, org_id: str, contact_id: str) -> list[dict]:
    """The contact page's "Legal holds" section: every hold protecting this patient's records."""
    holds = service.holds_for_contact(session, org_id, contact_id)
    if not holds:
        return [{"summary": "No legal hold."}]
    return [{"summary": f"HELD — legal hold \"{h.matter}\" ({h.scope}, {h.status}), placed "
                        f"{h.placed_at:%Y-%m-%d}: this patient's records are not purged."} for h in holds]


def message_hold_rows(session, org_id: str, message_id: str) -> list[dict]:
    """The message page's "Legal holds" mark: every hold protecting this message (by message, its
    campaign, a recipient's patient, its date or the whole organization)."""
    holds = service.holds_for_message(session, org_id, message_id)
    if not holds:
        return [{"held": False, "summary": "No legal hold."}]
    return [{"held": True, "summary": f"Legal hold \"{h.matter}\" ({h.scope}, {h.status}), placed "
                                      f"{h.placed_at:%Y-%m-%d}: this message is not purged."} for h in holds]
