"""Account notices: the emails accounts asks for through the ``account.notice`` event.

Accounts sits below delivery, so it cannot send mail itself. When a person must be told
something — an invitation to an organization, a password-reset link, a break-glass alert for
the compliance staff — accounts publishes ``account.notice`` with a kind code and ids (never PHI);
:func:`handle_account_notice` (wired by :mod:`carepost.assembly`) turns it into a queued
``Message`` of purpose ``transactional`` through the delivery pipeline, like the consent mailer
does, so it is DKIM-signed, gets the organization's protection (its security mode applies: a
link that is a credential never goes out in clear when the organization requires TLS) and
appears in the delivery log with its evidence. The body is stored encrypted and is not readable
through the API or the UI — an invitation link sent this way is never shown to the admin who
invited the person.

From ``no-reply@<the organization's sending domain>`` (one whose ownership it has proven, see
``domains.notice_sending_domain``). Without such a domain nothing can be sent: the handler returns None and accounts refuses the action (an invitation) or answers as if
it were sent (a password reset, which must not reveal whether an address has an account).
Delivery is queued when the transaction commits, never before.
"""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.orm import Session

from carepost.core.logging import get_logger

log = get_logger("carepost.delivery.notices")

_PENDING = "carepost_account_notice_pending"

# kind -> (subject, text). Placeholders: {org} organization name, {link} one-time link, {role}
# role label, {minutes} break-glass duration. No PHI can reach these texts: only ids come in.
TEXTS: dict[str, tuple[str, str]] = {
    "invitation": (
        "You are invited to {org} on CarePost",
        "You have been invited to join {org} on CarePost as {role}.\n\n"
        "Open this link to accept (it works once and expires):\n{link}\n\n"
        "If you already have a CarePost account, sign in first; the invitation joins that account.\n"
        "If you did not expect this invitation, ignore this email.\n",
    ),
    "password_reset": (
        "Reset your CarePost password",
        "Someone asked to reset the password of your CarePost account.\n\n"
        "Open this link to choose a new password (it works once and expires):\n{link}\n\n"
        "Your second factor is still required to sign in. If you did not ask for this, ignore this email.\n",
    ),
    "mfa_reset": (
        "Your CarePost second factor was reset",
        "The second factor of your CarePost account was reset. At your next sign-in you set up a new one.\n"
        "If you did not ask for this, tell an owner of your organization at once.\n",
    ),
    "break_glass": (
        "Emergency access used in {org}",
        "A person in {org} started emergency (break-glass) access to patient data for {minutes} minutes.\n\n"
        "Review it in CarePost: {link}\n",
    ),
    # A journey's "notify" step (journeys.steps): {note} is the step's text, checked at validation
    # to hold no merge field and nothing that looks like PHI, plus a count; {link} the journey's page.
    "journey_notice": (
        "A journey in {org} needs your attention",
        "{note}\n\nOpen the journey in CarePost: {link}\n",
    ),
    # Issue 16 item 10: a person's policy and training acknowledgement is missing or ends soon.
    "policy_reminder": (
        "Acknowledge the policies and training of {org}",
        "Your acknowledgement of the policies and training of {org} is missing or ends soon. Until you\n"
        "acknowledge the current versions, CarePost shows you patient data masked only.\n\n"
        "Read and acknowledge them here: {link}\n",
    ),
}


def handle_account_notice(session: Session, kind: str, *, org_id: str | None, user_id: str,
                          link: str | None = None, role: str | None = None, minutes: int | None = None,
                          note: str | None = None) -> str | None:
    """Queue one account notice to the person ``user_id``; the message id, or None when the
    organization cannot send mail (no sending domain)."""
    from carepost.accounts.models import Organization, User
    from carepost.accounts.permissions import ROLE_LABELS
    from carepost.delivery import service as delivery
    from carepost.delivery.schemas import MessageIn

    if kind not in TEXTS:
        raise ValueError(f"unknown account notice {kind!r}")
    user = session.get(User, user_id)
    if user is None or not org_id:
        return None
    domain = delivery.notice_sending_domain(session, org_id)
    if domain is None:
        log.warning("account_notice_not_sent", kind=kind, reason="no_sending_domain")
        return None
    org = session.get(Organization, org_id)
    org_name = org.name if org else "CarePost"
    subject, text = TEXTS[kind]
    values = {"org": org_name, "link": link or "", "role": ROLE_LABELS.get(role or "", role or ""),
              "minutes": minutes or "", "note": note or ""}
    name = org_name.replace('"', "'")
    data = MessageIn.model_validate({
        "from": f'"{name}" <no-reply@{domain.domain}>', "to": [user.email], "subject": subject.format(**values),
        "text": text.format(**values), "purpose": "transactional", "contains_phi": False,
        "tags": [f"account:{kind}"],
    })
    accepted = delivery.accept_message(session, org_id, data, source="api", created_by=f"system:account.{kind}")
    enqueue_after_commit(session, accepted.message.id)
    log.info("account_notice_queued", kind=kind, message_id=accepted.message.id)
    return accepted.message.id


def enqueue_after_commit(session: Session, message_id: str) -> None:
    """Queue the message's delivery once the session commits (nothing on rollback)."""
    pending = session.info.setdefault(_PENDING, [])
    pending.append(message_id)
    if len(pending) == 1:
        event.listen(session, "after_commit", _flush_queue, once=True)
        event.listen(session, "after_rollback", _forget, once=True)


def _flush_queue(session: Session) -> None:
    ids = session.info.pop(_PENDING, [])
    if ids:
        from carepost.delivery.tasks import enqueue_delivery

        enqueue_delivery(ids)


def _forget(session: Session) -> None:
    session.info.pop(_PENDING, None)
