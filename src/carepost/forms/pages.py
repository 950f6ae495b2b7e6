"""Web UI of forms: the list, the builder (with preview, publish and unpublish), submissions and
survey results.

The builder posts every field as ``fields-<row id>-<setting>`` inputs; rows keep the order of
the page. Without JavaScript it still works: "Add a field" re-renders the page with an empty
row and each row has a "Remove" box. With ``/static/forms-builder.js`` rows are added, removed
and moved in place.

Same rules as the API: building needs ``forms:manage``; submissions need ``phi:read_masked`` as
well, are masked unless the person may see clear values, and every view is audited.
"""

from __future__ import annotations

import re
import secrets

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core.errors import CarePostError, NotFound
from carepost.forms import service
from carepost.forms.schemas import CONTACT_FIELDS, FIELD_TYPE_LABELS, FIELD_TYPES, FormIn
from carepost.patients import masking
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

ROW_RE = re.compile(r"^fields-([a-z0-9]{1,16})-([a-z_]{1,20})$")
ROW_SETTINGS = ("key", "type", "label", "help", "required", "phi", "options", "multiple", "max_length", "scale",
                "contact_field", "topic_id", "purpose", "text_id", "drawn_signature", "remove")
TOP_SETTINGS = ("name", "description", "kind", "language", "slug", "notify_emails", "success_message", "action", "csrf_token")
CONTACT_FIELD_LABELS = {
    "email": "Email address", "phone": "Phone", "given_name": "Given name", "family_name": "Family name",
    "birth_date": "Birth date", "address_line1": "Street address", "address_line2": "Address line 2", "city": "City",
    "state": "State", "postal_code": "ZIP code", "preferred_language": "Preferred language",
}


def _uid() -> str:
    return secrets.token_hex(4)


# --------------------------------------------------------------------------- builder helpers


def _consent_choices(session, org_id: str) -> dict:
    """Topics, purposes that need an authorization, and published texts, for the selects."""
    out = {"topics": [], "purposes": [], "texts": []}
    try:
        from carepost.core import purposes as consent_purposes
        from carepost.consent import service as consent
    except ImportError:
        return out
    out["topics"] = [(t.id, t.name) for t in consent.list_topics(session, org_id)]
    out["purposes"] = [(p, consent_purposes.PURPOSES[p]) for p in consent_purposes.AUTHORIZATION_PURPOSES]
    from carepost.consent import authorizations

    for text in authorizations.list_texts(session, org_id):
        if text.status == "published":
            out["texts"].append((text.id, f"{consent_purposes.PURPOSES.get(text.purpose, text.purpose)} — v{text.version}: {text.title}"))
    return out


def _rows_from_fields(fields: list[dict]) -> list[dict]:
    rows = []
    for f in fields:
        row = {"uid": _uid(), **f}
        if f.get("options"):
            row["options"] = "\n".join(f["options"])
        rows.append(row)
    return rows


def _blank_row(kind: str = "text") -> dict:
    return {"uid": _uid(), "type": kind, "key": "", "label": ""}


def _parse_builder(items: list[tuple[str, str]]) -> tuple[dict, list[dict]]:
    top: dict[str, str] = {}
    rows: dict[str, dict] = {}
    for name, value in items:
        if not isinstance(value, str):
            continue
        m = ROW_RE.match(name)
        if m:
            uid, setting = m.groups()
            if setting in ROW_SETTINGS:
                rows.setdefault(uid, {"uid": uid})[setting] = value
        elif name in TOP_SETTINGS:
            top[name] = value
    return top, list(rows.values())


def _field_from_row(row: dict) -> dict:
    kind = (row.get("type") or "").strip()
    d: dict = {"key": (row.get("key") or "").strip(), "type": kind, "label": (row.get("label") or "").strip(),
               "required": "required" in row, "phi": "phi" in row}
    if (row.get("help") or "").strip():
        d["help"] = row["help"].strip()
    if kind == "choice":
        d["options"] = [line.strip() for line in (row.get("options") or "").splitlines() if line.strip()]
        d["multiple"] = "multiple" in row
    if kind in ("text", "long_text") and (row.get("max_length") or "").strip():
        d["max_length"] = row["max_length"].strip()
    if kind == "rating" and (row.get("scale") or "").strip():
        d["scale"] = row["scale"].strip()
    if kind in ("text", "email", "phone", "date", "choice") and row.get("contact_field"):
        d["contact_field"] = row["contact_field"]
    if kind == "consent":
        d["topic_id"] = row.get("topic_id") or None
    if kind == "authorization":
        d["purpose"] = row.get("purpose") or None
        if row.get("text_id"):
            d["text_id"] = row["text_id"]
        d["drawn_signature"] = "drawn_signature" in row
    return d


def _definition(top: dict, rows: list[dict]) -> dict:
    return {
        "name": top.get("name", ""),
        "description": top.get("description", ""),
        "kind": top.get("kind") or "form",
        "language": top.get("language") or "en",
        "slug": (top.get("slug") or "").strip() or None,
        "notify_emails": [a.strip() for a in re.split(r"[\s,;]+", top.get("notify_emails") or "") if a.strip()],
        "success_message": top.get("success_message", ""),
        "fields": [_field_from_row(r) for r in rows],
    }


def _errors_from(exc: Exception, rows: list[dict]) -> tuple[dict, dict]:
    """(top-level errors by setting, row errors by row id) from a pydantic or CarePost error."""
    top: dict[str, str] = {}
    by_row: dict[str, str] = {}

    def place(loc: list, message: str) -> None:
        if len(loc) >= 2 and loc[0] == "fields" and str(loc[1]).isdigit() and int(loc[1]) < len(rows):
            setting = ".".join(str(x) for x in loc[2:])
            by_row.setdefault(rows[int(loc[1])]["uid"], f"{setting}: {message}" if setting else message)
        elif loc:
            top.setdefault(str(loc[0]), message)
        else:
            top.setdefault("_form", message)

    if isinstance(exc, ValidationError):
        for err in exc.errors():
            loc = [p for p in err.get("loc", ())]
            message = err.get("msg", "invalid").removeprefix("Value error, ")
            if loc == ["fields"] and not rows:
                top.setdefault("fields", "Add at least one field.")
            else:
                place(loc, message)
    elif isinstance(exc, CarePostError):
        place((exc.field or "").split(".") if exc.field else [], exc.message)
    return top, by_row


def _builder(request: Request, principal: Principal, *, form=None, top: dict | None = None, rows: list[dict] | None = None,
             errors: dict | None = None, row_errors: dict | None = None, status_code: int = 200, notice: str | None = None):
    session = request.state.db
    if form is not None and top is None:
        top = {"name": form.name, "description": form.description, "kind": form.kind, "language": form.language,
               "slug": form.slug or "", "notify_emails": "\n".join(form.settings.get("notify_emails", [])),
               "success_message": form.settings.get("success_message", "")}
        rows = _rows_from_fields(form.fields)
    top = top or {"kind": "form", "language": "en"}
    rows = rows if rows is not None else [
        {"uid": _uid(), "type": "email", "key": "email", "label": "Email address", "required": True,
         "contact_field": "email"}]
    return render(request, "forms/builder.html", {
        "form": form, "top": top, "rows": rows, "blank": _blank_row(), "errors": errors or {}, "row_errors": row_errors or {},
        "types": [(t, FIELD_TYPE_LABELS[t]) for t in FIELD_TYPES],
        "contact_fields": [(k, CONTACT_FIELD_LABELS[k]) for k in CONTACT_FIELDS],
        "consent": _consent_choices(session, principal.org_id),
        "count": service.submission_count(session, form.id) if form is not None else 0,
        "url": service.public_url(form) if form is not None else None,
        "notice": notice,
    }, status_code=status_code)


async def _builder_post(request: Request) -> tuple[dict, list[dict], str]:
    data = await request.form()
    top, rows = _parse_builder(list(data.multi_items()))
    action = top.get("action", "save")
    rows = [r for r in rows if "remove" not in r]
    if action == "add_field":
        rows.append(_blank_row())
    return top, rows, action


# --------------------------------------------------------------------------- routes: forms


@router.get("/forms")
def forms_page(request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    counts = service.submission_counts(session, principal.org_id)
    forms = [service.form_dict(f, counts.get(f.id, 0)) for f in service.list_forms(session, principal.org_id)]
    return render(request, "forms/list.html", {"forms": forms, "deleted": request.query_params.get("deleted")})


@router.get("/forms/new")
def new_form_page(request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    return _builder(request, principal)


@router.post("/forms/new")
async def new_form_submit(request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    top, rows, action = await _builder_post(request)
    session = request.state.db
    if action != "save":
        return _builder(request, principal, top=top, rows=rows)
    try:
        data = FormIn(**_definition(top, rows))
        form = service.create_form(session, principal.org_id, data, created_by=principal.actor_id)
    except (ValidationError, CarePostError) as exc:
        session.rollback()
        errors, row_errors = _errors_from(exc, rows)
        return _builder(request, principal, top=top, rows=rows, errors=errors, row_errors=row_errors, status_code=422)
    record_for(session, principal, request, "form.create", target_type="form", target_id=form.id, details={"kind": form.kind})
    session.commit()
    return RedirectResponse(f"/app/forms/{form.id}?saved=1", status_code=303)


@router.get("/forms/{form_id}")
def form_page(form_id: str, request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    form = service.get_form(request.state.db, form_id)
    notice = {"saved": "The form was saved.", "published": "The form is published.",
              "unpublished": "The form is closed."}.get(next(iter(request.query_params), ""), None)
    return _builder(request, principal, form=form, notice=notice)


@router.post("/forms/{form_id}")
async def form_save(form_id: str, request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.get_form(session, form_id)
    top, rows, action = await _builder_post(request)
    if action != "save":
        return _builder(request, principal, form=form, top=top, rows=rows)
    try:
        data = FormIn(**_definition(top, rows))
        service.update_form(session, form, data)
    except (ValidationError, CarePostError) as exc:
        session.rollback()
        form = service.get_form(session, form_id)
        errors, row_errors = _errors_from(exc, rows)
        return _builder(request, principal, form=form, top=top, rows=rows, errors=errors, row_errors=row_errors, status_code=422)
    record_for(session, principal, request, "form.update", target_type="form", target_id=form.id, details={"version": form.version})
    session.commit()
    return RedirectResponse(f"/app/forms/{form.id}?saved=1", status_code=303)


@router.post("/forms/{form_id}/publish")
def form_publish(form_id: str, request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.get_form(session, form_id)
    try:
        service.publish(session, form)
    except CarePostError as exc:
        session.rollback()
        form = service.get_form(session, form_id)
        errors, row_errors = _errors_from(exc, _rows_from_fields(form.fields))
        return _builder(request, principal, form=form, errors={"_form": "The form cannot be published: " + exc.message, **errors},
                        status_code=422)
    record_for(session, principal, request, "form.publish", target_type="form", target_id=form.id, details={"version": form.version})
    session.commit()
    return RedirectResponse(f"/app/forms/{form.id}?published=1", status_code=303)


@router.post("/forms/{form_id}/unpublish")
def form_unpublish(form_id: str, request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.get_form(session, form_id)
    service.unpublish(session, form)
    record_for(session, principal, request, "form.unpublish", target_type="form", target_id=form.id, details={})
    session.commit()
    return RedirectResponse(f"/app/forms/{form.id}?unpublished=1", status_code=303)


@router.post("/forms/{form_id}/delete")
def form_delete(form_id: str, request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.get_form(session, form_id)
    try:
        service.delete_form(session, form)
    except CarePostError as exc:
        session.rollback()
        form = service.get_form(session, form_id)
        return _builder(request, principal, form=form, errors={"_form": exc.message}, status_code=exc.status_code)
    record_for(session, principal, request, "form.delete", target_type="form", target_id=form_id, details={})
    session.commit()
    return RedirectResponse("/app/forms?deleted=1", status_code=303)


@router.get("/forms/{form_id}/preview")
def form_preview(form_id: str, request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    from carepost.forms.hosted import render_form

    session = request.state.db
    form = service.get_form(session, form_id)
    response = render_form(session, form, preview=True)
    session.commit()
    return response


# --------------------------------------------------------------------------- routes: submissions and results


@router.get("/forms/{form_id}/submissions")
def submissions_page(form_id: str, request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE, P.PHI_READ_MASKED))):
    session = request.state.db
    form = service.get_form(session, form_id)
    status = request.query_params.get("status") or None
    if status not in (None, "received", "pending_confirmation", "confirmed", "expired"):
        status = None
    cursor = request.query_params.get("cursor") or None
    error = None
    try:
        rows, next_cursor = service.list_submissions(session, form, status=status, before=cursor, limit=50)
    except CarePostError as exc:
        rows, next_cursor, error = [], None, exc.message
    unmasked = masking.wants_unmasked(principal)
    subs = [service.submission_dict(session, form, s, unmasked=unmasked) for s in rows]
    record_for(session, principal, request, "form.submission.list", target_type="form", target_id=form.id,
               details={"view": "unmasked" if unmasked else "masked", "count": len(subs), "submission_ids": [s["id"] for s in subs]})
    session.commit()
    from carepost.portal.mailer import can_send_notices

    return render(request, "forms/submissions.html", {"form": form, "subs": subs, "next_cursor": next_cursor, "status": status,
                                                      "unmasked": unmasked, "error": error,
                                                      "cannot_send": not can_send_notices(session, form.org_id),
                                                      "columns": [f for f in form.fields if f["type"] != "authorization"][:4]})


@router.get("/forms/{form_id}/submissions/{submission_id}")
def submission_page(form_id: str, submission_id: str, request: Request,
                    principal: Principal = Depends(require(P.FORMS_MANAGE, P.PHI_READ_MASKED))):
    session = request.state.db
    form = service.get_form(session, form_id)
    sub = service.get_submission(session, form, submission_id)
    unmasked = masking.wants_unmasked(principal)
    data = service.submission_dict(session, form, sub, unmasked=unmasked)
    record_for(session, principal, request, "form.submission.read", target_type="form_submission", target_id=sub.id,
               details={"form_id": form.id, "view": "unmasked" if unmasked else "masked"})
    session.commit()
    labels = {f["key"]: f for f in form.fields}
    return render(request, "forms/submission.html", {"form": form, "sub": data, "fields": labels, "unmasked": unmasked})


@router.get("/forms/{form_id}/submissions/{submission_id}/signature.png")
def submission_signature(form_id: str, submission_id: str, request: Request,
                         principal: Principal = Depends(require(P.FORMS_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    form = service.get_form(session, form_id)
    sub = service.get_submission(session, form, submission_id)
    png = service.signature_png(session, sub)
    if png is None:
        raise NotFound("This submission has no drawn signature.", field="submission_id")
    record_for(session, principal, request, "form.submission.signature.read", target_type="form_submission", target_id=sub.id,
               details={"form_id": form.id})
    session.commit()
    return Response(png, media_type="image/png")


@router.get("/forms/{form_id}/results")
def results_page(form_id: str, request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.get_form(session, form_id)
    return render(request, "forms/results.html", {"form": form, "results": service.survey_results(session, form)})
