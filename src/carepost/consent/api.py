"""REST routes of consent: purposes, authorization texts, authorizations, topics, subscriptions,
suppressions, eligibility, settings and reports.

Managing consent needs ``consent:manage``. Responses carry references and codes; the one route
that returns signatures and evidence (the HTML evidence export) also needs
``phi:read_unmasked``. Every call is audited with references only; addresses in bodies never
reach a URL.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from carepost.accounts.access import Principal, request_context, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.consent import authorizations as auth
from carepost.consent import eligibility, reports, service
from carepost.core import purposes
from carepost.consent.schemas import (
    AuthorizationIn,
    EligibilityIn,
    ExpirationEventIn,
    RequirementsIn,
    SettingsIn,
    SubscriptionIn,
    SuppressionIn,
    TextIn,
    TextUpdate,
    TopicIn,
    TopicUpdate,
)
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.patients.masking import wants_unmasked

router = APIRouter(prefix="/api/v1", tags=["consent"])
MANAGE = require(P.CONSENT_MANAGE)


def _audit(request: Request, principal: Principal, action: str, target_type: str, target_id: str | None = None, **details):
    record_for(request.state.db, principal, request, action, target_type=target_type, target_id=target_id,
               details={k: v for k, v in details.items() if v is not None})


def _by(principal: Principal) -> str:
    return f"{principal.kind}:{principal.actor_id}"


# --------------------------------------------------------------------------- purposes


@router.get("/purposes", summary="Communication purposes and what each requires")
def list_purposes(principal: Principal = Depends(require())) -> dict:
    return {"data": purposes.purposes_list()}


@router.post("/purposes/requirements", summary="What a purpose requires given remuneration and prescription facts")
def purpose_requirements(body: RequirementsIn, principal: Principal = Depends(require())) -> dict:
    return purposes.requirements(body.purpose, remuneration=body.remuneration,
                                 prescription_lapsed_days=body.prescription_lapsed_days).as_dict()


# --------------------------------------------------------------------------- authorization texts


@router.get("/authorization-texts", summary="Authorization texts (every version)")
def list_texts(request: Request, purpose: Literal["marketing", "marketing_remunerated"] | None = None,
               principal: Principal = Depends(MANAGE)) -> dict:
    rows = auth.list_texts(request.state.db, principal.org_id, purpose)
    return {"data": [auth.text_dict(t, full=False) for t in rows]}


@router.post("/authorization-texts", status_code=201, summary="Create a draft version of a purpose's text")
def create_text(request: Request, body: TextIn, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    text = auth.create_text(session, principal.org_id, body.purpose, body.elements, created_by=_by(principal))
    _audit(request, principal, "authorization_text.create", "authorization_text", text.id, purpose=text.purpose,
           version=text.version)
    session.commit()
    return auth.text_dict(text)


@router.get("/authorization-texts/{text_id}", summary="One authorization text version")
def read_text(request: Request, text_id: str, principal: Principal = Depends(MANAGE)) -> dict:
    return auth.text_dict(auth.get_text(request.state.db, principal.org_id, text_id))


@router.patch("/authorization-texts/{text_id}", summary="Change a draft")
def update_text(request: Request, text_id: str, body: TextUpdate, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    text = auth.update_text(session, principal.org_id, text_id, body.elements)
    _audit(request, principal, "authorization_text.update", "authorization_text", text.id)
    session.commit()
    return auth.text_dict(text)


@router.post("/authorization-texts/{text_id}/publish", summary="Publish a complete draft (refused when an element is missing)")
def publish_text(request: Request, text_id: str, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    text = auth.publish_text(session, principal.org_id, text_id, published_by=_by(principal))
    _audit(request, principal, "authorization_text.publish", "authorization_text", text.id, purpose=text.purpose,
           version=text.version, content_hash=text.content_hash)
    session.commit()
    return auth.text_dict(text)


# --------------------------------------------------------------------------- authorizations


def _contact_for(session, org_id: str, contact_id: str | None, email: str | None) -> str:
    if contact_id:
        return service._contact(session, contact_id).id
    from carepost.patients.service import find_contact_ids, normalize_email

    ids = find_contact_ids(session, org_id, email=normalize_email(email or "", "email"))
    if not ids:
        raise NotFound("No contact has this email address.", field="email")
    if len(ids) > 1:
        raise Conflict("Several contacts have this email address; give contact_id.", field="email")
    return ids[0]


@router.post("/authorizations", status_code=201, summary="Record a signed authorization")
def create_authorization(request: Request, body: AuthorizationIn, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    contact_id = _contact_for(session, principal.org_id, body.contact_id, body.email)
    row = auth.record_authorization(
        session, principal.org_id, contact_id=contact_id, purpose=body.purpose, method=body.method,
        text_id=body.text_id, topic_id=body.topic_id, signature_name=body.signature.name,
        signature_image=body.signature.image, signed_at=body.signature.signed_at, expires_at=body.expires_at,
        expiration_event=body.expiration_event,
        representative_name=body.representative.name if body.representative else None,
        representative_authority=body.representative.authority if body.representative else None,
        language=body.language, created_by=_by(principal), backdate_reason=body.backdate_reason,
        scan=body.scan.content if body.scan else None, scan_content_type=body.scan.content_type if body.scan else None,
        # The API client's own request facts (it is not the patient's browser): evidence "of": "recorder".
        ip=request_context(request)["ip"], user_agent=request_context(request)["user_agent"],
    )
    _audit(request, principal, "authorization.create", "authorization", row.id, contact_id=contact_id,
           purpose=row.purpose, text_id=row.text_id, text_hash=row.text_hash, method=row.method,
           copy=row.copy_delivered, backdated=row.backdated or None, scan_id=row.scan_id)
    session.commit()
    return auth.authorization_dict(session, row)


@router.get("/authorizations", summary="A contact's authorizations (newest first)")
def list_authorizations(request: Request, contact_id: str = Query(min_length=32, max_length=32),
                        principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    contact = service._contact(session, contact_id)
    rows = auth.authorizations_of(session, principal.org_id, contact.id)
    _audit(request, principal, "authorization.list", "contact", contact.id, count=len(rows))
    session.commit()
    return {"data": [auth.authorization_dict(session, r) for r in rows]}


@router.get("/authorizations/{authorization_id}", summary="One authorization")
def read_authorization(request: Request, authorization_id: str, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    row = auth.get_authorization(session, principal.org_id, authorization_id)
    _audit(request, principal, "authorization.read", "authorization", row.id, contact_id=row.contact_id)
    session.commit()
    return auth.authorization_dict(session, row)


@router.post("/authorizations/{authorization_id}/revoke", summary="Revoke an authorization (effective at once)")
def revoke_authorization(request: Request, authorization_id: str, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    row, changed = auth.revoke_authorization(session, principal.org_id, authorization_id,
                                             by_type="api" if principal.kind == "api_credential" else "staff",
                                             by=_by(principal), method="api" if principal.kind == "api_credential" else "staff")
    _audit(request, principal, "authorization.revoke", "authorization", row.id, contact_id=row.contact_id,
           purpose=row.purpose, already_revoked=not changed or None)
    session.commit()
    return auth.authorization_dict(session, row)


@router.get("/authorizations/{authorization_id}/scan", summary="The scan of a paper authorization (PHI, audited)",
            response_class=Response, responses={200: {"content": {"application/pdf": {}, "image/png": {}, "image/jpeg": {}}}})
def read_scan(request: Request, authorization_id: str,
              principal: Principal = Depends(require(P.CONSENT_MANAGE, P.PHI_READ_UNMASKED))) -> Response:
    session = request.state.db
    row = auth.get_authorization(session, principal.org_id, authorization_id)
    content, stored = auth.get_scan(session, row)
    _audit(request, principal, "authorization.scan_download", "authorization", row.id, contact_id=row.contact_id,
           scan_id=stored.id, sha256=stored.sha256)
    session.commit()
    return scan_response(row.id, content, stored.content_type)


def scan_response(authorization_id: str, content: bytes, content_type: str) -> Response:
    ext = {"application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpg"}[content_type]
    return Response(content, media_type=content_type, headers={
        "Content-Disposition": f'attachment; filename="authorization-{authorization_id}.{ext}"',
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


@router.post("/authorizations/{authorization_id}/expiration-event",
             summary="Record that the expiration event an authorization names has happened (it ends then)")
def record_expiration_event(request: Request, authorization_id: str, body: ExpirationEventIn,
                            principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    row = auth.record_expiration_event(session, principal.org_id, authorization_id, body.occurred_at)
    _audit(request, principal, "authorization.expiration_event", "authorization", row.id, contact_id=row.contact_id,
           event=row.expiration_event)
    session.commit()
    return auth.authorization_dict(session, row)


@router.get("/contacts/{contact_id}/consent/evidence", summary="Evidence export of a patient's consent (HTML)",
            response_class=HTMLResponse)
def evidence(request: Request, contact_id: str,
             principal: Principal = Depends(require(P.CONSENT_MANAGE, P.PHI_READ_UNMASKED))) -> HTMLResponse:
    session = request.state.db
    html = auth.evidence_html(session, principal.org_id, contact_id)
    _audit(request, principal, "consent.evidence_export", "contact", contact_id, view="unmasked")
    session.commit()
    return HTMLResponse(html, headers={"Content-Disposition": 'attachment; filename="consent-evidence.html"'})


# --------------------------------------------------------------------------- topics and subscriptions


@router.get("/topics", summary="Subscription topics")
def list_topics(request: Request, include_archived: bool = False, principal: Principal = Depends(require())) -> dict:
    rows = service.list_topics(request.state.db, principal.org_id, include_archived=include_archived)
    return {"data": [service.topic_dict(t) for t in rows]}


@router.post("/topics", status_code=201, summary="Create a topic")
def create_topic(request: Request, body: TopicIn, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    topic = service.create_topic(session, principal.org_id, **body.model_dump())
    _audit(request, principal, "topic.create", "topic", topic.id, key=topic.key)
    session.commit()
    return service.topic_dict(topic)


@router.patch("/topics/{topic_id}", summary="Change or archive a topic")
def update_topic(request: Request, topic_id: str, body: TopicUpdate, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    topic = service.update_topic(session, principal.org_id, topic_id, body.model_dump(exclude_unset=True))
    _audit(request, principal, "topic.update", "topic", topic.id, fields=sorted(body.model_fields_set))
    session.commit()
    return service.topic_dict(topic)


@router.get("/subscriptions", summary="A contact's subscriptions and opt-outs")
def contact_subscriptions(request: Request, contact_id: str = Query(min_length=32, max_length=32),
                          principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    contact = service._contact(session, contact_id)
    rows = service.subscriptions_of(session, principal.org_id, contact.id)
    _audit(request, principal, "subscription.list", "contact", contact.id, count=len(rows))
    session.commit()
    return {"data": [service.subscription_dict(r) for r in rows]}


@router.put("/subscriptions", summary="Subscribe or unsubscribe a contact (one topic, or all marketing)")
def set_subscription(request: Request, body: SubscriptionIn, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    contact = service._contact(session, body.contact_id)
    topic_id = service.get_topic(session, principal.org_id, body.topic_id).id if body.topic_id else None
    if body.status == "unsubscribed":
        row = service.unsubscribe_contact(session, principal.org_id, contact.id, topic_id, source="api")
    else:
        row = service.resubscribe_contact(session, principal.org_id, contact.id, topic_id, source="api",
                                          frequency=body.frequency, confirmed=body.confirmed)
    if body.frequency and body.status == "unsubscribed":
        row.frequency = body.frequency
    _audit(request, principal, "subscription.update", "contact", contact.id, topic_id=topic_id, status=row.status)
    session.commit()
    return service.subscription_dict(row)


# --------------------------------------------------------------------------- suppressions


@router.get("/suppressions", summary="Suppressed addresses (newest first; masked unless you may see clear values)")
def list_suppressions(
    request: Request,
    reason: Literal["bounce_hard", "bounce_soft", "complaint", "unsubscribe", "manual", "legal_hold"] | None = None,
    scope: Literal["all", "marketing", "topic"] | None = None,
    cursor: str | None = Query(None, max_length=32),
    limit: int = Query(100, ge=1, le=500),
    masked: bool = False,
    principal: Principal = Depends(MANAGE),
) -> dict:
    session = request.state.db
    rows, next_cursor = service.list_suppressions(session, principal.org_id, reason=reason, scope=scope,
                                                  cursor=cursor, limit=limit)
    unmasked = wants_unmasked(principal, masked)
    _audit(request, principal, "suppression.list", "suppression_list", None, count=len(rows),
           view="unmasked" if unmasked else "masked")
    session.commit()
    return {"data": [service.suppression_dict(session, r, unmasked=unmasked) for r in rows], "next_cursor": next_cursor}


@router.post("/suppressions", status_code=201, summary="Suppress an address (manual entry, legal hold, ...)")
def create_suppression(request: Request, body: SuppressionIn, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    topic_id = service.get_topic(session, principal.org_id, body.topic_id).id if body.topic_id else None
    row = service.add_suppression(session, principal.org_id, body.address, body.reason, body.scope, topic_id,
                                  source="api" if principal.kind == "api_credential" else "staff",
                                  expires_at=body.expires_at, created_by=_by(principal))
    _audit(request, principal, "suppression.create", "suppression", row.id, reason=row.reason, scope=row.scope)
    session.commit()
    return service.suppression_dict(session, row, unmasked=wants_unmasked(principal))


@router.delete("/suppressions/{suppression_id}", status_code=204, summary="Lift a suppression")
def delete_suppression(request: Request, suppression_id: str, release_legal_hold: bool = False,
                       principal: Principal = Depends(MANAGE)) -> Response:
    session = request.state.db
    service.remove_suppression(session, principal.org_id, suppression_id=suppression_id,
                               allow_legal_hold=release_legal_hold)
    _audit(request, principal, "suppression.delete", "suppression", suppression_id,
           legal_hold_released=release_legal_hold or None)
    session.commit()
    return Response(status_code=204)


@router.post("/suppressions/import", summary="Import suppressions from CSV (request body: text/csv)")
async def import_suppressions(request: Request, principal: Principal = Depends(MANAGE)) -> dict:
    from starlette.concurrency import run_in_threadpool

    data = await request.body()
    if not data.strip():
        raise ValidationFailed("Send the CSV file as the request body.", field="file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationFailed("The file must be UTF-8 text.", field="file") from None

    def run() -> dict:
        session = request.state.db
        result = service.import_suppressions_csv(session, principal.org_id, text, created_by=_by(principal))
        _audit(request, principal, "suppression.import", "suppression_list", None, **result)
        session.commit()
        return result

    return await run_in_threadpool(run)


@router.get("/suppressions/export", summary="Export every suppression as CSV (addresses in clear)",
            response_class=Response)
def export_suppressions(request: Request, principal: Principal = Depends(require(P.CONSENT_MANAGE, P.PHI_READ_UNMASKED))) -> Response:
    session = request.state.db
    body = service.export_suppressions_csv(session, principal.org_id)
    _audit(request, principal, "suppression.export", "suppression_list", None, view="unmasked")
    session.commit()
    return Response(body, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="suppressions.csv"'})


# --------------------------------------------------------------------------- eligibility, settings, reports


@router.post("/eligibility", summary="Who may receive a message of this purpose (and topic)")
def check_eligibility(request: Request, body: EligibilityIn, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    results = eligibility.check_eligibility(
        session, body.contact_ids, body.purpose, body.topic, body.channel, body.at, org_id=principal.org_id,
        remuneration=body.remuneration, prescription_lapsed_days=body.prescription_lapsed_days)
    counts: dict[str, int] = {}
    for code in results.values():
        counts[code] = counts.get(code, 0) + 1
    req = purposes.requirements(body.purpose, remuneration=body.remuneration,
                                prescription_lapsed_days=body.prescription_lapsed_days)
    _audit(request, principal, "eligibility.check", "contact_list", None, purpose=body.purpose, count=len(results))
    session.commit()
    return {"purpose": body.purpose, "requirements": req.as_dict(), "results": results, "counts": counts}


@router.get("/consent/settings", summary="Frequency caps, quiet hours and consent defaults")
def read_settings(request: Request, principal: Principal = Depends(MANAGE)) -> dict:
    return service.consent_settings(request.state.db, principal.org_id)


@router.patch("/consent/settings", summary="Change frequency caps, quiet hours and consent defaults")
def update_settings(request: Request, body: SettingsIn, principal: Principal = Depends(MANAGE)) -> dict:
    session = request.state.db
    cfg = service.set_consent_settings(session, principal.org_id, body.model_dump(exclude_unset=True))
    _audit(request, principal, "consent.settings_update", "organization", principal.org_id,
           fields=sorted(body.model_fields_set))
    session.commit()
    return cfg


@router.get("/consent/reports", summary="Valid authorizations per purpose and topic, expiring, revoked this month")
def consent_report(request: Request, format: Literal["json", "csv"] = "json", principal: Principal = Depends(MANAGE)):
    session = request.state.db
    data = reports.consent_report(session, principal.org_id)
    _audit(request, principal, "consent.report", "organization", principal.org_id, format=format)
    session.commit()
    if format == "csv":
        return Response(reports.report_csv(data), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="consent-report.csv"'})
    return JSONResponse(data)
