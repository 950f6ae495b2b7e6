"""Sending the portal's own short emails: the one-time code to a recipient and the "a secure
reply arrived" notice to a sender. Neither carries PHI (the code opens nothing without the link,
the notice is a link into CarePost behind sign-in), so they go like any message without PHI:
over TLS when the receiving server offers it, DKIM-signed with the organization's sending
domain, through the same pooled SMTP client, relay settings and MX overrides as every delivery
(``delivery.smtp``; in relay mode verified TLS to the relay is required as always).

Sent with ``delivery.smtp`` directly rather than through a queued ``Message``: a code must
arrive within seconds, and it is not a message of the organization's (it is not shown in the
delivery log, it is audited as ``portal.code.sent``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy.orm import Session

from carepost.accounts.models import Organization
from carepost.delivery import service as delivery_service
from carepost.delivery.mime import compose
from carepost.delivery.models import SendingDomain
from carepost.delivery.smtp import DeliveryClient, Envelope


@dataclass
class Sent:
    status: str  # delivered | deferred | bounced
    reason: str
    reply_code: int | None = None
    tls_version: str | None = None


def _sending_domain(session: Session, org_id: str) -> SendingDomain | None:
    """The organization's sending domain whose ownership it has proven (its DNS checking out
    first, else the oldest); an unproven claim is never signed for (issue 9 item 2)."""
    return delivery_service.notice_sending_domain(session, org_id)


def sender_for(session: Session, org_id: str) -> tuple[str, str, SendingDomain | None]:
    """(From header, envelope sender, sending domain) of the organization's portal emails."""
    org = session.get(Organization, org_id)
    domain = _sending_domain(session, org_id)
    name = (org.name if org else "CarePost").replace('"', "'")
    if domain is not None:
        return f'"{name}" <no-reply@{domain.domain}>', f"no-reply@{domain.return_path_domain}", domain
    host = notice_domain()
    return f'"{name}" <no-reply@{host}>', f"no-reply@{host}", None


class NoNoticeSender(ValueError):
    """No sending domain, and neither CAREPOST_NOTICE_SENDER_DOMAIN nor the HELO name is a domain."""


NO_SENDER_REASON = ("no sender: the organization has no sending domain and this installation has no notice sender "
                    "(set CAREPOST_NOTICE_SENDER_DOMAIN, or add a sending domain)")


def notice_domain(settings=None) -> str:
    """The domain of notices of an organization without a sending domain: the configured notice
    sender domain, else the HELO name. Raises :class:`NoNoticeSender` when that is not a domain
    name a message may carry (``localhost`` on a fresh install)."""
    from carepost.core.config import get_settings
    from carepost.core.errors import ValidationFailed
    from carepost.delivery.mime import ascii_domain

    settings = settings or get_settings()
    host = settings.notice_sender_domain or delivery_service.mail_host(settings)
    try:
        return ascii_domain(host, field_name="notice_sender_domain")
    except ValidationFailed:
        raise NoNoticeSender(NO_SENDER_REASON) from None


def can_send_notices(session: Session, org_id: str) -> bool:
    """Whether the organization's own notices have a valid sender (a setup warning otherwise)."""
    if _sending_domain(session, org_id) is not None:
        return True
    try:
        notice_domain()
    except NoNoticeSender:
        return False
    return True


def prepare_notice(session: Session, org_id: str, to: str, subject: str, text: str, html: str, *,
                   require_verified_tls: bool = False) -> Envelope:
    """Compose and DKIM-sign one short email without PHI (reads the sending domain's keys).
    ``require_verified_tls``: a second factor (the one-time code) goes only over verified TLS,
    never down the unverified path the link may have taken; otherwise it is not sent at all."""
    from carepost.delivery import dkim

    from_header, envelope_from, domain = sender_for(session, org_id)
    composed = compose(sender=from_header, to=[to], subject=subject, text=text, html=html, return_path=envelope_from,
                       headers={"Auto-Submitted": "auto-generated"})
    keys = delivery_service.dkim_keys(session, domain) if domain is not None else []
    wire = dkim.sign(composed.as_bytes(), keys) if keys else composed.as_bytes()
    return Envelope(sender=composed.envelope_from, recipients=composed.recipients, message=wire,
                    smtputf8=composed.smtputf8, require_verified_tls=require_verified_tls)


def send(envelope: Envelope) -> Sent:
    """Send a prepared email. Touches no database: call it with no transaction open, so a slow
    receiving server never holds a lock."""

    async def go():
        async with DeliveryClient() as client:
            return await client.deliver(envelope)

    [result] = asyncio.run(go())
    evidence = result.evidence
    return Sent(result.status, result.reason, result.reply_code, evidence.tls_version if evidence else None)
