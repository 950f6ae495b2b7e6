"""REST routes of contacts, clinical facts and imports.

* Reading needs ``phi:read_masked``; holders of ``phi:read_unmasked`` get clear values unless
  they ask for ``masked=true``. Every read and write is audited with references only, and the
  event says whether the view was masked or unmasked.
* Searching by a direct identifier (email, phone, MRN) is a POST with the value in the body:
  PHI never travels in a URL.
* Imports upload the file as the raw request body; it streams into encrypted chunks in the
  database (no temporary file on the web server) and a worker imports it.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for, record_read
from carepost.core.config import get_settings
from carepost.core.database import begin_read
from carepost.core.errors import PermissionDenied, ValidationFailed
from carepost.patients import csvimport, imports, masking, service
from carepost.patients.schemas import AttributeDefinitionIn, ContactIn, CsvMappingIn, FactIn

router = APIRouter(prefix="/api/v1", tags=["contacts"])

FactKind = Literal["conditions", "medications", "procedures", "observations", "immunizations", "encounters",
                   "appointments", "care-plans", "coverages"]


class _FactKindConvertor(Convertor):
    """``{kind:fact_kind}`` matches only the kinds of clinical facts, so a path such as
    ``/contacts/{id}/consent/evidence`` is never taken by the facts routes (issue 9 item 28)."""

    regex = "|".join(FactKind.__args__)

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fact_kind", _FactKindConvertor())


def _audit(request: Request, principal: Principal, action: str, target_id: str | None = None, target_type: str = "contact", **details):
    record_for(request.state.db, principal, request, action, target_type=target_type, target_id=target_id, details=details)


def _view(principal: Principal, masked: bool) -> tuple[bool, str]:
    unmasked = masking.wants_unmasked(principal, masked)
    return unmasked, "unmasked" if unmasked else "masked"


# --------------------------------------------------------------------------- contacts


@router.post("/contacts", summary="Create a contact, or update the one with the same external id")
def upsert_contact(request: Request, body: ContactIn, principal: Principal = Depends(require(P.PHI_WRITE))) -> JSONResponse:
    session = request.state.db
    result = service.save_contact(session, principal.org_id, body, source="api")
    session.flush()
    unmasked, view = _view(principal, False)
    data = masking.present(service.contact_dict(session, result.contact), unmasked)
    _audit(request, principal, "contact.create" if result.created else "contact.update", result.contact.id,
           fields=sorted(body.model_fields_set), view=view)
    session.commit()
    return JSONResponse(data, status_code=201 if result.created else 200)


@router.get("/contacts", summary="List contacts (filters, cursor pagination)")
def list_contacts(
    request: Request,
    care_stage: str | None = Query(None, max_length=40),
    sex: Literal["female", "male", "other", "unknown"] | None = None,
    state: str | None = Query(None, max_length=50),
    city: str | None = Query(None, max_length=100),
    postal_code: str | None = Query(None, max_length=16, description="Exact ZIP or a prefix (ZIP3)."),
    preferred_language: str | None = Query(None, max_length=35),
    coverage_type: str | None = Query(None, max_length=64),
    born_after: date | None = None,
    born_before: date | None = None,
    updated_since: datetime | None = None,
    cursor: str | None = Query(None, max_length=200),
    limit: int = Query(50, ge=1, le=500),
    masked: bool = Query(False, description="Ask for the masked view even when allowed to see clear values."),
    principal: Principal = Depends(require(P.PHI_READ_MASKED)),
) -> dict:
    session = request.state.db
    filters = service.ContactFilters(care_stage=care_stage, sex=sex, state=state, city=city, postal_code=postal_code,
                                     preferred_language=preferred_language, coverage_type=coverage_type,
                                     born_after=born_after, born_before=born_before, updated_since=updated_since)
    rows, next_cursor = service.list_contacts(session, principal.org_id, filters, cursor=cursor, limit=limit)
    unmasked, view = _view(principal, masked)
    data = [masking.present(d, unmasked) for d in service.contact_dicts(session, rows)]
    _audit(request, principal, "contact.list", None, target_type="contact_list", view=view, count=len(data),
           contact_ids=[d["id"] for d in data])
    session.commit()
    return {"data": data, "next_cursor": next_cursor}


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: str | None = Field(None, max_length=320)
    phone: str | None = Field(None, max_length=40)
    mrn: str | None = Field(None, max_length=200)
    identifier: str | None = Field(None, max_length=200)
    system: str | None = Field(None, max_length=255)
    name: str | None = Field(None, max_length=200, description="Given and/or family name, any order; accents and case "
                                                               "ignored; every word must match. Needs phi:read_unmasked.")
    masked: bool = False


@router.post("/contacts/search", summary="Find contacts by exact email, phone or MRN, or by name (blind indexes)")
def search_contacts(request: Request, body: SearchIn, principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> dict:
    """The value is in the body, never in the URL. A name search is identifier-like (it confirms
    who is a patient here), so it needs ``phi:read_unmasked``."""
    session = request.state.db
    if body.name is not None and not principal.can(P.PHI_READ_UNMASKED):
        raise PermissionDenied("Searching by name needs the permission to see unmasked PHI (phi:read_unmasked).", field="name")
    # Issue 9 item 7: an exact identifier confirms who a patient is — the unmasked right only.
    by_identifier = next((k for k in ("email", "phone", "mrn", "identifier") if getattr(body, k)), None)
    if by_identifier is not None and not principal.can(P.PHI_READ_UNMASKED):
        raise PermissionDenied("Searching by email, phone, MRN or identifier needs the permission to see unmasked PHI "
                               "(phi:read_unmasked).", field=by_identifier)
    ids = None
    if body.email or body.phone or body.mrn or body.identifier or body.name is None:
        ids = service.find_contact_ids(session, principal.org_id, email=body.email, phone=body.phone, mrn=body.mrn,
                                       identifier=body.identifier, system=body.system)
    if body.name is not None:
        by_name = service.find_contact_ids_by_name(session, principal.org_id, body.name)
        ids = by_name if ids is None else sorted(set(ids) & set(by_name))
    rows, _ = service.list_contacts(session, principal.org_id, service.ContactFilters(ids=ids), limit=500)
    unmasked, view = _view(principal, body.masked)
    data = [masking.present(d, unmasked) for d in service.contact_dicts(session, rows)]
    searched_by = [k for k in ("email", "phone", "mrn", "identifier", "name") if getattr(body, k)]
    _audit(request, principal, "contact.search", None, target_type="contact_list", view=view, by=searched_by,
           count=len(data), contact_ids=[d["id"] for d in data])
    session.commit()
    return {"data": data, "next_cursor": None}


@router.get("/contacts/{contact_id}", summary="Read a contact")
def read_contact(request: Request, contact_id: str, masked: bool = False,
                 principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> dict:
    session = request.state.db
    begin_read(session)  # reads only: no write lock while reading and decrypting
    # Two Core statements scoped to the organization (core.scoped_select), not three ORM queries.
    view_data = service.contact_view(session, contact_id)
    unmasked, view = _view(principal, masked)
    data = masking.present(view_data, unmasked)
    session.commit()
    # Committed (grouped with concurrent reads' events) before the response is sent.
    record_read(principal, request, "contact.read", target_type="contact", target_id=view_data["id"], details={"view": view})
    # Encoded here, by the serializer FastAPI would use (pydantic-core): FastAPI then skips
    # validating the dict against the declared ``dict`` before encoding it (issue 11 item 6).
    return Response(to_json(data), media_type="application/json")


@router.post("/contacts/{contact_id}/identifiers/{identifier_id}/reveal",
             summary="Reveal one identifier in clear (government identifiers are otherwise shown to their last four)")
def reveal_identifier(request: Request, contact_id: str, identifier_id: str,
                      principal: Principal = Depends(require(P.PHI_READ_UNMASKED))) -> dict:
    session = request.state.db
    data = service.reveal_identifier(session, contact_id, identifier_id)
    _audit(request, principal, "contact.identifier.reveal", contact_id, identifier_id=data["id"],
           identifier_class=data["class"], type=data["type"], view="unmasked")
    session.commit()
    return data


@router.get("/identifier-policy", summary="Government identifier systems the organization keeps (none by default)")
def get_identifier_policy(request: Request, principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> dict:
    return service.identifier_policy(request.state.db, principal.org_id)


class IdentifierPolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_systems: list[str] = Field(max_length=50, description="Systems (URIs) of SSN, driver's licence, passport or other "
                                                               "government identifiers to store at import; none by default.")


@router.put("/identifier-policy", summary="Opt in, per system, to storing government identifiers")
def put_identifier_policy(request: Request, body: IdentifierPolicyIn, principal: Principal = Depends(require(P.ORG_MANAGE))) -> dict:
    session = request.state.db
    policy = service.set_identifier_policy(session, principal.org_id, body.keep_systems)
    _audit(request, principal, "identifier_policy.update", principal.org_id, target_type="organization",
           keep_systems=policy["keep_systems"])
    session.commit()
    return policy


@router.patch("/contacts/{contact_id}", summary="Change some fields of a contact")
def update_contact(request: Request, contact_id: str, body: ContactIn, principal: Principal = Depends(require(P.PHI_WRITE))) -> dict:
    session = request.state.db
    contact = service.get_contact(session, contact_id)
    service.save_contact(session, principal.org_id, body, contact=contact)
    session.flush()
    unmasked, view = _view(principal, False)
    data = masking.present(service.contact_dict(session, contact), unmasked)
    _audit(request, principal, "contact.update", contact.id, fields=sorted(body.model_fields_set), view=view)
    session.commit()
    return data


@router.delete("/contacts/{contact_id}", status_code=204, summary="Delete a patient and their encrypted data")
def delete_contact(request: Request, contact_id: str, principal: Principal = Depends(require(P.PHI_WRITE))) -> Response:
    session = request.state.db
    result = service.delete_contact(session, principal.org_id, contact_id)
    # The audit record keeps the id and counts only: none of the deleted PHI.
    _audit(request, principal, "contact.delete", result.contact_id, removed=result.removed,
           kept_index_kinds=sorted(result.kept_indexes))
    session.commit()
    return Response(status_code=204)


@router.get("/contacts/{contact_id}/export", summary="Everything held about one patient (right of access)")
def export_contact(request: Request, contact_id: str, format: Literal["json", "html"] = "json",
                   principal: Principal = Depends(require(P.PHI_READ_UNMASKED))) -> Response:
    session = request.state.db
    data = service.export_contact(session, principal.org_id, contact_id)
    _audit(request, principal, "contact.export", contact_id, format=format, view="unmasked")
    session.commit()
    disposition = f'attachment; filename="patient-export-{contact_id}.{format}"'
    if format == "html":
        return HTMLResponse(service.export_html(data), headers={"Content-Disposition": disposition})
    return JSONResponse(data, headers={"Content-Disposition": disposition})


# --------------------------------------------------------------------------- clinical facts


@router.get("/contacts/{contact_id}/{kind:fact_kind}", summary="List clinical facts of one kind")
def list_facts(request: Request, contact_id: str, kind: FactKind, principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> dict:
    session = request.state.db
    rows = service.list_facts(session, principal.org_id, contact_id, kind)
    unmasked, view = _view(principal, False)
    _audit(request, principal, f"contact.{kind}.read", contact_id, count=len(rows), view=view)
    session.commit()
    facts = [service.fact_dict(r) for r in rows]
    # Issue 9 item 7: masked viewers get categories and counts, never codes' text, dates or notes.
    return {"data": facts} if unmasked else masking.mask_facts(kind, facts)


@router.post("/contacts/{contact_id}/{kind:fact_kind}", status_code=201, summary="Add a clinical fact")
def create_fact(request: Request, contact_id: str, kind: FactKind, body: FactIn,
                principal: Principal = Depends(require(P.PHI_WRITE))) -> dict:
    session = request.state.db
    fact = service.create_fact(session, principal.org_id, contact_id, kind, body)
    _audit(request, principal, f"contact.{kind}.create", contact_id, fact_id=fact.id)
    session.commit()
    return service.fact_dict(fact)


@router.patch("/contacts/{contact_id}/{kind:fact_kind}/{fact_id}", summary="Change a clinical fact")
def update_fact(request: Request, contact_id: str, kind: FactKind, fact_id: str, body: FactIn,
                principal: Principal = Depends(require(P.PHI_WRITE))) -> dict:
    session = request.state.db
    fact = service.update_fact(session, principal.org_id, contact_id, kind, fact_id, body)
    _audit(request, principal, f"contact.{kind}.update", contact_id, fact_id=fact.id, fields=sorted(body.model_fields_set))
    session.commit()
    return service.fact_dict(fact)


@router.delete("/contacts/{contact_id}/{kind:fact_kind}/{fact_id}", status_code=204, summary="Delete a clinical fact")
def delete_fact(request: Request, contact_id: str, kind: FactKind, fact_id: str,
                principal: Principal = Depends(require(P.PHI_WRITE))) -> Response:
    session = request.state.db
    service.delete_fact(session, principal.org_id, contact_id, kind, fact_id)
    _audit(request, principal, f"contact.{kind}.delete", contact_id, fact_id=fact_id)
    session.commit()
    return Response(status_code=204)


# --------------------------------------------------------------------------- attributes and care journey


@router.get("/contact-attributes", summary="Custom attribute definitions", tags=["contacts"])
def list_attributes(request: Request, principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> dict:
    defs = service.list_attribute_definitions(request.state.db, principal.org_id)
    return {"data": [{"id": d.id, "key": d.key, "label": d.label, "type": d.type, "options": d.options} for d in defs]}


@router.post("/contact-attributes", status_code=201, summary="Define a custom attribute")
def define_attribute(request: Request, body: AttributeDefinitionIn, principal: Principal = Depends(require(P.CONTACTS_IMPORT))) -> dict:
    session = request.state.db
    d = service.define_attribute(session, principal.org_id, body)
    _audit(request, principal, "contact_attribute.create", d.id, target_type="contact_attribute", key=d.key, type=d.type)
    session.commit()
    return {"id": d.id, "key": d.key, "label": d.label, "type": d.type, "options": d.options}


@router.get("/care-journey", summary="Care-journey stage rules")
def get_care_journey(request: Request, principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> dict:
    return service.care_journey_config(request.state.db, principal.org_id)


@router.put("/care-journey", summary="Change the care-journey stage rules and re-derive every stage")
def put_care_journey(request: Request, body: dict[str, Any], principal: Principal = Depends(require(P.ORG_MANAGE))) -> dict:
    session = request.state.db
    cfg = service.set_care_journey_config(session, principal.org_id, body)
    _audit(request, principal, "care_journey.update", principal.org_id, target_type="organization", settings=sorted(body))
    session.commit()
    return cfg


# --------------------------------------------------------------------------- imports

_CONTENT_TYPES = {
    "application/fhir+json": "fhir",
    "application/json": "fhir",
    "application/x-ndjson": "ndjson",
    "application/fhir+ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "text/csv": "csv",
}


@router.post("/imports", status_code=202, summary="Upload a FHIR Bundle, NDJSON or CSV file to import",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/fhir+json": {"schema": {"type": "string", "format": "binary"}},
                 "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
                 "text/csv": {"schema": {"type": "string", "format": "binary"}}}}})
async def create_import(
    request: Request,
    format: Literal["auto", "fhir", "ndjson", "csv"] = "auto",
    mapping_id: str | None = Query(None, max_length=32, description="A saved CSV column mapping"),
    delimiter: str | None = Query(None, min_length=1, max_length=1),
    encoding: Literal["utf-8", "utf-8-sig", "latin-1", "cp1252"] | None = None,
    date_format: str | None = Query(None, max_length=20),
    principal: Principal = Depends(require(P.CONTACTS_IMPORT)),
) -> dict:
    """The file is the request body (``curl --data-binary @file``), not a form: it streams into
    encrypted storage as it arrives. The file name may be sent in ``X-Filename``."""
    session = request.state.db
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("multipart/"):
        raise ValidationFailed("Send the file itself as the request body (Content-Type text/csv, application/fhir+json or "
                               "application/x-ndjson), not as a form.", field="file")
    if format == "auto":
        format = _CONTENT_TYPES.get(content_type, "auto")
    if mapping_id:
        await run_in_threadpool(csvimport.get_mapping, session, mapping_id)
    options = {k: v for k, v in {"delimiter": delimiter, "encoding": encoding, "date_format": date_format}.items() if v}
    filename = (request.headers.get("x-filename") or "")[:255] or None
    job = await run_in_threadpool(imports.create_job, session, principal.org_id, format=format, filename=filename,
                                  created_by=principal.actor_id, mapping_id=mapping_id, options=options)
    job_id = job.id
    await run_in_threadpool(session.commit)
    writer = imports.ChunkWriter(session, job, get_settings().max_upload_bytes)
    try:
        async for data in request.stream():
            if data:
                stored = writer.seq
                await run_in_threadpool(writer.write, data)
                if writer.seq != stored:
                    await run_in_threadpool(session.commit)  # never hold SQLite's write lock while the client sends
        await run_in_threadpool(writer.close)
        if writer.size == 0:
            raise ValidationFailed("The file is empty.", field="file")
        job.status = "queued"
        _audit(request, principal, "import.create", job_id, target_type="import", format=format, size_bytes=writer.size)
        await run_in_threadpool(session.commit)
    except BaseException:
        await run_in_threadpool(_discard_job, session, job_id)
        raise
    from carepost.patients.tasks import start_import

    await run_in_threadpool(start_import, job_id, principal.org_id)
    session.expire_all()
    return await run_in_threadpool(lambda: imports.job_dict(session, imports.get_job(session, job_id)))


def _discard_job(session, job_id: str) -> None:
    session.rollback()
    job = session.get(imports.ImportJob, job_id)
    if job is not None:
        imports.discard_upload(session, job)
        session.delete(job)
        session.commit()


@router.get("/imports", summary="Recent imports")
def list_imports(request: Request, principal: Principal = Depends(require(P.CONTACTS_IMPORT))) -> dict:
    session = request.state.db
    return {"data": [imports.job_dict(session, j, with_errors=0) for j in imports.list_jobs(session, principal.org_id)]}


@router.get("/imports/fields", summary="CarePost fields a CSV column can map to")
def import_fields(request: Request, principal: Principal = Depends(require(P.CONTACTS_IMPORT))) -> dict:
    keys = [f"attributes.{d.key}" for d in service.list_attribute_definitions(request.state.db, principal.org_id)]
    return {"fields": list(csvimport.CONTACT_FIELDS) + keys + ["ignore"]}


@router.get("/imports/mappings", summary="Saved CSV column mappings")
def list_mappings(request: Request, principal: Principal = Depends(require(P.CONTACTS_IMPORT))) -> dict:
    return {"data": [csvimport.mapping_dict(m) for m in csvimport.list_mappings(request.state.db, principal.org_id)]}


@router.post("/imports/mappings", status_code=201, summary="Save a CSV column mapping")
def create_mapping(request: Request, body: CsvMappingIn, principal: Principal = Depends(require(P.CONTACTS_IMPORT))) -> dict:
    session = request.state.db
    m = csvimport.create_mapping(session, principal.org_id, body)
    _audit(request, principal, "import_mapping.create", m.id, target_type="csv_mapping")
    session.commit()
    return csvimport.mapping_dict(m)


@router.post("/imports/preview", summary="Detect encoding, delimiter and headers of the start of a CSV file")
async def preview_csv(request: Request, principal: Principal = Depends(require(P.CONTACTS_IMPORT))) -> dict:
    head = bytearray()
    async for data in request.stream():
        head.extend(data)
        if len(head) >= csvimport.SAMPLE_BYTES:
            break
    if not head:
        raise ValidationFailed("Send the first lines of the file.", field="file")
    return csvimport.preview(bytes(head[: csvimport.SAMPLE_BYTES]))


@router.get("/imports/{import_id}", summary="Status, counts and first errors of an import")
def read_import(request: Request, import_id: str, principal: Principal = Depends(require(P.CONTACTS_IMPORT))) -> dict:
    session = request.state.db
    return imports.job_dict(session, imports.get_job(session, import_id))


@router.get("/imports/{import_id}/errors", summary="The error report of an import (CSV)")
def import_errors(request: Request, import_id: str, principal: Principal = Depends(require(P.CONTACTS_IMPORT))) -> StreamingResponse:
    session = request.state.db
    job = imports.get_job(session, import_id)
    _audit(request, principal, "import.errors.download", job.id, target_type="import")
    session.commit()
    lines = list(imports.error_report_csv(session, job))
    return StreamingResponse(iter(lines), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="import-{job.id}-errors.csv"'})
