"""Web UI of message templates: list, edit (every save is a new version), versions, diff, preview.

The preview shows the rendered message in two sandboxed ``<iframe srcdoc>`` frames (desktop
600 px and phone 375 px wide): no script runs in them and they cannot reach the page. The page
gets its own Content-Security-Policy allowing inline styles (message HTML is styled inline) and
nothing from another host. Previewing as a contact is audited and masked exactly as the API
(``service.preview``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from carepost.accounts.access import Principal, request_context, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.content import helpers, service
from carepost.content.schemas import PreviewIn, TemplateIn
from carepost.core.errors import CarePostError
from carepost.core.purposes import PURPOSES
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

PREVIEW_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "font-src 'self'; connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'none'; "
               "base-uri 'none'; object-src 'none'")
FORM_FIELDS = ("name", "subject", "preheader", "purpose", "source_format", "html", "mjml", "text", "from_name",
               "portal_notice", "language", "es_subject", "es_preheader", "es_html", "es_mjml", "es_text")


def _form_values(template, version) -> dict:
    if template is None:
        return {"purpose": "treatment", "source_format": "html", "language": "en"}
    values = service.template_dict(template, version)
    es = (values.get("variants") or {}).get("es", {})
    for part in ("subject", "preheader", "html", "mjml", "text"):
        values[f"es_{part}"] = es.get(part, "")
    if values.get("source_format") == "mjml":
        values["html"] = ""
    return values


def _body(form: dict, contains_phi: bool) -> TemplateIn:
    variants = {}
    es = {part: form.get(f"es_{part}", "") for part in ("subject", "preheader", "html", "mjml", "text")}
    if any(v.strip() for v in es.values()):
        variants["es"] = es
    fmt = form.get("source_format") or "html"
    return TemplateIn(name=form.get("name", ""), subject=form.get("subject", ""), preheader=form.get("preheader", ""),
                      html="" if fmt == "mjml" else form.get("html", ""), text=form.get("text", ""),
                      mjml=form.get("mjml", "") if fmt == "mjml" else "", source_format=fmt,
                      purpose=form.get("purpose") or None, from_name=form.get("from_name", ""),
                      portal_notice=form.get("portal_notice", ""), language=form.get("language") or "en",
                      variants=variants, contains_phi=contains_phi)


def _edit_page(request, principal, template, version, form, error=None, status=200):
    ctx = {"template": template, "version": version, "form": form, "error": error, "purposes": PURPOSES,
           "helpers": helpers.catalog(), "can_manage": principal.can(P.TEMPLATES_MANAGE),
           "versions": [service.version_summary(v) for v in service.list_versions(request.state.db, template)]
           if template is not None else []}
    return render(request, "content/edit.html", ctx, status_code=status)


@router.get("/templates")
def template_list(request: Request, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    session = request.state.db
    rows = [service.template_dict(t, service.current_version(session, t))
            for t in service.list_templates(session, principal.org_id)]
    return render(request, "content/list.html", {"templates": rows})


@router.get("/templates/new")
def template_new(request: Request, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    return _edit_page(request, principal, None, None, _form_values(None, None))


def _error(exc) -> dict:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return {"field": ".".join(str(p) for p in first["loc"]), "message": first["msg"]}
    return {"field": exc.field, "message": exc.message}


async def _save(request: Request, principal: Principal, template_id: str | None):
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}

    def work():
        session = request.state.db
        template = service.get_template(session, principal.org_id, template_id) if template_id else None
        try:
            body = _body(form, template.contains_phi if template is not None else True)
            if template is None:
                template = service.create_template(session, principal.org_id, body, created_by=principal.actor_id)
                record_for(session, principal, request, "template.create", target_type="message_template",
                           target_id=template.id, details={"version": template.version})
            else:
                before = template.version
                service.update_template(session, template, body, created_by=principal.actor_id)
                if template.version != before:
                    record_for(session, principal, request, "template.update", target_type="message_template",
                               target_id=template.id, details={"version": template.version, "previous_version": before})
        except (CarePostError, ValidationError) as exc:
            session.rollback()
            template = service.get_template(session, principal.org_id, template_id) if template_id else None
            version = service.current_version(session, template) if template is not None else None
            return _edit_page(request, principal, template, version, form, _error(exc), status=422)
        session.commit()
        return RedirectResponse(f"/app/templates/{template.id}", status_code=303)

    return await run_in_threadpool(work)


@router.post("/templates/new")
async def template_create(request: Request, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    return await _save(request, principal, None)


@router.get("/templates/{template_id}")
def template_edit(request: Request, template_id: str, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    session = request.state.db
    template = service.get_template(session, principal.org_id, template_id)
    version = service.current_version(session, template)
    return _edit_page(request, principal, template, version, _form_values(template, version))


@router.post("/templates/{template_id}")
async def template_save(request: Request, template_id: str, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    return await _save(request, principal, template_id)


@router.get("/templates/{template_id}/diff")
def template_diff(request: Request, template_id: str, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    session = request.state.db
    template = service.get_template(session, principal.org_id, template_id)
    versions = service.list_versions(session, template)
    newest = versions[0].version if versions else 1
    try:
        a = int(request.query_params.get("from") or max(1, newest - 1))
        b = int(request.query_params.get("to") or newest)
    except ValueError:
        a, b = max(1, newest - 1), newest
    diff = service.diff_versions(service.get_version(session, template, a, "from"),
                                 service.get_version(session, template, b, "to"))
    return render(request, "content/diff.html", {"template": template, "diff": diff,
                                                 "versions": [v.version for v in versions]})


@router.get("/templates/{template_id}/preview")
def template_preview(request: Request, template_id: str, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    session = request.state.db
    template = service.get_template(session, principal.org_id, template_id)
    q = request.query_params
    error, rendered = None, None
    try:
        number = int(q["version"]) if q.get("version") else None
        if q.get("contact_id"):
            body = PreviewIn(contact_id=q["contact_id"], version=number, language=q.get("language") or None)
            rendered = service.preview(session, principal, template_id, body, context=request_context(request))
            session.commit()
        else:  # every helper shown by its name, every dynamic block shown
            version = service.version_for(session, template, number)
            if q.get("language"):
                helpers.check_language(q["language"], "language")
            rendered = service.render_version(version, helpers.placeholders(service.needs_of(version)),
                                              language=q.get("language") or None,
                                              visible_blocks=service.version_blocks(version).keys()).as_dict()
    except (CarePostError, ValidationError, ValueError) as exc:
        session.rollback()
        error = _error(exc) if not isinstance(exc, ValueError) else {"field": "version", "message": "Not a number."}
    response = render(request, "content/preview.html", {"template": template, "rendered": rendered, "error": error,
                                                        "query": dict(q)}, status_code=422 if error else 200)
    response.headers["Content-Security-Policy"] = PREVIEW_CSP
    return response
