"""Events and outbound webhooks: one function, :func:`emit`, through which every capability
announces what happened, and the delivery of those events to the organization's endpoints.

How an event travels:

1. ``emit(session, org_id, type, data)`` runs inside the caller's transaction. When an enabled
   endpoint of the organization subscribes to ``type``, it stores the event (payload encrypted)
   and one :class:`WebhookDelivery` per endpoint. Nothing is sent yet and nothing is queued: if
   the caller rolls back, the event never happened.
2. When the caller's transaction commits, each delivery id is queued (``tasks.deliver_webhook``).
   A queue that is down loses nothing: the minutely sweep (``tasks.sweep_webhook_deliveries``)
   queues every due delivery nobody is working on.
3. :func:`attempt_delivery` claims the delivery with a lease (so two workers never post the same
   delivery at once), signs and posts it outside any database transaction, then records the
   attempt: success; ``410 Gone`` disables the endpoint and cancels its pending deliveries; a
   refused target (SSRF guard) fails at once; anything else is retried on
   ``webhooks.RETRY_SCHEDULE`` (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h), then fails.

Payloads carry ids, codes and statuses — never PHI — unless the endpoint was created with
``include_phi`` by someone allowed to see PHI unmasked; only then are the event's PHI fields
(kept in their own encrypted column) merged in, over https only, and each such delivery is
audited as a disclosure.

Event types are registered by name (:func:`register_event_types`) so later capabilities add
their own; the message events are registered here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import event as sa_event
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.database import system_session
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import new_id
from carepost.core.logging import get_logger
from carepost.core.ports import Port
from carepost.tracking import webhooks
from carepost.tracking.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent

log = get_logger("carepost.tracking")

ALL_EVENTS = "*"
TEST_EVENT = "webhook.test"
MAX_ENDPOINTS_PER_ORG = 50
MAX_DESCRIPTION_CHARS = 200

EVENT_TYPES: dict[str, str] = {}


def register_event_types(types: dict[str, str]) -> None:
    """Add event types (name -> description). Names are ``<object>.<what happened>``."""
    EVENT_TYPES.update(types)


register_event_types({
    "message.queued": "A message was accepted for a recipient and waits for delivery.",
    "message.sent": "A recipient's copy (or portal notification) was handed to the next server.",
    "message.delivered": "The recipient's server accepted the message.",
    "message.deferred": "Delivery to a recipient failed for now and will be retried, or a remote server reported a delay.",
    "message.bounced": "The message could not be delivered to a recipient (hard or soft bounce).",
    "message.failed": "Delivery to a recipient failed for good (retries over, or no allowed secure method).",
    "message.complained": "A recipient reported the message as spam (feedback report).",
    "message.portal_viewed": "A recipient opened the message in the secure portal for the first time.",
    "message.excluded": "A recipient was not sent the message; data.reason is the reason code (unsubscribed_all, "
                        "no_authorization, no_opt_out, deceased, ...).",
    "consent.unsubscribed": "A contact (or an address) opted out of a topic (scope topic) or of all marketing "
                            "(scope marketing), by a link, the preference center, a reply, staff or the API.",
    "consent.subscribed": "A contact opted in to a topic or to marketing again (confirmed, when the topic asks for "
                          "double opt-in).",
    "authorization.signed": "A patient's HIPAA authorization (164.508) was recorded.",
    "authorization.revoked": "A patient's authorization was revoked (by the patient, staff or the API).",
    TEST_EVENT: "A test event sent on request to one endpoint.",
})


# --------------------------------------------------------------------------- emitting


def _hooks(session: Session) -> dict:
    """Per-session state: subscribers cached for the transaction, deliveries to queue on commit."""
    state = session.info.get("_webhooks")
    if state is None:
        state = session.info["_webhooks"] = {"subs": {}, "queue": []}
        sa_event.listen(session, "after_commit", _after_commit)
        sa_event.listen(session, "after_rollback", _after_rollback)
    return state


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a SAVEPOINT was released; the transaction that owns the deliveries goes on
    state = session.info.get("_webhooks") or {}
    state["subs"] = {}
    queued, state["queue"] = state.get("queue", []), []
    if queued:
        enqueue_deliveries(queued)


def _after_rollback(session: Session) -> None:
    if session.in_nested_transaction():
        return
    state = session.info.get("_webhooks") or {}
    state["subs"] = {}
    state["queue"] = []


def enqueue_deliveries(delivery_ids: list[str]) -> None:
    """Queue deliveries now; a failure to queue is left to the sweep."""
    from carepost.tracking.tasks import deliver_webhook

    for delivery_id in delivery_ids:
        try:
            deliver_webhook(delivery_id)
        except Exception as exc:  # the sweep picks up whatever was not queued
            log.warning("webhook_enqueue_failed", delivery_id=delivery_id, error_type=type(exc).__name__)


@dataclass(frozen=True)
class _Subscriber:
    id: str
    event_types: tuple[str, ...]
    include_phi: bool

    def wants(self, type_: str) -> bool:
        return ALL_EVENTS in self.event_types or type_ in self.event_types


def _subscribers(session: Session, org_id: str) -> list[_Subscriber]:
    state = _hooks(session)
    subs = state["subs"].get(org_id)
    if subs is None:
        rows = session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.event_types, WebhookEndpoint.include_phi)
            .where(WebhookEndpoint.org_id == org_id, WebhookEndpoint.enabled.is_(True))
        ).all()
        subs = state["subs"][org_id] = [_Subscriber(r[0], tuple(r[1] or ()), bool(r[2])) for r in rows]
    return subs


def emit(session: Session, org_id: str, type_: str, data: dict, *,
         phi: dict | Callable[[], dict] | None = None, endpoint_ids: list[str] | None = None) -> list[str]:
    """Announce an event of ``org_id``. ``data`` holds ids, codes and statuses only (it goes to
    every subscribed endpoint); ``phi`` (a dict, or a function computing it only when needed) is
    merged into ``data`` for endpoints that receive PHI. ``endpoint_ids`` sends to exactly those
    endpoints, subscribed or not (test events). Returns the delivery ids; the caller commits."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}: register it first")
    subs = _subscribers(session, org_id)
    if endpoint_ids is not None:
        targets = [s for s in subs if s.id in endpoint_ids]
    else:
        targets = [s for s in subs if s.wants(type_)]
    if not targets:
        return []
    now = clock.now()
    ring = get_keyring()
    event = WebhookEvent(id=new_id(), org_id=org_id, type=type_, created_at=now)
    payload = {"type": type_, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": data}
    event.payload_enc = ring.encrypt(session, org_id, WebhookEvent.__tablename__, "payload", event.id,
                                     webhooks.body_of(payload))
    if phi is not None and any(t.include_phi for t in targets):
        extra = phi() if callable(phi) else phi
        if extra:
            event.phi_enc = ring.encrypt(session, org_id, WebhookEvent.__tablename__, "phi", event.id,
                                         json.dumps(extra, separators=(",", ":")))
    session.add(event)
    session.flush([event])
    ids = []
    for target in targets:
        delivery = WebhookDelivery(id=new_id(), org_id=org_id, endpoint_id=target.id, event_id=event.id,
                                   status="pending", attempts=0, next_attempt_at=now, created_at=now)
        session.add(delivery)
        ids.append(delivery.id)
    _hooks(session)["queue"].extend(ids)
    return ids


# The fields of a message event's details that may leave CarePost (codes, never text).
_MESSAGE_DETAIL_KEYS = ("reply_code", "possible_duplicate", "bounce_type", "status", "source", "feedback_type",
                        "remote_mta", "action")


def emit_message_event(session: Session, recipient, event) -> list[str]:
    """``message.<type>`` for a recipient's event (called by ``delivery.service.add_event``)."""
    type_ = f"message.{event.type}"
    if type_ not in EVENT_TYPES:
        return []
    details = event.details or {}
    data = {
        "message_id": recipient.message_id,
        "recipient_id": recipient.id,
        "event_id": event.id,
        "recipient_kind": recipient.kind,
        "status": recipient.status,
        "method": recipient.method,
        "details": {k: details[k] for k in _MESSAGE_DETAIL_KEYS if details.get(k) is not None},
    }
    if event.type in ("bounced", "failed", "deferred", "excluded") and recipient.reason:
        data["reason"] = recipient.reason
    if event.type == "excluded":
        data["reason_code"] = (details.get("reason") or recipient.reason or "").split(":", 1)[0] or None

    def phi() -> dict:
        address = get_keyring().decrypt_text(session, recipient.org_id, "message_recipients", "address", recipient.id,
                                             recipient.address_enc)
        return {"address": address}

    return emit(session, recipient.org_id, type_, data, phi=phi)


# The consent events (published by consent through ``core.events``, wired by ``carepost.assembly``).
# ``data`` holds ids, codes and dates; endpoints that receive PHI also get the address concerned.


def _consent_phi(session: Session, org_id: str, data: dict) -> Callable[[], dict]:
    def phi() -> dict:
        ring = get_keyring()
        if data.get("recipient_id"):
            from carepost.delivery.models import MessageRecipient

            rec = session.get(MessageRecipient, data["recipient_id"])
            if rec is not None and rec.org_id == org_id and rec.address_enc:
                return {"address": ring.decrypt_text(session, org_id, "message_recipients", "address", rec.id,
                                                     rec.address_enc)}
        if data.get("contact_id"):
            from carepost.patients.models import ContactIdentifier

            ident = session.scalars(select(ContactIdentifier).where(
                ContactIdentifier.org_id == org_id, ContactIdentifier.contact_id == data["contact_id"],
                ContactIdentifier.kind == "email").order_by(ContactIdentifier.rank, ContactIdentifier.id)).first()
            if ident is not None and ident.value_enc:
                return {"address": ring.decrypt_text(session, org_id, ContactIdentifier.__tablename__, "value",
                                                     ident.id, ident.value_enc)}
        return {}
    return phi


def _emit_consent(type_: str, session: Session, org_id: str, data: dict) -> list[str]:
    return emit(session, org_id, type_, dict(data), phi=_consent_phi(session, org_id, data))


def emit_consent_unsubscribed(session: Session, org_id: str, data: dict) -> list[str]:
    return _emit_consent("consent.unsubscribed", session, org_id, data)


def emit_consent_subscribed(session: Session, org_id: str, data: dict) -> list[str]:
    return _emit_consent("consent.subscribed", session, org_id, data)


def emit_authorization_signed(session: Session, org_id: str, data: dict) -> list[str]:
    return _emit_consent("authorization.signed", session, org_id, data)


def emit_authorization_revoked(session: Session, org_id: str, data: dict) -> list[str]:
    return _emit_consent("authorization.revoked", session, org_id, data)


# --------------------------------------------------------------------------- endpoints


def _check_event_types(event_types) -> list[str]:
    if not isinstance(event_types, (list, tuple)) or not event_types:
        raise ValidationFailed("Choose at least one event type (or \"*\" for all).", field="event_types")
    out = []
    for i, name in enumerate(event_types):
        if not isinstance(name, str) or (name != ALL_EVENTS and name not in EVENT_TYPES):
            raise ValidationFailed(f"Unknown event type at position {i + 1}; see GET /api/v1/webhook-event-types.",
                                   field="event_types")
        if name not in out:
            out.append(name)
    return [ALL_EVENTS] if ALL_EVENTS in out else out


def _check_description(description) -> str:
    description = (description or "").strip()
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise ValidationFailed(f"The description is longer than {MAX_DESCRIPTION_CHARS} characters.", field="description")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in description):
        raise ValidationFailed("The description may not contain control characters.", field="description")
    return description


def _check_phi(url: str, include_phi: bool, allow_phi: bool) -> None:
    if not include_phi:
        return
    if not allow_phi:
        raise ValidationFailed("Only someone allowed to see PHI unmasked may send PHI to an endpoint.", field="include_phi")
    if not url.strip().lower().startswith("https://"):
        raise ValidationFailed("An endpoint that receives PHI must use https://.", field="url")


def _secret_hint(secret: str) -> str:
    return f"{webhooks.SECRET_PREFIX}…{secret[-4:]}"


def _store_secret(session: Session, row: WebhookEndpoint, secret: str) -> None:
    row.secret_enc = get_keyring().encrypt(session, row.org_id, WebhookEndpoint.__tablename__, "secret", row.id, secret)
    row.secret_hint = _secret_hint(secret)


def endpoint_secret(session: Session, row: WebhookEndpoint) -> str:
    return get_keyring().decrypt_text(session, row.org_id, WebhookEndpoint.__tablename__, "secret", row.id, row.secret_enc)


def create_endpoint(session: Session, org_id: str, *, url: str, event_types, description: str = "",
                    include_phi: bool = False, allow_phi: bool = False,
                    created_by: str | None = None) -> tuple[WebhookEndpoint, str]:
    """A new endpoint and its signing secret (returned once; stored encrypted)."""
    event_types = _check_event_types(event_types)
    description = _check_description(description)
    webhooks.parse_url(url)
    _check_phi(url, bool(include_phi), allow_phi)
    webhooks.check_url(url)  # resolves the host: after the checks that need no network
    count = len(session.scalars(select(WebhookEndpoint.id).where(WebhookEndpoint.org_id == org_id)).all())
    if count >= MAX_ENDPOINTS_PER_ORG:
        raise Conflict(f"An organization can have at most {MAX_ENDPOINTS_PER_ORG} webhook endpoints.", field="url")
    row = WebhookEndpoint(id=new_id(), org_id=org_id, url=url.strip(), description=description, event_types=event_types,
                          include_phi=bool(include_phi), enabled=True, created_by=created_by)
    secret = webhooks.new_secret()
    _store_secret(session, row, secret)
    session.add(row)
    session.flush()
    return row, secret


def get_endpoint(session: Session, org_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.get(WebhookEndpoint, endpoint_id) if isinstance(endpoint_id, str) else None
    if row is None or row.org_id != org_id:
        raise NotFound("No such webhook endpoint.", field="id")
    return row


def list_endpoints(session: Session, org_id: str) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.org_id == org_id)
                                .order_by(WebhookEndpoint.created_at)))


_UNSET = object()


def update_endpoint(session: Session, row: WebhookEndpoint, *, url=_UNSET, event_types=_UNSET, description=_UNSET,
                    include_phi=_UNSET, enabled=_UNSET, allow_phi: bool = False) -> list[str]:
    """Change an endpoint; returns the names of the fields that changed."""
    changed = []
    new_url = row.url if url is _UNSET else url
    new_phi = row.include_phi if include_phi is _UNSET else bool(include_phi)
    if url is not _UNSET:
        webhooks.check_url(url)
        new_url = url.strip()
    if new_phi and (url is not _UNSET or include_phi is not _UNSET):
        # Turning PHI on, or pointing a PHI endpoint somewhere else, needs the permission; https always.
        _check_phi(new_url, True, allow_phi or (row.include_phi and new_url == row.url))
    if event_types is not _UNSET:
        event_types = _check_event_types(event_types)
    if description is not _UNSET:
        description = _check_description(description)
    for name, value in (("url", new_url), ("event_types", event_types), ("description", description),
                        ("include_phi", new_phi)):
        if value is not _UNSET and getattr(row, name) != value:
            setattr(row, name, value)
            changed.append(name)
    if enabled is not _UNSET and bool(enabled) != row.enabled:
        row.enabled = bool(enabled)
        row.disabled_reason = None if row.enabled else "disabled by a person"
        changed.append("enabled")
    if changed:
        row.updated_at = clock.now()
        session.flush()
    return changed


def rotate_secret(session: Session, row: WebhookEndpoint) -> str:
    secret = webhooks.new_secret()
    _store_secret(session, row, secret)
    row.updated_at = clock.now()
    session.flush()
    return secret


def delete_endpoint(session: Session, row: WebhookEndpoint) -> None:
    session.delete(row)
    session.flush()


# --------------------------------------------------------------------------- deliveries


@dataclass
class DeliveryView:
    delivery: WebhookDelivery
    event_type: str
    attempts: list[WebhookAttempt]


def list_deliveries(session: Session, org_id: str, endpoint_id: str, *, limit: int = 50,
                    status: str | None = None) -> list[DeliveryView]:
    """The endpoint's delivery log, newest first, with each delivery's attempts."""
    q = (select(WebhookDelivery, WebhookEvent.type).join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
         .where(WebhookDelivery.org_id == org_id, WebhookDelivery.endpoint_id == endpoint_id))
    if status:
        q = q.where(WebhookDelivery.status == status)
    rows = session.execute(q.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                           .limit(max(1, min(limit, 200)))).all()
    ids = [d.id for d, _ in rows]
    attempts: dict[str, list[WebhookAttempt]] = {i: [] for i in ids}
    if ids:
        for a in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids))
                                 .order_by(WebhookAttempt.attempt)):
            attempts[a.delivery_id].append(a)
    return [DeliveryView(d, t, attempts[d.id]) for d, t in rows]


def get_delivery(session: Session, org_id: str, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
    row = session.get(WebhookDelivery, delivery_id) if isinstance(delivery_id, str) else None
    if row is None or row.org_id != org_id or row.endpoint_id != endpoint_id:
        raise NotFound("No such delivery.", field="delivery_id")
    return row


def replay(session: Session, org_id: str, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
    """Send a delivered or failed event again, now, as a new delivery (same ``webhook-id``)."""
    endpoint = get_endpoint(session, org_id, endpoint_id)
    original = get_delivery(session, org_id, endpoint_id, delivery_id)
    if not endpoint.enabled:
        raise Conflict("The endpoint is disabled; enable it before replaying.", field="enabled")
    now = clock.now()
    row = WebhookDelivery(id=new_id(), org_id=org_id, endpoint_id=endpoint.id, event_id=original.event_id,
                          replay_of=original.id, status="pending", attempts=0, next_attempt_at=now, created_at=now)
    session.add(row)
    session.flush()
    _hooks(session)["queue"].append(row.id)
    return row


def send_test_event(session: Session, org_id: str, endpoint_id: str) -> WebhookDelivery:
    endpoint = get_endpoint(session, org_id, endpoint_id)
    if not endpoint.enabled:
        raise Conflict("The endpoint is disabled; enable it before sending a test event.", field="enabled")
    ids = emit(session, org_id, TEST_EVENT, {"endpoint_id": endpoint.id, "note": "A test event from CarePost."},
               endpoint_ids=[endpoint.id])
    return session.get(WebhookDelivery, ids[0])


# --------------------------------------------------------------------------- one attempt


webhook_baa: Port = Port(
    "tracking.webhook_baa", "(session, org_id, endpoint_id) -> None when a BAA covers a PHI webhook endpoint, else the "
    "reason PHI may not be posted to it (compliance.associates.webhook_refusal).")


def _claim(delivery_id: str, lease: timedelta):
    """Lease a due delivery; returns what the POST needs, or None when there is nothing to do."""
    with system_session() as session:
        q = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
        if session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        delivery = session.scalars(q).first()
        if delivery is None or delivery.status != "pending":
            return None
        now = clock.now()
        if delivery.lease_until is not None and clock.aware(delivery.lease_until) > now:
            return None
        if delivery.next_attempt_at is not None and clock.aware(delivery.next_attempt_at) > now + timedelta(seconds=2):
            return None  # not due: the scheduled task or the sweep comes back for it
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            delivery.status = "cancelled"
            delivery.finished_at = now
            delivery.last_error = "the endpoint is disabled"
            session.commit()
            return None
        event = session.get(WebhookEvent, delivery.event_id)
        ring = get_keyring()
        payload = json.loads(ring.decrypt(session, event.org_id, WebhookEvent.__tablename__, "payload", event.id,
                                          event.payload_enc))
        refusal = webhook_baa(session, delivery.org_id, endpoint.id) if endpoint.include_phi and event.phi_enc else None
        if refusal:  # no BAA on record: PHI is not posted (issue 16 item 9); replay once one is recorded
            from carepost.audit.service import record

            delivery.status, delivery.finished_at, delivery.next_attempt_at = "failed", now, None
            delivery.last_error = refusal[:300]
            record(session, org_id=delivery.org_id, actor_type="system", actor_id=None, action="webhook.phi_refused",
                   target_type="webhook_endpoint", target_id=endpoint.id, outcome="denied",
                   details={"event_id": event.id, "delivery_id": delivery.id, "reason": "no_baa"})
            session.commit()
            return None
        if endpoint.include_phi and event.phi_enc:
            extra = json.loads(ring.decrypt(session, event.org_id, WebhookEvent.__tablename__, "phi", event.id,
                                            event.phi_enc))
            payload["data"] = {**payload.get("data", {}), **extra}
        claim = {
            "org_id": delivery.org_id, "endpoint_id": endpoint.id, "url": endpoint.url, "event_id": event.id,
            "event_type": event.type, "secret": endpoint_secret(session, endpoint), "body": webhooks.body_of(payload),
            "phi": bool(endpoint.include_phi and event.phi_enc), "attempt": delivery.attempts + 1,
        }
        delivery.attempts += 1
        delivery.lease_until = now + lease
        session.commit()
        return claim


def attempt_delivery(delivery_id: str) -> str | None:
    """Make one attempt of a delivery if it is due; returns the attempt's outcome (or None when
    there was nothing to do). Runs its own short transactions: none is open during the POST."""
    from carepost.audit.service import record
    from carepost.core.config import get_settings

    settings = get_settings()
    claim = _claim(delivery_id, timedelta(seconds=settings.webhook_timeout * 4 + 30))
    if claim is None:
        return None
    timestamp = int(clock.now().timestamp())
    headers = {
        "webhook-id": claim["event_id"],
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhooks.sign(claim["secret"], claim["event_id"], timestamp, claim["body"]),
    }
    started = clock.now()
    result = webhooks.post(claim["url"], claim["body"], headers, settings)
    retry_in: timedelta | None = None
    with system_session() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:  # the endpoint was deleted meanwhile
            return result.outcome
        now = clock.now()
        session.add(WebhookAttempt(id=new_id(), org_id=delivery.org_id, delivery_id=delivery.id,
                                   attempt=claim["attempt"], started_at=started, duration_ms=result.duration_ms,
                                   status_code=result.status_code, outcome=result.outcome, error=result.error))
        delivery.lease_until = None
        delivery.last_status_code = result.status_code
        delivery.last_error = result.error
        if result.outcome == "succeeded":
            delivery.status = "succeeded"
            delivery.finished_at = now
            delivery.next_attempt_at = None
            if claim["phi"]:
                record(session, org_id=delivery.org_id, actor_type="system", actor_id=None,
                       action="webhook.phi_disclosed", target_type="webhook_endpoint", target_id=claim["endpoint_id"],
                       details={"event_id": claim["event_id"], "event_type": claim["event_type"],
                                "delivery_id": delivery.id})
        elif result.outcome == "gone":
            delivery.status = "failed"
            delivery.finished_at = now
            delivery.next_attempt_at = None
            endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
            if endpoint is not None and endpoint.enabled:
                endpoint.enabled = False
                endpoint.disabled_reason = "the endpoint answered 410 Gone"
                endpoint.updated_at = now
                session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == "pending",
                           WebhookDelivery.id != delivery.id)
                    .values(status="cancelled", finished_at=now, last_error="the endpoint answered 410 Gone")
                    .execution_options(synchronize_session=False)
                )
                record(session, org_id=delivery.org_id, actor_type="system", actor_id=None,
                       action="webhook.endpoint_disabled", target_type="webhook_endpoint", target_id=endpoint.id,
                       details={"reason": "410 Gone", "delivery_id": delivery.id})
        elif result.outcome == "refused":
            delivery.status = "failed"
            delivery.finished_at = now
            delivery.next_attempt_at = None
        else:
            retry_in = webhooks.retry_delay(claim["attempt"])
            if retry_in is None:
                delivery.status = "failed"
                delivery.finished_at = now
                delivery.next_attempt_at = None
            else:
                delivery.next_attempt_at = now + retry_in
        session.commit()
    log.info("webhook_attempt", delivery_id=delivery_id, endpoint_id=claim["endpoint_id"], attempt_count=claim["attempt"],
             outcome_status=result.outcome, http_status=result.status_code, duration_ms=result.duration_ms)
    if retry_in is not None:
        from carepost.tracking.tasks import deliver_webhook

        try:
            deliver_webhook.schedule((delivery_id,), delay=retry_in.total_seconds())
        except Exception as exc:
            log.warning("webhook_schedule_failed", delivery_id=delivery_id, error_type=type(exc).__name__)
    return result.outcome


def due_deliveries(session: Session, *, now: datetime | None = None, grace: timedelta = timedelta(seconds=60),
                   limit: int = 500) -> list[str]:
    """Pending deliveries that are due (by ``grace`` already) and leased by nobody: the sweep's work."""
    now = now or clock.now()
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.lease_until)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now - grace)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)
    ).all()
    return [rid for rid, lease in rows if lease is None or clock.aware(lease) <= now]


def purge_log(session: Session, *, now: datetime | None = None) -> dict[str, int]:
    """Delete finished deliveries (with their attempts) and events older than
    ``CAREPOST_WEBHOOK_LOG_RETENTION_DAYS``; pending deliveries and their events are kept."""
    from sqlalchemy import delete, exists

    from carepost.core.config import get_settings

    cutoff = (now or clock.now()) - timedelta(days=get_settings().webhook_log_retention_days)
    finished = select(WebhookDelivery.id).where(WebhookDelivery.status != "pending", WebhookDelivery.created_at < cutoff)
    counts = {
        "attempts": session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(finished))
                                    .execution_options(synchronize_session=False)).rowcount or 0,
    }
    counts["deliveries"] = session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.status != "pending", WebhookDelivery.created_at < cutoff)
        .execution_options(synchronize_session=False)).rowcount or 0
    counts["events"] = session.execute(
        delete(WebhookEvent).where(WebhookEvent.created_at < cutoff,
                                   ~exists().where(WebhookDelivery.event_id == WebhookEvent.id))
        .execution_options(synchronize_session=False)).rowcount or 0
    return counts
