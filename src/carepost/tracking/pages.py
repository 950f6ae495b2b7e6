"""UI routes of outbound webhooks: the endpoint list with the create form (the secret shown once),
an endpoint's page with its delivery log, replay, test event, pause/resume, secret rotation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission
from carepost.audit.service import record_for
from carepost.core import clock
from carepost.core.errors import CarePostError
from carepost.tracking import service
from carepost.tracking.schemas import delivery_out, endpoint_out
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)
MANAGE = Permission.WEBHOOKS_MANAGE


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _event_choices() -> list[dict]:
    return [{"type": t, "description": d} for t, d in sorted(service.EVENT_TYPES.items()) if t != service.TEST_EVENT]


def _list_page(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
               created=None, created_secret: str | None = None, status_code: int = 200):
    session = request.state.db
    return render(request, "tracking/webhooks.html", {
        "endpoints": [endpoint_out(r) for r in service.list_endpoints(session, principal.org_id)],
        "event_choices": _event_choices(), "can_phi": principal.can(Permission.PHI_READ_UNMASKED),
        "errors": errors or {}, "form": form or {"event_types": []}, "created": created, "created_secret": created_secret,
    }, status_code=status_code)


@router.get("/webhooks")
def webhooks_page(request: Request, principal: Principal = Depends(require(MANAGE))):
    return _list_page(request, principal)


@router.post("/webhooks")
def webhooks_create(request: Request, url: str = Form(""), description: str = Form(""),
                    event_types: list[str] = Form([]), include_phi: str = Form(""),
                    principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    form = {"url": url[:2000], "description": description[:200], "event_types": event_types[:100],
            "include_phi": bool(include_phi)}
    try:
        row, secret = service.create_endpoint(
            session, principal.org_id, url=form["url"], event_types=form["event_types"], description=form["description"],
            include_phi=form["include_phi"], allow_phi=principal.can(Permission.PHI_READ_UNMASKED),
            created_by=principal.actor_id,
        )
        record_for(session, principal, request, "webhook.create", target_type="webhook_endpoint", target_id=row.id,
                   details={"event_types": row.event_types, "include_phi": row.include_phi})
    except CarePostError as exc:
        session.rollback()
        return _list_page(request, principal, errors={exc.field or "form": exc.message}, form=form,
                          status_code=exc.status_code)
    session.commit()
    # The secret is rendered into this response only (Cache-Control: no-store), never into a URL.
    return _list_page(request, principal, created=endpoint_out(row), created_secret=secret)


def _detail_page(request: Request, principal: Principal, endpoint_id: str, *, secret: str | None = None,
                 errors: dict | None = None, status_code: int = 200):
    session = request.state.db
    row = service.get_endpoint(session, principal.org_id, endpoint_id)
    views = service.list_deliveries(session, principal.org_id, row.id, limit=100)
    return render(request, "tracking/webhook.html", {
        "endpoint": endpoint_out(row), "deliveries": [delivery_out(v.delivery, v.event_type, v.attempts) for v in views],
        "secret": secret, "errors": errors or {}, "now": clock.now(),
    }, status_code=status_code)


@router.get("/webhooks/{endpoint_id}")
def webhook_page(endpoint_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    return _detail_page(request, principal, endpoint_id)


@router.post("/webhooks/{endpoint_id}/enabled")
def webhook_enable(endpoint_id: str, request: Request, enabled: str = Form(""),
                   principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    row = service.get_endpoint(session, principal.org_id, endpoint_id)
    if service.update_endpoint(session, row, enabled=enabled == "true"):
        record_for(session, principal, request, "webhook.update", target_type="webhook_endpoint", target_id=row.id,
                   details={"changed": ["enabled"], "enabled": row.enabled})
    session.commit()
    return _see_other(f"/app/webhooks/{row.id}")


@router.post("/webhooks/{endpoint_id}/rotate-secret")
def webhook_rotate(endpoint_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    row = service.get_endpoint(session, principal.org_id, endpoint_id)
    secret = service.rotate_secret(session, row)
    record_for(session, principal, request, "webhook.rotate_secret", target_type="webhook_endpoint", target_id=row.id)
    session.commit()
    return _detail_page(request, principal, row.id, secret=secret)


@router.post("/webhooks/{endpoint_id}/test-event")
def webhook_test(endpoint_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    try:
        delivery = service.send_test_event(session, principal.org_id, endpoint_id)
    except CarePostError as exc:
        session.rollback()
        if exc.status_code == 404:
            raise
        return _detail_page(request, principal, endpoint_id, errors={"form": exc.message}, status_code=exc.status_code)
    record_for(session, principal, request, "webhook.test_event", target_type="webhook_endpoint", target_id=endpoint_id,
               details={"delivery_id": delivery.id})
    session.commit()
    return _see_other(f"/app/webhooks/{endpoint_id}")


@router.post("/webhooks/{endpoint_id}/deliveries/{delivery_id}/replay")
def webhook_replay(endpoint_id: str, delivery_id: str, request: Request,
                   principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    try:
        row = service.replay(session, principal.org_id, endpoint_id, delivery_id)
    except CarePostError as exc:
        session.rollback()
        if exc.status_code == 404:
            raise
        return _detail_page(request, principal, endpoint_id, errors={"form": exc.message}, status_code=exc.status_code)
    record_for(session, principal, request, "webhook.replay", target_type="webhook_endpoint", target_id=endpoint_id,
               details={"delivery_id": delivery_id, "new_delivery_id": row.id})
    session.commit()
    return _see_other(f"/app/webhooks/{endpoint_id}")


@router.post("/webhooks/{endpoint_id}/delete")
def webhook_delete(endpoint_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    row = service.get_endpoint(session, principal.org_id, endpoint_id)
    service.delete_endpoint(session, row)
    record_for(session, principal, request, "webhook.delete", target_type="webhook_endpoint", target_id=endpoint_id)
    session.commit()
    return _see_other("/app/webhooks")


# --------------------------------------------------------------------------- deliverability (issue 13 item 7)


@router.get("/deliverability")
def deliverability_page(request: Request, principal: Principal = Depends(require(Permission.ANALYTICS_READ))):
    """Rates per receiving provider against the Gmail/Yahoo levels, open and past alerts, DMARC
    aggregate reports per sending source and SMTP TLS reports, over 7 or 30 days."""
    from datetime import datetime as _dt

    from carepost.tracking import deliverability, feedback

    session = request.state.db
    days = 30 if request.query_params.get("days") == "30" else 7
    view = deliverability.by_provider(session, principal.org_id, days)
    alerts = [deliverability.alert_out(a) for a in deliverability.list_alerts(session, principal.org_id, limit=50)]
    return render(request, "tracking/deliverability.html", {
        "view": view, "days": days, "windows": deliverability.WINDOWS,
        "active_alerts": [a for a in alerts if a["active"]], "past_alerts": [a for a in alerts if not a["active"]],
        "dmarc_sources": feedback.dmarc_sources(session, principal.org_id, since=_dt.fromisoformat(view["since"])),
        "tls": deliverability.tls_summary(session, principal.org_id, days),
    })
