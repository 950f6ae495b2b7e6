"""A portal message's thread (issue 10 item 13): the message, the patient's secure replies and
staff answers, in order, in the same place.

* Staff answer a reply in the same thread: the answer is stored encrypted like the message
  (``portal_replies``, author ``staff``), and the patient is told by an email that carries no PHI
  — the organization's name and the portal link — and reads the answer in the portal after
  proving their address again, as for the first message.
* The staff page says which patient wrote: the contact the message was sent to, named only to
  those who may see names unmasked (``phi:read_unmasked``); the masked view says "a patient"
  with a link to the contact record and no initial or email domain.
* Who may answer: whoever may send messages with PHI (``messages:send`` and ``phi:read_masked``,
  the permissions of a treatment message from the API) — owners, administrators, developers.

Every answer and every read of the thread is audited (``portal.staff_reply.create``,
``portal.reply.read``); events hold ids, never the text.
"""

from __future__ import annotations

import html as html_lib

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import new_id
from carepost.portal import service
from carepost.portal.models import PortalMessage, PortalReply

MAX_ANSWER_CHARS = service.MAX_REPLY_CHARS


def thread(session: Session, pm: PortalMessage) -> list[PortalReply]:
    """Every reply and answer after the message, oldest first."""
    return service.replies(session, pm)


def recipient_replies(session: Session, pm: PortalMessage) -> list[PortalReply]:
    return [r for r in thread(session, pm) if (r.author or "recipient") == "recipient"]


def staff_authors(session: Session, rows: list[PortalReply]) -> dict[str, str]:
    """{user id: display name} of the staff who wrote answers (shown to staff only)."""
    from carepost.accounts.models import User

    ids = {r.author_id for r in rows if r.author == "staff" and r.author_id}
    if not ids:
        return {}
    return {u.id: (u.display_name or u.email) for u in session.scalars(select(User).where(User.id.in_(ids)))}


def item(session: Session, row: PortalReply, *, names: dict[str, str] | None = None) -> dict:
    """One entry of the thread, decrypted in memory for display."""
    out = service.reply_dict(session, row)
    out["author_id"] = row.author_id
    out["author_name"] = (names or {}).get(row.author_id) if row.author == "staff" else None
    return out


def add_staff_reply(session: Session, pm: PortalMessage, text: str, *, author_id: str) -> PortalReply:
    """Append a staff answer to the thread. Refused (naming the field) when empty or too long,
    and when the message can no longer be opened (recalled, expired, locked for good)."""
    body = (text or "").strip()
    if not body:
        raise ValidationFailed("Write an answer first.", field="text")
    if len(body) > MAX_ANSWER_CHARS:
        raise ValidationFailed(f"The answer is longer than {MAX_ANSWER_CHARS:,} characters.", field="text")
    st = service.state(pm)
    if st not in ("open", "locked"):
        raise Conflict(f"This message is {st}: the patient can no longer open it, so it cannot be answered here.",
                       field="text")
    reply_id = new_id()
    enc = get_keyring().encrypt(session, pm.org_id, PortalReply.__tablename__, "text", reply_id, body)
    row = PortalReply(id=reply_id, org_id=pm.org_id, portal_message_id=pm.id, text_enc=enc, created_at=clock.now(),
                      author="staff", author_id=author_id)
    session.add(row)
    session.flush()
    recipient = service._recipient(session, pm)
    if recipient is not None:
        from carepost.delivery.service import add_event

        add_event(session, recipient, "portal_answer", portal_message_id=pm.id, reply_id=row.id)
    return row


def answer_notice(session: Session, pm: PortalMessage) -> tuple[str, str, str]:
    """(subject, text, html) telling the patient an answer waits in the portal. No PHI: the
    organization's name and the portal link, which opens nothing without the second factor."""
    org = service.organization_name(session, pm)
    link = service.portal_link(session, pm)
    subject = f"{org} answered your secure message"
    text = (f"{org} answered your secure message.\n\nRead the answer in the secure portal (you will be asked to confirm "
            f"it is you):\n{link}\n\nThe answer is not in this email: it is kept in the portal.\n")
    esc_org, esc_link = html_lib.escape(org), html_lib.escape(link)
    html = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>" + html_lib.escape(subject) + "</title></head><body>"
            f"<p>{esc_org} answered your secure message.</p>"
            f"<p>Read the answer in the secure portal (you will be asked to confirm it is you):<br>"
            f"<a href=\"{esc_link}\">{esc_link}</a></p>"
            "<p>The answer is not in this email: it is kept in the portal.</p></body></html>")
    return subject, text, html


def patient(session: Session, pm: PortalMessage, *, unmasked: bool) -> dict:
    """Who the patient of this thread is, for the staff page: the contact the message went to,
    named only in the unmasked view; the address masked unless unmasked."""
    from carepost.patients import masking

    recipient = service._recipient(session, pm)
    contact_id = recipient.contact_id if recipient is not None else None
    address = service.recipient_address(session, pm)
    # Masked: no initial, no email domain (issue 9 item 7) — "a patient" and the contact link.
    out = {"contact_id": contact_id, "name": None, "address": address if unmasked else masking.MASK,
           "masked": not unmasked}
    if contact_id and unmasked:
        from carepost.patients import service as patients

        try:
            data = patients.contact_dict(session, patients.get_contact(session, contact_id))
        except NotFound:  # the contact was deleted since (the address still says who)
            data = {}
        parts = [data.get(k) for k in ("given_name", "family_name") if data.get(k)]
        out["name"] = " ".join(parts) or None
    return out
