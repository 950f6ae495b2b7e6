"""Web UI of secure delivery: sending domains (DNS records to publish, live check), the delivery
log (per-recipient method, status and evidence), the security preview tool and recipient keys.
(The sender's view of a portal message is the portal's: ``portal/sender_pages.py``.)

Same rules as the API: recipient addresses are masked unless the person holds
``phi:read_unmasked``; every page that shows recipients, replies or keys is audited; searching
never puts an address in a URL.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from carepost.accounts.access import Principal, require
from carepost.accounts.models import Organization
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import CarePostError, NotFound, ValidationFailed
from carepost.core.ids import is_id
from carepost.core.ports import Port
from carepost.delivery import policy, service
from carepost.delivery.models import METHODS, RECIPIENT_STATUSES, Message, MessageEvent, MessageRecipient, RecipientKey, SendingDomain
from carepost.patients import masking
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

portal_state: Port = Port(
    "delivery.portal_state",
    "{recipient id: portal state dict} of a message's portal copies, for the message page (portal.service).")

engagement_of: Port = Port(
    "delivery.engagement_of",
    "{totals, recipients} of a message's opens and clicks, for the message page (tracking.engagement).")

legal_holds_of: Port = Port(
    "delivery.legal_holds_of",
    "[{summary, held}] of the legal holds protecting a message, for the message page's mark (retention.pages).")

PAGE_SIZE = 50
MAX_PREVIEW_ADDRESSES = 200
MAX_KEY_BYTES = 256 * 1024
STATUS_TONE = {
    "delivered": "ok", "sent": "ok", "portal_viewed": "ok", "queued": "", "deferred": "warn", "excluded": "warn",
    "bounced": "danger", "failed": "danger", "recalled": "", "expired": "",
}


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def org_security_mode(session, org_id: str) -> str:
    """The organization's security mode (the floor every message starts from)."""
    org = session.get(Organization, org_id)
    mode = (org.settings or {}).get("security_mode") if org else None
    return mode if mode in policy.MODES else "tls_required"


def _address(session, org_id: str, table: str, row_id: str, blob: bytes, unmasked: bool) -> str:
    addr = get_keyring().decrypt_text(session, org_id, table, "address", row_id, blob) or ""
    return addr if unmasked else masking.mask_email(addr)


# --------------------------------------------------------------------------- sending domains


RECORD_LABELS = {
    "ownership": "Ownership", "dkim": "DKIM (RSA)", "dkim-ed25519": "DKIM (Ed25519)", "spf": "SPF", "dmarc": "DMARC",
    "return-path-mx": "Return-path MX", "mta-sts": "MTA-STS", "mta-sts-host": "MTA-STS host",
}


def _domain_view(row: SendingDomain) -> dict:
    verified = service.is_verified(row)
    # The ownership record comes first: nothing can be sent until it passes (it may stay published).
    records = [service.ownership_record(row), *service.dns_records(row)]
    checks = row.check_results or {}
    mail_checks = [c for purpose, c in checks.items() if purpose != service.OWNERSHIP]
    return {
        "id": row.id, "domain": row.domain, "dns_ok": row.dns_ok, "checked_at": clock.aware(row.checked_at),
        "verified": verified, "verified_at": clock.aware(row.verified_at),
        "ownership": checks.get(service.OWNERSHIP),
        "records": [{**r.__dict__, "label": RECORD_LABELS.get(r.purpose, r.purpose), "check": checks.get(r.purpose)}
                    for r in records],
        "failing": sum(1 for c in mail_checks if not c.get("ok")),
    }


def _local_name(host: str | None) -> bool:
    """``localhost``, a loopback address, or a name without a dot: nothing others can look up."""
    from carepost.core.mailcapture import is_loopback

    host = (host or "").strip().rstrip(".").lower()
    return not host or is_loopback(host) or host.endswith(".localhost") or "." not in host


def setup_warnings() -> list[str]:
    """Why the DNS records shown would be useless (issue 10 item 12): they name this
    installation's web host (the MTA-STS host) and mail host (SPF, the return-path MX)."""
    from urllib.parse import urlparse

    from carepost.core.config import get_settings

    settings = get_settings()
    out = []
    web_host = urlparse(settings.base_url).hostname
    if _local_name(web_host):
        out.append(f"The base URL is {settings.base_url}: the MTA-STS record below points at “{web_host}”, which no "
                   "one else can reach. Set CAREPOST_BASE_URL to this installation's public https address.")
    mail_host = service.mail_host(settings)
    if _local_name(mail_host):
        out.append(f"The HELO name is “{mail_host}”: the SPF and return-path MX records below name a host no one else "
                   "can find. Set CAREPOST_SMTP_HELO_NAME to this server's public DNS name.")
    return out


def _domains_page(request: Request, principal: Principal, *, form_domain: str = "", error: str | None = None,
                  status_code: int = 200):
    session = request.state.db
    rows = session.scalars(select(SendingDomain).order_by(SendingDomain.domain)).all()
    return render(request, "delivery/domains.html", {
        "domains": [_domain_view(r) for r in rows], "form_domain": form_domain, "error": error,
        "setup_warnings": setup_warnings(), "deleted": request.query_params.get("deleted") == "1",
    }, status_code=status_code)


@router.get("/domains")
def domains_page(request: Request, principal: Principal = Depends(require(P.DOMAINS_MANAGE))):
    return _domains_page(request, principal)


@router.post("/domains")
def domain_add(request: Request, domain: str = Form(""), principal: Principal = Depends(require(P.DOMAINS_MANAGE))):
    session = request.state.db
    domain = domain.strip()[:253]
    try:
        if not domain:
            raise ValidationFailed("Enter a domain name, such as mail.example.org.", field="domain")
        row = service.create_sending_domain(session, principal.org_id, domain)
    except CarePostError as exc:
        session.rollback()
        return _domains_page(request, principal, form_domain=domain, error=exc.message, status_code=exc.status_code)
    record_for(session, principal, request, "domain.create", target_type="sending_domain", target_id=row.id,
               details={"domain": row.domain, "via": "ui", "ownership": "claimed"})
    row_id = row.id
    session.commit()
    return _see_other(f"/app/domains/{row_id}")


def _get_domain(session, domain_id: str) -> SendingDomain:
    row = session.get(SendingDomain, domain_id) if is_id(domain_id) else None
    if row is None or row.org_id != session.info.get("org_id"):
        raise NotFound("No such sending domain.", field="id")
    return row


@router.get("/domains/{domain_id}")
def domain_page(request: Request, domain_id: str, principal: Principal = Depends(require(P.DOMAINS_MANAGE))):
    row = _get_domain(request.state.db, domain_id)
    return render(request, "delivery/domain.html", {"d": _domain_view(row), "checked": request.query_params.get("checked") == "1",
                                                    "setup_warnings": setup_warnings()})


@router.post("/domains/{domain_id}/validate")
def domain_validate(request: Request, domain_id: str, principal: Principal = Depends(require(P.DOMAINS_MANAGE))):
    """Validate the published SPF and DMARC records with checkdmarc (issue 13 item 7); nothing
    is stored. The transaction is closed during the look-ups."""
    from carepost.delivery import record_validation

    session = request.state.db
    row = _get_domain(session, domain_id)
    names = (row.domain, row.return_path_domain)
    session.commit()
    validation = record_validation.validate_domain(*names)
    record_for(session, principal, request, "domain.validate_records", target_type="sending_domain", target_id=row.id,
               details={"ok": validation["ok"], "failing": [r["kind"] for r in validation["records"] if not r["ok"]]})
    session.commit()
    if request.headers.get("hx-request") == "true":
        return render(request, "delivery/_validation.html", {"d": _domain_view(row), "validation": validation})
    return render(request, "delivery/domain.html", {"d": _domain_view(row), "checked": False, "validation": validation,
                                                    "setup_warnings": setup_warnings()})


@router.post("/domains/{domain_id}/delete")
def domain_delete(request: Request, domain_id: str, principal: Principal = Depends(require(P.DOMAINS_MANAGE))):
    """Remove a sending domain and its DKIM keys (the page asks for confirmation first); audited."""
    session = request.state.db
    row = _get_domain(session, domain_id)
    record_for(session, principal, request, "domain.delete", target_type="sending_domain", target_id=row.id,
               details={"domain": row.domain, "via": "ui"})
    service.delete_sending_domain(session, row)
    session.commit()
    return _see_other("/app/domains?deleted=1")


@router.post("/domains/{domain_id}/check")
def domain_check(request: Request, domain_id: str, principal: Principal = Depends(require(P.DOMAINS_MANAGE))):
    """Look every record up live. The transaction is closed during the look-ups, so a slow DNS
    server never holds the database."""
    session = request.state.db
    row = _get_domain(session, domain_id)
    records = service.records_to_check(row)
    session.commit()
    # "Check now" means now: answers cached by this process (NXDOMAIN included, kept for the
    # zone's negative TTL) would hide a record published a minute ago.
    from carepost.delivery import dns as cpdns

    cpdns.reset()
    results = asyncio.run(service.check_dns(records))
    row = _get_domain(session, domain_id)
    was_verified = service.is_verified(row)
    service.apply_checks(session, row, results)
    record_for(session, principal, request, "domain.check", target_type="sending_domain", target_id=row.id,
               details={"ok": row.dns_ok, "failing": [r.purpose for r in results if not r.ok]})
    if service.is_verified(row) and not was_verified:
        record_for(session, principal, request, "domain.verify", target_type="sending_domain", target_id=row.id,
                   details={"domain": row.domain, "via": "ui"})
    session.commit()
    if request.headers.get("hx-request") == "true":
        return render(request, "delivery/_records.html", {"d": _domain_view(row), "checked": True})
    return _see_other(f"/app/domains/{row.id}?checked=1")


# --------------------------------------------------------------------------- delivery log


def _filters(request: Request) -> tuple[dict, dict]:
    q = request.query_params
    form = {"status": (q.get("status") or "")[:20], "method": (q.get("method") or "")[:10]}
    errors = {}
    if form["status"] and form["status"] not in RECIPIENT_STATUSES:
        errors["status"] = "Choose a status from the list."
        form["status"] = ""
    if form["method"] and form["method"] not in METHODS:
        errors["method"] = "Choose a method from the list."
        form["method"] = ""
    return form, errors


def _parse_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    try:
        stamp, _, msg_id = cursor.partition("_")
        when = datetime.fromisoformat(stamp)
    except ValueError:
        raise ValidationFailed("The page cursor is not valid.", field="cursor") from None
    if not is_id(msg_id):
        raise ValidationFailed("The page cursor is not valid.", field="cursor")
    return clock.aware(when), msg_id


@router.get("/deliveries")
def delivery_log(request: Request, principal: Principal = Depends(require(P.MESSAGES_READ, P.PHI_READ_MASKED))):
    session = request.state.db
    form, errors = _filters(request)
    unmasked = masking.wants_unmasked(principal)
    query = select(Message)
    if form["status"] or form["method"]:
        sub = select(MessageRecipient.message_id)
        if form["status"]:
            sub = sub.where(MessageRecipient.status == form["status"])
        if form["method"]:
            sub = sub.where(MessageRecipient.method == form["method"])
        query = query.where(Message.id.in_(sub))
    try:
        cursor = _parse_cursor(request.query_params.get("cursor"))
    except ValidationFailed as exc:
        errors["cursor"] = exc.message
        cursor = None
    if cursor:
        when, msg_id = cursor
        query = query.where((Message.created_at < when) | ((Message.created_at == when) & (Message.id < msg_id)))
    messages = session.scalars(query.order_by(Message.created_at.desc(), Message.id.desc()).limit(PAGE_SIZE + 1)).all()
    next_cursor = None
    if len(messages) > PAGE_SIZE:
        messages = messages[:PAGE_SIZE]
        last = messages[-1]
        next_cursor = f"{clock.aware(last.created_at).isoformat()}_{last.id}"
    ids = [m.id for m in messages]
    recipients: dict[str, list[dict]] = {i: [] for i in ids}
    if ids:
        for r in session.scalars(select(MessageRecipient).where(MessageRecipient.message_id.in_(ids))
                                 .order_by(MessageRecipient.id)):
            recipients[r.message_id].append({
                "id": r.id, "kind": r.kind, "status": r.status, "method": r.method, "tone": STATUS_TONE.get(r.status, ""),
                "address": _address(session, r.org_id, MessageRecipient.__tablename__, r.id, r.address_enc, unmasked),
                "possible_duplicate": r.possible_duplicate,
            })
    rows = [{
        "id": m.id, "created_at": clock.aware(m.created_at), "source": m.source, "purpose": m.purpose,
        "security": m.security, "contains_phi": m.contains_phi, "sandbox": m.sandbox, "recipients": recipients[m.id],
    } for m in messages]
    record_for(session, principal, request, "message.list", target_type="message_list",
               details={"view": "unmasked" if unmasked else "masked", "count": len(rows), "message_ids": ids, "via": "ui"})
    session.commit()
    from urllib.parse import urlencode

    return render(request, "delivery/log.html", {
        "messages": rows, "form": form, "errors": errors, "next_cursor": next_cursor, "unmasked": unmasked,
        "statuses": RECIPIENT_STATUSES, "methods": METHODS,
        "query": urlencode({k: v for k, v in form.items() if v}),
    }, status_code=422 if errors else 200)


@router.get("/deliveries/{message_id}")
def delivery_detail(request: Request, message_id: str,
                    principal: Principal = Depends(require(P.MESSAGES_READ, P.PHI_READ_MASKED))):
    session = request.state.db
    message = session.get(Message, message_id) if is_id(message_id) else None
    if message is None or message.org_id != principal.org_id:
        raise NotFound("No such message.", field="id")
    unmasked = masking.wants_unmasked(principal)
    ring = get_keyring()
    events: dict[str, list[dict]] = {}
    for e in session.scalars(select(MessageEvent).where(MessageEvent.message_id == message.id)
                             .order_by(MessageEvent.created_at, MessageEvent.id)):
        events.setdefault(e.recipient_id or "", []).append(
            {"type": e.type, "at": clock.aware(e.created_at), "details": {k: v for k, v in (e.details or {}).items() if v is not None}})
    recipients = []
    for r in session.scalars(select(MessageRecipient).where(MessageRecipient.message_id == message.id)
                             .order_by(MessageRecipient.id)):
        recipients.append({
            "id": r.id, "kind": r.kind, "status": r.status, "method": r.method, "reason": r.reason,
            "tone": STATUS_TONE.get(r.status, ""), "possible_duplicate": r.possible_duplicate, "attempts": r.attempts,
            "next_attempt_at": clock.aware(r.next_attempt_at), "key_fingerprint": r.key_fingerprint,
            "portal_message_id": r.portal_message_id,
            "address": _address(session, r.org_id, MessageRecipient.__tablename__, r.id, r.address_enc, unmasked),
            "evidence": {k: v for k, v in (r.evidence or {}).items() if v not in (None, "", False) or k == "cert_verified"},
            "reply": ring.decrypt_text(session, r.org_id, MessageRecipient.__tablename__, "reply", r.id, r.reply_enc)
            if unmasked and r.reply_enc else None,
            "events": events.get(r.id, []),
        })
    portal = portal_state(session, message.id)
    engagement = engagement_of(session, message.id)
    holds = legal_holds_of(session, principal.org_id, message.id)
    for r in recipients:
        r["engagement"] = engagement["recipients"].get(r["id"])
    for r in recipients:
        r["portal"] = portal.get(r["id"])
        r["portal_message_id"] = r["portal_message_id"] or (r["portal"] or {}).get("id")
    subject = None
    if unmasked:
        subject = ring.decrypt_text(session, message.org_id, Message.__tablename__, "subject", message.id, message.subject_enc)
    record_for(session, principal, request, "message.read", target_type="message", target_id=message.id,
               details={"view": "unmasked" if unmasked else "masked", "page": "delivery_detail"})
    session.commit()
    return render(request, "delivery/message.html", {
        "m": {"id": message.id, "created_at": clock.aware(message.created_at), "source": message.source,
              "purpose": message.purpose, "security": message.security, "contains_phi": message.contains_phi,
              "sandbox": message.sandbox, "from_address": message.from_address, "tags": message.tags or [],
              "subject": subject, "track_opens": message.track_opens, "track_clicks": message.track_clicks},
        "recipients": recipients, "unmasked": unmasked, "engagement": engagement["totals"], "holds": holds,
    })


# --------------------------------------------------------------------------- security preview


def _preview_page(request, *, addresses: str = "", security: str = "", contains_phi: bool = True, rows=None,
                  error: str | None = None, field: str | None = None, status_code: int = 200):
    session = request.state.db
    principal = request.state.principal
    return render(request, "delivery/preview.html", {
        "addresses": addresses, "security": security, "contains_phi": contains_phi, "rows": rows, "error": error,
        "field": field, "modes": policy.MODES, "org_mode": org_security_mode(session, principal.org_id),
        "max": MAX_PREVIEW_ADDRESSES,
    }, status_code=status_code)


@router.get("/security-preview")
def preview_page(request: Request, principal: Principal = Depends(require(P.MESSAGES_SEND))):
    return _preview_page(request)


@router.post("/security-preview")
def preview_run(request: Request, addresses: str = Form(""), security: str = Form(""), contains_phi: str = Form(""),
                principal: Principal = Depends(require(P.MESSAGES_SEND))):
    """Which method each address would get now, and why. Addresses come in the body, never in a
    URL; nothing is stored. ``messages:send`` like the API: the preview probes the recipients'
    mail servers."""
    session = request.state.db
    text = addresses[:MAX_PREVIEW_ADDRESSES * 330]
    wanted = [a.strip() for chunk in text.splitlines() for a in chunk.replace(";", ",").split(",") if a.strip()]
    phi = contains_phi != "no"
    keep = {"addresses": text, "security": security, "contains_phi": phi}
    try:
        if not wanted:
            raise ValidationFailed("Enter at least one address.", field="addresses")
        if len(wanted) > MAX_PREVIEW_ADDRESSES:
            raise ValidationFailed(f"At most {MAX_PREVIEW_ADDRESSES} addresses at a time.", field="addresses")
        org_mode = org_security_mode(session, principal.org_id)
        policy.effective_mode(org_mode, security or None)
        keys = service.keys_on_file(session, principal.org_id, wanted)
        org_relay = service.delivery_settings(session, principal.org_id)["relay"]
    except CarePostError as exc:
        session.rollback()
        return _preview_page(request, **keep, error=exc.message, field=exc.field, status_code=422)
    record_for(session, principal, request, "security.preview", target_type="security_preview",
               details={"count": len(keys), "security": security or org_mode, "contains_phi": phi})
    session.commit()  # no transaction is held during the TLS probes
    try:
        rows = asyncio.run(service.security_preview(keys, org_mode=org_mode, override=security or None, contains_phi=phi,
                                                        org_relay=org_relay))
    except CarePostError as exc:
        return _preview_page(request, **keep, error=exc.message, field=exc.field, status_code=422)
    return _preview_page(request, **keep, rows=[r.to_dict() for r in rows])


# --------------------------------------------------------------------------- recipient keys


def _key_rows(session, unmasked: bool) -> list[dict]:
    rows = session.scalars(select(RecipientKey).order_by(RecipientKey.created_at.desc()).limit(500)).all()
    out = []
    now = clock.now()
    for r in rows:
        info = service.key_info(r)
        expired = info.expires_at is not None and info.expires_at <= now
        out.append({
            "id": r.id, "kind": r.kind, "fingerprint": r.fingerprint, "expires_at": info.expires_at,
            "expiring_soon": info.expiring_soon and not expired, "expired": expired,
            "address": _address(session, r.org_id, RecipientKey.__tablename__, r.id, r.address_enc, unmasked),
        })
    return out


def _keys_page(request: Request, principal: Principal, *, form: dict | None = None, error: str | None = None,
               field: str | None = None, added: dict | None = None, status_code: int = 200):
    session = request.state.db
    unmasked = masking.wants_unmasked(principal)
    keys = _key_rows(session, unmasked)
    record_for(session, principal, request, "recipient_key.list", target_type="recipient_key_list",
               details={"view": "unmasked" if unmasked else "masked", "count": len(keys)})
    session.commit()
    return render(request, "delivery/keys.html", {
        "keys": keys, "form": form or {"address": "", "kind": "pgp", "key": ""}, "error": error, "field": field,
        "added": added, "can_upload": principal.can(P.MESSAGES_SEND), "unmasked": unmasked,
        "expiring": sum(1 for k in keys if k["expiring_soon"]),
    }, status_code=status_code)


@router.get("/recipient-keys")
def keys_page(request: Request, principal: Principal = Depends(require(P.MESSAGES_READ, P.PHI_READ_MASKED))):
    return _keys_page(request, principal, added={"fingerprint": request.query_params.get("added")}
                      if request.query_params.get("added") else None)


@router.post("/recipient-keys")
async def key_upload(request: Request, address: str = Form(""), kind: str = Form("pgp"), key: str = Form(""),
                     key_file: UploadFile | None = File(None),
                     principal: Principal = Depends(require(P.MESSAGES_SEND, P.PHI_READ_MASKED))):
    material: str | bytes = key
    if key_file is not None and key_file.filename:
        material = await key_file.read(MAX_KEY_BYTES + 1)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_store_key, request, principal, address.strip()[:320], kind[:10], material)


def _store_key(request: Request, principal: Principal, address: str, kind: str, material: str | bytes):
    session = request.state.db
    form = {"address": address, "kind": kind if kind in service.KEY_KINDS else "pgp",
            "key": material if isinstance(material, str) else ""}
    try:
        if not material or (isinstance(material, str) and not material.strip()):
            raise ValidationFailed("Paste the certificate or choose a file.", field="key")
        if len(material) > MAX_KEY_BYTES:
            raise ValidationFailed("The certificate is larger than 256 KiB.", field="key")
        info = service.add_recipient_key(session, principal.org_id, address, kind, material, actor_id=principal.actor_id)
    except CarePostError as exc:
        session.rollback()
        return _keys_page(request, principal, form=form, error=exc.message, field=exc.field, status_code=exc.status_code)
    record_for(session, principal, request, "recipient_key.create", target_type="recipient_key", target_id=info.id,
               details={"kind": info.kind, "fingerprint": info.fingerprint, "via": "ui"})
    session.commit()
    return _see_other(f"/app/recipient-keys?added={info.fingerprint}")


@router.post("/recipient-keys/{key_id}/delete")
def key_delete(request: Request, key_id: str, principal: Principal = Depends(require(P.MESSAGES_SEND))):
    session = request.state.db
    if not is_id(key_id):
        raise NotFound("No such recipient key.", field="id")
    service.delete_recipient_key(session, key_id)
    record_for(session, principal, request, "recipient_key.delete", target_type="recipient_key", target_id=key_id,
               details={"via": "ui"})
    session.commit()
    return _see_other("/app/recipient-keys")


# --------------------------------------------------------------------------- contact page sections


def contact_messages_rows(session, org_id: str, contact_id: str) -> list[dict]:
    """Message history on the contact page: the newest deliveries to this patient (status,
    method, purpose) with a link to each message; no addresses or content."""
    from sqlalchemy import select

    from carepost.delivery.models import Message, MessageRecipient

    rows = session.execute(
        select(MessageRecipient.message_id, MessageRecipient.status, MessageRecipient.method, Message.purpose,
               Message.created_at)
        .join(Message, Message.id == MessageRecipient.message_id)
        .where(MessageRecipient.org_id == org_id, MessageRecipient.contact_id == contact_id)
        .order_by(Message.created_at.desc()).limit(10)
    ).all()
    out = [{"summary": f"{clock.aware(created):%Y-%m-%d %H:%M} — {purpose or 'message'}: {status}"
                       + (f" by {method}" if method else ""),
            "href": f"/app/deliveries/{message_id}"} for message_id, status, method, purpose, created in rows]
    return out or [{"summary": "No messages yet."}]


def contact_keys_rows(session, org_id: str, contact_id: str) -> list[dict]:
    """Encryption keys on file for the patient's addresses (by blind index), with a warning
    when one expires within 30 days."""
    from sqlalchemy import select

    from carepost.delivery.models import RecipientKey
    from carepost.patients.models import ContactIdentifier

    indexes = list(session.scalars(select(ContactIdentifier.blind_index).where(
        ContactIdentifier.org_id == org_id, ContactIdentifier.contact_id == contact_id, ContactIdentifier.kind == "email")))
    if not indexes:
        return [{"summary": "No email address on file."}]
    soon = clock.now() + service.KEY_EXPIRY_WARNING
    out = []
    for key in session.scalars(select(RecipientKey).where(RecipientKey.org_id == org_id,
                                                          RecipientKey.address_index.in_(indexes))):
        expires = clock.aware(key.expires_at)
        note = ""
        if expires is not None:
            note = f", expires {expires:%Y-%m-%d}" + (" — renew soon" if expires <= soon else "")
        out.append({"summary": f"{'OpenPGP' if key.kind == 'pgp' else 'S/MIME'} key {key.fingerprint[:16]}…{note}",
                    "href": "/app/recipient-keys"})
    return out or [{"summary": "No PGP or S/MIME key on file: protected mail goes by TLS or the secure portal."}]
