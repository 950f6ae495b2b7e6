"""Disclosures CarePost derives from what it logs anyway, for the accounting (registered with
``audit.disclosures.register_source`` by the composition root).

**Webhooks that carry PHI.** An endpoint created with ``include_phi`` (``tracking``; only by a
holder of ``phi:read_unmasked``, https only) receives, merged into the event's data, the PHI of
that event — today the patient's e-mail address on message and consent events. Each successful
delivery appends a ``webhook.phi_disclosed`` audit event (endpoint, event and delivery ids). For
one patient, this source reads those audit events in the period, decrypts each event's payload
(ids only) to find the patient it concerns (``contact_id``, or the message recipient's contact),
and lists the deliveries that concern this patient, with the endpoint's description and URL as
recipient. The purpose is not recorded on an endpoint; the entry says so, for staff to complete
by recording the disclosure by hand if the endpoint is a third party rather than a business
associate of the organization (disclosures to a business associate for operations are outside
the accounting, 164.528(a)(1)(i)).

Set-based read across capabilities (a documented exception): the webhook tables of ``tracking``
and the recipients of ``delivery`` are read directly. The cost grows with the organization's PHI
webhook deliveries in the period (one payload decrypted per delivery); see docs/compliance.md.

**Not derived (recorded by hand instead):** exports — the right-of-access export goes to the
individual (excluded, 164.528(a)(1)(ii)), de-identified exports hold no PHI, and CarePost has no
identified or limited-data-set export to a third party; portal access by a third party is not
recorded as such (the portal authenticates the addressee of a message, not who they are).
"""

from __future__ import annotations

import json
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.audit.disclosures import phi_webhook_events
from carepost.core.crypto import get_keyring


def webhook_disclosures(session: Session, org_id: str, contact_id: str, since: datetime, until: datetime) -> list[dict]:
    from carepost.delivery.models import MessageRecipient
    from carepost.tracking.models import WebhookEndpoint, WebhookEvent

    events = phi_webhook_events(session, org_id, since, until)
    if not events:
        return []
    event_ids = sorted({(e.details or {}).get("event_id") for e in events} - {None})
    payloads: dict[str, dict] = {}
    ring = get_keyring()
    for row in session.scalars(select(WebhookEvent).where(WebhookEvent.org_id == org_id, WebhookEvent.id.in_(event_ids))):
        try:
            payloads[row.id] = json.loads(ring.decrypt(session, org_id, WebhookEvent.__tablename__, "payload", row.id,
                                                       row.payload_enc)).get("data") or {}
        except Exception:  # an unreadable payload is left out rather than failing the accounting
            continue
    recipient_ids = sorted({d.get("recipient_id") for d in payloads.values()} - {None})
    recipient_contact = dict(session.execute(
        select(MessageRecipient.id, MessageRecipient.contact_id)
        .where(MessageRecipient.org_id == org_id, MessageRecipient.id.in_(recipient_ids))).all()) if recipient_ids else {}
    endpoint_ids = sorted({e.target_id for e in events} - {None})
    endpoints = {row.id: row for row in session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.org_id == org_id, WebhookEndpoint.id.in_(endpoint_ids)))}
    out = []
    for e in events:
        details = e.details or {}
        data = payloads.get(details.get("event_id"))
        if data is None:
            continue
        concerns = data.get("contact_id") or recipient_contact.get(data.get("recipient_id"))
        if concerns != contact_id:
            continue
        endpoint = endpoints.get(e.target_id)
        host = urlsplit(endpoint.url).hostname if endpoint is not None else None
        out.append({
            "disclosed_at": e.occurred_at,
            "recipient_name": (endpoint.description or f"Webhook endpoint at {host}") if endpoint is not None
            else "A webhook endpoint since deleted",
            "recipient_address": endpoint.url if endpoint is not None else None,
            "description": f"The patient's e-mail address, sent with the event {details.get('event_type') or 'webhook'}.",
            "purpose": "Not recorded: sent to a webhook endpoint set to receive PHI (include_phi).",
            "source": "webhook", "source_ref": details.get("delivery_id"),
        })
    return out
