"""Organization branding: the staff settings page (``/app/branding``), its REST API
(``/api/v1/organization/branding``) and the public assets patient pages load
(``/b/<org_id>/brand.css``, ``/b/<org_id>/logo``). See :mod:`carepost.accounts.branding`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from carepost.accounts import branding, ports
from carepost.accounts.access import Principal, db_session, public, require
from carepost.accounts.permissions import Permission as P
from carepost.core.errors import CarePostError, NotFound, ValidationFailed
from carepost.web.rendering import render

router = APIRouter()

ASSET_WHY = "patient-facing pages (unsubscribe, preferences, portal, forms) load the organization's colours and logo"
# Versioned URLs (?v=) change whenever the branding does, so a day of caching is safe.
ASSET_CACHE = "public, max-age=86400"


# --------------------------------------------------------------------------- public assets

@router.get("/b/{org_id}/brand.css", include_in_schema=False)
def brand_css(request: Request, org_id: str, session: Session = Depends(db_session), _=Depends(public(ASSET_WHY))):
    row = branding.get_branding(session, org_id[:32])
    body = branding.stylesheet(row)
    etag = f'"{row.version}"' if row is not None else '"0"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": ASSET_CACHE})
    return Response(body, media_type="text/css; charset=utf-8", headers={"ETag": etag, "Cache-Control": ASSET_CACHE})


@router.get("/b/{org_id}/logo", include_in_schema=False)
def brand_logo(request: Request, org_id: str, session: Session = Depends(db_session), _=Depends(public(ASSET_WHY))):
    row = branding.get_branding(session, org_id[:32])
    if row is None or row.logo is None or row.logo_type not in ("image/png", "image/jpeg"):
        raise NotFound("This organization has no logo.")
    etag = f'"{row.version}"'
    headers = {"ETag": etag, "Cache-Control": ASSET_CACHE, "X-Content-Type-Options": "nosniff",
               "Content-Disposition": "inline"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(bytes(row.logo), media_type=row.logo_type, headers=headers)


# --------------------------------------------------------------------------- REST API

class BrandingOut(BaseModel):
    display_name: str = Field(description="Shown to patients instead of the organization's name; empty: the organization's name")
    shown_name: str = Field(description="The name patient pages show")
    primary_color: str | None = Field(description="#rrggbb: buttons, links, headings; null: CarePost's default")
    accent_color: str | None = Field(description="#rrggbb: the band above patient pages; null: the primary colour")
    logo_url: str | None = Field(description="Where patient pages load the logo from; null: no logo")
    logo_type: str | None
    logo_bytes: int


# What branding.parse_colour accepts: #rrggbb (either case), or empty for the default.
COLOUR_PATTERN = r"^\s*(#[0-9A-Fa-f]{6})?\s*$"


class BrandingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    display_name: str = Field("", max_length=200)
    primary_color: str | None = Field(None, max_length=7, pattern=COLOUR_PATTERN, description="#rrggbb, or null for the default")
    accent_color: str | None = Field(None, max_length=7, pattern=COLOUR_PATTERN, description="#rrggbb, or null for the default")


@router.get("/api/v1/organization/branding", response_model=BrandingOut, tags=["organization"],
            summary="The organization's branding on patient-facing pages")
def api_get_branding(request: Request, principal: Principal = Depends(require(P.ORG_MANAGE))):
    return branding.branding_dict(request.state.db, principal.org_id)


@router.put("/api/v1/organization/branding", response_model=BrandingOut, tags=["organization"],
            summary="Set the display name and colours patient pages use")
def api_set_branding(request: Request, body: BrandingIn, principal: Principal = Depends(require(P.ORG_MANAGE))):
    session = request.state.db
    _, changed = branding.set_branding(session, principal.org_id, display_name=body.display_name,
                                       primary_color=body.primary_color, accent_color=body.accent_color)
    ports.record_for(session, principal, request, "organization.branding.update", target_type="organization",
                     target_id=principal.org_id, details={"changed": changed, "via": "api"})
    session.commit()
    return branding.branding_dict(session, principal.org_id)


@router.put("/api/v1/organization/branding/logo", response_model=BrandingOut, tags=["organization"],
            summary="Upload the logo (the request body is the PNG or JPEG file, at most 200 KB)",
            openapi_extra={"requestBody": {"required": True, "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
async def api_set_logo(request: Request, principal: Principal = Depends(require(P.ORG_MANAGE))):
    data = await _read_limited(request)
    return await _save_logo(request, principal, data, via="api")


@router.delete("/api/v1/organization/branding/logo", response_model=BrandingOut, tags=["organization"],
               summary="Remove the logo")
def api_remove_logo(request: Request, principal: Principal = Depends(require(P.ORG_MANAGE))):
    session = request.state.db
    branding.remove_logo(session, principal.org_id)
    ports.record_for(session, principal, request, "organization.branding.logo_remove", target_type="organization",
                     target_id=principal.org_id, details={"via": "api"})
    session.commit()
    return branding.branding_dict(session, principal.org_id)


async def _read_limited(request: Request) -> bytes:
    """The body, refused as soon as it passes the limit (a huge upload is never held whole)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > branding.MAX_LOGO_BYTES:
            raise ValidationFailed(f"The logo is larger than {branding.MAX_LOGO_BYTES // 1024} KB; choose a smaller image.",
                                   field="logo")
        chunks.append(chunk)
    return b"".join(chunks)


async def _save_logo(request: Request, principal: Principal, data: bytes, via: str) -> dict:
    from starlette.concurrency import run_in_threadpool

    def work() -> dict:
        session = request.state.db
        row = branding.set_logo(session, principal.org_id, data)
        ports.record_for(session, principal, request, "organization.branding.logo_update", target_type="organization",
                         target_id=principal.org_id, details={"type": row.logo_type, "bytes": len(data), "via": via})
        session.commit()
        return branding.branding_dict(session, principal.org_id)

    return await run_in_threadpool(work)


# --------------------------------------------------------------------------- staff page

def _page(request: Request, values: dict, *, error: str | None = None, field: str | None = None, status: int = 200):
    return render(request, "accounts/branding.html", {
        "b": values, "error": error, "field": field, "saved": request.query_params.get("saved") == "1",
        "max_kb": branding.MAX_LOGO_BYTES // 1024,
    }, status_code=status)


@router.get("/app/branding", include_in_schema=False)
def branding_page(request: Request, principal: Principal = Depends(require(P.ORG_MANAGE))):
    return _page(request, branding.branding_dict(request.state.db, principal.org_id))


@router.post("/app/branding", include_in_schema=False)
async def branding_save(request: Request, principal: Principal = Depends(require(P.ORG_MANAGE))):
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    form = await request.form(max_files=1, max_fields=20)
    text = {k: v for k, v in form.items() if isinstance(v, str)}
    upload = form.get("logo")
    logo: bytes | None = None
    if isinstance(upload, UploadFile) and upload.filename:
        logo = await upload.read(branding.MAX_LOGO_BYTES + 1)
    submitted = {"display_name": text.get("display_name", "")[:200], "primary_color": text.get("primary_color", "")[:7],
                 "accent_color": text.get("accent_color", "")[:7]}

    def work():
        session = request.state.db
        try:
            _, changed = branding.set_branding(session, principal.org_id, display_name=submitted["display_name"],
                                               primary_color=submitted["primary_color"],
                                               accent_color=submitted["accent_color"])
            if logo is not None:
                branding.set_logo(session, principal.org_id, logo)
                changed.append("logo")
            elif text.get("remove_logo") == "on":
                branding.remove_logo(session, principal.org_id)
                changed.append("logo")
        except CarePostError as exc:
            session.rollback()
            values = {**branding.branding_dict(session, principal.org_id), **submitted}
            return _page(request, values, error=exc.message, field=exc.field, status=422)
        ports.record_for(session, principal, request, "organization.branding.update", target_type="organization",
                         target_id=principal.org_id, details={"changed": changed, "via": "ui"})
        session.commit()
        return RedirectResponse("/app/branding?saved=1", status_code=303)

    return await run_in_threadpool(work)

