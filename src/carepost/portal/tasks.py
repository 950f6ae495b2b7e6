"""Queue tasks of the secure portal. They take ids only (the queue never carries a secret):

* ``send_portal_code(portal_message_id)`` draws the one-time code itself, stores its hash and
  mails it — the web request only notes that a code is owed (``code_requested_at``);
* ``notify_reply(reply_id)`` tells the sender a secure reply arrived (a link, no PHI);
* ``notify_answer(reply_id)`` tells the patient a staff answer waits in the portal (the
  organization's name and the portal link, no PHI);
* ``expire_portal_messages`` (every 10 minutes) wipes the stored copy of messages past their
  expiry, marks their recipients ``expired``, and deletes portal sessions that ended.

Each is idempotent: a code task that finds no code owed does nothing; a notice sent twice is
harmless; expiry skips what is already wiped.
"""

from __future__ import annotations

from datetime import timedelta

from huey import crontab
from sqlalchemy import delete, or_
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.database import ALL_ORGANIZATIONS, system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey
from carepost.portal import mailer, service
from carepost.portal.models import PortalMessage, PortalReply, PortalSession

log = get_logger("carepost.portal.tasks")


class SendDeferred(RuntimeError):
    """The receiving server asked to try later; Huey retries the task."""


def _scope(session: Session, org_id: str) -> None:
    session.info.pop("scope", None)
    session.info["org_id"] = org_id


def deliver_code(session: Session, portal_message_id: str) -> str | None:
    """Draw, store and mail a code if one is owed. Returns the send status, or None when
    nothing was owed. Commits (the code's hash must be stored before the email leaves)."""
    pm = session.get(PortalMessage, portal_message_id)
    if pm is None or pm.code_requested_at is None:
        return None
    _scope(session, pm.org_id)
    if service.state(pm) != "open":
        pm.code_requested_at = None
        session.commit()
        return None
    settings = get_settings()
    # The local capture of `carepost run` is a final destination on this host (loopback only),
    # not a path onward: codes go there.
    to_capture = settings.smtp_relay == f"localhost@{settings.capture_host}:{settings.capture_port}"
    if settings.smtp_relay and not settings.smtp_relay_enforces_tls and not to_capture:
        # A relay that does not promise verified TLS onward is an unverified path: no code.
        service.code_not_sent_unverified(session, pm)
        service._audit(session, pm, "portal.code.sent", None, outcome="failure", status="tls_unavailable", relay=True)
        pm.code_requested_at = None
        session.commit()
        return "tls_unavailable"
    code = service.issue_code(session, pm)
    address = service.recipient_address(session, pm)
    # The code is a second factor: it travels only over verified TLS (issue 9 item 3), never down
    # the unverified path the notification with the link may have taken.
    envelope = mailer.prepare_notice(session, pm.org_id, address, *service.code_email(session, pm, code),
                                     require_verified_tls=True)
    session.commit()  # the hash is stored before the code leaves; no transaction is open while sending
    sent = mailer.send(envelope)
    outcome = "success" if sent.status == "delivered" else "failure"
    service._audit(session, pm, "portal.code.sent", None, outcome=outcome, status=sent.status,
                   reply_code=sent.reply_code, tls=sent.tls_version)
    if sent.status == "tls_unavailable":
        service.code_not_sent_unverified(session, pm)
    elif sent.status == "delivered":
        pm.code_tls_unavailable = False
    if sent.status != "deferred":
        pm.code_requested_at = None
    session.commit()
    return sent.status


@huey.task(retries=3, retry_delay=20)
def send_portal_code(portal_message_id: str) -> None:
    with system_session() as session:
        status = deliver_code(session, portal_message_id)
    log.info("portal_code", status=status or "not_owed")
    if status == "deferred":
        raise SendDeferred("the recipient's server deferred the code email")


def sender_address(session: Session, pm: PortalMessage) -> str | None:
    """Where the sender's notice goes: the sending person, or the person who created the API
    credential that sent the message."""
    from carepost.accounts.models import ApiCredential, User

    if not pm.sender_id:
        return None
    user = session.get(User, pm.sender_id)
    if user is None:
        cred = session.get(ApiCredential, pm.sender_id)
        user = session.get(User, cred.created_by) if cred is not None and cred.created_by else None
    return user.email if user is not None and user.is_active else None


def notify_sender(session: Session, reply_id: str) -> str | None:
    reply = session.get(PortalReply, reply_id)
    if reply is None:
        return None
    _scope(session, reply.org_id)
    pm = session.get(PortalMessage, reply.portal_message_id)
    to = sender_address(session, pm)
    if to is None:
        return None
    envelope = mailer.prepare_notice(session, pm.org_id, to, *service.reply_notice(session, pm))
    session.commit()
    return mailer.send(envelope).status


@huey.task(retries=3, retry_delay=60)
def notify_reply(reply_id: str) -> None:
    with system_session() as session:
        status = notify_sender(session, reply_id)
        session.commit()
    log.info("portal_reply_notice", status=status or "no_sender")
    if status == "deferred":
        raise SendDeferred("the sender's server deferred the notice")


def notify_recipient(session: Session, reply_id: str) -> str | None:
    """Email the patient that a staff answer waits in the portal. The email has no PHI, so it
    goes like the first portal notification (TLS when offered, not only verified TLS). Returns
    the send status, or None when nothing is owed (already notified, not a staff answer, or the
    message can no longer be opened)."""
    from carepost.portal import threads

    reply = session.get(PortalReply, reply_id)
    if reply is None or reply.author != "staff" or reply.notified_at is not None:
        return None
    _scope(session, reply.org_id)
    pm = session.get(PortalMessage, reply.portal_message_id)
    if pm is None or service.state(pm) not in ("open", "locked"):
        return None
    address = service.recipient_address(session, pm)
    envelope = mailer.prepare_notice(session, pm.org_id, address, *threads.answer_notice(session, pm))
    session.commit()  # no transaction is open while sending
    sent = mailer.send(envelope)
    if sent.status == "delivered":
        reply.notified_at = clock.now()
    service._audit(session, pm, "portal.answer.notified", None, outcome="success" if sent.status == "delivered" else "failure",
                   reply_id=reply.id, status=sent.status, reply_code=sent.reply_code, tls=sent.tls_version)
    session.commit()
    return sent.status


@huey.task(retries=3, retry_delay=60)
def notify_answer(reply_id: str) -> None:
    with system_session() as session:
        status = notify_recipient(session, reply_id)
        session.commit()
    log.info("portal_answer_notice", status=status or "not_owed")
    if status == "deferred":
        raise SendDeferred("the recipient's server deferred the notice")


def purge_sessions(session: Session) -> int:
    """Delete portal sessions that can no longer be used (ended, revoked, or idle past the
    timeout), so stale cookie hashes do not pile up."""
    now = clock.now()
    idle_cutoff = now - timedelta(minutes=get_settings().portal_session_minutes) - timedelta(minutes=5)
    return session.execute(
        delete(PortalSession).where(or_(PortalSession.expires_at < now, PortalSession.revoked.is_(True),
                                        PortalSession.last_seen_at < idle_cutoff))
        .execution_options(**ALL_ORGANIZATIONS)
    ).rowcount


def expire_due(session: Session) -> int:
    count = 0
    for pm_id in service.due_for_expiry(session):
        pm = session.get(PortalMessage, pm_id)
        session.info["org_id"] = pm.org_id
        session.info.pop("scope", None)
        service.mark_expired_if_due(session, pm)
        session.info.pop("org_id", None)
        session.info["scope"] = "system"
        count += 1
    return count


@huey.periodic_task(crontab(minute="*/10"))
def expire_portal_messages() -> None:
    with system_session() as session:
        count = expire_due(session)
        purged = purge_sessions(session)
        session.commit()
    if count or purged:
        log.info("portal_expired", count=count, sessions_purged=purged)
