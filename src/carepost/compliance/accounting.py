"""Requests for an accounting of disclosures (45 CFR 164.528(c)) and the document produced.

The request is tracked from receipt: ``due_on`` is 60 days after ``received_on``; one extension
of at most 30 days is allowed, with a reason that is given to the individual in writing within
the first 60 days (164.528(c)(1)(ii)); a request not fulfilled by its (extended) due date is
**overdue**. Fulfilling produces the accounting (``audit.disclosures.accounting``) as a readable
document — an HTML page that prints to PDF in any browser, and plain text — and keeps the SHA-256
of the text given to the individual, the number of entries and how it was delivered, as
documentation (164.528(d)).

The period defaults to the six years before receipt; an individual may ask for less
(164.528(a)(3)), never more.
"""

from __future__ import annotations

import hashlib
from datetime import date, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.audit import disclosures
from carepost.audit.service import record
from carepost.compliance.models import AccountingRequest
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id

DUE_DAYS = 60
EXTENSION_DAYS = 30
DELIVERY_METHODS = ("mail", "email", "portal", "in_person")
REASON_MAX = 1000
TABLE = AccountingRequest.__tablename__


def check_contact(session: Session, org_id: str, contact_id: str, field: str = "contact_id") -> None:
    """A patient of ``org_id``, else 422 naming ``field`` (a body field, not a path: an id of
    another organization's patient is simply unknown here)."""
    from carepost.patients.service import get_contact

    try:
        contact = get_contact(session, contact_id)
    except NotFound:
        contact = None
    if contact is None or contact.org_id != org_id:
        raise ValidationFailed("No such patient in this organization.", field=field)


def _audit(session: Session, org_id: str, actor: dict, action: str, req: AccountingRequest, details: dict) -> None:
    record(session, org_id=org_id, action=action, target_type="accounting_request", target_id=req.id,
           details={"contact_id": req.contact_id, **details}, **actor)


def create_request(session: Session, org_id: str, *, contact_id: str, received_on: date,
                   period_start: date | None = None, period_end: date | None = None, actor: dict) -> AccountingRequest:
    """Track a request received on ``received_on``. ``actor``: audit fields (actor_type,
    actor_id, on_behalf_of, ip, user_agent, request_id). The caller commits."""
    check_contact(session, org_id, contact_id)
    today = clock.now().date()
    if received_on > today:
        raise ValidationFailed("A request cannot be received in the future.", field="received_on")
    if received_on < disclosures.years_before(today, disclosures.ACCOUNTING_YEARS):
        raise ValidationFailed("Must be within the last six years.", field="received_on")
    end = period_end or received_on
    if end > received_on:
        raise ValidationFailed("The period ends on or before the day the request was received.", field="period_end")
    earliest = disclosures.accounting_start(received_on)
    start = period_start or earliest
    if start < earliest:
        raise ValidationFailed(f"An accounting covers at most six years: on or after {earliest.isoformat()}.",
                               field="period_start")
    if start > end:
        raise ValidationFailed("Must be on or before the end of the period.", field="period_start")
    req = AccountingRequest(id=new_id(), org_id=org_id, contact_id=contact_id, received_on=received_on,
                            due_on=received_on + timedelta(days=DUE_DAYS), period_start=start, period_end=end,
                            status="open", created_by=actor.get("actor_id"), created_at=clock.now())
    session.add(req)
    session.flush([req])
    _audit(session, org_id, actor, "disclosure.accounting_request.created", req,
           {"received_on": received_on.isoformat(), "due_on": req.due_on.isoformat()})
    return req


def get_request(session: Session, org_id: str, request_id: str) -> AccountingRequest:
    req = session.scalar(select(AccountingRequest).where(AccountingRequest.org_id == org_id,
                                                         AccountingRequest.id == request_id)) if is_id(request_id) else None
    if req is None:
        raise NotFound("No such accounting request.", field="request_id")
    return req


def effective_due(req: AccountingRequest) -> date:
    return req.extended_due_on or req.due_on


def is_overdue(req: AccountingRequest, today: date | None = None) -> bool:
    return req.status != "fulfilled" and (today or clock.now().date()) > effective_due(req)


def list_requests(session: Session, org_id: str, *, status: str | None = None, overdue: bool | None = None,
                  contact_id: str | None = None, limit: int = 200) -> list[AccountingRequest]:
    stmt = select(AccountingRequest).where(AccountingRequest.org_id == org_id)
    if status:
        stmt = stmt.where(AccountingRequest.status == status)
    if contact_id:
        stmt = stmt.where(AccountingRequest.contact_id == contact_id)
    rows = list(session.scalars(stmt.order_by(AccountingRequest.due_on, AccountingRequest.id).limit(limit)))
    if overdue is not None:
        today = clock.now().date()
        rows = [r for r in rows if is_overdue(r, today) == overdue]
    return rows


def request_dict(session: Session, req: AccountingRequest) -> dict:
    today = clock.now().date()
    reason = None
    if req.extension_reason_enc:
        reason = get_keyring().decrypt_text(session, req.org_id, TABLE, "extension_reason", req.id,
                                            req.extension_reason_enc)
    due = effective_due(req)
    return {
        "id": req.id, "contact_id": req.contact_id, "status": req.status,
        "received_on": req.received_on.isoformat(), "due_on": req.due_on.isoformat(),
        "extended_due_on": req.extended_due_on.isoformat() if req.extended_due_on else None,
        "effective_due_on": due.isoformat(), "overdue": is_overdue(req, today),
        "days_left": None if req.status == "fulfilled" else (due - today).days,
        "period_start": req.period_start.isoformat(), "period_end": req.period_end.isoformat(),
        "extension_reason": reason, "extended_on": req.extended_on.isoformat() if req.extended_on else None,
        "fulfilled_on": req.fulfilled_on.isoformat() if req.fulfilled_on else None,
        "delivery_method": req.delivery_method, "entry_count": req.entry_count,
        "document_sha256": req.document_sha256, "created_by": req.created_by,
    }


def extend(session: Session, org_id: str, req: AccountingRequest, reason: str | None, actor: dict) -> AccountingRequest:
    """The one 30-day extension (164.528(c)(1)(ii)): a reason is required, and it must be made
    within the first 60 days."""
    if req.status == "fulfilled":
        raise Conflict("This request is already fulfilled.", field="status")
    if req.extended_due_on is not None:
        raise Conflict("This request was already extended once; only one extension is allowed.", field="extension")
    reason = (reason or "").strip()
    if not reason:
        raise ValidationFailed("Required: the written reason for the delay given to the individual.", field="reason")
    if len(reason) > REASON_MAX:
        raise ValidationFailed(f"At most {REASON_MAX} characters.", field="reason")
    today = clock.now().date()
    if today > req.due_on:
        raise ValidationFailed(f"The 60 days ended on {req.due_on.isoformat()}; an extension must be made within them.",
                               field="due_on")
    req.extended_due_on = req.due_on + timedelta(days=EXTENSION_DAYS)
    req.extension_reason_enc = get_keyring().encrypt(session, org_id, TABLE, "extension_reason", req.id, reason)
    req.extended_on = today
    req.extended_by = actor.get("actor_id")
    req.status = "extended"
    _audit(session, org_id, actor, "disclosure.accounting_request.extended", req,
           {"extended_due_on": req.extended_due_on.isoformat()})
    return req


def patient_label(session: Session, org_id: str, contact_id: str) -> str:
    from carepost.patients.service import contact_view

    try:
        view = contact_view(session, contact_id)
    except NotFound:
        return f"(patient record {contact_id} no longer held)"
    name = " ".join(p for p in (view.get("given_name"), view.get("middle_name"), view.get("family_name")) if p)
    born = f", born {view['birth_date']}" if view.get("birth_date") else ""
    return (name or "(name not recorded)") + born


def organization_name(session: Session, org_id: str) -> str:
    from carepost.accounts.service import get_organization

    return get_organization(session, org_id).name


def produce(session: Session, org_id: str, req: AccountingRequest, actor: dict, *, action: str = "read") -> tuple[dict, str]:
    """The accounting for this request's period and its text; audited (PHI is read)."""
    acc = disclosures.accounting(session, org_id, req.contact_id, period_start=req.period_start,
                                 period_end=req.period_end)
    text = disclosures.accounting_text(acc, organization=organization_name(session, org_id),
                                       patient=patient_label(session, org_id, req.contact_id))
    _audit(session, org_id, actor, f"disclosure.accounting.{action}", req, {"entries": len(acc["entries"])})
    return acc, text


def fulfil(session: Session, org_id: str, req: AccountingRequest, *, fulfilled_on: date | None,
           delivery_method: str | None, actor: dict) -> tuple[AccountingRequest, str]:
    """Mark the request fulfilled with the accounting given to the individual; returns the text."""
    if req.status == "fulfilled":
        raise Conflict("This request is already fulfilled.", field="status")
    today = clock.now().date()
    when = fulfilled_on or today
    if when > today:
        raise ValidationFailed("Cannot be in the future.", field="fulfilled_on")
    if when < req.received_on:
        raise ValidationFailed("Cannot be before the request was received.", field="fulfilled_on")
    if delivery_method is not None and delivery_method not in DELIVERY_METHODS:
        raise ValidationFailed(f"Choose one of {', '.join(DELIVERY_METHODS)}.", field="delivery_method")
    acc, text = produce(session, org_id, req, actor, action="produced")
    req.status = "fulfilled"
    req.fulfilled_on = when
    req.fulfilled_by = actor.get("actor_id")
    req.delivery_method = delivery_method
    req.entry_count = len(acc["entries"])
    req.document_sha256 = hashlib.sha256(text.encode()).hexdigest()
    _audit(session, org_id, actor, "disclosure.accounting_request.fulfilled", req,
           {"fulfilled_on": when.isoformat(), "entries": req.entry_count, "late": when > effective_due(req),
            "document_sha256": req.document_sha256})
    return req, text
