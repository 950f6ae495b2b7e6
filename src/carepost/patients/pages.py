"""Web UI of patients: the contacts list (search and filters), the contact page (demographics,
clinical facts, consent and message history) and the import wizard (column mapping, live
progress, error report download).

Same rules as the API: masked unless the person may see clear values; every view audited;
searching by a direct identifier is a POST (PHI never goes into a URL).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core.errors import CarePostError, ValidationFailed
from carepost.patients import csvimport, imports, masking, service
from carepost.patients.models import FACT_MODELS
from carepost.patients.schemas import SEXES, ContactIn
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

# Sections other capabilities add to the contact page: name -> (title, fn(session, org_id, contact_id) -> list of rows)
ContactSection = Callable[[Any, str, str], list[dict]]
_SECTIONS: dict[str, tuple[str, ContactSection | None]] = {
    "consent": ("Consent and authorizations", None),
    "messages": ("Message history", None),
}


def register_contact_section(key: str, title: str, rows: ContactSection) -> None:
    """Fill a section of the contact page (consent, message history) from another capability."""
    _SECTIONS[key] = (title, rows)


FACT_COLUMNS = {
    "conditions": ("onset_date", "abatement_date", "verification_status"),
    "medications": ("authored_on", "last_fill_date", "next_refill_due", "days_supply"),
    "procedures": ("performed_start",),
    "observations": ("effective_at", "value_quantity", "value_unit", "value_display"),
    "immunizations": ("occurrence_date",),
    "encounters": ("class_code", "start_at", "end_at", "is_hospitalization"),
    "appointments": ("start_at", "minutes_duration"),
    "care-plans": ("intent", "period_start", "period_end"),
    "coverages": ("plan_name", "payor_name", "period_start", "period_end"),
}


def _filters_from(request: Request) -> tuple[service.ContactFilters, dict, dict]:
    q = request.query_params
    form = {k: (q.get(k) or "").strip()[:64] for k in ("care_stage", "sex", "state", "postal_code", "born_after", "born_before")}
    errors: dict[str, str] = {}
    dates: dict[str, date | None] = {}
    for name in ("born_after", "born_before"):
        dates[name] = None
        if form[name]:
            try:
                dates[name] = date.fromisoformat(form[name])
            except ValueError:
                errors[name] = "Enter a date as YYYY-MM-DD."
    if form["sex"] and form["sex"] not in ("female", "male", "other", "unknown"):
        errors["sex"] = "Choose female, male, other or unknown."
    filters = service.ContactFilters(care_stage=form["care_stage"] or None, sex=form["sex"] or None if "sex" not in errors else None,
                                     state=form["state"] or None, postal_code=form["postal_code"] or None, **dates)
    return filters, form, errors


@router.get("/contacts")
def contacts_page(request: Request, principal: Principal = Depends(require(P.PHI_READ_MASKED))):
    session = request.state.db
    filters, form, errors = _filters_from(request)
    cursor = request.query_params.get("cursor") or None
    try:
        rows, next_cursor = service.list_contacts(session, principal.org_id, filters, cursor=cursor, limit=50)
    except ValidationFailed as exc:
        errors[exc.field or "cursor"] = exc.message
        rows, next_cursor = [], None
    return _render_list(request, principal, rows, next_cursor, form, errors, searched=False)


@router.post("/contacts/search")
def contacts_search(request: Request, email: str = Form(""), mrn: str = Form(""), phone: str = Form(""), name: str = Form(""),
                    principal: Principal = Depends(require(P.PHI_READ_MASKED))):
    session = request.state.db
    errors: dict[str, str] = {}
    rows = []
    name = name.strip()[:200]
    try:
        if name and not masking.may_unmask(principal):
            raise ValidationFailed("Searching by name needs the permission to see unmasked PHI.", field="name")
        ids = None
        if email.strip() or mrn.strip() or phone.strip() or not name:
            ids = service.find_contact_ids(session, principal.org_id, email=email.strip()[:320] or None, mrn=mrn.strip()[:200] or None,
                                           phone=phone.strip()[:40] or None)
        if name:  # by the blind indexes of its tokens (accents and case ignored)
            by_name = service.find_contact_ids_by_name(session, principal.org_id, name)
            ids = by_name if ids is None else sorted(set(ids) & set(by_name))
        rows, _ = service.list_contacts(session, principal.org_id, service.ContactFilters(ids=ids), limit=500)
    except ValidationFailed as exc:
        errors["search"] = exc.message
    return _render_list(request, principal, rows, None, {}, errors, searched=True,
                        by=[k for k, v in (("email", email), ("mrn", mrn), ("phone", phone), ("name", name)) if v.strip()])


def _render_list(request, principal, rows, next_cursor, form, errors, *, searched: bool, by: list[str] | None = None):
    session = request.state.db
    unmasked = masking.wants_unmasked(principal)
    data = [masking.present(d, unmasked) for d in service.contact_dicts(session, rows)]
    record_for(session, principal, request, "contact.search" if searched else "contact.list", target_type="contact_list",
               details={"view": "unmasked" if unmasked else "masked", "count": len(data), "contact_ids": [d["id"] for d in data],
                        **({"by": by} if by else {})})
    session.commit()
    stages = list(service.DERIVED_STAGES) + list(service.care_journey_config(session, principal.org_id)["stages"])
    query = urlencode({k: v for k, v in form.items() if v})
    return render(request, "patients/list.html", {
        "contacts": data, "next_cursor": next_cursor, "form": form, "errors": errors, "searched": searched,
        "stages": stages, "unmasked": unmasked, "total": service.count_contacts(session, principal.org_id),
        "query": query, "can_import": principal.can(P.CONTACTS_IMPORT), "can_write": principal.can(P.PHI_WRITE),
    }, status_code=422 if errors else 200)


# --------------------------------------------------------------------------- add and edit by hand

# (name, label, kind): kind "text" | "email" | "tel" | "date" — fieldsets of the contact form.
FORM_GROUPS: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("Name", [("name_prefix", "Prefix", "text"), ("given_name", "Given name", "text"), ("middle_name", "Middle name", "text"),
              ("family_name", "Family name", "text"), ("name_suffix", "Suffix", "text")]),
    ("Reach", [("email", "Email address", "email"), ("phone", "Phone", "tel")]),
    ("Address", [("address_line1", "Street address", "text"), ("address_line2", "Address line 2", "text"), ("city", "City", "text"),
                 ("state", "State", "text"), ("postal_code", "ZIP code", "text"), ("country", "Country (2 letters)", "text")]),
    ("Identity", [("mrn", "Medical record number (MRN)", "text"), ("birth_date", "Birth date", "date")]),
    ("More about the patient", [(n, n.replace("_", " ").capitalize(), "text") for n in (
        "gender_identity", "preferred_language", "time_zone", "ethnicity", "race", "marital_status", "education",
        "employment_status", "household_status", "income_band", "coverage_type", "coverage_plan", "religion")]),
]
TEXT_FIELDS = [name for _, fields in FORM_GROUPS for name, _, _ in fields]
# Shown only to those who may see clear values; for others the field is empty and left unchanged when empty.
HIDDEN_WHEN_MASKED = {"name_prefix", "given_name", "middle_name", "family_name", "name_suffix", "email", "phone",
                      "address_line1", "address_line2", "mrn", "birth_date"}
MAX_FORM_VALUE = 320


def _form_values(current: dict | None, unmasked: bool) -> dict:
    if current is None:
        return {}
    values = {name: "" if (name in HIDDEN_WHEN_MASKED and not unmasked) else (current.get(name) or "") for name in TEXT_FIELDS}
    values["sex"] = current.get("sex") or ""
    values["deceased"] = bool(current.get("deceased"))
    return values


def _changes(form, current: dict | None, unmasked: bool) -> dict:
    """The ContactIn fields the form changes: every filled field of a new contact; of an existing
    one, only what differs (an emptied field is cleared; a field hidden from a masked viewer is
    changed only when filled). The other email addresses and phones of the contact are kept."""
    data: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = str(form.get(name) or "").strip()[:MAX_FORM_VALUE]
        if current is None:
            if value:
                data[name] = value
            continue
        if name in HIDDEN_WHEN_MASKED and not unmasked:
            if value:
                data[name] = value
            continue
        if value != str(current.get(name) or ""):
            data[name] = value or None
    sex = str(form.get("sex") or "")
    if (current is None and sex) or (current is not None and sex != (current.get("sex") or "")):
        data["sex"] = sex or None
    deceased = form.get("deceased") == "on"
    if (current is None and deceased) or (current is not None and deceased != bool(current.get("deceased"))):
        data["deceased"] = deceased
    if current is not None:
        if "email" in data:  # the primary address changes; the others stay
            others = [e for e in current.get("emails") or [] if e != current.get("email")]
            data["emails"] = ([data.pop("email")] if data.get("email") else []) + others
            data.pop("email", None)
        if "phone" in data:
            others = [p for p in current.get("phones") or [] if p.get("value") != current.get("phone")]
            first = [{"value": data.pop("phone"), "use": (current.get("phones") or [{}])[0].get("use")}] if data.get("phone") else []
            data.pop("phone", None)
            data["phones"] = first + [{"value": p["value"], "use": p.get("use")} for p in others]
        if "mrn" in data:
            if not data["mrn"]:
                data.pop("mrn")  # an MRN is replaced, never removed, by hand
            else:
                system = next((i["system"] for i in current.get("identifiers") or [] if i.get("type") == service.MRN_TYPE), None)
                if system:
                    data["mrn_system"] = system
    return data


def _form_errors_from(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for err in exc.errors(include_input=False, include_url=False):
        loc = [str(p) for p in err.get("loc", ())]
        name = {"emails": "email", "phones": "phone"}.get(loc[0], loc[0]) if loc else "form"
        errors.setdefault(name, str(err.get("msg", "invalid")).replace("Value error, ", "").capitalize() + ".")
    return errors


def _save_form(request: Request, principal: Principal, form, contact_id: str | None):
    session = request.state.db
    unmasked = masking.wants_unmasked(principal)
    contact = service.get_contact(session, contact_id) if contact_id else None
    current = service.contact_dict(session, contact) if contact is not None else None
    data = _changes(form, current, unmasked)
    errors: dict[str, str] = {}
    if contact is None and not (data.get("given_name") or data.get("family_name") or data.get("email")):
        errors["given_name"] = "Enter at least a name or an email address."
    body = None
    if not errors:
        try:
            body = ContactIn.model_validate(data)
        except ValidationError as exc:
            errors = _form_errors_from(exc)
    if body is not None and not errors:
        try:
            result = service.save_contact(session, principal.org_id, body, source="ui", contact=contact)
            session.flush()
        except CarePostError as exc:
            session.rollback()
            field = (exc.field or "form").split(".")[0]
            errors[{"emails": "email", "phones": "phone", "identifiers": "mrn"}.get(field, field)] = exc.message
        else:
            created = contact is None
            record_for(session, principal, request, "contact.create" if created else "contact.update", target_type="contact",
                       target_id=result.contact.id, details={"fields": sorted(body.model_fields_set), "page": "contact_form",
                                                             "view": "unmasked" if unmasked else "masked"})
            session.commit()
            return RedirectResponse(f"/app/contacts/{result.contact.id}?m={'created' if created else 'saved'}", status_code=303)
    values = {name: str(form.get(name) or "")[:MAX_FORM_VALUE] for name in TEXT_FIELDS}
    values["sex"] = str(form.get("sex") or "")
    values["deceased"] = form.get("deceased") == "on"
    return _render_form(request, principal, current, values, errors, status_code=422)


def _render_form(request, principal, current: dict | None, values: dict, errors: dict, status_code: int = 200):
    unmasked = masking.wants_unmasked(principal)
    return render(request, "patients/form.html", {
        "c": current, "values": values, "errors": errors, "groups": FORM_GROUPS, "sexes": SEXES, "unmasked": unmasked,
        "hidden_when_masked": HIDDEN_WHEN_MASKED,
    }, status_code=status_code)


@router.get("/contacts/new")
def contact_new_page(request: Request, principal: Principal = Depends(require(P.PHI_WRITE))):
    return _render_form(request, principal, None, {}, {})


@router.post("/contacts/new")
async def contact_create(request: Request, principal: Principal = Depends(require(P.PHI_WRITE))):
    form = await request.form()
    return await run_in_threadpool(_save_form, request, principal, form, None)


@router.get("/contacts/{contact_id}/edit")
def contact_edit_page(request: Request, contact_id: str, principal: Principal = Depends(require(P.PHI_WRITE))):
    session = request.state.db
    contact = service.get_contact(session, contact_id)
    unmasked = masking.wants_unmasked(principal)
    current = service.contact_dict(session, contact)
    record_for(session, principal, request, "contact.read", target_type="contact", target_id=contact.id,
               details={"view": "unmasked" if unmasked else "masked", "page": "contact_form"})
    session.commit()
    return _render_form(request, principal, current, _form_values(current, unmasked), {})


@router.post("/contacts/{contact_id}/edit")
async def contact_update(request: Request, contact_id: str, principal: Principal = Depends(require(P.PHI_WRITE))):
    form = await request.form()
    return await run_in_threadpool(_save_form, request, principal, form, contact_id)


@router.get("/contacts/{contact_id}")
def contact_page(request: Request, contact_id: str, principal: Principal = Depends(require(P.PHI_READ_MASKED))):
    return _contact_page(request, principal, contact_id)


@router.post("/contacts/{contact_id}/identifiers/{identifier_id}/reveal")
def contact_reveal_identifier(request: Request, contact_id: str, identifier_id: str,
                              principal: Principal = Depends(require(P.PHI_READ_UNMASKED))):
    """Show one government identifier in clear on the contact page (a POST: audited, one at a time)."""
    session = request.state.db
    revealed = service.reveal_identifier(session, contact_id, identifier_id)
    record_for(session, principal, request, "contact.identifier.reveal", target_type="contact", target_id=contact_id,
               details={"identifier_id": revealed["id"], "identifier_class": revealed["class"], "type": revealed["type"],
                        "view": "unmasked"})
    return _contact_page(request, principal, contact_id, revealed=revealed)


def _contact_page(request: Request, principal: Principal, contact_id: str, revealed: dict | None = None):
    session = request.state.db
    contact = service.get_contact(session, contact_id)
    unmasked = masking.wants_unmasked(principal)
    data = masking.present(service.contact_dict(session, contact), unmasked)
    if revealed:
        data["identifiers"] = [{**i, "value": revealed["value"], "revealed": True} if i.get("id") == revealed["id"] else i
                               for i in data["identifiers"]]
    facts, masked_facts = {}, {}
    for kind in FACT_MODELS:
        rows = [service.fact_dict(f) for f in service.list_facts(session, principal.org_id, contact.id, kind, limit=100)]
        if unmasked:
            facts[kind] = rows
        else:  # issue 9 item 7: a count per category, never a code's text, a date or a note
            masked_facts[kind] = masking.mask_facts(kind, rows)
    sections = []
    for key, (title, fn) in _SECTIONS.items():
        rows = fn(session, principal.org_id, contact.id) if fn else []
        if not unmasked:  # no exact date (the year at most), no key fingerprint or long number
            rows = [{**row, "summary": masking.mask_summary(row.get("summary"))} for row in rows]
        sections.append({"key": key, "title": title, "rows": rows})
    record_for(session, principal, request, "contact.read", target_type="contact", target_id=contact.id,
               details={"view": "unmasked" if unmasked else "masked", "page": "contact"})
    session.commit()
    return render(request, "patients/contact.html", {
        "c": data, "facts": facts, "masked_facts": masked_facts, "labels": service.FACT_LABELS, "columns": FACT_COLUMNS, "sections": sections,
        "unmasked": unmasked, "can_write": principal.can(P.PHI_WRITE), "can_export": principal.can(P.PHI_READ_UNMASKED),
    })


@router.post("/contacts/{contact_id}/delete")
def contact_delete(request: Request, contact_id: str, principal: Principal = Depends(require(P.PHI_WRITE))):
    session = request.state.db
    result = service.delete_contact(session, principal.org_id, contact_id)
    record_for(session, principal, request, "contact.delete", target_type="contact", target_id=result.contact_id,
               details={"removed": result.removed, "kept_index_kinds": sorted(result.kept_indexes)})
    session.commit()
    return RedirectResponse("/app/contacts?deleted=1", status_code=303)


# --------------------------------------------------------------------------- imports


@router.get("/imports")
def imports_page(request: Request, principal: Principal = Depends(require(P.CONTACTS_IMPORT))):
    session = request.state.db
    jobs = imports.list_jobs(session, principal.org_id, limit=20)
    return render(request, "patients/imports.html", {
        "jobs": [imports.job_dict(session, j, with_errors=0) for j in jobs],
        "mappings": [csvimport.mapping_dict(m) for m in csvimport.list_mappings(session, principal.org_id)],
        "fields": list(csvimport.CONTACT_FIELDS) + [f"attributes.{d.key}" for d in service.list_attribute_definitions(session, principal.org_id)],
    })


@router.get("/imports/{import_id}")
def import_page(request: Request, import_id: str, principal: Principal = Depends(require(P.CONTACTS_IMPORT))):
    session = request.state.db
    job = imports.get_job(session, import_id)
    return render(request, "patients/import.html", {"job": imports.job_dict(session, job, with_errors=50),
                                                     "finished": job.status in imports.FINISHED})


@router.get("/imports/{import_id}/progress")
def import_progress(request: Request, import_id: str, principal: Principal = Depends(require(P.CONTACTS_IMPORT))):
    """The progress fragment the import page polls with htmx until the job ends."""
    session = request.state.db
    job = imports.get_job(session, import_id)
    return render(request, "patients/_progress.html", {"job": imports.job_dict(session, job, with_errors=50),
                                                        "finished": job.status in imports.FINISHED})
