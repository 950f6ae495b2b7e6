"""REST routes of message templates.

* Writing (create, replace, delete) needs ``templates:manage``; each change is audited.
* Reading and previewing need ``templates:manage`` or ``messages:send`` (a sending application
  must see which variables a template expects). Templates hold placeholders, not PHI.
* Preview renders with the data in the request and stores nothing; the data is not audited
  (it is the caller's own input, not stored PHI) and never echoed in errors.
* Preview **as a contact** binds the merge-field helpers to that contact's stored data: an access
  to PHI, audited (``template.preview``, the contact as target); without ``phi:read_unmasked``
  every merge value is masked.
* Versions are immutable; ``/versions`` lists them and ``/diff`` compares two.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record, record_for
from carepost.accounts.access import request_context
from carepost.content import service
from carepost.content.schemas import PreviewIn, RenderedOut, TemplateIn, TemplateOut, VersionSummary
from carepost.core.errors import PermissionDenied

router = APIRouter(prefix="/api/v1", tags=["templates"])

READ_ANY = (P.TEMPLATES_MANAGE, P.MESSAGES_SEND)
MAX_VERSION = 1_000_000


def _deny(request: Request, principal: Principal) -> None:
    session = request.state.db
    record(session, org_id=principal.org_id, actor_type=principal.kind, actor_id=principal.actor_id,
           on_behalf_of=principal.on_behalf_of, action="access.denied", target_type="route",
           target_id=request.scope["route"].path if request.scope.get("route") else None, outcome="denied",
           details={"reason": "missing:" + "|".join(READ_ANY), "needed": list(READ_ANY), "method": request.method},
           **request_context(request))
    session.commit()


async def can_read_templates(request: Request, principal: Principal = Depends(require())) -> Principal:
    """``templates:manage`` or ``messages:send`` (``require`` takes all-of, this is any-of)."""
    if not any(principal.can(p) for p in READ_ANY):
        await run_in_threadpool(_deny, request, principal)
        raise PermissionDenied("You do not have permission to do this.")
    return principal


def _audit(request: Request, principal: Principal, action: str, template, **details) -> None:
    record_for(request.state.db, principal, request, action, target_type="message_template",
               target_id=template.id, details={"version": template.version, **details})


def _out(template, session=None) -> dict:
    version = service.current_version(session, template) if session is not None else None
    return TemplateOut(**service.template_dict(template, version)).model_dump(mode="json")


@router.post("/templates", status_code=201, response_model=TemplateOut, summary="Create a message template")
def create_template(request: Request, body: TemplateIn, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    session = request.state.db
    template = service.create_template(session, principal.org_id, body, created_by=principal.actor_id)
    _audit(request, principal, "template.create", template)
    out = _out(template, session)
    session.commit()
    return JSONResponse(out, status_code=201)


@router.get("/templates", summary="List message templates")
def list_templates(request: Request, principal: Principal = Depends(can_read_templates)) -> dict:
    session = request.state.db
    return {"data": [_out(t, session) for t in service.list_templates(session, principal.org_id)]}


@router.get("/templates/{template_id}", response_model=TemplateOut, summary="Read a message template")
def read_template(request: Request, template_id: str, principal: Principal = Depends(can_read_templates)):
    session = request.state.db
    return _out(service.get_template(session, principal.org_id, template_id), session)


@router.put("/templates/{template_id}", response_model=TemplateOut, summary="Replace a message template (a new version when it changes)")
def update_template(request: Request, template_id: str, body: TemplateIn,
                    principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    session = request.state.db
    template = service.get_template(session, principal.org_id, template_id)
    before = template.version
    service.update_template(session, template, body, created_by=principal.actor_id)
    if template.version != before:
        _audit(request, principal, "template.update", template, previous_version=before)
    out = _out(template, session)
    session.commit()
    return out


@router.delete("/templates/{template_id}", status_code=204, summary="Delete a message template")
def delete_template(request: Request, template_id: str, principal: Principal = Depends(require(P.TEMPLATES_MANAGE))):
    session = request.state.db
    template = service.get_template(session, principal.org_id, template_id)
    _audit(request, principal, "template.delete", template, name=template.name)
    service.delete_template(session, template)
    session.commit()
    return Response(status_code=204)


@router.get("/templates/{template_id}/versions", summary="List a template's versions (newest first)")
def list_versions(request: Request, template_id: str, principal: Principal = Depends(can_read_templates)) -> dict:
    session = request.state.db
    template = service.get_template(session, principal.org_id, template_id)
    return {"data": [VersionSummary(**service.version_summary(v)).model_dump(mode="json")
                     for v in service.list_versions(session, template)]}


@router.get("/templates/{template_id}/versions/{version}", response_model=TemplateOut,
            summary="Read one version of a template")
def read_version(request: Request, template_id: str, version: int = Path(ge=1, le=MAX_VERSION), principal: Principal = Depends(can_read_templates)):
    session = request.state.db
    template = service.get_template(session, principal.org_id, template_id)
    found = service.get_version(session, template, version)
    return TemplateOut(**service.template_dict(template, found)).model_dump(mode="json")


@router.get("/templates/{template_id}/diff", summary="Unified diff of two versions, part by part")
def diff_versions(request: Request, template_id: str, principal: Principal = Depends(can_read_templates),
                  from_version: int = Query(alias="from", ge=1, le=MAX_VERSION), to_version: int = Query(alias="to", ge=1, le=MAX_VERSION)) -> dict:
    session = request.state.db
    template = service.get_template(session, principal.org_id, template_id)
    return service.diff_versions(service.get_version(session, template, from_version, "from"),
                                 service.get_version(session, template, to_version, "to"))


@router.get("/template-helpers", summary="Merge-field helpers and the PHI category each reveals")
def list_helpers(request: Request, principal: Principal = Depends(can_read_templates)) -> dict:
    from carepost.content import helpers

    return {"data": helpers.catalog(), "categories": helpers.CATEGORIES,
            "purposes": {k: list(v) for k, v in helpers.PURPOSE_CATEGORIES.items()}}


@router.post("/templates/{template_id}/preview", response_model=RenderedOut, summary="Render a template with data or as a contact (nothing is stored)")
def preview_template(request: Request, template_id: str, body: PreviewIn,
                     principal: Principal = Depends(can_read_templates)):
    session = request.state.db
    out = service.preview(session, principal, template_id, body, context=request_context(request))
    session.commit()  # the audit event of a preview as a contact
    return out
