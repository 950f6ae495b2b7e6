"""REST routes of journeys (``/api/v1/journeys``; docs/journeys.md).

* ``journeys:read``: list, read (with its versions), one version, validate a definition, the
  analytics (counts of 1..10 people shown as ``<11`` without ``phi:read_unmasked``).
* ``journeys:read`` + ``phi:read_masked``: the runs of a journey, and of one contact
  (``/journeys/runs?contact_id=``) — which patient is in which program; audited.
* ``journeys:manage``: create (version 1, a draft), rename, delete a journey never published,
  save a definition (the draft version, or a new one after a publish), publish (``migrate`` or
  ``drain`` when a version is live), pause, resume, archive.
* ``campaigns:approve`` (compliance, a signed-in person; no API scope): approve the draft version
  of a journey that needs it (marketing purpose, sensitive segment), or withdraw the approval —
  never the version's author.

A bad definition is a 422 whose ``field`` is the first JSON path at fault
(``definition.steps.s4.timeout``) and whose ``errors`` list every one. Every change is
audited; every route is scoped to the caller's organization: another's journey is a 404.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core.errors import PermissionDenied
from carepost.core.ids import ID_PATTERN
from carepost.journeys import analytics, service, validation
from carepost.journeys.schemas import (
    STEP_ID_PATTERN,
    CommentIn,
    DefinitionIn,
    JourneyIn,
    JourneyPatch,
    PublishIn,
    VersionIn,
)

router = APIRouter(prefix="/api/v1", tags=["journeys"])
STATES = "^(active|waiting|completed|exited|failed)$"


def _audit(request: Request, principal: Principal, action: str, row, **details) -> None:
    record_for(request.state.db, principal, request, action, target_type="journey", target_id=row.id,
               details={"status": row.status, **details})


def _get(request: Request, principal: Principal, journey_id: str):
    return service.get_journey(request.state.db, principal.org_id, journey_id)


def _out(request: Request, row) -> dict:
    return service.journey_dict(request.state.db, row)


# --------------------------------------------------------------------------- collection

@router.get("/journeys", summary="The organization's journeys, newest first")
def list_journeys(request: Request, status: str | None = Query(None, max_length=10),
                  limit: int = Query(200, ge=1, le=1000),
                  principal: Principal = Depends(require(P.JOURNEYS_READ))) -> dict:
    session = request.state.db
    rows = service.list_journeys(session, principal.org_id, status=status, limit=limit)
    return {"journeys": [service.journey_dict(session, r, with_definition=False) for r in rows]}


@router.post("/journeys", status_code=201, summary="Create a journey; its definition becomes version 1, a draft "
             "(422 naming every JSON path at fault)")
def create_journey(request: Request, body: JourneyIn,
                   principal: Principal = Depends(require(P.JOURNEYS_MANAGE))) -> JSONResponse:
    session = request.state.db
    row = service.create_journey(session, principal.org_id, body, principal)
    _audit(request, principal, "journey.created", row, version=1)
    session.commit()
    return JSONResponse(_out(request, row), status_code=201)


@router.post("/journeys/validate", summary="Check a definition without saving it: 200 with the approval it would "
             "need, or 422 listing every problem with its JSON path")
def validate(request: Request, body: DefinitionIn,
             principal: Principal = Depends(require(P.JOURNEYS_READ))) -> dict:
    session = request.state.db
    service.check_size(body.definition)
    validation.check_definition(session, principal.org_id, body.definition)
    return {"valid": True, "errors": [],
            "approval_reasons": service.approval_reasons(session, principal.org_id, body.definition)}


@router.get("/journeys/runs", summary="The runs of one contact in every journey (its timeline), with the steps "
            "each executed; audited")
def contact_runs(request: Request, contact_id: str = Query(..., pattern=ID_PATTERN),
                 state: str | None = Query(None, pattern=STATES), limit: int = Query(100, ge=1, le=1000),
                 principal: Principal = Depends(require(P.JOURNEYS_READ, P.PHI_READ_MASKED))) -> dict:
    from carepost.patients.service import get_contact

    session = request.state.db
    get_contact(session, contact_id)  # 404 outside the organization
    runs = service.list_runs(session, principal.org_id, contact_id=contact_id, state=state, limit=limit)
    steps = service.run_steps(session, principal.org_id, [r.id for r in runs])
    record_for(session, principal, request, "journey.runs_read", target_type="contact", target_id=contact_id,
               details={"returned": len(runs)})
    session.commit()
    return {"contact_id": contact_id, "runs": [service.run_dict(r, steps[r.id]) for r in runs]}


# --------------------------------------------------------------------------- one journey

@router.get("/journeys/{journey_id}", summary="One journey: its newest version's definition, the live version")
def read_journey(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_READ))) -> dict:
    row = _get(request, principal, journey_id)
    out = _out(request, row)
    out["versions"] = [service.version_dict(v, with_definition=False)
                       for v in service.list_versions(request.state.db, row)]
    return out


@router.patch("/journeys/{journey_id}", summary="Rename a journey or change its description")
def update_journey(request: Request, journey_id: str, body: JourneyPatch,
                   principal: Principal = Depends(require(P.JOURNEYS_MANAGE))) -> dict:
    session = request.state.db
    row = service.update_journey(session, _get(request, principal, journey_id), body)
    _audit(request, principal, "journey.updated", row, fields=sorted(body.model_dump(exclude_unset=True)))
    session.commit()
    return _out(request, row)


@router.delete("/journeys/{journey_id}", status_code=204, summary="Delete a journey never published (409 for "
               "others: archive them)")
def delete_journey(request: Request, journey_id: str,
                   principal: Principal = Depends(require(P.JOURNEYS_MANAGE))) -> Response:
    session = request.state.db
    row = _get(request, principal, journey_id)
    service.delete_journey(session, row)
    record_for(session, principal, request, "journey.deleted", target_type="journey", target_id=journey_id)
    session.commit()
    return Response(status_code=204)


@router.get("/journeys/{journey_id}/versions", summary="Every version of a journey, with its definition")
def list_versions(request: Request, journey_id: str,
                  principal: Principal = Depends(require(P.JOURNEYS_READ))) -> dict:
    row = _get(request, principal, journey_id)
    return {"versions": [service.version_dict(v) for v in service.list_versions(request.state.db, row)]}


@router.post("/journeys/{journey_id}/versions", status_code=201, summary="Save a definition: changes the draft "
             "version (voiding its approval) or starts a new one after a publish; published versions never change")
def save_version(request: Request, journey_id: str, body: VersionIn,
                 principal: Principal = Depends(require(P.JOURNEYS_MANAGE))) -> JSONResponse:
    session = request.state.db
    row = _get(request, principal, journey_id)
    ver = service.save_definition(session, row, body.definition, principal)
    _audit(request, principal, "journey.version_saved", row, version=ver.version)
    session.commit()
    return JSONResponse(service.version_dict(ver), status_code=201)


@router.get("/journeys/{journey_id}/versions/{version}", summary="One version of a journey")
def read_version(request: Request, journey_id: str, version: int = Path(ge=1, le=100_000),
                 principal: Principal = Depends(require(P.JOURNEYS_READ))) -> dict:
    row = _get(request, principal, journey_id)
    return service.version_dict(service.get_version(request.state.db, row, version))


def _review(request: Request, principal: Principal, journey_id: str, fn, action: str, version: int | None,
            comment: str) -> dict:
    session = request.state.db
    row = _get(request, principal, journey_id)
    try:
        ver = fn(session, row, principal, version)
    except PermissionDenied as exc:
        session.rollback()
        record_for(session, principal, request, f"journey.{action}", target_type="journey", target_id=row.id,
                   outcome="denied", details={"reason": exc.code})
        session.commit()
        raise
    _audit(request, principal, f"journey.{action}", row, version=ver.version, commented=bool(comment.strip()))
    session.commit()
    return _out(request, row)


@router.post("/journeys/{journey_id}/approve", summary="Approve the draft version (compliance; never its author)")
def approve(request: Request, journey_id: str, body: CommentIn | None = None,
            version: int | None = Query(None, ge=1, le=100_000),
            principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))) -> dict:
    return _review(request, principal, journey_id, service.approve, "approved", version,
                   body.comment if body else "")


@router.post("/journeys/{journey_id}/reject", summary="Withdraw the approval of the draft version (compliance)")
def reject(request: Request, journey_id: str, body: CommentIn | None = None,
           version: int | None = Query(None, ge=1, le=100_000),
           principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))) -> dict:
    return _review(request, principal, journey_id, service.revoke_approval, "rejected", version,
                   body.comment if body else "")


@router.post("/journeys/{journey_id}/publish", summary="Publish the draft version (409 until approved when it "
             "needs approval); with a live version, mode migrate or drain says what happens to its runs")
def publish(request: Request, journey_id: str, body: PublishIn | None = None,
            principal: Principal = Depends(require(P.JOURNEYS_MANAGE))) -> dict:
    session = request.state.db
    body = body or PublishIn()
    row = _get(request, principal, journey_id)
    ver, migrated = service.publish(session, row, principal, number=body.version, mode=body.mode)
    _audit(request, principal, "journey.published", row, version=ver.version, mode=ver.migration_mode,
           migrated=migrated)
    session.commit()
    out = _out(request, row)
    out["migrated_runs"] = migrated
    return out


def _transition(request: Request, principal: Principal, journey_id: str, fn, action: str) -> dict:
    session = request.state.db
    row = _get(request, principal, journey_id)
    result = fn(session, row)
    details = {"runs_ended": result} if isinstance(result, int) else {}
    _audit(request, principal, f"journey.{action}", row, **details)
    session.commit()
    return _out(request, row)


@router.post("/journeys/{journey_id}/pause", summary="Pause: no run enters or advances until resumed")
def pause(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))) -> dict:
    return _transition(request, principal, journey_id, service.pause, "paused")


@router.post("/journeys/{journey_id}/resume", summary="Resume a paused journey")
def resume(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))) -> dict:
    return _transition(request, principal, journey_id, service.resume, "resumed")


@router.post("/journeys/{journey_id}/archive", summary="Archive: open runs end (reason removed); nothing enters")
def archive(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))) -> dict:
    return _transition(request, principal, journey_id, service.archive, "archived")


@router.get("/journeys/{journey_id}/runs", summary="The runs of a journey, newest first (contact ids, states, "
            "steps); audited")
def journey_runs(request: Request, journey_id: str, state: str | None = Query(None, pattern=STATES),
                 step_id: str | None = Query(None, pattern=STEP_ID_PATTERN),
                 after: str | None = Query(None, pattern=ID_PATTERN), limit: int = Query(100, ge=1, le=1000),
                 principal: Principal = Depends(require(P.JOURNEYS_READ, P.PHI_READ_MASKED))) -> dict:
    session = request.state.db
    row = _get(request, principal, journey_id)
    runs = service.list_runs(session, principal.org_id, journey_id=row.id, state=state, step_id=step_id,
                             limit=limit, after=after)
    _audit(request, principal, "journey.runs_read", row, returned=len(runs))
    session.commit()
    return {"journey_id": row.id, "runs": [service.run_dict(r) for r in runs],
            "next_after": runs[-1].id if len(runs) == limit else None}


@router.get("/journeys/{journey_id}/analytics", summary="Entered, at each step now, exited by reason, reached the "
            "goal, drop-off per step, message metrics per send step, and the step diagram's edges")
def journey_analytics(request: Request, journey_id: str, version: int | None = Query(None, ge=1, le=100_000),
                      principal: Principal = Depends(require(P.JOURNEYS_READ))) -> dict:
    session = request.state.db
    row = _get(request, principal, journey_id)
    out = analytics.journey_analytics(session, row, version=version)
    return out if principal.can(P.PHI_READ_UNMASKED) else analytics.mask(out)
