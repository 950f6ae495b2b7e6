"""REST routes of outbound webhooks (``webhooks:manage``): endpoints, their delivery log, replay
and test events. Every change is audited; secrets appear only in the answer that creates them.
Deliverability feedback (``analytics:read``): DMARC aggregate reports per sending source and SMTP
TLS reports, as received by the return path (:mod:`carepost.tracking.feedback`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission
from carepost.audit.service import record_for
from carepost.tracking import feedback, service
from carepost.tracking.schemas import (
    DeliveryOut,
    EventTypeOut,
    SecretOut,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookPatch,
    delivery_out,
    endpoint_out,
)

router = APIRouter(prefix="/api/v1", tags=["webhooks"])
MANAGE = Permission.WEBHOOKS_MANAGE


def _may_receive_phi(principal: Principal) -> bool:
    return principal.can(Permission.PHI_READ_UNMASKED)


@router.get("/webhook-event-types", response_model=list[EventTypeOut], summary="Event types an endpoint can receive")
def api_event_types(principal: Principal = Depends(require(MANAGE))):
    return [{"type": t, "description": d} for t, d in sorted(service.EVENT_TYPES.items())]


@router.get("/webhooks", response_model=list[WebhookOut], summary="Webhook endpoints")
def api_list_webhooks(request: Request, principal: Principal = Depends(require(MANAGE))):
    return [endpoint_out(r) for r in service.list_endpoints(request.state.db, principal.org_id)]


@router.post("/webhooks", response_model=WebhookCreated, status_code=201, summary="Add a webhook endpoint")
def api_create_webhook(body: WebhookCreate, request: Request, principal: Principal = Depends(require(MANAGE))):
    """The answer holds the signing secret; it is never shown again (rotate it to get a new one)."""
    session = request.state.db
    row, secret = service.create_endpoint(
        session, principal.org_id, url=body.url, event_types=body.event_types, description=body.description,
        include_phi=body.include_phi, allow_phi=_may_receive_phi(principal), created_by=principal.actor_id,
    )
    record_for(session, principal, request, "webhook.create", target_type="webhook_endpoint", target_id=row.id,
               details={"event_types": row.event_types, "include_phi": row.include_phi})
    session.commit()
    return JSONResponse(WebhookCreated(**endpoint_out(row), secret=secret).model_dump(mode="json"), status_code=201)


@router.get("/webhooks/{endpoint_id}", response_model=WebhookOut, summary="One webhook endpoint")
def api_get_webhook(endpoint_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    return endpoint_out(service.get_endpoint(request.state.db, principal.org_id, endpoint_id))


@router.patch("/webhooks/{endpoint_id}", response_model=WebhookOut, summary="Change a webhook endpoint")
def api_update_webhook(endpoint_id: str, body: WebhookPatch, request: Request,
                       principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    row = service.get_endpoint(session, principal.org_id, endpoint_id)
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    changed = service.update_endpoint(session, row, allow_phi=_may_receive_phi(principal), **changes)
    if changed:
        record_for(session, principal, request, "webhook.update", target_type="webhook_endpoint", target_id=row.id,
                   details={"changed": changed, "enabled": row.enabled, "include_phi": row.include_phi})
    session.commit()
    return endpoint_out(row)


@router.delete("/webhooks/{endpoint_id}", status_code=204, summary="Delete a webhook endpoint and its delivery log")
def api_delete_webhook(endpoint_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    row = service.get_endpoint(session, principal.org_id, endpoint_id)
    service.delete_endpoint(session, row)
    record_for(session, principal, request, "webhook.delete", target_type="webhook_endpoint", target_id=endpoint_id)
    session.commit()
    return Response(status_code=204)


@router.post("/webhooks/{endpoint_id}/rotate-secret", response_model=SecretOut, summary="Replace the signing secret")
def api_rotate_secret(endpoint_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    row = service.get_endpoint(session, principal.org_id, endpoint_id)
    secret = service.rotate_secret(session, row)
    record_for(session, principal, request, "webhook.rotate_secret", target_type="webhook_endpoint", target_id=row.id)
    session.commit()
    return {"secret": secret}


@router.get("/webhooks/{endpoint_id}/deliveries", response_model=list[DeliveryOut],
            summary="The endpoint's delivery log, newest first (attempts, status codes, durations)")
def api_deliveries(endpoint_id: str, request: Request,
                   status: Literal["pending", "succeeded", "failed", "cancelled"] | None = Query(None),
                   limit: int = Query(50, ge=1, le=200), principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    service.get_endpoint(session, principal.org_id, endpoint_id)
    views = service.list_deliveries(session, principal.org_id, endpoint_id, limit=limit, status=status)
    return [delivery_out(v.delivery, v.event_type, v.attempts) for v in views]


@router.post("/webhooks/{endpoint_id}/deliveries/{delivery_id}/replay", response_model=DeliveryOut, status_code=202,
             summary="Send an event again (a new delivery with the same webhook-id)")
def api_replay(endpoint_id: str, delivery_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    row = service.replay(session, principal.org_id, endpoint_id, delivery_id)
    event_type = _event_type(session, row.event_id)
    record_for(session, principal, request, "webhook.replay", target_type="webhook_endpoint", target_id=endpoint_id,
               details={"delivery_id": delivery_id, "new_delivery_id": row.id})
    session.commit()
    return JSONResponse(DeliveryOut(**delivery_out(row, event_type)).model_dump(mode="json"), status_code=202)


@router.post("/webhooks/{endpoint_id}/test-event", response_model=DeliveryOut, status_code=202,
             summary="Send a webhook.test event to this endpoint")
def api_test_event(endpoint_id: str, request: Request, principal: Principal = Depends(require(MANAGE))):
    session = request.state.db
    row = service.send_test_event(session, principal.org_id, endpoint_id)
    record_for(session, principal, request, "webhook.test_event", target_type="webhook_endpoint", target_id=endpoint_id,
               details={"delivery_id": row.id})
    session.commit()
    return JSONResponse(DeliveryOut(**delivery_out(row, service.TEST_EVENT)).model_dump(mode="json"), status_code=202)


def _event_type(session, event_id: str) -> str:
    from carepost.tracking.models import WebhookEvent

    return session.get(WebhookEvent, event_id).type


# --------------------------------------------------------------------------- deliverability feedback


@router.get("/deliverability/dmarc/sources", tags=["deliverability"],
            summary="DMARC aggregate reports per sending source: messages, DMARC pass, aligned DKIM and SPF, dispositions")
def api_dmarc_sources(request: Request, domain: str | None = Query(None, max_length=253, pattern=r"^[A-Za-z0-9.\-]+$"),
                      since: datetime | None = Query(None), until: datetime | None = Query(None),
                      principal: Principal = Depends(require(Permission.ANALYTICS_READ))) -> dict:
    return {"data": feedback.dmarc_sources(request.state.db, principal.org_id, domain=domain, since=since, until=until)}


@router.get("/deliverability/dmarc/reports", tags=["deliverability"], summary="DMARC aggregate reports received, newest first")
def api_dmarc_reports(request: Request, limit: int = Query(100, ge=1, le=1000),
                      principal: Principal = Depends(require(Permission.ANALYTICS_READ))) -> dict:
    return {"data": feedback.dmarc_reports(request.state.db, principal.org_id, limit)}


@router.get("/deliverability/tls-reports", tags=["deliverability"],
            summary="SMTP TLS reports (RFC 8460) received, newest first: sessions to the return-path host by policy")
def api_tls_reports(request: Request, limit: int = Query(100, ge=1, le=1000),
                    principal: Principal = Depends(require(Permission.ANALYTICS_READ))) -> dict:
    return {"data": feedback.tls_reports(request.state.db, principal.org_id, limit)}


@router.get("/deliverability/domains", tags=["deliverability"],
            summary="Per receiving provider (gmail.com, yahoo.com, outlook.com, ..., other): delivery, deferral, bounce "
                    "and complaint rates over 7 or 30 days, judged against the Gmail/Yahoo bulk-sender levels")
def api_deliverability_domains(request: Request, days: int = Query(7, description="The window: 7 or 30 days"),
                               principal: Principal = Depends(require(Permission.ANALYTICS_READ))) -> dict:
    from carepost.core.errors import ValidationFailed
    from carepost.tracking import deliverability

    if days not in deliverability.WINDOWS:
        raise ValidationFailed("The window is 7 or 30 days.", field="days")
    return deliverability.by_provider(request.state.db, principal.org_id, days)


@router.get("/deliverability/sending-domains", tags=["deliverability"],
            summary="Per sending domain of the organization: delivery, bounce and complaint rates over 7 or 30 days, "
                    "the complaint and hard-bounce rates judged against their levels")
def api_deliverability_sending_domains(request: Request, days: int = Query(7, description="The window: 7 or 30 days"),
                                       principal: Principal = Depends(require(Permission.ANALYTICS_READ))) -> dict:
    from carepost.core.errors import ValidationFailed
    from carepost.tracking import deliverability

    if days not in deliverability.WINDOWS:
        raise ValidationFailed("The window is 7 or 30 days.", field="days")
    return {"window_days": days, "min_volume": deliverability.MIN_VOLUME,
            "judged_rates": list(deliverability.SENDING_DOMAIN_RATES),
            "data": deliverability.by_sending_domain(request.state.db, principal.org_id, days)}


@router.get("/deliverability/alerts", tags=["deliverability"],
            summary="Deliverability alerts, newest first: a provider's or a sending domain's rate at or over its "
                    "warning level or limit")
def api_deliverability_alerts(request: Request, active: bool | None = Query(None, description="true: open alerts only; "
                                                                                             "false: cleared ones only"),
                              limit: int = Query(100, ge=1, le=500),
                              principal: Principal = Depends(require(Permission.ANALYTICS_READ))) -> dict:
    from carepost.tracking import deliverability

    rows = deliverability.list_alerts(request.state.db, principal.org_id, active=active, limit=limit)
    return {"data": [deliverability.alert_out(a) for a in rows]}
