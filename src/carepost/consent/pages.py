"""Consent pages.

Patients (public, the signed token in the path is the credential; no login, no PHI in any URL):

* ``/t/u/<token>`` — unsubscribe (RFC 8058). ``POST`` with ``List-Unsubscribe=One-Click`` (no
  cookies needed) unsubscribes at once and answers 200, never a redirect; a ``GET`` never
  unsubscribes (link scanners follow links) but offers "this topic" and "all marketing".
* ``/t/preferences/<token>`` — the hosted preference center (topics, frequency, all marketing,
  the patient's authorizations with revoke links).
* ``/t/confirm/<token>`` — double opt-in confirmation (expires; GET shows a button, POST confirms).
* ``/t/revoke/<token>`` — revoke an authorization (a form: revocation in writing, 164.508(b)(5)).
* ``/t/authorizations/<token>`` — the patient's copy of what they signed (164.508(c)(4)).

A forged, altered or expired token gets an error page that repeats nothing of the request.

Staff (``consent:manage``): the consent page of a contact (history, revoke, record a paper
authorization, evidence export), suppressions (list, add, import, export), topics, settings
(frequency caps, quiet hours) and reports.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from carepost.accounts.access import Principal, db_session, public, request_context, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record, record_for
from carepost.consent import authorizations as auth
from carepost.consent import eligibility, reports, service, tokens
from carepost.core import purposes
from carepost.consent.models import (
    ALL_MARKETING,
    BACKDATE_WINDOW_DAYS,
    EXPIRATION_EVENTS,
    FREQUENCIES,
    SCAN_MAX_BYTES,
    STAFF_METHODS,
    SUPPRESSION_REASONS,
    SUPPRESSION_SCOPES,
    AuthorizationText,
)
from carepost.core import clock
from carepost.core.errors import CarePostError
from carepost.patients.masking import wants_unmasked
from carepost.web.rendering import render

router = APIRouter(include_in_schema=False)

LINK_WHY = "patient link: the signed token in the path is the credential (no login, no PHI in the URL)"


# =========================================================================== patients


def _invalid(request: Request, session: Session, exc: tokens.InvalidToken, page: str) -> HTMLResponse:
    session.rollback()
    expired = exc.reason == "expired"
    return render(request, "consent/link_invalid.html", {"expired": expired, "page": page},
                  status_code=410 if expired else 400)


def _verified(session: Session, token: str, kind: str):
    data = tokens.verify(session, token, kind)
    return data


async def _form(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    return {}


def _topic_name(session: Session, org_id: str, topic_id: str | None) -> str | None:
    if not topic_id:
        return None
    from carepost.consent.models import Topic

    topic = session.get(Topic, topic_id)
    return topic.name if topic is not None and topic.org_id == org_id else None


def _org_name(session: Session, org_id: str) -> str:
    brand = brand_for(session, org_id)
    return brand["name"] if brand else ""


def brand_for(session: Session, org_id: str) -> dict | None:
    """The organization's name, logo and colours for a patient page (issue 10 item 16)."""
    from carepost.accounts.branding import brand_for as _brand_for

    return _brand_for(session, org_id)


@router.get("/t/u/{token}")
def unsubscribe_page(request: Request, token: str, session: Session = Depends(db_session), _=Depends(public(LINK_WHY))):
    """Never unsubscribes: link scanners and previews follow GET links."""
    try:
        subject = service.resolve_link(session, _verified(session, token, "u"))
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "unsubscribe")
    ctx = {"token": token, "topic": _topic_name(session, subject.org_id, subject.topic_id),
           "org_name": _org_name(session, subject.org_id), "brand": brand_for(session, subject.org_id), "done": None,
           "preferences_token": _preferences_token_for(session, subject)}
    session.commit()  # a named key created on first use
    return render(request, "consent/unsubscribe.html", ctx)


@router.post("/t/u/{token}")
async def unsubscribe_post(request: Request, token: str, session: Session = Depends(db_session),
                           _=Depends(public(LINK_WHY))):
    """RFC 8058 one-click (``List-Unsubscribe=One-Click``, no cookies) or the page's choice.
    Always 200 and never a redirect; using the link again answers 200 too."""
    form = await _form(request)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_unsubscribe, request, token, session, form)


def _unsubscribe(request: Request, token: str, session: Session, form: dict) -> HTMLResponse:
    try:
        subject = service.resolve_link(session, _verified(session, token, "u"))
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "unsubscribe")
    choice = form.get("choice")
    one_click = form.get("List-Unsubscribe") == "One-Click"
    all_marketing = choice == "all" or subject.topic_id is None
    method = "one_click" if one_click and not choice else "page"
    service.apply_unsubscribe(session, subject, all_marketing=all_marketing, method=method,
                              context=request_context(request))
    topic = None if all_marketing else _topic_name(session, subject.org_id, subject.topic_id)
    ctx = {"token": token, "topic": topic, "org_name": _org_name(session, subject.org_id), "brand": brand_for(session, subject.org_id),
           "done": "all" if all_marketing else "topic", "preferences_token": _preferences_token_for(session, subject)}
    session.commit()
    return render(request, "consent/unsubscribe.html", ctx)


def _preferences_token_for(session: Session, subject: service.LinkSubject) -> str:
    if subject.recipient_id:
        return service.preferences_token(session, subject.org_id, subject.recipient_id, ref_kind="r")
    return service.preferences_token(session, subject.org_id, subject.contact_id, ref_kind="c")


# --------------------------------------------------------------------------- preference center


def _preference_state(session: Session, subject: service.LinkSubject) -> dict:
    from sqlalchemy import select

    from carepost.consent.models import Suppression

    org_id = subject.org_id
    topics = service.list_topics(session, org_id)
    subs = {}
    if subject.contact_id:
        subs = {s.topic_key: s for s in service.subscriptions_of(session, org_id, subject.contact_id)}
    indexes = set()
    if subject.address_index:
        indexes.add(subject.address_index)
    if subject.contact_id:
        indexes.update(service.contact_email_indexes(session, org_id, [subject.contact_id]).get(subject.contact_id, []))
    unsub_keys = set()
    if indexes:
        unsub_keys = set(session.scalars(select(Suppression.scope_key).where(
            Suppression.org_id == org_id, Suppression.address_index.in_(indexes), Suppression.reason == "unsubscribe")))
    all_row = subs.get(ALL_MARKETING)
    all_off = (all_row is not None and all_row.status == "unsubscribed") or "marketing:" in unsub_keys
    rows = []
    for t in topics:
        sub = subs.get(t.id)
        status = sub.status if sub else ("unsubscribed" if t.opt_in_required else "subscribed")
        if f"topic:{t.id}" in unsub_keys:
            status = "unsubscribed"
        rows.append({"id": t.id, "name": t.name, "description": t.description, "status": status,
                     "opt_in_required": t.opt_in_required})
    auths = []
    if subject.contact_id:
        for a in auth.authorizations_of(session, org_id, subject.contact_id):
            state = auth.state_at(a)
            auths.append({"purpose": purposes.PURPOSES.get(a.purpose, a.purpose), "signed_at": clock.aware(a.signed_at),
                          "expires_at": clock.aware(a.expires_at) if a.expires_at else None, "state": state,
                          "revoke_url": auth.revocation_url(session, a) if state == "valid" else None})
    return {"topics": rows, "all_off": all_off, "frequency": all_row.frequency if all_row else "immediate",
            "authorizations": auths, "has_contact": subject.contact_id is not None}


@router.get("/t/preferences/{token}")
def preferences_page(request: Request, token: str, session: Session = Depends(db_session), _=Depends(public(LINK_WHY))):
    try:
        subject = service.resolve_link(session, _verified(session, token, "p"))
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "preferences")
    ctx = {"token": token, "org_name": _org_name(session, subject.org_id), "brand": brand_for(session, subject.org_id), "frequencies": FREQUENCIES, "saved": False,
           **_preference_state(session, subject)}
    session.commit()
    return render(request, "consent/preferences.html", ctx)


@router.post("/t/preferences/{token}")
async def preferences_save(request: Request, token: str, session: Session = Depends(db_session),
                           _=Depends(public(LINK_WHY))):
    form = await _form(request)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_save_preferences, request, token, session, form)


def _save_preferences(request: Request, token: str, session: Session, form: dict) -> HTMLResponse:
    try:
        subject = service.resolve_link(session, _verified(session, token, "p"))
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "preferences")
    org_id = subject.org_id
    before = _preference_state(session, subject)
    frequency = form.get("frequency") if form.get("frequency") in FREQUENCIES else None
    want_all_off = form.get("all_marketing") == "off"
    changes: list[dict] = []
    ctx_audit = request_context(request)
    if want_all_off and not before["all_off"]:
        service.apply_unsubscribe(session, service.LinkSubject(org_id, subject.contact_id, subject.address_index,
                                                               subject.recipient_id, subject.message_id, None),
                                  all_marketing=True, method="preferences", context=ctx_audit)
        changes.append({"topic_id": None, "status": "unsubscribed"})
    elif not want_all_off and before["all_off"]:
        _resubscribe(session, subject, None)
        changes.append({"topic_id": None, "status": "subscribed"})
    for t in before["topics"]:
        wanted = form.get(f"topic_{t['id']}") == "on"
        was = t["status"] in ("subscribed", "pending")
        if wanted and not was:
            status = _resubscribe(session, subject, t["id"])
            changes.append({"topic_id": t["id"], "status": status})
        elif not wanted and was:
            sub = service.LinkSubject(org_id, subject.contact_id, subject.address_index, subject.recipient_id,
                                      subject.message_id, t["id"])
            service.apply_unsubscribe(session, sub, all_marketing=False, method="preferences", context=ctx_audit)
            changes.append({"topic_id": t["id"], "status": "unsubscribed"})
    if frequency and subject.contact_id:
        row = service._subscription_row(session, org_id, subject.contact_id, None)
        if row.frequency != frequency:
            row.frequency = frequency
            changes.append({"frequency": frequency})
    if changes:
        record(session, org_id=org_id, actor_type="patient", actor_id=subject.contact_id,
               action="consent.preferences_update", target_type="contact" if subject.contact_id else "message_recipient",
               target_id=subject.contact_id or subject.recipient_id, details={"changes": changes}, **ctx_audit)
    session.flush()
    ctx = {"token": token, "org_name": _org_name(session, org_id), "brand": brand_for(session, org_id), "frequencies": FREQUENCIES, "saved": True,
           **_preference_state(session, subject)}
    session.commit()
    return render(request, "consent/preferences.html", ctx)


def _resubscribe(session: Session, subject: service.LinkSubject, topic_id: str | None) -> str:
    from sqlalchemy import delete

    from carepost.consent.models import Suppression

    if subject.contact_id:
        # The preference link reached the patient at their address: that already proves the
        # address, so no second confirmation is asked for.
        row = service.resubscribe_contact(session, subject.org_id, subject.contact_id, topic_id, source="preferences",
                                          confirmed=True)
        status = row.status
    else:
        status = "subscribed"
    if subject.address_index and status == "subscribed":
        session.execute(delete(Suppression).where(
            Suppression.org_id == subject.org_id, Suppression.address_index == subject.address_index,
            Suppression.reason == "unsubscribe",
            Suppression.scope_key == (f"topic:{topic_id}" if topic_id else "marketing:")))
    return status


# --------------------------------------------------------------------------- double opt-in


@router.get("/t/confirm/{token}")
def confirm_page(request: Request, token: str, session: Session = Depends(db_session), _=Depends(public(LINK_WHY))):
    try:
        confirm_org = _verified(session, token, "c").org_id
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "confirm")
    return render(request, "consent/confirm.html", {"token": token, "done": False,
                                                    "brand": brand_for(session, confirm_org)})


@router.post("/t/confirm/{token}")
def confirm_post(request: Request, token: str, session: Session = Depends(db_session), _=Depends(public(LINK_WHY))):
    try:
        row = service.confirm_subscription(session, token)
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "confirm")
    record(session, org_id=row.org_id, actor_type="patient", actor_id=row.contact_id, action="consent.subscription_confirm",
           target_type="contact", target_id=row.contact_id, details={"topic_id": row.topic_id}, **request_context(request))
    topic = _topic_name(session, row.org_id, row.topic_id)
    session.commit()
    return render(request, "consent/confirm.html", {"token": token, "done": True, "topic": topic,
                                                    "brand": brand_for(session, row.org_id)})


# --------------------------------------------------------------------------- revocation and copy


def _authorization_from(session: Session, token: str, kind: str):
    data = _verified(session, token, kind)
    if data.ref_kind != "a":
        raise tokens.InvalidToken()
    session.info.pop("scope", None)
    session.info["org_id"] = data.org_id
    try:
        return auth.get_authorization(session, data.org_id, data.ref_id)
    except CarePostError:
        raise tokens.InvalidToken() from None


def _authorization_view(session: Session, row) -> dict:
    text = session.get(AuthorizationText, row.text_id)
    return {"purpose": purposes.PURPOSES.get(row.purpose, row.purpose), "signed_at": clock.aware(row.signed_at),
            "expires_at": clock.aware(row.expires_at) if row.expires_at else None, "state": auth.state_at(row),
            "expiration_event": EXPIRATION_EVENTS.get(row.expiration_event, row.expiration_event) if row.expiration_event else None,
            "title": text.title,
            "text": text.rendered.get(row.language) or text.rendered.get("en", ""), "language": row.language,
            "version": row.text_version, "hash": row.text_hash, "method": row.method,
            "org_name": _org_name(session, row.org_id), "brand": brand_for(session, row.org_id)}


@router.get("/t/revoke/{token}")
def revoke_page(request: Request, token: str, session: Session = Depends(db_session), _=Depends(public(LINK_WHY))):
    try:
        row = _authorization_from(session, token, "r")
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "revoke")
    ctx = {"token": token, "a": _authorization_view(session, row), "brand": brand_for(session, row.org_id), "done": False, "error": None}
    return render(request, "consent/revoke.html", ctx)


@router.post("/t/revoke/{token}")
async def revoke_post(request: Request, token: str, session: Session = Depends(db_session), _=Depends(public(LINK_WHY))):
    form = await _form(request)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_revoke, request, token, session, form)


def _revoke(request: Request, token: str, session: Session, form: dict) -> HTMLResponse:
    try:
        row = _authorization_from(session, token, "r")
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "revoke")
    if form.get("confirm") != "yes":
        ctx = {"token": token, "a": _authorization_view(session, row), "brand": brand_for(session, row.org_id), "done": False,
               "error": "Tick the box to confirm that you revoke this authorization."}
        return render(request, "consent/revoke.html", ctx, status_code=422)
    row, changed = auth.revoke_authorization(session, row.org_id, row.id, by_type="patient", by=row.contact_id,
                                             method="form")
    record(session, org_id=row.org_id, actor_type="patient", actor_id=row.contact_id, action="authorization.revoke",
           target_type="authorization", target_id=row.id,
           details={"method": "form", "purpose": row.purpose, "contact_id": row.contact_id,
                    **({"already_revoked": True} if not changed else {})}, **request_context(request))
    ctx = {"token": token, "a": _authorization_view(session, row), "brand": brand_for(session, row.org_id), "done": True, "error": None}
    session.commit()
    return render(request, "consent/revoke.html", ctx)


@router.get("/t/authorizations/{token}")
def copy_page(request: Request, token: str, session: Session = Depends(db_session), _=Depends(public(LINK_WHY))):
    try:
        row = _authorization_from(session, token, "a")
    except tokens.InvalidToken as exc:
        return _invalid(request, session, exc, "copy")
    view = _authorization_view(session, row)
    signer = auth.authorization_dict(session, row, include_evidence=True)
    record(session, org_id=row.org_id, actor_type="patient", actor_id=row.contact_id, action="authorization.copy_view",
           target_type="authorization", target_id=row.id, details={}, **request_context(request))
    ctx = {"a": view, "brand": brand_for(session, row.org_id), "signature": signer["signature"] if row.signature_kind == "typed" else None,
           "signature_image": signer["signature"] if row.signature_kind == "drawn" else None,
           "representative": signer["representative"],
           "revoke_url": auth.revocation_url(session, row) if view["state"] == "valid" else None}
    session.commit()
    return render(request, "consent/copy.html", ctx)


# =========================================================================== staff

MANAGE = require(P.CONSENT_MANAGE)


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def consent_rows(session: Session, org_id: str, contact_id: str) -> list[dict]:
    """The consent section of the contact page: a summary and a link to the full history."""
    rows: list[dict[str, Any]] = []
    for a in auth.authorizations_of(session, org_id, contact_id)[:5]:
        state = auth.state_at(a)
        rows.append({"summary": f"{purposes.PURPOSES.get(a.purpose, a.purpose)} authorization — {state}, signed "
                                f"{clock.aware(a.signed_at):%Y-%m-%d}"})
    for s in service.subscriptions_of(session, org_id, contact_id):
        if s.status == "unsubscribed":
            what = "all marketing" if s.topic_key == ALL_MARKETING else (_topic_name(session, org_id, s.topic_id) or "a topic")
            rows.append({"summary": f"Unsubscribed from {what}"})
    rows.append({"summary": "Consent history, revocation and evidence", "href": f"/app/contacts/{contact_id}/consent"})
    return rows


def _contact_ctx(request: Request, principal: Principal, contact_id: str, errors: dict | None = None, form: dict | None = None) -> dict:
    session = request.state.db
    contact = service._contact(session, contact_id)
    rows = auth.authorizations_of(session, principal.org_id, contact.id)
    topics = {t.id: t.name for t in service.list_topics(session, principal.org_id, include_archived=True)}
    indexes = service.contact_email_indexes(session, principal.org_id, [contact.id]).get(contact.id, [])
    supp = list(service.suppression_reason(session, principal.org_id, indexes, "marketing").values()) if indexes else []
    return {
        "contact_id": contact.id,
        "authorizations": [{**auth.authorization_dict(session, a), "purpose_label": purposes.PURPOSES.get(a.purpose, a.purpose),
                            "topic": topics.get(a.topic_id)} for a in rows],
        "subscriptions": [{**service.subscription_dict(s), "topic": topics.get(s.topic_id, "All marketing")}
                          for s in service.subscriptions_of(session, principal.org_id, contact.id)],
        "suppressions": [{"reason": s.reason, "scope": s.scope, "topic": topics.get(s.topic_id),
                          "created_at": clock.aware(s.created_at)} for s in supp],
        "texts": [t for t in (auth.current_text(session, principal.org_id, p) for p in purposes.AUTHORIZATION_PURPOSES) if t],
        "topics": service.list_topics(session, principal.org_id),
        "can_export": principal.can(P.PHI_READ_UNMASKED), "errors": errors or {}, "form": form or {},
        "staff_methods": STAFF_METHODS, "expiration_events": EXPIRATION_EVENTS, "backdate_days": BACKDATE_WINDOW_DAYS,
    }


@router.get("/app/contacts/{contact_id}/consent")
def contact_consent_page(request: Request, contact_id: str, principal: Principal = Depends(MANAGE)):
    session = request.state.db
    ctx = _contact_ctx(request, principal, contact_id)
    record_for(session, principal, request, "consent.read", target_type="contact", target_id=ctx["contact_id"],
               details={"page": "contact_consent"})
    session.commit()
    return render(request, "consent/contact.html", ctx)


@router.post("/app/contacts/{contact_id}/consent/authorizations")
async def record_staff_authorization(request: Request, contact_id: str, principal: Principal = Depends(MANAGE)):
    """Staff record a paper (with the uploaded scan) or verbal authorization (issue 9 item 12:
    methods CarePost witnesses itself — form, portal, email link — are never offered here)."""
    form: dict[str, str] = {}
    scan: tuple[bytes, str | None] | None = None
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        data = await request.form()
        for k, v in data.items():
            if isinstance(v, str):
                form[k] = v
            elif k == "scan" and hasattr(v, "read") and getattr(v, "filename", None):
                content = await v.read(SCAN_MAX_BYTES + 1)
                if content:
                    scan = (content, getattr(v, "content_type", None))
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_record_staff, request, principal, contact_id, form, scan)


def _record_staff(request: Request, principal: Principal, contact_id: str, form: dict,
                  scan: tuple[bytes, str | None] | None):
    session = request.state.db
    clean = {k: (form.get(k) or "").strip()[:500] for k in (
        "text_id", "signature_name", "signed_on", "expires_on", "expiration_event", "representative_name",
        "representative_authority", "topic_id", "method", "backdate_reason")}
    clean["method"] = clean["method"] or "paper"
    try:
        if clean["method"] not in STAFF_METHODS:
            from carepost.core.errors import ValidationFailed

            raise ValidationFailed("Choose paper or verbal.", field="method")
        contact = service._contact(session, contact_id)
        text = auth.get_text(session, principal.org_id, clean["text_id"])
        signed_at = _date_field(clean["signed_on"], "signed_on") or clock.now()
        expires_at = _date_field(clean["expires_on"], "expires_on")
        if scan is not None and clean["method"] != "paper":
            scan = None  # a file picked before switching to verbal is not kept
        ctx = request_context(request)
        row = auth.record_authorization(
            session, principal.org_id, contact_id=contact.id, purpose=text.purpose, text_id=text.id,
            method=clean["method"], topic_id=clean["topic_id"] or None, signature_name=clean["signature_name"] or None,
            signed_at=signed_at, expires_at=expires_at, expiration_event=clean["expiration_event"] or None,
            representative_name=clean["representative_name"] or None,
            representative_authority=clean["representative_authority"] or None,
            backdate_reason=clean["backdate_reason"] or None,
            scan=scan[0] if scan else None, scan_content_type=scan[1] if scan else None,
            ip=ctx["ip"], user_agent=ctx["user_agent"],  # the staff member's own request (evidence "of": "recorder")
            created_by=f"user:{principal.actor_id}")
    except CarePostError as exc:
        session.rollback()
        field = (exc.field or "form").replace("signature.name", "signature_name").replace("signature.signed_at", "signed_on")
        field = field.replace("representative.", "representative_").replace("expires_at", "expires_on")
        ctx = _contact_ctx(request, principal, contact_id, {field: exc.message}, clean)
        return render(request, "consent/contact.html", ctx, status_code=exc.status_code)
    record_for(session, principal, request, "authorization.create", target_type="authorization", target_id=row.id,
               details={"contact_id": contact.id, "purpose": row.purpose, "method": row.method, "text_hash": row.text_hash,
                        **({"backdated": True} if row.backdated else {}), **({"scan_id": row.scan_id} if row.scan_id else {})})
    session.commit()
    return _see_other(f"/app/contacts/{contact.id}/consent")


@router.get("/app/authorizations/{authorization_id}/scan")
def staff_scan_download(request: Request, authorization_id: str,
                        principal: Principal = Depends(require(P.CONSENT_MANAGE, P.PHI_READ_UNMASKED))):
    from carepost.consent.api import scan_response

    session = request.state.db
    row = auth.get_authorization(session, principal.org_id, authorization_id)
    content, stored = auth.get_scan(session, row)
    record_for(session, principal, request, "authorization.scan_download", target_type="authorization", target_id=row.id,
               details={"contact_id": row.contact_id, "scan_id": stored.id, "sha256": stored.sha256})
    session.commit()
    return scan_response(row.id, content, stored.content_type)


def _date_field(value: str, field: str) -> datetime | None:
    from carepost.core.errors import ValidationFailed

    if not value:
        return None
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationFailed("Enter a date as YYYY-MM-DD.", field=field) from None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


@router.post("/app/authorizations/{authorization_id}/revoke")
def staff_revoke(request: Request, authorization_id: str, principal: Principal = Depends(MANAGE)):
    session = request.state.db
    row, changed = auth.revoke_authorization(session, principal.org_id, authorization_id, by_type="staff",
                                             by=f"user:{principal.actor_id}", method="staff")
    record_for(session, principal, request, "authorization.revoke", target_type="authorization", target_id=row.id,
               details={"contact_id": row.contact_id, "purpose": row.purpose, "method": "staff",
                        **({"already_revoked": True} if not changed else {})})
    session.commit()
    return _see_other(f"/app/contacts/{row.contact_id}/consent" if row.contact_id else "/app/consent/reports")


@router.get("/app/contacts/{contact_id}/consent/evidence")
def evidence_download(request: Request, contact_id: str,
                      principal: Principal = Depends(require(P.CONSENT_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    html = auth.evidence_html(session, principal.org_id, contact_id)
    record_for(session, principal, request, "consent.evidence_export", target_type="contact", target_id=contact_id,
               details={"view": "unmasked"})
    session.commit()
    return HTMLResponse(html, headers={"Content-Disposition": 'attachment; filename="consent-evidence.html"'})


# --------------------------------------------------------------------------- suppressions


def _suppressions_ctx(request: Request, principal: Principal, *, errors: dict | None = None, form: dict | None = None,
                      notice: str | None = None, import_errors: list | None = None) -> dict:
    session = request.state.db
    q = request.query_params
    reason = q.get("reason") if q.get("reason") in SUPPRESSION_REASONS else None
    scope = q.get("scope") if q.get("scope") in SUPPRESSION_SCOPES else None
    cursor = q.get("cursor") if q.get("cursor") and len(q.get("cursor")) == 32 else None
    rows, next_cursor = service.list_suppressions(session, principal.org_id, reason=reason, scope=scope,
                                                  cursor=cursor, limit=50)
    unmasked = wants_unmasked(principal)
    topics = {t.id: t.name for t in service.list_topics(session, principal.org_id, include_archived=True)}
    record_for(session, principal, request, "suppression.list", target_type="suppression_list",
               details={"count": len(rows), "view": "unmasked" if unmasked else "masked"})
    return {
        "rows": [{**service.suppression_dict(session, r, unmasked=unmasked), "topic": topics.get(r.topic_id)} for r in rows],
        "next_cursor": next_cursor, "reason": reason, "scope": scope, "reasons": SUPPRESSION_REASONS,
        "scopes": SUPPRESSION_SCOPES, "topics": service.list_topics(session, principal.org_id), "unmasked": unmasked,
        "can_export": principal.can(P.PHI_READ_UNMASKED), "errors": errors or {}, "form": form or {}, "notice": notice,
        "import_errors": import_errors or [],
    }


@router.get("/app/consent/suppressions")
def suppressions_page(request: Request, principal: Principal = Depends(MANAGE)):
    ctx = _suppressions_ctx(request, principal, notice={"added": "The address is suppressed.", "removed": "The suppression was lifted."}.get(
        request.query_params.get("m", "")))
    request.state.db.commit()
    return render(request, "consent/suppressions.html", ctx)


@router.post("/app/consent/suppressions")
async def suppressions_add(request: Request, principal: Principal = Depends(MANAGE)):
    form = await _form(request)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_add_suppression, request, principal, form)


def _add_suppression(request: Request, principal: Principal, form: dict):
    session = request.state.db
    clean = {k: (form.get(k) or "").strip()[:320] for k in ("address", "reason", "scope", "topic_id")}
    try:
        topic_id = service.get_topic(session, principal.org_id, clean["topic_id"]).id if clean["topic_id"] else None
        scope = clean["scope"] or ("topic" if topic_id else "all")
        row = service.add_suppression(session, principal.org_id, clean["address"], clean["reason"] or "manual", scope,
                                      topic_id, source="staff", created_by=f"user:{principal.actor_id}")
    except CarePostError as exc:
        session.rollback()
        ctx = _suppressions_ctx(request, principal, errors={exc.field or "form": exc.message},
                                form={k: v for k, v in clean.items() if k != "address"} | {"address": clean["address"]})
        session.commit()
        return render(request, "consent/suppressions.html", ctx, status_code=exc.status_code)
    record_for(session, principal, request, "suppression.create", target_type="suppression", target_id=row.id,
               details={"reason": row.reason, "scope": row.scope})
    session.commit()
    return _see_other("/app/consent/suppressions?m=added")


@router.post("/app/consent/suppressions/import")
async def suppressions_import(request: Request, principal: Principal = Depends(MANAGE)):
    form = await request.form()
    upload = form.get("file")
    data = await upload.read() if upload is not None and hasattr(upload, "read") else b""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_import_suppressions, request, principal, data)


def _import_suppressions(request: Request, principal: Principal, data: bytes):
    session = request.state.db
    try:
        if not data.strip():
            from carepost.core.errors import ValidationFailed

            raise ValidationFailed("Choose a CSV file.", field="file")
        result = service.import_suppressions_csv(session, principal.org_id, data, created_by=f"user:{principal.actor_id}")
    except UnicodeDecodeError:
        session.rollback()
        ctx = _suppressions_ctx(request, principal, errors={"file": "The file must be UTF-8 text."})
        session.commit()
        return render(request, "consent/suppressions.html", ctx, status_code=422)
    except CarePostError as exc:
        session.rollback()
        ctx = _suppressions_ctx(request, principal, errors={"file": exc.message},
                                import_errors=getattr(exc, "errors", [])[:50])
        session.commit()
        return render(request, "consent/suppressions.html", ctx, status_code=exc.status_code)
    record_for(session, principal, request, "suppression.import", target_type="suppression_list", details=result)
    ctx = _suppressions_ctx(request, principal, notice=f"Imported {result['rows']} rows: {result['added']} new, "
                                                      f"{result['already_suppressed']} already suppressed.")
    session.commit()
    return render(request, "consent/suppressions.html", ctx)


@router.post("/app/consent/suppressions/{suppression_id}/delete")
async def suppressions_delete(request: Request, suppression_id: str, principal: Principal = Depends(MANAGE)):
    form = await _form(request)
    from starlette.concurrency import run_in_threadpool

    def run():
        session = request.state.db
        release = form.get("release_legal_hold") == "yes"
        try:
            service.remove_suppression(session, principal.org_id, suppression_id=suppression_id, allow_legal_hold=release)
        except CarePostError as exc:
            session.rollback()
            ctx = _suppressions_ctx(request, principal, errors={"form": exc.message})
            session.commit()
            return render(request, "consent/suppressions.html", ctx, status_code=exc.status_code)
        record_for(session, principal, request, "suppression.delete", target_type="suppression", target_id=suppression_id,
                   details={"legal_hold_released": True} if release else {})
        session.commit()
        return _see_other("/app/consent/suppressions?m=removed")

    return await run_in_threadpool(run)


@router.get("/app/consent/suppressions/export")
def suppressions_export(request: Request, principal: Principal = Depends(require(P.CONSENT_MANAGE, P.PHI_READ_UNMASKED))):
    session = request.state.db
    body = service.export_suppressions_csv(session, principal.org_id)
    record_for(session, principal, request, "suppression.export", target_type="suppression_list", details={"view": "unmasked"})
    session.commit()
    return Response(body, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="suppressions.csv"'})


# --------------------------------------------------------------------------- topics, settings, reports


@router.get("/app/consent/topics")
def topics_page(request: Request, principal: Principal = Depends(MANAGE)):
    topics = service.list_topics(request.state.db, principal.org_id, include_archived=True)
    return render(request, "consent/topics.html", {"topics": topics, "errors": {}, "form": {}})


@router.post("/app/consent/topics")
async def topics_add(request: Request, principal: Principal = Depends(MANAGE)):
    form = await _form(request)
    from starlette.concurrency import run_in_threadpool

    def run():
        session = request.state.db
        clean = {k: (form.get(k) or "").strip()[:1000] for k in ("key", "name", "description")}
        try:
            topic = service.create_topic(session, principal.org_id, key=clean["key"], name=clean["name"],
                                         description=clean["description"], opt_in_required=form.get("opt_in_required") == "on",
                                         double_opt_in=form.get("double_opt_in") == "on")
        except CarePostError as exc:
            session.rollback()
            topics = service.list_topics(session, principal.org_id, include_archived=True)
            return render(request, "consent/topics.html", {"topics": topics, "errors": {exc.field or "form": exc.message},
                                                           "form": clean}, status_code=exc.status_code)
        record_for(session, principal, request, "topic.create", target_type="topic", target_id=topic.id, details={"key": topic.key})
        session.commit()
        return _see_other("/app/consent/topics")

    return await run_in_threadpool(run)


@router.post("/app/consent/topics/{topic_id}")
async def topics_edit(request: Request, topic_id: str, principal: Principal = Depends(MANAGE)):
    """Change a topic's name, description, opt-in and confirmation, or archive it (its short name
    stays: messages and links name it)."""
    form = await _form(request)
    from starlette.concurrency import run_in_threadpool

    def run():
        session = request.state.db
        values = {"name": (form.get("name") or "").strip()[:1000], "description": (form.get("description") or "").strip()[:2000],
                  "opt_in_required": form.get("opt_in_required") == "on", "double_opt_in": form.get("double_opt_in") == "on",
                  "archived": form.get("archived") == "on"}
        try:
            topic = service.update_topic(session, principal.org_id, topic_id, values)
        except CarePostError as exc:
            session.rollback()
            topics = service.list_topics(session, principal.org_id, include_archived=True)
            return render(request, "consent/topics.html", {"topics": topics, "errors": {"form": exc.message}, "form": {}},
                          status_code=exc.status_code)
        record_for(session, principal, request, "topic.update", target_type="topic", target_id=topic.id,
                   details={"fields": sorted(values)})
        session.commit()
        return _see_other("/app/consent/topics")

    return await run_in_threadpool(run)


@router.get("/app/consent/settings")
def settings_page(request: Request, principal: Principal = Depends(MANAGE)):
    cfg = service.consent_settings(request.state.db, principal.org_id)
    return render(request, "consent/settings.html", {"cfg": cfg, "errors": {}, "saved": request.query_params.get("m") == "saved"})


@router.post("/app/consent/settings")
async def settings_save(request: Request, principal: Principal = Depends(MANAGE)):
    form = await _form(request)
    from starlette.concurrency import run_in_threadpool

    def run():
        session = request.state.db
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for key in ("frequency_cap_daily", "frequency_cap_weekly", "authorization_default_months", "confirmation_link_hours"):
            raw = (form.get(key) or "").strip()
            if not raw:
                if key.startswith("frequency_cap"):
                    values[key] = None
                continue
            if not raw.isdigit() or len(raw) > 5:
                errors[key] = "Enter a whole number."
                continue
            values[key] = int(raw)
        for key in ("quiet_hours_start", "quiet_hours_end", "default_time_zone"):
            raw = (form.get(key) or "").strip()[:64]
            values[key] = raw or (None if key != "default_time_zone" else service.CONSENT_DEFAULTS["default_time_zone"])
        values["postal_address"] = (form.get("postal_address") or "").strip()[:1000] or None
        if not errors:
            try:
                service.set_consent_settings(session, principal.org_id, values)
            except CarePostError as exc:
                session.rollback()
                errors[exc.field or "form"] = exc.message
        if errors:
            shown = {**service.consent_settings(session, principal.org_id),
                     **{k: (form.get(k) or "")[:64 if k != "postal_address" else 1000] for k in values}}
            return render(request, "consent/settings.html", {"cfg": shown, "errors": errors, "saved": False}, status_code=422)
        record_for(session, principal, request, "consent.settings_update", target_type="organization",
                   target_id=principal.org_id, details={"fields": sorted(values)})
        session.commit()
        return _see_other("/app/consent/settings?m=saved")

    return await run_in_threadpool(run)


@router.get("/app/consent/reports")
def reports_page(request: Request, principal: Principal = Depends(MANAGE)):
    session = request.state.db
    data = reports.consent_report(session, principal.org_id)
    fmt = request.query_params.get("format")
    record_for(session, principal, request, "consent.report", target_type="organization", target_id=principal.org_id,
               details={"format": "csv" if fmt == "csv" else "html"})
    session.commit()
    if fmt == "csv":
        return Response(reports.report_csv(data), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="consent-report.csv"'})
    return render(request, "consent/reports.html", {"report": data, "reasons": eligibility.REASON_TEXT})
