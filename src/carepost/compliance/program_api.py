"""REST routes of the compliance program (``/api/v1/compliance``), issue 16 items 5, 6, 9 and 10:
breach incidents, compliance reports, business associates, policies and their acknowledgement.
(The de-identified exports and the accounting of disclosures are in ``api.py``.)

* ``compliance:manage``: the business associate register and the responsibility matrix; policies
  (publish, list, the per-person report); reports (JSON, CSV, PDF); breach incidents.
* ``compliance:manage`` + ``phi:read_unmasked``: a breach's affected patients and the drafted
  notices (names and addresses are PHI). Each read is audited.
* any signed-in person: their own acknowledgement status and acknowledging the current versions.

Bad input is 422 naming the field; an id of another organization is 404.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request, Response

from carepost.accounts.access import Principal, authenticated, require
from carepost.accounts.permissions import Permission as P
from carepost.compliance import associates, breach, reports, training
from carepost.compliance.api import actor_fields
from carepost.compliance.schemas import (
    AcknowledgeIn,
    BreachIn,
    BusinessAssociateIn,
    FactorIn,
    NotificationsIn,
    PolicyIn,
    TrainingSettingsIn,
)

router = APIRouter(prefix="/api/v1/compliance", tags=["compliance"])


# --------------------------------------------------------------------------- business associates


@router.get("/business-associates", summary="The business associate register (BAA date, scope, renewal, state)")
def list_business_associates(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    return {"data": [associates.as_dict(r) for r in associates.list_all(session, principal.org_id)],
            "phi_flows": associates.phi_flows(session, principal.org_id)}


@router.post("/business-associates", status_code=201, summary="Record a business associate and its BAA")
def create_business_associate(request: Request, body: BusinessAssociateIn,
                              principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    row = associates.create(session, principal.org_id, body.model_dump(), actor_fields(principal, request))
    session.commit()
    return associates.as_dict(row)


@router.patch("/business-associates/{associate_id}", summary="Change a business associate (renewal, termination)")
def update_business_associate(request: Request, associate_id: str, body: BusinessAssociateIn,
                              principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    row = associates.get(session, principal.org_id, associate_id)
    associates.update(session, principal.org_id, row, body.model_dump(exclude_unset=True), actor_fields(principal, request))
    session.commit()
    return associates.as_dict(row)


@router.get("/responsibilities", summary="Who is responsible for what: CarePost, the organization, each associate")
def responsibilities(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    return associates.responsibility_matrix(request.state.db, principal.org_id)


# --------------------------------------------------------------------------- policies and training


@router.get("/policies", summary="The current version of every published policy and training module")
def list_policies(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    return {"data": [training.document_dict(d) for d in training.current_documents(session, principal.org_id)],
            "settings": training.settings_of(session, principal.org_id)}


@router.post("/policies", status_code=201, summary="Publish a policy or training module (a new version of its key)")
def publish_policy(request: Request, body: PolicyIn, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    doc = training.publish(session, principal.org_id, key=body.key, kind=body.kind, title=body.title, body=body.body,
                           actor=actor_fields(principal, request))
    session.commit()
    return training.document_dict(doc, body=True)


@router.put("/policy-settings", summary="How long an acknowledgement counts and when reminders go out")
def policy_settings(request: Request, body: TrainingSettingsIn,
                    principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    out = training.update_settings(session, principal.org_id, body.period_days, body.reminder_days,
                                   actor_fields(principal, request))
    session.commit()
    return out


@router.get("/policies/report", summary="Per person: acknowledged versions, standing and when it ends")
def policy_report(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    return training.report(request.state.db, principal.org_id)


@router.get("/acknowledgements/me", summary="My standing: the current versions, acknowledged or not")
def my_acknowledgements(request: Request, principal: Principal = Depends(authenticated())) -> dict:
    session = request.state.db
    person = training._person_of(session, principal)
    docs = training.current_documents(session, principal.org_id)
    st = training.status(session, principal.org_id, person, docs=docs) if person else {"documents": [], "current": False}
    bodies = {d.id: d.body for d in docs}
    return {**st, "documents": [{**d, "body": bodies.get(d["id"])} for d in st["documents"]]}


@router.post("/acknowledgements", status_code=201, summary="Acknowledge the current versions (all, or those named)")
def acknowledge(request: Request, body: AcknowledgeIn, principal: Principal = Depends(authenticated())) -> dict:
    session = request.state.db
    person = training._person_of(session, principal)
    if person is None:
        from carepost.core.errors import ValidationFailed

        raise ValidationFailed("Only a person (or a key a person created) acknowledges policies.", field="document_ids")
    done = training.acknowledge(session, principal.org_id, person, body.document_ids, actor_fields(principal, request))
    session.commit()
    return {"acknowledged": done, **training.status(session, principal.org_id, person)}


# --------------------------------------------------------------------------- breach incidents


@router.get("/breaches", summary="The breach incident register, newest discovery first, with the 60-day clock")
def list_breaches(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    return {"data": [breach.incident_dict(session, i, with_assessment=False)
                     for i in breach.list_incidents(session, principal.org_id)]}


@router.post("/breaches", status_code=201,
             summary="Open an incident: the affected patients and PHI categories are computed from messages and audit")
def open_breach(request: Request, body: BreachIn, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    inc = breach.open_incident(session, principal.org_id, body.model_dump(), actor_fields(principal, request))
    session.commit()
    return breach.incident_dict(session, inc)


@router.get("/breaches/{incident_id}", summary="An incident: affected counts, categories, states, assessment, clock")
def read_breach(request: Request, incident_id: str, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    return breach.incident_dict(session, breach.get(session, principal.org_id, incident_id))


@router.post("/breaches/{incident_id}/recompute", summary="Compute the affected patients again (audited)")
def recompute_breach(request: Request, incident_id: str,
                     principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    breach.compute(session, principal.org_id, inc, actor_fields(principal, request))
    session.commit()
    return breach.incident_dict(session, inc)


@router.get("/breaches/{incident_id}/assessment-form", summary="The four factors of the guided risk assessment")
def assessment_form(request: Request, incident_id: str,
                    principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    return {"next_factor": breach.FACTOR_KEYS[inc.assessment_step] if inc.assessment_step < 4 else None,
            "factors": breach.FACTORS}


@router.post("/breaches/{incident_id}/assessment", summary="Answer one factor of the four-factor risk assessment")
def assess_breach(request: Request, incident_id: str, body: FactorIn,
                  principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    breach.answer_factor(session, principal.org_id, inc, body.factor, body.rating, body.notes,
                         actor_fields(principal, request))
    session.commit()
    return breach.incident_dict(session, inc)


@router.post("/breaches/{incident_id}/notifications", summary="Record the notifications made, or close the incident")
def breach_notifications(request: Request, incident_id: str, body: NotificationsIn,
                         principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    breach.record_notifications(session, principal.org_id, inc, body.model_dump(exclude_none=True),
                                actor_fields(principal, request))
    session.commit()
    return breach.incident_dict(session, inc)


@router.get("/breaches/{incident_id}/notices",
            summary="Draft the individual notices, each in the patient's language (PHI; audited; not stored)")
def breach_notices(request: Request, incident_id: str,
                   principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> dict:
    session = request.state.db
    inc = breach.get(session, principal.org_id, incident_id)
    notices = breach.draft_notices(session, principal.org_id, inc, actor_fields(principal, request))
    session.commit()
    return {"incident_id": inc.id, "data": notices}


# --------------------------------------------------------------------------- reports


def report_response(request: Request, principal: Principal, start, end, format: str):
    """The report in ``format`` (json, csv, pdf); generating one is audited. Shared with the page."""
    from carepost.audit.service import record

    session = request.state.db
    report = reports.build(session, principal.org_id, start, end)
    record(session, org_id=principal.org_id, action="compliance.report.generated", target_type="organization",
           target_id=principal.org_id, details={"period_start": report["period_start"],
                                               "period_end": report["period_end"], "format": format},
           **actor_fields(principal, request))
    session.commit()
    name = f"compliance-report-{report['period_start']}-{report['period_end']}"
    if format == "csv":
        return Response(reports.to_csv(report), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
    if format == "pdf":
        return Response(reports.to_pdf(report), media_type="application/pdf",
                        headers={"Content-Disposition": f'attachment; filename="{name}.pdf"'})
    return report


@router.get("/reports", summary="Compliance reports over a period (default the last 30 days): JSON, CSV or PDF",
            response_model=None)
def compliance_report(request: Request, start: str | None = None, end: str | None = None,
                      format: Literal["json", "csv", "pdf"] = "json",
                      principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))):
    return report_response(request, principal, start, end, format)
