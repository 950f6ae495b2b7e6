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
    values, details = result_changes(session, recipient, result, method=method, key_fingerprint=key_fingerprint)
    for column, value in values.items():
        setattr(recipient, column, value)
    add_event(session, recipient, values["status"], **details)
    if values["status"] == "bounced":
        from carepost.delivery import bounces

        bounce = bounces.smtp_bounce_details(result)
        if bounce:
            bounces.after_bounce(session, recipient, bounce, source="smtp")


def result_changes(session: Session, recipient: MessageRecipient, result: RecipientResult, *, method: str,
                   key_fingerprint: str | None = None, encrypt=None) -> tuple[dict, dict]:
    """What one delivery attempt's outcome changes, without touching the row: ``(column values,
    event details)``. :func:`record_result` applies it to an ORM row; the delivery pipeline
    writes a whole group of outcomes with one executemany UPDATE (``pipeline.record``).
    ``encrypt(table, column, row id, value)``: an encryptor of the recipient's organization
    (``Keyring.encryptor``), else the keyring is asked for this one value."""
    now = clock.now()
    first_attempt_at = recipient.first_attempt_at or now
    attempts = (recipient.attempts or 0) + 1
    values = {
        "attempts": attempts, "first_attempt_at": first_attempt_at, "method": method,
        "key_fingerprint": key_fingerprint or recipient.key_fingerprint,
        "possible_duplicate": bool(recipient.possible_duplicate or result.possible_duplicate),
        "lease_until": None, "lease_owner": None, "sending_since": None,
        "evidence": recipient.evidence, "reply_enc": recipient.reply_enc,
    }
    if result.evidence is not None:
        # Evidence.to_dict() without dataclasses.asdict's deep copy (every value is a scalar):
        # this runs once per delivered recipient.
        evidence = dict(vars(result.evidence))
        evidence["at"] = evidence["at"].isoformat() if evidence.get("at") else None
        reply = evidence.pop("reply", None)
        values["evidence"] = evidence
        if reply:
            if encrypt is None:
                values["reply_enc"] = get_keyring().encrypt(session, recipient.org_id, MessageRecipient.__tablename__,
                                                            "reply", recipient.id, reply)
            else:
                values["reply_enc"] = encrypt(MessageRecipient.__tablename__, "reply", recipient.id, reply)
    status = result.status
    if status == "tls_unavailable":
        # The pipeline takes the policy's fallback (policy.after_tls_failure) before recording;
        # reaching here means there was none: the recipient fails, nothing was sent.
        status = "failed"
    if status == "deferred":
        if retries_exhausted(first_attempt_at):
            status = "failed"
            values["next_attempt_at"] = None
            values["reason"] = f"gave up after retrying: {result.reason}"
        else:
            values["next_attempt_at"] = now + retry_delay(attempts)
            values["reason"] = result.reason
    else:
        values["next_attempt_at"] = None
        values["reason"] = result.reason
    if recipient.possible_duplicate and not result.possible_duplicate:
        values["reason"] = _with_earlier_doubt(values["reason"], recipient.reason)
    values["status"] = status
    bounce = {}
    if status == "bounced":
        from carepost.delivery import bounces

        bounce = bounces.smtp_bounce_details(result)
    details = {"method": method, "reply_code": result.reply_code, "possible_duplicate": result.possible_duplicate, **bounce}
    return values, details


EARLIER_ATTEMPT = "possible duplicate: an earlier attempt"


def _with_earlier_doubt(reason: str | None, earlier: str | None) -> str:
    """A recipient flagged ``possible_duplicate`` by an earlier attempt keeps saying why after the
    next attempt's outcome replaces its reason (the flag itself never clears)."""
    if reason and EARLIER_ATTEMPT in reason:
        return reason
    if earlier and EARLIER_ATTEMPT in earlier:  # said by an attempt before: carried, not nested
        note = earlier[earlier.index(EARLIER_ATTEMPT):]
    else:
        note = f"{EARLIER_ATTEMPT} ended in doubt ({earlier or 'no reason recorded'})"
    return f"{reason}; {note}" if reason else note

