"""REST routes of campaigns (``/api/v1/campaigns``; docs/campaigns.md).

* ``campaigns:read``: list, read (with the workflow history), the calendar, the report (after
  launch with the A/B results), the A/B results (``/ab``), the approval rules. Reading one
  campaign is audited (its history holds free-text comments).
* ``campaigns:manage``: create, change (an edit of an approved field returns it to draft),
  delete a draft, submit for approval, set the schedule.
* ``campaigns:approve`` (compliance): approve or reject with a comment; never one's own.
* ``campaigns:send``: launch (refused with 409 until approved when approval is required),
  pause, resume, cancel.
* ``org:manage``: change the organization's approval rules.

The report before launch is the pre-launch compliance report: counts per eligibility reason,
the PHI categories the template reveals, the security mode and a sample render for one contact
(needs ``phi:read_masked``; masked unless the caller holds ``phi:read_unmasked``; audited). A
sensitive audience needs ``phi:read_unmasked``. After launch it is the progress of planning and
sending. Every route is scoped to the caller's organization: another's campaign is a 404.
"""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from carepost.accounts.access import Principal, request_context, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.campaigns import ab_tests, report, service
from carepost.campaigns.schemas import CampaignIn, CampaignPatch, CampaignSettingsIn, CommentIn, ScheduleIn
from carepost.core.errors import NotFound, PermissionDenied
from carepost.core.ids import ID_PATTERN

router = APIRouter(prefix="/api/v1", tags=["campaigns"])


def _audit(request: Request, principal: Principal, action: str, row, **details) -> None:
    record_for(request.state.db, principal, request, action, target_type="campaign", target_id=row.id,
               details={"status": row.status, **details})


def _out(request: Request, row) -> dict:
    return service.campaign_dict(request.state.db, row)


def _get(request: Request, principal: Principal, campaign_id: str):
    return service.get_campaign(request.state.db, principal.org_id, campaign_id)


# --------------------------------------------------------------------------- collection

@router.get("/campaigns", summary="The organization's campaigns, newest first")
def list_campaigns(request: Request, status: str | None = Query(None, max_length=12),
                   limit: int = Query(200, ge=1, le=1000),
                   principal: Principal = Depends(require(P.CAMPAIGNS_READ))) -> dict:
    session = request.state.db
    rows = service.list_campaigns(session, principal.org_id, status=status, limit=limit)
    return {"campaigns": [service.campaign_dict(session, r) for r in rows]}


@router.post("/campaigns", status_code=201, summary="Create a campaign (a draft); every field is checked")
def create_campaign(request: Request, body: CampaignIn,
                    principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))) -> JSONResponse:
    session = request.state.db
    row = service.create_campaign(session, principal.org_id, body, principal)
    _audit(request, principal, "campaign.created", row)
    session.commit()
    return JSONResponse(_out(request, row), status_code=201)


@router.get("/campaigns/calendar", summary="Campaigns sending in a date range, with warnings where two reach "
            "the same patients within the overlap window")
def calendar(request: Request, start: date = Query(...), end: date = Query(...),
             overlap_days: int | None = Query(None, ge=0, le=90),
             principal: Principal = Depends(require(P.CAMPAIGNS_READ))) -> dict:
    session = request.state.db
    out = service.calendar(session, principal.org_id, start, end, principal, overlap_days=overlap_days)
    session.commit()
    return out


@router.get("/campaigns/settings", summary="The organization's approval rules for campaigns")
def read_settings(request: Request, principal: Principal = Depends(require(P.CAMPAIGNS_READ))) -> dict:
    return service.campaign_settings(request.state.db, principal.org_id)


@router.put("/campaigns/settings", summary="Change the approval rules (marketing purposes and sensitive segments "
            "need approval by default)")
def change_settings(request: Request, body: CampaignSettingsIn,
                    principal: Principal = Depends(require(P.ORG_MANAGE))) -> dict:
    session = request.state.db
    out = service.set_campaign_settings(session, principal.org_id, body.model_dump(exclude_unset=True))
    record_for(session, principal, request, "campaign.settings_changed", target_type="organization",
               target_id=principal.org_id, details={k: v for k, v in out.items()})
    session.commit()
    return out


# --------------------------------------------------------------------------- one campaign

@router.get("/campaigns/{campaign_id}", summary="One campaign with its workflow history")
def read_campaign(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_READ))) -> dict:
    session = request.state.db
    row = _get(request, principal, campaign_id)
    out = _out(request, row)
    out["history"] = service.events_of(session, row)
    _audit(request, principal, "campaign.read", row)
    session.commit()
    return out


@router.patch("/campaigns/{campaign_id}", summary="Change a campaign; an approved field changed returns it to draft")
def update_campaign(request: Request, campaign_id: str, body: CampaignPatch,
                    principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))) -> dict:
    session = request.state.db
    row = _get(request, principal, campaign_id)
    service.update_campaign(session, row, body, principal)
    _audit(request, principal, "campaign.updated", row, fields=sorted(body.model_dump(exclude_unset=True)))
    session.commit()
    return _out(request, row)


@router.delete("/campaigns/{campaign_id}", status_code=204, summary="Delete a draft (others are cancelled instead)")
def delete_campaign(request: Request, campaign_id: str,
                    principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))) -> Response:
    session = request.state.db
    row = _get(request, principal, campaign_id)
    service.delete_campaign(session, row)
    record_for(session, principal, request, "campaign.deleted", target_type="campaign", target_id=campaign_id)
    session.commit()
    return Response(status_code=204)


def _comment(body: CommentIn | None) -> str:
    return body.comment if body is not None else ""


@router.post("/campaigns/{campaign_id}/submit", summary="Submit a draft (or a rejected campaign) for approval")
def submit(request: Request, campaign_id: str, body: CommentIn | None = None,
           principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))) -> dict:
    session = request.state.db
    row = service.submit(session, _get(request, principal, campaign_id), principal, _comment(body))
    _audit(request, principal, "campaign.submitted", row)
    session.commit()
    return _out(request, row)


def _review(request: Request, principal: Principal, campaign_id: str, fn, comment: str, action: str) -> dict:
    session = request.state.db
    row = _get(request, principal, campaign_id)
    try:
        fn(session, row, principal, comment)
    except PermissionDenied as exc:
        session.rollback()
        record_for(session, principal, request, f"campaign.{action}", target_type="campaign", target_id=row.id,
                   outcome="denied", details={"reason": exc.code})
        session.commit()
        raise
    _audit(request, principal, f"campaign.{action}", row)
    session.commit()
    return _out(request, row)


@router.post("/campaigns/{campaign_id}/approve", summary="Approve a submitted campaign (compliance; not one's own)")
def approve(request: Request, campaign_id: str, body: CommentIn | None = None,
            principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))) -> dict:
    return _review(request, principal, campaign_id, service.approve, _comment(body), "approved")


@router.post("/campaigns/{campaign_id}/reject", summary="Reject a submitted campaign with a comment (compliance)")
def reject(request: Request, campaign_id: str, body: CommentIn,
           principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))) -> dict:
    return _review(request, principal, campaign_id, service.reject, body.comment, "rejected")


@router.post("/campaigns/{campaign_id}/schedule", summary="Set the schedule (now, at a time, or at a local time "
             "in each recipient's time zone) and mark the campaign scheduled")
def schedule(request: Request, campaign_id: str, body: ScheduleIn,
             principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))) -> dict:
    session = request.state.db
    row = service.schedule(session, _get(request, principal, campaign_id), body, principal)
    _audit(request, principal, "campaign.scheduled", row, schedule_kind=row.schedule_kind)
    session.commit()
    return _out(request, row)


def _start(request: Request, principal: Principal, campaign_id: str, fn, action: str) -> dict:
    session = request.state.db
    row = fn(session, _get(request, principal, campaign_id), principal)
    _audit(request, principal, f"campaign.{action}", row)
    session.commit()
    if row.status in ("planning", "sending"):
        service.start_work(principal.org_id, row.id, row.status)
    return _out(request, row)


@router.post("/campaigns/{campaign_id}/launch", summary="Launch: planning starts (409 until approved when "
             "approval is required)")
def launch(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_SEND))) -> dict:
    return _start(request, principal, campaign_id, service.launch, "launched")


@router.post("/campaigns/{campaign_id}/pause", summary="Pause planning and sending")
def pause(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_SEND))) -> dict:
    session = request.state.db
    row = service.pause(session, _get(request, principal, campaign_id), principal)
    _audit(request, principal, "campaign.paused", row)
    session.commit()
    return _out(request, row)


@router.post("/campaigns/{campaign_id}/resume", summary="Resume a paused campaign where it stopped")
def resume(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_SEND))) -> dict:
    return _start(request, principal, campaign_id, service.resume, "resumed")


@router.post("/campaigns/{campaign_id}/cancel", summary="Cancel: nothing more is planned or sent")
def cancel(request: Request, campaign_id: str, body: CommentIn | None = None,
           principal: Principal = Depends(require(P.CAMPAIGNS_SEND))) -> dict:
    session = request.state.db
    row = service.cancel(session, _get(request, principal, campaign_id), principal, _comment(body))
    _audit(request, principal, "campaign.cancelled", row)
    session.commit()
    return _out(request, row)


@router.get("/campaigns/{campaign_id}/report", summary="Before launch the compliance report (exclusions by "
            "eligibility reason, PHI categories, security mode, a sample render); after launch the progress")
def campaign_report(request: Request, campaign_id: str,
                    sample_contact_id: str | None = Query(None, pattern=ID_PATTERN),
                    principal: Principal = Depends(require(P.CAMPAIGNS_READ))) -> dict:
    session = request.state.db
    row = _get(request, principal, campaign_id)
    if row.launched_at is None:
        try:
            out = {"kind": "compliance", **report.compliance_report(session, principal, row,
                                                                    sample_contact_id=sample_contact_id,
                                                                    context=request_context(request))}
        except PermissionDenied:
            session.rollback()
            record_for(session, principal, request, "campaign.report", target_type="campaign", target_id=row.id,
                       outcome="denied", details={"reason": "sensitive_category"})
            session.commit()
            raise
    else:
        ab = ab_tests.results(session, row)
        if ab is not None and not principal.can(P.PHI_READ_UNMASKED):
            ab = ab_tests.mask_small_cells(ab)  # counts of 1-10 people as "<11"
        out = {"kind": "progress", **service.progress(session, row), "ab_test": ab}
    session.commit()
    return out


@router.get("/campaigns/{campaign_id}/ab", summary="The A/B/n test's results: per variant recipients, delivered, "
            "human opens and clicks, conversions, rates with 95% intervals; chi-square and leader-vs-runner-up "
            "p-values; the winner; the holdout's lift (404 without a test; counts of 1-10 people shown as <11 "
            "without phi:read_unmasked)")
def campaign_ab(request: Request, campaign_id: str,
                principal: Principal = Depends(require(P.CAMPAIGNS_READ))) -> dict:
    session = request.state.db
    row = _get(request, principal, campaign_id)
    out = ab_tests.results(session, row)
    if out is None:
        raise NotFound("This campaign has no A/B test.", field="campaign_id")
    return out if principal.can(P.PHI_READ_UNMASKED) else ab_tests.mask_small_cells(out)
