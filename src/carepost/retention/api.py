"""REST routes of retention (``/api/v1/retention``), all needing ``compliance:manage``.

* schedules per record class (``GET``, ``PUT /schedules/{record_class}``): a HIPAA documentation
  class below six years is 422 naming ``min_days`` or ``max_days``;
* legal holds: place, approve (a second person with the compliance officer role — an API key is
  not a person, so approvals are 403 through a key), ask for release, approve the release; a
  message's or a contact's holds (``held`` is the API field marking a held record);
* purges: a dry run (``{"dry_run": true}``, the default) answers what would go; a real purge is
  queued for the worker (202) or refused with 409 while one runs; runs and their signed
  destruction certificates (download; verify offline with the organization's public key).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.core.errors import Conflict, ValidationFailed
from carepost.retention import purge, service
from carepost.retention.schemas import HoldIn, PurgeIn, ReleaseIn, ScheduleIn

router = APIRouter(prefix="/api/v1/retention", tags=["retention"])
NEED = require(P.COMPLIANCE_MANAGE)


def start_purge(org_id: str, actor_id: str) -> None:
    from carepost.retention.tasks import purge_organization

    purge_organization(org_id, actor_id)


@router.get("/schedules", summary="Retention schedules of every record class (unconfigured ones are never purged)")
def list_schedules(request: Request, principal: Principal = Depends(NEED)) -> dict:
    return {"data": service.list_schedules(request.state.db, principal.org_id)}


@router.put("/schedules/{record_class}", summary="Set a record class's minimum and maximum retention (audited)")
def put_schedule(request: Request, record_class: str, body: ScheduleIn, principal: Principal = Depends(NEED)) -> dict:
    session = request.state.db
    row = service.set_schedule(session, principal.org_id, record_class, min_days=body.min_days, max_days=body.max_days,
                               inactive_months=body.inactive_months, enabled=body.enabled,
                               actor=service.Actor.of(principal, request))
    session.commit()
    return service.schedule_dict(row, record_class)


@router.get("/holds", summary="Legal holds, newest first")
def list_holds(request: Request, principal: Principal = Depends(NEED)) -> dict:
    return {"data": [service.hold_dict(h) for h in service.list_holds(request.state.db, principal.org_id)]}


@router.post("/holds", status_code=201, summary="Place a legal hold (protects at once; a second person approves it)")
def place_hold(request: Request, body: HoldIn, principal: Principal = Depends(NEED)) -> dict:
    session = request.state.db
    hold = service.place_hold(session, principal.org_id, actor=service.Actor.of(principal, request),
                              **body.model_dump())
    session.commit()
    return service.hold_dict(hold)


@router.get("/holds/{hold_id}", summary="One legal hold")
def read_hold(request: Request, hold_id: str, principal: Principal = Depends(NEED)) -> dict:
    return service.hold_dict(service.get_hold(request.state.db, principal.org_id, hold_id))


@router.post("/holds/{hold_id}/approve", summary="Approve a placed hold (a different person, compliance officer)")
def approve_hold(request: Request, hold_id: str, principal: Principal = Depends(NEED)) -> dict:
    session = request.state.db
    try:
        hold = service.approve_hold(session, principal.org_id, hold_id, service.Actor.of(principal, request))
    except Exception:
        session.commit()  # keep the audit event of the refusal
        raise
    session.commit()
    return service.hold_dict(hold)


@router.post("/holds/{hold_id}/release", summary="Ask for a hold's release (it protects until a second person approves)")
def request_release(request: Request, hold_id: str, body: ReleaseIn, principal: Principal = Depends(NEED)) -> dict:
    session = request.state.db
    hold = service.request_release(session, principal.org_id, hold_id, body.reason, service.Actor.of(principal, request))
    session.commit()
    return service.hold_dict(hold)


@router.post("/holds/{hold_id}/release/approve", summary="Approve a hold's release (a different person, compliance officer)")
def approve_release(request: Request, hold_id: str, principal: Principal = Depends(NEED)) -> dict:
    session = request.state.db
    try:
        hold = service.approve_release(session, principal.org_id, hold_id, service.Actor.of(principal, request))
    except Exception:
        session.commit()
        raise
    session.commit()
    return service.hold_dict(hold)


@router.get("/messages/{message_id}/holds", summary="Whether a message is held, and by which holds")
def message_holds(request: Request, message_id: str, principal: Principal = Depends(NEED)) -> dict:
    holds = service.holds_for_message(request.state.db, principal.org_id, message_id)
    return {"message_id": message_id, "held": bool(holds), "holds": [service.hold_dict(h) for h in holds]}


@router.get("/contacts/{contact_id}/holds", summary="Whether a contact is held, and by which holds")
def contact_holds(request: Request, contact_id: str, principal: Principal = Depends(NEED)) -> dict:
    holds = service.holds_for_contact(request.state.db, principal.org_id, contact_id)
    return {"contact_id": contact_id, "held": bool(holds), "holds": [service.hold_dict(h) for h in holds]}


@router.post("/purges", summary="Dry run (default): what a purge would delete now; or queue a real purge (202)")
def start(request: Request, body: PurgeIn, principal: Principal = Depends(NEED)):
    session = request.state.db
    actor = service.Actor.of(principal, request)
    if body.dry_run:
        result = purge.plan(session, principal.org_id)
        service._audit(session, principal.org_id, actor, "retention.purge_dry_run", "organization", principal.org_id,
                       {"classes": {c["record_class"]: c["count"] for c in result["classes"]}})
        session.commit()
        return result
    running = purge.running_run(principal.org_id)
    if running is not None:
        raise Conflict(f"A purge of this organization is already running (run {running['id']}); only one runs at a time.",
                       field="purge")
    if not any(s["configured"] and s["enabled"] for s in service.list_schedules(session, principal.org_id)):
        raise ValidationFailed("No retention schedule is set: nothing would be purged.", field="schedules")
    start_purge(principal.org_id, actor.id)
    return JSONResponse({"status": "queued"}, status_code=202)


@router.get("/purges", summary="Purge runs, newest first, with their progress and certificate")
def list_runs(request: Request, principal: Principal = Depends(NEED)) -> dict:
    return {"data": purge.list_runs(request.state.db, principal.org_id)}


@router.get("/purges/{run_id}/certificate", summary="The signed destruction certificate of a finished run (JSON)")
def certificate(request: Request, run_id: str, principal: Principal = Depends(NEED)):
    bundle = purge.certificate_bundle(request.state.db, principal.org_id, run_id)
    return JSONResponse(bundle, headers={"Content-Disposition": f'attachment; filename="destruction-{run_id}.json"'})


@router.get("/certificate-key", summary="The organization's Ed25519 public key that signs destruction certificates")
def certificate_key(request: Request, principal: Principal = Depends(NEED)) -> dict:
    session = request.state.db
    key = purge.public_key_b64(session, principal.org_id)
    session.commit()
    return {"algorithm": "Ed25519", "public_key": key}
