"""Retention schedules and legal holds (issue 16 items 1 and 3).

Schedules: one per organization and record class (:data:`RECORD_CLASSES`), a minimum and a
maximum period in days. HIPAA documentation — authorizations and consent evidence, policies,
audit events — must be kept at least six years (45 CFR 164.316(b)(2)(i), 164.508(b)(6),
164.530(j)): for those classes neither period may be set below :data:`HIPAA_MIN_DAYS`, and the
refusal names the field. A class without a schedule is never purged (fail safe).

Legal holds: placed by one person, approved by a second person holding the compliance officer
role; released only when a second person approves the release. A hold protects from the moment
it is placed until its release is approved (pending and release-pending holds protect too).
Every step is written to the audit chain. The purge (:mod:`carepost.retention.purge`) skips
every record a hold covers; :func:`holds_for_message` and :func:`holds_for_contact` mark held
records in the API and on the pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from carepost.audit.service import record
from carepost.core import clock
from carepost.core.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from carepost.core.ids import is_id
from carepost.retention import held
from carepost.retention.models import LegalHold, RetentionSchedule

# Six years, counting the leap days six years can hold.
HIPAA_MIN_DAYS = 6 * 365 + 2

# record class -> (label, HIPAA documentation?, purged by this version?)
RECORD_CLASSES: dict[str, tuple[str, bool, bool]] = {
    "messages": ("Messages and their bodies, attachments, recipients and events", False, True),
    "portal": ("Portal messages and attachments", False, True),
    "forms": ("Form submissions", False, True),
    "imports": ("Imports and their uploads", False, True),
    "events": ("Engagement events (opens, clicks)", False, True),
    "logs": ("Webhook and inbound report logs", False, True),
    "authorizations": ("Authorizations and consent evidence", True, True),
    "policies": ("Policies and training acknowledgements", True, True),
    "audit": ("Audit events", True, True),
    "contacts": ("Contacts inactive for N months", False, True),
}
HIPAA_CLASSES = frozenset(c for c, (_, hipaa, _p) in RECORD_CLASSES.items() if hipaa)
HOLD_SCOPES = ("patient", "campaign", "message", "date_range", "organization")
PROTECTING = ("pending", "active", "release_pending")
APPROVER_ROLE = "compliance_officer"
MAX_DAYS = 100 * 366


@dataclass(frozen=True)
class Actor:
    """Who acts (audit ``actor_id``) and with which role (the approver must be a compliance officer)."""

    kind: str
    id: str
    role: str | None = None
    context: dict | None = None

    @classmethod
    def of(cls, principal, request=None) -> Actor:
        from carepost.accounts.access import request_context

        return cls(principal.kind, principal.user_id or principal.actor_id, principal.role,
                   request_context(request) if request is not None else {})


def _audit(session: Session, org_id: str, actor: Actor, action: str, target_type: str, target_id: str | None,
           details: dict, outcome: str = "success") -> None:
    ctx = actor.context or {}
    record(session, org_id=org_id, actor_type=actor.kind, actor_id=actor.id, action=action, outcome=outcome,
           target_type=target_type, target_id=target_id, details=details,
           ip=ctx.get("ip"), user_agent=ctx.get("user_agent"), request_id=ctx.get("request_id"))


# --------------------------------------------------------------------------- schedules


def schedule_dict(row: RetentionSchedule | None, record_class: str) -> dict:
    label, hipaa, purged = RECORD_CLASSES[record_class]
    out = {"record_class": record_class, "label": label, "hipaa_documentation": hipaa, "purged": purged,
           "legal_min_days": HIPAA_MIN_DAYS if hipaa else 0, "configured": row is not None}
    if row is None:
        out.update(min_days=HIPAA_MIN_DAYS if hipaa else None, max_days=None, inactive_months=None,
                   enabled=False, configured_by=None, configured_at=None)
    else:
        out.update(min_days=row.min_days, max_days=row.max_days, inactive_months=row.inactive_months,
                   enabled=row.enabled, configured_by=row.configured_by,
                   configured_at=clock.aware(row.configured_at).isoformat())
    return out


def list_schedules(session: Session, org_id: str) -> list[dict]:
    rows = {r.record_class: r for r in session.scalars(select(RetentionSchedule).where(RetentionSchedule.org_id == org_id))}
    return [schedule_dict(rows.get(c), c) for c in RECORD_CLASSES]


def get_schedule(session: Session, org_id: str, record_class: str) -> RetentionSchedule | None:
    return session.scalars(select(RetentionSchedule).where(RetentionSchedule.org_id == org_id,
                                                           RetentionSchedule.record_class == record_class)).first()


def set_schedule(session: Session, org_id: str, record_class: str, *, min_days: int, max_days: int,
                 inactive_months: int | None = None, enabled: bool = True, actor: Actor) -> RetentionSchedule:
    """Create or change a class's schedule. Refused (``ValidationFailed`` naming the field): an
    unknown class; a period below zero or beyond 100 years; ``min_days`` above ``max_days``; a
    HIPAA documentation class below six years; ``inactive_months`` missing for contacts."""
    if record_class not in RECORD_CLASSES:
        raise ValidationFailed(f"Unknown record class; one of {', '.join(RECORD_CLASSES)}.", field="record_class")
    for name, value in (("min_days", min_days), ("max_days", max_days)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > MAX_DAYS:
            raise ValidationFailed(f"{name} must be a whole number of days from 0 to {MAX_DAYS}.", field=name)
    if record_class in HIPAA_CLASSES:
        for name, value in (("min_days", min_days), ("max_days", max_days)):
            if value < HIPAA_MIN_DAYS:
                raise ValidationFailed(
                    f"{name} of {value} days is below the legal minimum for {RECORD_CLASSES[record_class][0].lower()}: "
                    f"HIPAA documentation must be kept at least 6 years ({HIPAA_MIN_DAYS} days, 45 CFR 164.316(b)(2)).",
                    field=name)
    if min_days > max_days:
        raise ValidationFailed("min_days must not exceed max_days.", field="min_days")
    if record_class == "contacts":
        if inactive_months is None or inactive_months < 1 or inactive_months > 1200:
            raise ValidationFailed("inactive_months (1 to 1200) is required for the contacts class.", field="inactive_months")
    elif inactive_months is not None:
        raise ValidationFailed("inactive_months applies to the contacts class only.", field="inactive_months")
    row = get_schedule(session, org_id, record_class)
    before = None if row is None else {"min_days": row.min_days, "max_days": row.max_days, "enabled": row.enabled}
    if row is None:
        row = RetentionSchedule(org_id=org_id, record_class=record_class)
        session.add(row)
    row.min_days, row.max_days, row.inactive_months, row.enabled = min_days, max_days, inactive_months, bool(enabled)
    row.configured_by, row.configured_at = actor.id, clock.now()
    session.flush()
    _audit(session, org_id, actor, "retention.schedule_set", "retention_schedule", row.id,
           {"record_class": record_class, "min_days": min_days, "max_days": max_days, "enabled": bool(enabled),
            "inactive_months": inactive_months, "before": before})
    return row


# --------------------------------------------------------------------------- legal holds


def hold_dict(h: LegalHold) -> dict:
    def ts(v):
        return clock.aware(v).isoformat() if v else None

    return {"id": h.id, "scope": h.scope, "contact_id": h.contact_id, "campaign_id": h.campaign_id,
            "message_id": h.message_id, "starts_on": h.starts_on.isoformat() if h.starts_on else None,
            "ends_on": h.ends_on.isoformat() if h.ends_on else None, "matter": h.matter, "reason": h.reason,
            "status": h.status, "protecting": h.status in PROTECTING, "placed_by": h.placed_by,
            "placed_at": ts(h.placed_at), "approved_by": h.approved_by, "approved_at": ts(h.approved_at),
            "release_requested_by": h.release_requested_by, "release_requested_at": ts(h.release_requested_at),
            "release_reason": h.release_reason, "released_by": h.released_by, "released_at": ts(h.released_at)}


def _require_text(value: str | None, field: str, limit: int) -> str:
    value = (value or "").strip()
    if not value:
        raise ValidationFailed(f"{field} is required.", field=field)
    if len(value) > limit:
        raise ValidationFailed(f"{field} is longer than {limit} characters.", field=field)
    return value


def place_hold(session: Session, org_id: str, *, scope: str, matter: str, reason: str, actor: Actor,
               contact_id: str | None = None, campaign_id: str | None = None, message_id: str | None = None,
               starts_on: date | None = None, ends_on: date | None = None) -> LegalHold:
    """Place a hold (status ``pending``: it protects at once; a second person approves it)."""
    if scope not in HOLD_SCOPES:
        raise ValidationFailed(f"scope must be one of {', '.join(HOLD_SCOPES)}.", field="scope")
    matter = _require_text(matter, "matter", 200)
    reason = _require_text(reason, "reason", 2000)
    refs = {"patient": ("contact_id", contact_id), "campaign": ("campaign_id", campaign_id),
            "message": ("message_id", message_id)}
    if scope in refs:
        field, value = refs[scope]
        if not value or not is_id(value):
            raise ValidationFailed(f"{field} is required for a {scope} hold.", field=field)
        _check_reference(session, org_id, field, value)
    if scope == "date_range":
        if starts_on is None:
            raise ValidationFailed("starts_on is required for a date range hold.", field="starts_on")
        if ends_on is None:
            raise ValidationFailed("ends_on is required for a date range hold.", field="ends_on")
        if ends_on < starts_on:
            raise ValidationFailed("ends_on is before starts_on.", field="ends_on")
    hold = LegalHold(org_id=org_id, scope=scope, matter=matter, reason=reason, placed_by=actor.id, status="pending",
                     contact_id=contact_id if scope == "patient" else None,
                     campaign_id=campaign_id if scope == "campaign" else None,
                     message_id=message_id if scope == "message" else None,
                     starts_on=starts_on if scope == "date_range" else None,
                     ends_on=ends_on if scope == "date_range" else None)
    session.add(hold)
    session.flush()
    _audit(session, org_id, actor, "retention.hold_placed", "legal_hold", hold.id,
           {"scope": scope, "matter": matter, "contact_id": hold.contact_id, "campaign_id": hold.campaign_id,
            "message_id": hold.message_id, "starts_on": str(hold.starts_on) if hold.starts_on else None,
            "ends_on": str(hold.ends_on) if hold.ends_on else None})
    return hold


def _check_reference(session: Session, org_id: str, field: str, value: str) -> None:
    from carepost.core.database import Base

    table = {"contact_id": "contacts", "campaign_id": "campaigns", "message_id": "messages"}[field]
    t = Base.metadata.tables[table]
    if session.execute(select(t.c.id).where(t.c.id == value, t.c.org_id == org_id)).first() is None:
        raise ValidationFailed(f"{field} names no {table[:-1]} of this organization.", field=field)


def get_hold(session: Session, org_id: str, hold_id: str) -> LegalHold:
    hold = session.get(LegalHold, hold_id) if is_id(hold_id) else None
    if hold is None or hold.org_id != org_id:
        raise NotFound("No such legal hold.")
    return hold


def list_holds(session: Session, org_id: str, *, include_released: bool = True) -> list[LegalHold]:
    q = select(LegalHold).where(LegalHold.org_id == org_id)
    if not include_released:
        q = q.where(LegalHold.status.in_(PROTECTING))
    return list(session.scalars(q.order_by(LegalHold.placed_at.desc())))


def _second_person(hold_actor: str | None, actor: Actor, what: str) -> None:
    if actor.role != APPROVER_ROLE:
        raise PermissionDenied(f"Only a compliance officer may approve {what}.", field="approver")
    if actor.id == hold_actor:
        raise PermissionDenied(f"{what.capitalize()} needs a second person: the one who asked may not approve it.",
                               field="approver")


def _second_person_or_audit(session: Session, org_id: str, hold: LegalHold, first: str | None, actor: Actor,
                            what: str, action: str) -> None:
    """``_second_person``; a refusal is audited as a denied ``action`` on the hold before it is raised."""
    try:
        _second_person(first, actor, what)
    except PermissionDenied:
        _audit(session, org_id, actor, action, "legal_hold", hold.id, {"refused": "second person"}, outcome="denied")
        raise


def approve_hold(session: Session, org_id: str, hold_id: str, actor: Actor) -> LegalHold:
    hold = get_hold(session, org_id, hold_id)
    if hold.status != "pending":
        raise Conflict(f"The hold is {hold.status}, not waiting for approval.", field="status")
    _second_person_or_audit(session, org_id, hold, hold.placed_by, actor, "a legal hold", "retention.hold_approved")
    hold.status, hold.approved_by, hold.approved_at = "active", actor.id, clock.now()
    session.flush()
    _audit(session, org_id, actor, "retention.hold_approved", "legal_hold", hold.id, {"matter": hold.matter})
    return hold


def request_release(session: Session, org_id: str, hold_id: str, reason: str, actor: Actor) -> LegalHold:
    """Ask for a hold's release. The hold keeps protecting until a second person approves."""
    hold = get_hold(session, org_id, hold_id)
    reason = _require_text(reason, "reason", 2000)
    if hold.status not in ("pending", "active"):
        raise Conflict(f"The hold is {hold.status}; only a placed or active hold can be released.", field="status")
    hold.status = "release_pending"
    hold.release_requested_by, hold.release_requested_at, hold.release_reason = actor.id, clock.now(), reason
    session.flush()
    _audit(session, org_id, actor, "retention.hold_release_requested", "legal_hold", hold.id, {"matter": hold.matter})
    return hold


def approve_release(session: Session, org_id: str, hold_id: str, actor: Actor) -> LegalHold:
    hold = get_hold(session, org_id, hold_id)
    if hold.status != "release_pending":
        raise Conflict("The hold's release was not requested: request it first, then a second person approves it.",
                       field="status")
    _second_person_or_audit(session, org_id, hold, hold.release_requested_by, actor, "the release of a legal hold",
                            "retention.hold_released")
    hold.status, hold.released_by, hold.released_at = "released", actor.id, clock.now()
    session.flush()
    _audit(session, org_id, actor, "retention.hold_released", "legal_hold", hold.id, {"matter": hold.matter})
    return hold


def protecting_holds(session: Session, org_id: str) -> list[LegalHold]:
    return list(session.scalars(select(LegalHold).where(LegalHold.org_id == org_id, LegalHold.status.in_(PROTECTING))))


def holds_for_message(session: Session, org_id: str, message_id: str) -> list[LegalHold]:
    """The holds protecting one message (by message, its campaign, a recipient's contact, its date
    or the whole organization)."""
    from carepost.core.database import Base

    m = Base.metadata.tables["messages"]
    r = Base.metadata.tables["message_recipients"]
    row = session.execute(select(m.c.campaign_id, m.c.created_at).where(m.c.id == message_id, m.c.org_id == org_id)).first()
    if row is None:
        raise NotFound("No such message.")
    contacts = set(session.scalars(select(r.c.contact_id).where(r.c.message_id == message_id, r.c.org_id == org_id,
                                                                 r.c.contact_id.is_not(None))))
    created = clock.aware(row.created_at).date()
    out = []
    for h in protecting_holds(session, org_id):
        if (h.scope == "organization" or (h.scope == "message" and h.message_id == message_id)
                or (h.scope == "campaign" and row.campaign_id and h.campaign_id == row.campaign_id)
                or (h.scope == "patient" and h.contact_id in contacts)
                or (h.scope == "date_range" and h.starts_on <= created <= h.ends_on)):
            out.append(h)
    return out


def holds_for_contact(session: Session, org_id: str, contact_id: str) -> list[LegalHold]:
    """The holds protecting one of the organization's contacts (NotFound for another's)."""
    from carepost.core.database import Base

    c = Base.metadata.tables["contacts"]
    if session.scalar(select(c.c.id).where(c.c.id == contact_id, c.c.org_id == org_id)) is None:
        raise NotFound("No such contact.")
    return [h for h in protecting_holds(session, org_id)
            if h.scope == "organization" or (h.scope == "patient" and h.contact_id == contact_id)]


def hold_filter(holds: list[LegalHold], table, *, time_column, contact_ids_of=None):
    """SQL conditions that exclude the rows ``holds`` cover from a purge of ``table`` (None: an
    organization-wide hold covers everything). ``contact_ids_of(table)`` gives an expression to
    test patient holds when the table has no ``contact_id`` of its own (messages: their
    recipients)."""
    if any(h.scope == "organization" for h in holds):
        return None
    conds = []
    for h in holds:
        if h.scope == "date_range":
            start = datetime.combine(h.starts_on, datetime.min.time(), tzinfo=clock.now().tzinfo)
            end = datetime.combine(h.ends_on + timedelta(days=1), datetime.min.time(), tzinfo=clock.now().tzinfo)
            conds.append(or_(time_column < start, time_column >= end))
    messages = [h.message_id for h in holds if h.scope == "message"]
    if messages and "message_id" in table.c:
        conds.append(table.c.message_id.not_in(messages))
    elif messages and table.name == "messages":
        conds.append(table.c.id.not_in(messages))
    if holds and table.name != "messages" and ("message_id" in table.c or "recipient_id" in table.c):
        # A row about a message (a portal message, an engagement event, a report naming a copy) is
        # held with its message: a held message, a message of a held campaign or addressed to a
        # held patient (carepost.retention.held, correlated look-ups by primary key).
        covered = held.Held.of(holds[0].org_id, holds)
        ref = table.c.message_id if "message_id" in table.c else table.c.recipient_id
        cond = (held.message_held if "message_id" in table.c else held.recipient_held)(covered, ref)
        if cond is not None:
            conds.append(or_(ref.is_(None), ~cond))
    campaigns = [h.campaign_id for h in holds if h.scope == "campaign"]
    if campaigns and "campaign_id" in table.c:
        conds.append(or_(table.c.campaign_id.is_(None), table.c.campaign_id.not_in(campaigns)))
    patients = [h.contact_id for h in holds if h.scope == "patient"]
    if patients:
        if "contact_id" in table.c:
            conds.append(or_(table.c.contact_id.is_(None), table.c.contact_id.not_in(patients)))
        elif contact_ids_of is not None:
            conds.append(~contact_ids_of(patients))
    return conds
