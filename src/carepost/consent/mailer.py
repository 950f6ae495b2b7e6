"""The default patient mailer: CarePost's own emails to a patient (the copy of a signed
authorization, a double opt-in confirmation, a form confirmation) go through the delivery
pipeline like any message — a queued ``Message`` of purpose ``transactional``, marked as
carrying PHI, so it gets verified TLS, PGP, S/MIME or the portal and appears in the delivery log
with its evidence.

From ``no-reply@<the organization's sending domain>`` (the one whose DNS checks out first). An
organization without a sending domain cannot send: the mailer returns None and the caller falls
back to showing the link (the copy page, the confirmation page). Delivery is queued when the
transaction that created the message commits, never before.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from carepost.core.logging import get_logger
from carepost.delivery.notices import enqueue_after_commit

log = get_logger("carepost.consent.mailer")

_PENDING = "carepost_consent_mail_pending"


def deliver_through_pipeline(session: Session, email) -> str | None:
    from carepost.accounts.models import Organization
    from carepost.delivery import service as delivery
    from carepost.delivery.schemas import MessageIn
    from carepost.patients.service import contact_dict, get_contact

    contact = get_contact(session, email.contact_id)
    address = contact_dict(session, contact).get("email")
    if not address:
        return None
    # A domain whose ownership the organization has proven (issue 9 item 2).
    domain = delivery.notice_sending_domain(session, email.org_id)
    if domain is None:
        return None
    org = session.get(Organization, email.org_id)
    name = (org.name if org else "CarePost").replace('"', "'")
    data = MessageIn.model_validate({
        "from": f'"{name}" <no-reply@{domain.domain}>', "to": [address], "subject": email.subject,
        "text": email.text, "html": email.html, "purpose": email.purpose, "contains_phi": True,
        "tags": [f"consent:{email.kind}"],
    })
    accepted = delivery.accept_message(session, email.org_id, data, source="api", created_by="system:consent")
    enqueue_after_commit(session, accepted.message.id)
    log.info("patient_email_queued", kind=email.kind, message_id=accepted.message.id)
    return accepted.message.id
