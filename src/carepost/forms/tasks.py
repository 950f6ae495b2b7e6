"""Queue tasks of forms: the confirmation email, the staff notification, expiring old links.

Neither email carries PHI. The confirmation email names the organization and holds the signed
link (ids only); it does not name the form, whose title may itself reveal a condition. The staff
notification names the form and links into CarePost, behind sign-in. Both go like the portal's
short notices (``portal.mailer``): TLS when offered, DKIM-signed, through the configured relay.

Tasks take ids only and are idempotent: a sent email is marked (``confirmation_sent_at``,
``staff_notified_at``) in the same transaction, and the periodic sweep picks up anything the
queue lost.
"""

from __future__ import annotations

from datetime import timedelta

from huey import crontab
from sqlalchemy import or_, select

from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.database import system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey
from carepost.forms import service
from carepost.forms.models import Form, FormSubmission

log = get_logger("carepost.forms.tasks")


def _html(text: str) -> str:
    from html import escape

    paragraphs = "".join(f"<p>{escape(p).replace(chr(10), '<br>')}</p>" for p in text.strip().split("\n\n"))
    return f"<!doctype html><html><body>{paragraphs}</body></html>"


def prepare_email(session, org_id: str, to: str, subject: str, text: str):
    """Compose and DKIM-sign one short email without PHI (the portal's notice path)."""
    from carepost.portal.mailer import prepare_notice

    return prepare_notice(session, org_id, to, subject, text, _html(text))


def send_prepared(envelope) -> str:
    """Send outside any transaction (a slow server never holds a database lock); the status."""
    return send_prepared_result(envelope).status


def send_prepared_result(envelope):
    from carepost.portal.mailer import send

    return send(envelope)


def _failure_reason(sent) -> str:
    """What staff are told about an email that did not go: a reply code, or CarePost's own words
    (a receiving server's free text may quote the address, so it is not kept)."""
    if sent.reply_code:
        return f"the receiving server answered {sent.reply_code}" + (" (refused)" if sent.status == "bounced" else " (try later)")
    return (sent.reason or sent.status)[:200]


def _submitted_email(session, form: Form, sub: FormSubmission) -> str | None:
    """The address the submission gave, if it is still on file for the contact."""
    from carepost.patients import service as patients

    key = next((f["key"] for f in form.fields if f.get("contact_field") == "email"), None)
    address = service.submission_data(session, sub)["answers"].get(key) if key else None
    if not address or not sub.contact_id:
        return None
    if sub.contact_id not in patients.find_contact_ids(session, sub.org_id, email=address):
        return None
    return address


def confirmation_envelope(session, form: Form, sub: FormSubmission):
    """The fallback when no patient mailer is registered: the link goes straight to the address
    the submission gave, if it is (still) on file for the contact."""
    address = _submitted_email(session, form, sub)
    if address is None:
        log.info("form_confirmation_skipped", submission_id=sub.id, reason="address_not_on_file")
        return None
    subject, text = service.confirmation_email(session, form, sub)
    return prepare_email(session, sub.org_id, address, subject, text)


def staff_envelopes(session, form: Form, sub: FormSubmission) -> list:
    url = f"{get_settings().base_url}/app/forms/{form.id}/submissions/{sub.id}"
    subject = "New form submission in CarePost"
    text = (f"A new submission to the form \"{form.name}\" arrived.\n\n"
            f"Open it in CarePost (sign-in required):\n{url}\n")
    return [prepare_email(session, sub.org_id, address, subject, text) for address in form.settings.get("notify_emails") or []]


def process_submission(submission_id: str) -> dict:
    """Send whatever a submission still needs; safe to run twice. Emails are prepared in one
    transaction, sent with none open, and marked sent in another.

    What happened to the confirmation is kept on the submission (``outcome.confirmation_email``:
    status and reason, never the address) so staff see a failure rather than "pending" forever:
    no sender (a fresh install with neither a sending domain nor a notice sender domain) and a
    refusal are final; a deferral is retried by the queue."""
    from carepost.portal.mailer import NoNoticeSender

    done = {"confirmation": False, "staff": 0}
    failure = None
    with system_session() as session:
        sub = session.get(FormSubmission, submission_id)
        if sub is None:
            return done
        service.scope_to(session, sub.org_id)
        form = session.get(Form, sub.form_id)
        confirm = None
        failed_before = (sub.outcome or {}).get("confirmation_email", {}).get("status") == "failed"
        try:
            if sub.status == "pending_confirmation" and sub.confirmation_sent_at is None and not failed_before:
                confirm = confirmation_envelope(session, form, sub)
            staff = staff_envelopes(session, form, sub) if sub.staff_notified_at is None else None
        except NoNoticeSender as exc:
            confirm, staff, failure = None, None, ("failed", str(exc))
        session.commit()
    sent = send_prepared_result(confirm) if confirm is not None else None
    confirmed = sent is not None and sent.status == "delivered"
    if sent is not None and not confirmed:
        failure = ("failed" if sent.status == "bounced" else "deferred", _failure_reason(sent))
    staff_sent = sum(1 for envelope in staff or [] if send_prepared(envelope) == "delivered")
    with system_session() as session:
        sub = session.get(FormSubmission, submission_id)
        service.scope_to(session, sub.org_id)
        if confirmed:
            sub.confirmation_sent_at = clock.now()
            sub.outcome = {**(sub.outcome or {}), "confirmation_email": {"status": "sent", "at": clock.now().isoformat()}}
        elif failure is not None:
            sub.outcome = {**(sub.outcome or {}), "confirmation_email": {"status": failure[0], "reason": failure[1],
                                                                         "at": clock.now().isoformat()}}
        if staff is not None:
            sub.staff_notified_at = clock.now()
        session.commit()
    done.update(confirmation=confirmed, staff=staff_sent)
    if failure is not None:
        log.warning("form_confirmation_not_sent", submission_id=submission_id, status=failure[0])
        if failure[0] == "deferred":
            raise RuntimeError("the confirmation email was deferred; the task retries")
    return done


@huey.task(retries=5, retry_delay=120)
def send_submission_emails(submission_id: str) -> None:
    process_submission(submission_id)


def sweep(now=None) -> dict:
    """Expire pending submissions whose link ran out; re-queue emails the queue lost."""
    now = now or clock.now()
    with system_session() as session:
        expired = service.expire_pending(session, now)
        stale = now - timedelta(minutes=30)
        ids = list(session.scalars(
            select(FormSubmission.id).where(
                FormSubmission.created_at < stale, FormSubmission.created_at > now - timedelta(days=2),
                or_(FormSubmission.staff_notified_at.is_(None),
                    (FormSubmission.status == "pending_confirmation") & FormSubmission.confirmation_sent_at.is_(None)),
            ).limit(500)
        ))
        session.commit()
    for submission_id in ids:
        send_submission_emails(submission_id)
    return {"expired": expired, "requeued": len(ids)}


@huey.periodic_task(crontab(minute="*/15"))
def sweep_form_submissions() -> None:
    result = sweep()
    log.info("form_sweep", expired_count=result["expired"], requeued_count=result["requeued"])


def after_submit(sub: FormSubmission) -> None:
    """Queue the confirmation email and the staff notification (after the commit: the worker
    must find the row). A queue outage never loses the submission; the periodic sweep retries."""
    try:
        send_submission_emails(sub.id)
    except Exception as exc:  # noqa: BLE001 - the submission is stored; the sweep sends later
        log.warning("form_emails_not_queued", submission_id=sub.id, error_type=type(exc).__name__)
