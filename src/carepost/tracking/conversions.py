"""Custom events and goals (issue 13 item 4): what a patient did after a message —
``appointment.booked``, ``refill.picked_up`` or a name of the organization's own — recorded for a
contact through ``POST /api/v1/events``, and conversions attributed to the message that led to it.

* **Idempotent by key.** A caller's key (``Idempotency-Key`` header or ``idempotency_key``
  field) is kept as a SHA-256 only (a key could hold anything); so is the request it came with.
  The same key with the same request answers the stored event; with another request, 409. Two
  concurrent requests with one key: the unique constraint lets one in, the other reads it.
* **Properties may be PHI** (a medication, an appointment type): JSON, at most
  :data:`MAX_PROPERTIES_BYTES`, encrypted under the organization's data key, bound to the row.
  They are never echoed, logged or audited (the audit holds the event's id and name).
* **Goals.** An organization names an event as a goal with an attribution window in days. When
  such an event arrives, it is attributed to the *last message delivered* (or handed to a relay or
  the portal) to that contact within the window before the event, and that message's
  ``converted`` counter goes up (source, campaign, template, receiving domain… as the message's).
  One event converts once; an event without a goal, or no message in the window, is only kept.
  A conversion goes out as the webhook event ``message.converted`` (ids only).

Attribution reads ``delivery.models`` directly (a set-based read joining events to recipients,
which ARCHITECTURE.md section 3 allows).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    bindparam,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from carepost.core import clock
from carepost.core import events as domain_events
from carepost.core.crypto import get_keyring
from carepost.core.database import Base, OrgScoped
from carepost.core.errors import CarePostError, Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id

EVENT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}(\.[a-z][a-z0-9_]{0,30}){0,3}$")
MAX_EVENT_NAME = 64
PROPERTY_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_PROPERTIES_BYTES = 16 * 1024
MAX_PROPERTIES_DEPTH = 4
MAX_PROPERTY_KEYS = 100
MAX_WINDOW_DAYS = 90
MAX_GOALS_PER_ORG = 100
MAX_PAST_DAYS = 366
KNOWN_EVENTS = {
    "appointment.booked": "The patient booked an appointment.",
    "appointment.attended": "The patient came to an appointment.",
    "refill.requested": "The patient asked for a refill.",
    "refill.picked_up": "The patient picked up a prescription.",
    "form.submitted": "The patient submitted a form.",
    "payment.made": "The patient paid a bill.",
    "screening.completed": "The patient completed a screening.",
    "vaccination.given": "The patient was vaccinated.",
}
ATTRIBUTING_EVENTS = ("delivered", "sent")
domain_events.declare("contact.event_recorded",
                      "A contact event was recorded (the ContactEvent row: ids, name, time; properties stay encrypted). "
                      "Journeys start, wait and reach goals on it.")
domain_events.declare("contact.events_recorded",
                      "Contact events of one organization recorded together (record_events: session, org id, the "
                      "ContactEvent rows in order). Journeys evaluate them set-wise.")
# Registered by the composition root (``carepost.assembly``), like every other capability's.
EVENT_TYPES: dict[str, str] = {
    "message.converted": "A goal's event was attributed to the last message delivered to the contact within the "
                         "goal's window (data: message_id, recipient_id, contact_id, event_id, goal_id — ids only; "
                         "the event's name only to endpoints that receive PHI).",
}


class Goal(OrgScoped, Base):
    """An event the organization counts as a conversion, with its attribution window."""

    __tablename__ = "analytics_goals"
    __table_args__ = (UniqueConstraint("org_id", "event_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(120))
    event_name: Mapped[str] = mapped_column(String(MAX_EVENT_NAME))
    window_days: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class ContactEvent(OrgScoped, Base):
    """One event of a contact, as recorded (append-only)."""

    __tablename__ = "contact_events"
    __table_args__ = (
        UniqueConstraint("org_id", "idempotency_key"),
        Index("ix_contact_events_org_contact", "org_id", "contact_id", "occurred_at"),
        Index("ix_contact_events_org_name", "org_id", "name", "occurred_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(MAX_EVENT_NAME))
    occurred_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=clock.now)
    properties_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    idempotency_key: Mapped[str | None] = mapped_column(String(64))  # SHA-256 of the caller's key
    request_hash: Mapped[str | None] = mapped_column(String(64))
    goal_id: Mapped[str | None] = mapped_column(String(32))
    message_id: Mapped[str | None] = mapped_column(String(32))  # the message the conversion is attributed to
    recipient_id: Mapped[str | None] = mapped_column(String(32))
    created_by: Mapped[str | None] = mapped_column(String(32))


# --------------------------------------------------------------------------- validation


def check_event_name(name, field: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise ValidationFailed("The event name is required.", field=field)
    if len(name) > MAX_EVENT_NAME or not EVENT_NAME_RE.match(name):
        raise ValidationFailed("An event name is 1 to 4 dot-separated parts of lowercase letters, digits and "
                               "underscores, each starting with a letter (appointment.booked), at most "
                               f"{MAX_EVENT_NAME} characters.", field=field)
    return name


def _depth(value, level: int = 1) -> int:
    if isinstance(value, dict):
        return max([level] + [_depth(v, level + 1) for v in value.values()])
    if isinstance(value, list):
        return max([level] + [_depth(v, level + 1) for v in value])
    return level - 1 if level > 1 else 0


class PayloadTooLarge(ValidationFailed):
    status_code = 413
    code = "payload_too_large"


def check_properties(properties) -> str | None:
    """The properties as canonical JSON text, or refused naming the field."""
    if properties is None:
        return None
    if not isinstance(properties, dict):
        raise ValidationFailed("properties is a JSON object.", field="properties")
    if len(properties) > MAX_PROPERTY_KEYS:
        raise ValidationFailed(f"properties has at most {MAX_PROPERTY_KEYS} keys.", field="properties")
    for key in properties:
        if not PROPERTY_KEY_RE.match(key):
            raise ValidationFailed("A property name is 1 to 64 letters, digits, '_', '.' or '-', starting with a "
                                   "letter or '_'.", field="properties")
    try:
        text = json.dumps(properties, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise ValidationFailed("properties holds a value JSON cannot carry.", field="properties") from None
    if len(text.encode()) > MAX_PROPERTIES_BYTES:
        raise PayloadTooLarge(f"properties is at most {MAX_PROPERTIES_BYTES} bytes as JSON.", field="properties")
    if _depth(properties) > MAX_PROPERTIES_DEPTH:
        raise ValidationFailed(f"properties nests at most {MAX_PROPERTIES_DEPTH} levels.", field="properties")
    return text


def check_occurred_at(value: datetime | None) -> datetime:
    now = clock.now()
    if value is None:
        return now
    if value.tzinfo is None:
        raise ValidationFailed("occurred_at needs a time zone (2026-12-03T14:25:00Z).", field="occurred_at")
    value = value.astimezone(UTC)
    if value > now + timedelta(minutes=5):
        raise ValidationFailed("occurred_at is in the future.", field="occurred_at")
    if value < now - timedelta(days=MAX_PAST_DAYS):
        raise ValidationFailed(f"occurred_at is at most {MAX_PAST_DAYS} days ago.", field="occurred_at")
    return value


def check_idempotency_key(key) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not (1 <= len(key) <= 200) or not key.isascii() or not key.isprintable():
        raise ValidationFailed("The idempotency key is 1 to 200 printable ASCII characters.", field="idempotency_key")
    return key


def _sha(kind: str, text: str) -> str:
    return hashlib.sha256(f"{kind}\x00{text}".encode()).hexdigest()


# --------------------------------------------------------------------------- events


def resolve_contact(session: Session, org_id: str, *, contact_id: str | None, contact: dict | None) -> str:
    """The contact an event is about: by id, or by an identifier the API already resolves (email,
    phone, MRN with an optional system) through blind indexes. Unknown, ambiguous or another
    organization's: refused naming the field, nothing stored."""
    from carepost.patients import service as patients

    if contact_id is not None and contact is not None:
        raise ValidationFailed("Give contact_id or contact, not both.", field="contact")
    if contact_id is not None:
        if not isinstance(contact_id, str) or not is_id(contact_id):
            raise ValidationFailed("contact_id is a CarePost id.", field="contact_id")
        found = patients.get_contact(session, contact_id)  # the scope hides other organizations' contacts
        if found.org_id != org_id:
            raise NotFound("No such contact.", field="contact_id")
        return found.id
    if contact is None:
        raise ValidationFailed("Name the contact: contact_id, or contact with email, phone or mrn.", field="contact_id")
    if not isinstance(contact, dict) or not contact:
        raise ValidationFailed("contact is an object with email, phone or mrn (and system).", field="contact")
    allowed = {"email", "phone", "mrn", "system"}
    if set(contact) - allowed or not (set(contact) & {"email", "phone", "mrn"}):
        raise ValidationFailed("contact is an object with email, phone or mrn (and system).", field="contact")
    for key, value in contact.items():
        if not isinstance(value, str) or not value or len(value) > 320:
            raise ValidationFailed(f"contact.{key} is a non-empty string of at most 320 characters.",
                                   field=f"contact.{key}")
    ids = patients.find_contact_ids(session, org_id, email=contact.get("email"), phone=contact.get("phone"),
                                    mrn=contact.get("mrn"), system=contact.get("system"))
    if not ids:
        raise NotFound("No contact has this identifier.", field="contact")
    if len(ids) > 1:
        raise ValidationFailed("More than one contact has this identifier; give contact_id.", field="contact")
    return ids[0]


def find_goal(session: Session, org_id: str, event_name: str) -> Goal | None:
    return session.scalar(select(Goal).where(Goal.org_id == org_id, Goal.event_name == event_name))


def last_delivered(session: Session, org_id: str, contact_id: str, at: datetime, window_days: int):
    """(message id, recipient id, when) of the last copy delivered to the contact in the window."""
    from carepost.delivery.models import Message, MessageEvent, MessageRecipient

    row = session.execute(
        select(MessageEvent.message_id, MessageEvent.recipient_id, MessageEvent.created_at)
        .join(MessageRecipient, MessageRecipient.id == MessageEvent.recipient_id)
        .join(Message, Message.id == MessageEvent.message_id)
        .where(MessageEvent.org_id == org_id, MessageRecipient.contact_id == contact_id,
               MessageEvent.type.in_(ATTRIBUTING_EVENTS), Message.sandbox.is_(False),
               MessageEvent.created_at >= at - timedelta(days=window_days), MessageEvent.created_at <= at)
        .order_by(MessageEvent.created_at.desc(), MessageEvent.id.desc()).limit(1)
    ).first()
    return tuple(row) if row else None


def request_fingerprint(body: dict) -> str:
    """The request an idempotency key came with (the key itself left out)."""
    data = {k: v for k, v in body.items() if k != "idempotency_key" and v is not None}
    return _sha("event-request", json.dumps(data, sort_keys=True, separators=(",", ":"), default=str))


def record_event(session: Session, org_id: str, *, name: str, contact_id: str | None = None,
                 contact: dict | None = None, occurred_at: datetime | None = None, properties: dict | None = None,
                 idempotency_key: str | None = None, request_hash: str | None = None,
                 created_by: str | None = None) -> tuple[ContactEvent, bool]:
    """Record one event (and its conversion); returns ``(event, created)``. Every check runs
    before anything is written. The caller commits."""
    key = check_idempotency_key(idempotency_key)
    key_hash = _sha("event-idempotency", key) if key else None
    if key_hash:
        existing = session.scalar(select(ContactEvent).where(ContactEvent.org_id == org_id,
                                                             ContactEvent.idempotency_key == key_hash))
        if existing is not None:
            if existing.request_hash != request_hash:
                raise Conflict("This idempotency key was used with a different request.", field="idempotency_key",
                               code="idempotency_conflict")
            return existing, False
    name = check_event_name(name)
    text = check_properties(properties)
    at = check_occurred_at(occurred_at)
    cid = resolve_contact(session, org_id, contact_id=contact_id, contact=contact)
    event = ContactEvent(id=new_id(), org_id=org_id, contact_id=cid, name=name, occurred_at=at,
                         received_at=clock.now(), idempotency_key=key_hash, request_hash=request_hash,
                         created_by=created_by)
    if text is not None:
        event.properties_enc = get_keyring().encrypt(session, org_id, ContactEvent.__tablename__, "properties",
                                                     event.id, text)
    goal = find_goal(session, org_id, name)
    if goal is not None:
        found = last_delivered(session, org_id, cid, at, goal.window_days)
        if found is not None:
            event.goal_id, event.message_id, event.recipient_id = goal.id, found[0], found[1]
    try:
        with session.begin_nested():
            session.add(event)
            session.flush()
    except IntegrityError:
        if not key_hash:
            raise
        existing = session.scalar(select(ContactEvent).where(ContactEvent.org_id == org_id,
                                                             ContactEvent.idempotency_key == key_hash))
        if existing is None:
            raise
        if existing.request_hash != request_hash:
            raise Conflict("This idempotency key was used with a different request.", field="idempotency_key",
                           code="idempotency_conflict") from None
        return existing, False
    if event.message_id:
        from carepost.tracking import analytics

        analytics.count_conversion(session, org_id, at, event.message_id, event.recipient_id)
        _announce_conversion(session, event)
    # Journeys hear every new event (entries, goals, waits for an event), in this transaction; an
    # idempotent replay returned above and announces nothing again.
    domain_events.publish("contact.event_recorded", session, event)
    return event, True


@dataclass
class EventResult:
    """One item of :func:`record_events`: the event (new or the earlier one of its idempotency
    key), whether it was created, or the error that refused it (nothing of it stored)."""

    event: ContactEvent | None = None
    created: bool = False
    error: CarePostError | None = None


def record_events(session: Session, org_id: str, items: list[dict]) -> list[EventResult]:
    """:func:`record_event` for many events of one organization at once (the HL7 listener's
    group): each item has ``name``, ``contact_id`` (already resolved within the organization),
    ``occurred_at``, ``properties``, ``idempotency_key``, ``request_hash``, ``created_by``.

    The same checks and answers per item — a bad item is refused alone (its error in its result),
    an idempotency key seen before (stored, or earlier in ``items``) returns that event — but set-
    wise: one idempotency query, one contact check, one goal query, one multi-row flush, and the
    new events announced together (``contact.events_recorded``: journeys evaluate them set-wise).
    A unique-key race with a concurrent writer raises ``IntegrityError`` (no savepoint per event):
    the caller's transaction is lost and it retries item by item. The caller commits."""
    results = [EventResult() for _ in items]
    keys: list[str | None] = []
    for item, result in zip(items, results, strict=True):
        try:
            key = check_idempotency_key(item.get("idempotency_key"))
        except CarePostError as exc:
            result.error, key = exc, None
        keys.append(_sha("event-idempotency", key) if key else None)
    wanted = sorted({k for k in keys if k})
    existing: dict[str, ContactEvent] = {}
    # In the organization's own session (the listener's group) the reads are scoped Core
    # statements (core.scoped_select): the same rows without the ORM's cost per statement; the
    # ORM loads only the events an idempotency key already names (a replay — rare).
    core = session.info.get("org_id") == org_id
    if core and session.autoflush:
        session.flush()  # what an ORM query would have written first (a Core one does not)
    for start in range(0, len(wanted), 500):
        part = wanted[start:start + 500]
        if core:
            from carepost.core.scoped_select import org_select

            hits = list(org_select(session, _EVENT_KEYS, {"keys": part}).scalars())
            if not hits:
                continue
            part = hits
        for row in session.scalars(select(ContactEvent).where(ContactEvent.org_id == org_id,
                                                              ContactEvent.idempotency_key.in_(part))):
            existing[row.idempotency_key] = row
    contact_ids = sorted({i.get("contact_id") for i in items if isinstance(i.get("contact_id"), str)
                          and is_id(i["contact_id"])})
    from carepost.patients.models import Contact

    if core:
        from carepost.core.scoped_select import org_select

        known_contacts = set(org_select(session, _contact_ids_statement(), {"ids": contact_ids}).scalars()) \
            if contact_ids else set()
        goals = {g.event_name: g for g in org_select(session, _GOALS)}
    else:
        known_contacts = set(session.scalars(select(Contact.id).where(
            Contact.org_id == org_id, Contact.id.in_(contact_ids)))) if contact_ids else set()
        goals = {g.event_name: g for g in session.scalars(select(Goal).where(Goal.org_id == org_id))}
    new_events: list[ContactEvent] = []
    for item, key_hash, result in zip(items, keys, results, strict=True):
        if result.error is not None:
            continue
        if key_hash and key_hash in existing:
            earlier = existing[key_hash]
            if earlier.request_hash != item.get("request_hash"):
                result.error = Conflict("This idempotency key was used with a different request.",
                                        field="idempotency_key", code="idempotency_conflict")
            else:
                result.event = earlier
            continue
        try:
            name = check_event_name(item.get("name"))
            text = check_properties(item.get("properties"))
            at = check_occurred_at(item.get("occurred_at"))
            cid = item.get("contact_id")
            if cid not in known_contacts:
                raise NotFound("No such contact.", field="contact_id")
        except CarePostError as exc:
            result.error = exc
            continue
        event = ContactEvent(id=new_id(), org_id=org_id, contact_id=cid, name=name, occurred_at=at,
                             received_at=clock.now(), idempotency_key=key_hash, request_hash=item.get("request_hash"),
                             created_by=item.get("created_by"))
        if text is not None:
            event.properties_enc = get_keyring().encrypt(session, org_id, ContactEvent.__tablename__, "properties",
                                                         event.id, text)
        goal = goals.get(name)
        if goal is not None:
            found = last_delivered(session, org_id, cid, at, goal.window_days)
            if found is not None:
                event.goal_id, event.message_id, event.recipient_id = goal.id, found[0], found[1]
        if key_hash:
            existing[key_hash] = event
        result.event, result.created = event, True
        new_events.append(event)
    if not new_events:
        return results
    if core:
        # One Core INSERT of the rows (the organization's own, checked above); the objects stay
        # detached values for the caller and the subscribers (ids, names, times).
        session.flush()  # anything pending first, in the order the ORM would have written it
        session.connection().execute(ContactEvent.__table__.insert(), [
            {c: getattr(e, c) for c in _EVENT_COLUMNS} for e in new_events])
    else:
        session.add_all(new_events)
        session.flush()
    for event in new_events:
        if event.message_id:
            from carepost.tracking import analytics

            analytics.count_conversion(session, org_id, event.occurred_at, event.message_id, event.recipient_id)
            _announce_conversion(session, event)
    domain_events.publish("contact.events_recorded", session, org_id, new_events)
    return results


_EVENT_COLUMNS = ("id", "org_id", "contact_id", "name", "occurred_at", "received_at", "properties_enc",
                  "idempotency_key", "request_hash", "goal_id", "message_id", "recipient_id", "created_by")
# Core statements for :func:`carepost.core.scoped_select.org_select` (it adds the organization).
_EVENT_KEYS = select(ContactEvent.__table__.c.idempotency_key).where(
    ContactEvent.__table__.c.idempotency_key.in_(bindparam("keys", expanding=True)))
_GOALS = select(Goal.__table__.c.id, Goal.__table__.c.event_name, Goal.__table__.c.window_days)


_contact_ids: list = []  # the contact-id check's statement, built once on first use (lazy import)


def _contact_ids_statement():
    if not _contact_ids:
        from carepost.patients.models import Contact

        _contact_ids.append(select(Contact.__table__.c.id).where(
            Contact.__table__.c.id.in_(bindparam("ids", expanding=True))))
    return _contact_ids[0]


def _announce_conversion(session: Session, event: ContactEvent) -> None:
    """``message.converted`` to the organization's webhook endpoints, in the event's transaction
    (a rolled-back event announces nothing; an idempotent replay announces nothing again). Ids
    only: a custom event's name can say what the patient did (``hiv_test.booked``), so it goes
    only to endpoints that receive PHI; the properties never."""
    from carepost.tracking.service import emit

    data = {"message_id": event.message_id, "recipient_id": event.recipient_id, "contact_id": event.contact_id,
            "event_id": event.id, "goal_id": event.goal_id,
            "occurred_at": clock.aware(event.occurred_at).isoformat().replace("+00:00", "Z")}
    emit(session, event.org_id, "message.converted", data, phi={"event_name": event.name})


def event_properties(session: Session, event: ContactEvent) -> dict | None:
    text = get_keyring().decrypt_text(session, event.org_id, ContactEvent.__tablename__, "properties", event.id,
                                      event.properties_enc)
    return json.loads(text) if text is not None else None


def event_out(event: ContactEvent) -> dict:
    """What the API answers: ids, name and times — never the properties."""
    return {"id": event.id, "name": event.name, "contact_id": event.contact_id,
            "occurred_at": event.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
            if event.occurred_at.tzinfo else event.occurred_at.isoformat() + "Z",
            "conversion": {"goal_id": event.goal_id, "message_id": event.message_id} if event.goal_id else None}


def forget_contact(session: Session, org_id: str, contact_id: str, _indexes: dict | None = None) -> None:
    """A deleted patient's events go with them (a deletion hook; the counters stay, they name
    nobody)."""
    from sqlalchemy import delete

    session.execute(delete(ContactEvent).where(ContactEvent.org_id == org_id, ContactEvent.contact_id == contact_id))


def forget_contacts(session: Session, org_id: str, indexes_by_contact: dict) -> None:
    """:func:`forget_contact` for a set of contacts, in one statement."""
    from sqlalchemy import delete

    if indexes_by_contact:
        session.execute(delete(ContactEvent).where(ContactEvent.org_id == org_id,
                                                   ContactEvent.contact_id.in_(sorted(indexes_by_contact))))


# --------------------------------------------------------------------------- goals


def _check_goal(name, event_name, window_days) -> tuple[str, str, int]:
    if not isinstance(name, str) or not name.strip() or len(name) > 120:
        raise ValidationFailed("A goal's name is 1 to 120 characters.", field="name")
    event_name = check_event_name(event_name, "event_name")
    if isinstance(window_days, bool) or not isinstance(window_days, int) or not 1 <= window_days <= MAX_WINDOW_DAYS:
        raise ValidationFailed(f"window_days is a whole number of days from 1 to {MAX_WINDOW_DAYS}.",
                               field="window_days")
    return name.strip(), event_name, window_days


def list_goals(session: Session, org_id: str) -> list[Goal]:
    return list(session.scalars(select(Goal).where(Goal.org_id == org_id).order_by(Goal.created_at, Goal.id)))


def get_goal(session: Session, org_id: str, goal_id: str) -> Goal:
    goal = session.get(Goal, goal_id) if is_id(goal_id) else None
    if goal is None or goal.org_id != org_id:
        raise NotFound("No such goal.", field="goal_id")
    return goal


def create_goal(session: Session, org_id: str, *, name, event_name, window_days, created_by: str | None = None) -> Goal:
    name, event_name, window_days = _check_goal(name, event_name, window_days)
    if find_goal(session, org_id, event_name) is not None:
        raise Conflict("A goal for this event already exists.", field="event_name")
    if len(list_goals(session, org_id)) >= MAX_GOALS_PER_ORG:
        raise ValidationFailed(f"An organization has at most {MAX_GOALS_PER_ORG} goals.", field="event_name")
    goal = Goal(id=new_id(), org_id=org_id, name=name, event_name=event_name, window_days=window_days,
                created_by=created_by)
    session.add(goal)
    session.flush()
    return goal


def update_goal(session: Session, goal: Goal, *, name=None, window_days=None) -> list[str]:
    new_name, _, new_window = _check_goal(goal.name if name is None else name, goal.event_name,
                                          goal.window_days if window_days is None else window_days)
    changed = [f for f, old, new in (("name", goal.name, new_name), ("window_days", goal.window_days, new_window))
               if old != new]
    goal.name, goal.window_days = new_name, new_window
    session.flush()
    return changed


def delete_goal(session: Session, goal: Goal) -> None:
    session.delete(goal)
    session.flush()


def goal_out(goal: Goal) -> dict:
    return {"id": goal.id, "name": goal.name, "event_name": goal.event_name, "window_days": goal.window_days,
            "created_at": goal.created_at.isoformat() if goal.created_at else None}
