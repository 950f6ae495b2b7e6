"""REST routes of the compliance center (``/api/v1/compliance``).

* ``compliance:manage``: de-identified exports of a saved segment (create, status, download —
  the file holds no PHI, but creating one evaluates the segment, so a sensitive segment needs
  ``phi:read_unmasked`` as everywhere); accounting-of-disclosures requests (create, list with
  the overdue flag, extend once with a reason, fulfil); disclosures recorded by hand.
* ``compliance:manage`` + ``phi:read_unmasked``: a patient's disclosures and the accounting
  document (recipients, descriptions and the patient's name are PHI). Each read is audited.

Bad input is 422 naming the field: an unknown segment (``segment_id``), another organization's
or an unknown patient (``contact_id``), an extension without a reason (``reason``), a date out of
range (``received_on``, ``period_start``, ``period_end``, ``disclosed_at``, ``fulfilled_on``).
A path id of another organization is 404.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from carepost.accounts.access import Principal, request_context, require
from carepost.accounts.permissions import Permission as P
from carepost.audit import disclosures
from carepost.compliance import accounting, service
from carepost.compliance.schemas import (
    AccountingRequestIn,
    DeidentifiedExportIn,
    DisclosureIn,
    ExtensionIn,
    FulfilIn,
)
from carepost.segments.service import Actor

router = APIRouter(prefix="/api/v1/compliance", tags=["compliance"])


def actor_fields(principal: Principal, request: Request) -> dict:
    return {"actor_type": principal.kind, "actor_id": principal.actor_id, "on_behalf_of": principal.on_behalf_of,
            **request_context(request)}


def start_export(export_id: str, org_id: str) -> None:
    from carepost.compliance.tasks import run_deidentified_export

    run_deidentified_export(export_id, org_id)


# --------------------------------------------------------------------------- de-identified exports


@router.post("/deidentified-exports", status_code=202,
             summary="Start a Safe Harbor de-identified export of a saved segment (contacts and clinical facts)")
def create_deidentified_export(request: Request, body: DeidentifiedExportIn,
                               principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    job = service.create_export(session, principal.org_id, body.segment_id, body.format, Actor.of(principal, request))
    session.commit()
    start_export(job.id, principal.org_id)
    session.expire_all()
    return service.export_dict(service.get_export(session, principal.org_id, job.id))


@router.get("/deidentified-exports", summary="De-identified exports of the organization, newest first")
def list_deidentified_exports(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    rows = service.list_exports(request.state.db, principal.org_id)
    return {"data": [service.export_dict(j) for j in rows]}


@router.get("/deidentified-exports/{export_id}", summary="A de-identified export's status and counts")
def read_deidentified_export(request: Request, export_id: str,
                             principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    return service.export_dict(service.get_export(request.state.db, principal.org_id, export_id))


@router.get("/deidentified-exports/{export_id}/download", summary="Download a finished de-identified export (audited)",
            response_class=Response)
def download_deidentified_export(request: Request, export_id: str,
                                 principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> Response:
    session = request.state.db
    name, media_type, data = service.download(session, principal.org_id, export_id, Actor.of(principal, request))
    session.commit()
    return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'})


# --------------------------------------------------------------------------- disclosures


@router.post("/disclosures", status_code=201, summary="Record a disclosure of a patient's PHI made outside CarePost")
def record_disclosure(request: Request, body: DisclosureIn,
                      principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    accounting.check_contact(session, principal.org_id, body.contact_id)
    row = disclosures.record_disclosure(
        session, principal.org_id, contact_id=body.contact_id, disclosed_at=body.disclosed_at,
        recipient_name=body.recipient_name, recipient_address=body.recipient_address, description=body.description,
        purpose=body.purpose, source="manual", recorded_by=principal.actor_id, actor_type=principal.kind,
        context={"on_behalf_of": principal.on_behalf_of, **request_context(request)})
    session.commit()
    return {"id": row.id, "contact_id": row.contact_id, "disclosed_at": body.disclosed_at.isoformat(), "source": "manual"}


def _entry_out(e: dict) -> dict:
    return {**e, "disclosed_at": e["disclosed_at"].isoformat().replace("+00:00", "Z")}


@router.get("/disclosures", summary="A patient's disclosures subject to accounting (recorded and derived; audited)")
def list_disclosures(request: Request, contact_id: str = Query(..., min_length=1, max_length=64),
                     period_start: date | None = None, period_end: date | None = None,
                     principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> dict:
    session = request.state.db
    accounting.check_contact(session, principal.org_id, contact_id)
    acc = disclosures.accounting(session, principal.org_id, contact_id, period_start=period_start, period_end=period_end)
    from carepost.audit.service import record

    record(session, org_id=principal.org_id, action="disclosure.list", target_type="contact", target_id=contact_id,
           details={"entries": len(acc["entries"])}, **actor_fields(principal, request))
    session.commit()
    return {"contact_id": contact_id, "period_start": acc["period_start"].isoformat(),
            "period_end": acc["period_end"].isoformat(), "sources": acc["sources"],
            "data": [_entry_out(e) for e in acc["entries"]]}


# --------------------------------------------------------------------------- accounting requests


@router.post("/accounting-requests", status_code=201,
             summary="Track an individual's request for an accounting of disclosures (due in 60 days)")
def create_accounting_request(request: Request, body: AccountingRequestIn,
                              principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    req = accounting.create_request(session, principal.org_id, contact_id=body.contact_id, received_on=body.received_on,
                                    period_start=body.period_start, period_end=body.period_end,
                                    actor=actor_fields(principal, request))
    session.commit()
    return accounting.request_dict(session, req)


@router.get("/accounting-requests", summary="Accounting requests, soonest due first, with the overdue flag")
def list_accounting_requests(request: Request, status: Literal["open", "extended", "fulfilled"] | None = None,
                             overdue: bool | None = None, contact_id: str | None = Query(None, max_length=64),
                             principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    rows = accounting.list_requests(session, principal.org_id, status=status, overdue=overdue, contact_id=contact_id)
    return {"data": [accounting.request_dict(session, r) for r in rows]}


@router.get("/accounting-requests/{request_id}", summary="An accounting request")
def read_accounting_request(request: Request, request_id: str,
                            principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    return accounting.request_dict(session, accounting.get_request(session, principal.org_id, request_id))


@router.post("/accounting-requests/{request_id}/extension",
             summary="Extend once by 30 days, within the first 60, with the reason given to the individual")
def extend_accounting_request(request: Request, request_id: str, body: ExtensionIn,
                              principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> dict:
    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    accounting.extend(session, principal.org_id, req, body.reason, actor_fields(principal, request))
    session.commit()
    return accounting.request_dict(session, req)


@router.post("/accounting-requests/{request_id}/fulfil",
             summary="Produce the accounting and mark the request fulfilled (the document's hash is kept)")
def fulfil_accounting_request(request: Request, request_id: str, body: FulfilIn,
                              principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))) -> dict:
    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    accounting.fulfil(session, principal.org_id, req, fulfilled_on=body.fulfilled_on,
                      delivery_method=body.delivery_method, actor=actor_fields(principal, request))
    session.commit()
    return accounting.request_dict(session, req)


@router.get("/accounting-requests/{request_id}/accounting",
            summary="The accounting of disclosures for this request: JSON, HTML (prints to PDF) or plain text (audited)",
            response_class=Response)
def accounting_document(request: Request, request_id: str, format: Literal["json", "html", "text"] = "json",
                        principal: Principal = Depends(require(P.COMPLIANCE_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    req = accounting.get_request(session, principal.org_id, request_id)
    acc, text = accounting.produce(session, principal.org_id, req, actor_fields(principal, request))
    session.commit()
    if format == "text":
        return PlainTextResponse(text, headers={"Content-Disposition": f'attachment; filename="accounting-{req.id}.txt"'})
    if format == "html":
        from carepost.compliance.pages import accounting_html

        return HTMLResponse(accounting_html(request, session, req, acc))
    return JSONResponse({"request": accounting.request_dict(session, req), "period_start": acc["period_start"].isoformat(),
                         "period_end": acc["period_end"].isoformat(), "sources": acc["sources"],
                         "entries": [_entry_out(e) for e in acc["entries"]]})


@router.post("/evidence-pack", summary="Build the signed evidence pack for an auditor (ZIP; audited)",
             response_class=Response)
def evidence_pack(request: Request, principal: Principal = Depends(require(P.COMPLIANCE_MANAGE))) -> Response:
    from carepost.compliance import evidence

    session = request.state.db
    session.commit()  # on SQLite the request's session holds the write lock; the doctor's checks need it free
    pack = evidence.build_pack(session, principal.org_id, actor_type=principal.kind, actor_id=principal.actor_id,
                               context={"on_behalf_of": principal.on_behalf_of, **request_context(request)})
    session.commit()
    return Response(pack.content, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="evidence-{principal.org_id}.zip"',
        "X-Evidence-Key-Fingerprint": pack.fingerprint})
