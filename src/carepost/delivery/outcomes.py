"""Recording delivery outcomes: a recipient's events, and one attempt's result applied to its row.

(Split out of ``delivery.service``, which still exports every public name.)
"""

from __future__ import annotations


from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core import events as domain_events
from carepost.core.crypto import get_keyring
from carepost.core.ids import new_id
from carepost.delivery.models import MessageEvent, MessageRecipient
from carepost.delivery.smtp import RecipientResult, retries_exhausted, retry_delay

# --- outcomes ----------------------------------------------------------------------------------


def add_event(session: Session, recipient: MessageRecipient, type_: str, **details) -> MessageEvent:
    event = MessageEvent(id=new_id(), org_id=recipient.org_id, message_id=recipient.message_id,
                         recipient_id=recipient.id, type=type_, details=details)
    session.add(event)
    # Every message event goes out to the organization's webhooks (tracking, wired by the root).
    domain_events.publish("message.recipient_event", session, recipient, event)
    return event


def record_result(session: Session, recipient: MessageRecipient, result: RecipientResult, *, method: str,
                  key_fingerprint: str | None = None) -> None:
    """Apply one delivery attempt's outcome to the recipient row and its event log.

    ``deferred`` schedules the next attempt with exponential backoff until the retry period
    (``CAREPOST_DELIVERY_RETRY_HOURS``) is over, then fails the recipient."""
    now = clock.now()
    recipient.attempts += 1
    recipient.first_attempt_at = recipient.first_attempt_at or now
    recipient.method = method
    recipient.key_fingerprint = key_fingerprint or recipient.key_fingerprint
    recipient.possible_duplicate = recipient.possible_duplicate or result.possible_duplicate
    recipient.lease_until = None
    recipient.lease_owner = None
    recipient.sending_since = None
    if result.evidence is not None:
        # Evidence.to_dict() without dataclasses.asdict's deep copy (every value is a scalar):
        # this runs once per delivered recipient.
        evidence = dict(vars(result.evidence))
        evidence["at"] = evidence["at"].isoformat() if evidence.get("at") else None
        reply = evidence.pop("reply", None)
        recipient.evidence = evidence
        if reply:
            recipient.reply_enc = get_keyring().encrypt(session, recipient.org_id, MessageRecipient.__tablename__,
                                                        "reply", recipient.id, reply)
    status = result.status
    if status == "tls_unavailable":
        # The pipeline takes the policy's fallback (policy.after_tls_failure) before recording;
        # reaching here means there was none: the recipient fails, nothing was sent.
        status = "failed"
    if status == "deferred":
        if retries_exhausted(recipient.first_attempt_at):
            status = "failed"
            recipient.next_attempt_at = None
            recipient.reason = f"gave up after retrying: {result.reason}"
        else:
            recipient.next_attempt_at = now + retry_delay(recipient.attempts)
            recipient.reason = result.reason
    else:
        recipient.next_attempt_at = None
        recipient.reason = result.reason
    recipient.status = status
    bounce = {}
    if status == "bounced":
        from carepost.delivery import bounces

        bounce = bounces.smtp_bounce_details(result)
    add_event(session, recipient, status, method=method, reply_code=result.reply_code,
              possible_duplicate=result.possible_duplicate, **bounce)
    if bounce:
        bounces.after_bounce(session, recipient, bounce, source="smtp")
