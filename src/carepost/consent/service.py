"""Consent logic over the database: suppressions, topics and subscriptions, authorizations.

Plain functions taking a session (ARCHITECTURE.md section 3); callers commit. Routes write the
audit events (they know the principal); functions here that act for a patient through a token
(unsubscribe, revocation) write their own, since no principal is signed in.

Suppressions are address-level: keyed by the keyed blind index of the address (kind ``email``),
so they survive patient deletion and re-import and apply to addresses that match no contact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.consent.models import (
    ALL_MARKETING,
    FREQUENCIES,
    SUPPRESSION_REASONS,
    SUPPRESSION_SCOPES,
    Authorization,
    Subscription,
    Suppression,
    Topic,
)
from carepost.core import clock
from carepost.core.errors import CarePostError, Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.core.logging import get_logger
from carepost.delivery.suppressions import (  # noqa: F401 - consent's public names for the suppression list
    REASON_STRENGTH,
    _active,
    _check_scope,
    _scope_key,
    add_suppression,
    add_suppression_by_index,
    address_index,
    is_suppressed,
    remove_suppression,
    suppression_address,
    suppression_reason,
)

log = get_logger("carepost.consent")

# --------------------------------------------------------------------------- suppressions
# The list itself lives in delivery (delivery/suppressions.py); consent adds unsubscribes, CSV
# import and export, and shows it.


def suppression_dict(session: Session, row: Suppression, *, unmasked: bool) -> dict:
    """A suppression as the API and UI show it; the address masked unless ``unmasked``."""
    from carepost.patients.masking import mask_email

    address = suppression_address(session, row)
    return {
        "id": row.id,
        "address": address if unmasked else mask_email(address),
        "address_kept": row.address_enc is not None,
        "reason": row.reason,
        "scope": row.scope,
        "topic_id": row.topic_id,
        "source": row.source,
        "details": row.details or {},
        "created_at": clock.aware(row.created_at).isoformat(),
        "expires_at": clock.aware(row.expires_at).isoformat() if row.expires_at else None,
    }


def list_suppressions(session: Session, org_id: str, *, reason: str | None = None, scope: str | None = None,
                      cursor: str | None = None, limit: int = 100) -> tuple[list[Suppression], str | None]:
    """Newest first; ``cursor`` is the id of the last row of the previous page."""
    if reason is not None and reason not in SUPPRESSION_REASONS:
        raise ValidationFailed(f"reason must be one of {', '.join(SUPPRESSION_REASONS)}.", field="reason")
    if scope is not None and scope not in SUPPRESSION_SCOPES:
        raise ValidationFailed(f"scope must be one of {', '.join(SUPPRESSION_SCOPES)}.", field="scope")
    q = select(Suppression).where(Suppression.org_id == org_id)
    if reason:
        q = q.where(Suppression.reason == reason)
    if scope:
        q = q.where(Suppression.scope == scope)
    if cursor:
        if not is_id(cursor):
            raise ValidationFailed("Invalid cursor.", field="cursor")
        q = q.where(Suppression.id < cursor)
    rows = list(session.scalars(q.order_by(Suppression.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


class CsvRejected(ValidationFailed):
    """A CSV file with bad rows: nothing was stored. ``errors`` name the line and field, never
    the value."""

    def __init__(self, errors: list[dict]):
        first = errors[0]
        super().__init__(f"Line {first['line']}: {first['reason']} Nothing was imported.", field=first.get("field") or "file")
        self.errors = errors

    def to_dict(self) -> dict:
        return {**super().to_dict(), "errors": self.errors[:100]}


SUPPRESSION_CSV_COLUMNS = ("address", "reason", "scope", "topic", "expires_at")
MAX_IMPORT_ROWS = 100_000


def import_suppressions_csv(session: Session, org_id: str, data: bytes | str, *, created_by: str | None = None,
                            default_reason: str = "manual") -> dict:
    """Import a CSV (header row: ``address`` (or ``email``), optional ``reason``, ``scope``,
    ``topic`` (key or id), ``expires_at`` (ISO 8601)). Every row is checked first; one bad row
    rejects the file and nothing is stored."""
    import csv
    import io

    from carepost.accounts.service import normalize_email

    text = data.decode("utf-8-sig", errors="strict") if isinstance(data, bytes) else data
    reader = csv.DictReader(io.StringIO(text))
    headers = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    if "email" in headers and "address" not in headers:
        headers = ["address" if h == "email" else h for h in headers]
    if "address" not in headers:
        raise ValidationFailed("The first row must name the columns, including 'address'.", field="file")
    unknown = [h for h in headers if h and h not in SUPPRESSION_CSV_COLUMNS]
    if unknown:
        raise ValidationFailed(f"Unknown column(s): {', '.join(sorted(unknown))[:200]}.", field="file")
    reader.fieldnames = headers
    topics = {t.key: t.id for t in list_topics(session, org_id, include_archived=True)}
    topic_ids = set(topics.values())
    rows: list[tuple] = []
    errors: list[dict] = []
    for n, raw in enumerate(reader, start=2):
        if n - 1 > MAX_IMPORT_ROWS:
            raise ValidationFailed(f"At most {MAX_IMPORT_ROWS} rows per file.", field="file")
        if None in raw:
            errors.append({"line": n, "field": "file", "reason": "More values than columns."})
            continue
        values = {k: (v or "").strip() for k, v in raw.items()}
        if not any(values.values()):
            continue
        try:
            address = normalize_email(values.get("address", ""), "address")
            reason = values.get("reason") or default_reason
            scope = values.get("scope") or "all"
            topic_ref = values.get("topic") or None
            topic_id = None
            if topic_ref:
                topic_id = topics.get(topic_ref) or (topic_ref if topic_ref in topic_ids else None)
                if topic_id is None:
                    raise ValidationFailed("No such topic.", field="topic")
                scope = values.get("scope") or "topic"
            _check_scope(scope, topic_id, reason)
            expires = None
            if values.get("expires_at"):
                try:
                    expires = clock.aware(datetime.fromisoformat(values["expires_at"]))
                except ValueError:
                    raise ValidationFailed("Enter expires_at as an ISO 8601 date and time.", field="expires_at") from None
            rows.append((address, reason, scope, topic_id, expires))
        except ValidationFailed as exc:
            errors.append({"line": n, "field": exc.field, "reason": exc.message})
    if errors:
        raise CsvRejected(errors)
    before = session.scalar(select(func.count()).select_from(Suppression).where(Suppression.org_id == org_id)) or 0
    for address, reason, scope, topic_id, expires in rows:
        add_suppression(session, org_id, address, reason, scope, topic_id, source="import", expires_at=expires,
                        created_by=created_by)
    after = session.scalar(select(func.count()).select_from(Suppression).where(Suppression.org_id == org_id)) or 0
    return {"rows": len(rows), "added": after - before, "already_suppressed": len(rows) - (after - before)}


def export_suppressions_csv(session: Session, org_id: str) -> str:
    """Every suppression, with the address where a copy was kept (the caller audits the export)."""
    import csv
    import io

    topics = {t.id: t.key for t in list_topics(session, org_id, include_archived=True)}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["address", "reason", "scope", "topic", "source", "created_at", "expires_at"])
    q = select(Suppression).where(Suppression.org_id == org_id).order_by(Suppression.id)
    for row in session.scalars(q.execution_options(yield_per=1000)):
        writer.writerow([
            _csv_safe(suppression_address(session, row) or ""), row.reason, row.scope, topics.get(row.topic_id, row.topic_id or ""),
            _csv_safe(row.source or ""), clock.aware(row.created_at).isoformat(),
            clock.aware(row.expires_at).isoformat() if row.expires_at else "",
        ])
    return out.getvalue()


def _csv_safe(value: str) -> str:
    """Defuse spreadsheet formulas (CSV injection) in exported text."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


# --------------------------------------------------------------------------- organization settings

CONSENT_DEFAULTS: dict = {
    "frequency_cap_daily": None,  # marketing messages per patient per day (None: no cap)
    "frequency_cap_weekly": None,  # ... per rolling 7 days
    "quiet_hours_start": None,  # "21:00" in the recipient's time zone (None: no quiet hours)
    "quiet_hours_end": None,  # "08:00"
    "default_time_zone": "America/New_York",  # for contacts without a time zone
    "authorization_default_months": 24,  # expiry of an authorization signed without one
    "confirmation_link_hours": 48,  # validity of a double opt-in confirmation link
    # CAN-SPAM (15 U.S.C. 7704(a)(5)(A)(iii)): a valid physical postal address in every commercial
    # message. Required before marketing can be sent (recipients are excluded as no_postal_address).
    "postal_address": None,
}
POSTAL_ADDRESS_MAX = 300


def consent_settings(session: Session, org_id: str) -> dict:
    from carepost.accounts.models import Organization

    org = session.get(Organization, org_id)
    if org is None:
        raise NotFound("No such organization.", field="org")
    return {**CONSENT_DEFAULTS, **((org.settings or {}).get("consent") or {})}


def set_consent_settings(session: Session, org_id: str, values: dict) -> dict:
    """Change frequency caps, quiet hours and defaults (kept in the organization's settings)."""
    import re
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from carepost.accounts.models import Organization

    cfg = consent_settings(session, org_id)
    for key, value in values.items():
        if key not in CONSENT_DEFAULTS:
            raise ValidationFailed("Unknown consent setting.", field=key)
        if key in ("frequency_cap_daily", "frequency_cap_weekly"):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000):
                raise ValidationFailed("Enter a whole number from 1 to 1000, or nothing for no cap.", field=key)
        elif key in ("quiet_hours_start", "quiet_hours_end"):
            if value is not None and (not isinstance(value, str) or not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value)):
                raise ValidationFailed("Enter a time as HH:MM (24-hour clock).", field=key)
        elif key == "default_time_zone":
            try:
                ZoneInfo(str(value))
            except (ZoneInfoNotFoundError, ValueError):
                raise ValidationFailed("Enter an IANA time zone such as America/Chicago.", field=key) from None
        elif key == "authorization_default_months":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 120:
                raise ValidationFailed("Enter a number of months from 1 to 120.", field=key)
        elif key == "confirmation_link_hours":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 720:
                raise ValidationFailed("Enter a number of hours from 1 to 720.", field=key)
        elif key == "postal_address":
            if value is not None and not isinstance(value, str):
                raise ValidationFailed("Enter the postal address as text.", field=key)
            value = "\n".join(line.strip() for line in (value or "").strip().splitlines() if line.strip()) or None
            if value is not None:
                if len(value) > POSTAL_ADDRESS_MAX:
                    raise ValidationFailed(f"The postal address is longer than {POSTAL_ADDRESS_MAX} characters.", field=key)
                if len(value) < 10 or any(ord(c) < 0x20 and c != "\n" or ord(c) == 0x7F for c in value):
                    raise ValidationFailed("Enter the organization's full postal address (street or PO box, city, "
                                           "state, ZIP).", field=key)
        cfg[key] = value
    if (cfg["quiet_hours_start"] is None) != (cfg["quiet_hours_end"] is None):
        raise ValidationFailed("Quiet hours need both a start and an end.", field="quiet_hours_end")
    if cfg["quiet_hours_start"] is not None and cfg["quiet_hours_start"] == cfg["quiet_hours_end"]:
        raise ValidationFailed("Quiet hours must start and end at different times.", field="quiet_hours_end")
    if (cfg["frequency_cap_daily"] and cfg["frequency_cap_weekly"]
            and cfg["frequency_cap_daily"] > cfg["frequency_cap_weekly"]):
        raise ValidationFailed("The daily cap cannot exceed the weekly cap.", field="frequency_cap_daily")
    org = session.get(Organization, org_id)
    org.settings = {**(org.settings or {}), "consent": cfg}
    session.flush()
    return cfg


# --------------------------------------------------------------------------- patient email

@dataclass
class PatientEmail:
    """A message CarePost itself sends a patient (a copy of a signed authorization, a double
    opt-in confirmation). Sent to the contact's primary address through the delivery pipeline,
    so it gets the same protection (TLS, PGP, S/MIME or portal) as any other message."""

    org_id: str
    contact_id: str
    kind: str  # authorization_copy | subscription_confirmation
    subject: str  # never PHI
    text: str
    html: str | None = None
    purpose: str = "transactional"


Mailer = Callable[[Session, PatientEmail], "str | None"]


def _default_mailer(session: Session, email: PatientEmail) -> str | None:
    from carepost.consent.mailer import deliver_through_pipeline

    return deliver_through_pipeline(session, email)


_MAILER: list[Mailer] = [_default_mailer]
DEFAULT_MAILER = _default_mailer


def register_mailer(mailer: Mailer | None) -> None:
    """Replace how CarePost sends a patient email (returns the message id, or None when it could
    not). The default queues a message through the delivery pipeline (``consent.mailer``);
    ``None`` restores it."""
    _MAILER[:] = [mailer or _default_mailer]


def send_patient_email(session: Session, email: PatientEmail) -> str | None:
    """Queue ``email`` through the mailer; None when it cannot be sent (no sending domain, no
    address): the caller then offers the link on screen instead."""
    try:
        with session.begin_nested():
            return _MAILER[0](session, email)
    except CarePostError as exc:
        log.warning("consent_email_not_sent", kind=email.kind, code=exc.code)
        return None


def public_url(path: str) -> str:
    from carepost.core.config import get_settings

    return get_settings().base_url + path


# --------------------------------------------------------------------------- topics

def _topic_key(value: str) -> str:
    import re

    key = (value or "").strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", key):
        raise ValidationFailed("A topic's short name is 1 to 64 lowercase letters, digits, - or _ "
                               "(for example flu-clinic).", field="key")
    return key


def create_topic(session: Session, org_id: str, *, key: str, name: str, description: str = "",
                 opt_in_required: bool = False, double_opt_in: bool = True) -> Topic:
    key = _topic_key(key)
    name = _plain(name, "name", 200, required=True)
    description = _plain(description or "", "description", 1000)
    if session.scalar(select(Topic.id).where(Topic.org_id == org_id, Topic.key == key)):
        raise Conflict("A topic with this short name exists.", field="key")
    # Double opt-in (a confirmation email) only means something for an opt-in topic.
    topic = Topic(id=new_id(), org_id=org_id, key=key, name=name, description=description,
                  opt_in_required=bool(opt_in_required), double_opt_in=bool(double_opt_in) and bool(opt_in_required))
    session.add(topic)
    session.flush()
    return topic


def update_topic(session: Session, org_id: str, topic_id: str, values: dict) -> Topic:
    topic = get_topic(session, org_id, topic_id, by_key=False)
    for key, value in values.items():
        if key == "name":
            topic.name = _plain(value, "name", 200, required=True)
        elif key == "description":
            topic.description = _plain(value or "", "description", 1000)
        elif key in ("opt_in_required", "double_opt_in", "archived"):
            if not isinstance(value, bool):
                raise ValidationFailed("Expected true or false.", field=key)
            setattr(topic, key, value)
        else:
            raise ValidationFailed("This field cannot be changed.", field=key)
    if not topic.opt_in_required:
        topic.double_opt_in = False  # double opt-in applies to opt-in topics only
    session.flush()
    return topic


def get_topic(session: Session, org_id: str, ref: str, field: str = "topic_id", *, by_key: bool = True) -> Topic:
    """By id, or by key too when ``by_key`` (a path names a topic by id only)."""
    if not isinstance(ref, str) or not ref or len(ref) > 64:
        raise NotFound("No such topic.", field=field)
    match = or_(Topic.id == ref, Topic.key == ref) if by_key else (Topic.id == ref)
    topic = session.scalars(select(Topic).where(Topic.org_id == org_id, match).order_by(Topic.id != ref)).first()
    if topic is None:
        raise NotFound("No such topic.", field=field)
    return topic


def list_topics(session: Session, org_id: str, *, include_archived: bool = False) -> list[Topic]:
    q = select(Topic).where(Topic.org_id == org_id)
    if not include_archived:
        q = q.where(Topic.archived.is_(False))
    return list(session.scalars(q.order_by(Topic.name)))


def topic_dict(topic: Topic) -> dict:
    return {"id": topic.id, "key": topic.key, "name": topic.name, "description": topic.description,
            "opt_in_required": topic.opt_in_required, "double_opt_in": topic.double_opt_in, "archived": topic.archived}


def _plain(value, field: str, max_len: int, *, required: bool = False) -> str:
    import re

    if not isinstance(value, str):
        raise ValidationFailed("Expected text.", field=field)
    text = value.strip()
    if required and not text:
        raise ValidationFailed("This field is required.", field=field)
    if len(text) > max_len:
        raise ValidationFailed(f"At most {max_len} characters.", field=field)
    if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text):
        raise ValidationFailed("Control characters are not allowed.", field=field)
    return text


# --------------------------------------------------------------------------- subscriptions and opt-outs

def contact_email_indexes(session: Session, org_id: str, contact_ids: Iterable[str]) -> dict[str, list[str]]:
    """Each contact's email blind indexes, primary (lowest rank) first."""
    from carepost.patients.models import ContactIdentifier

    ids = list(dict.fromkeys(contact_ids))
    out: dict[str, list[str]] = {}
    for i in range(0, len(ids), 900):
        rows = session.execute(
            select(ContactIdentifier.contact_id, ContactIdentifier.blind_index)
            .where(ContactIdentifier.org_id == org_id, ContactIdentifier.kind == "email",
                   ContactIdentifier.contact_id.in_(ids[i : i + 900]))
            .order_by(ContactIdentifier.contact_id, ContactIdentifier.rank, ContactIdentifier.id)
        )
        for cid, idx in rows:
            out.setdefault(cid, []).append(idx)
    return out


def _contact(session: Session, contact_id: str, field: str = "contact_id"):
    from carepost.patients.models import Contact

    contact = session.get(Contact, contact_id) if contact_id and is_id(contact_id) else None
    if contact is None or contact.org_id != session.info.get("org_id", contact.org_id):
        raise NotFound("No such contact.", field=field)
    return contact


def subscriptions_of(session: Session, org_id: str, contact_id: str) -> list[Subscription]:
    return list(session.scalars(select(Subscription).where(Subscription.org_id == org_id,
                                                           Subscription.contact_id == contact_id)))


def subscription_dict(row: Subscription) -> dict:
    def ts(v):
        return clock.aware(v).isoformat() if v else None

    return {"id": row.id, "contact_id": row.contact_id, "topic_id": row.topic_id,
            "all_marketing": row.topic_key == ALL_MARKETING, "status": row.status, "frequency": row.frequency,
            "channel": row.channel, "source": row.source, "confirmed_at": ts(row.confirmed_at),
            "unsubscribed_at": ts(row.unsubscribed_at), "updated_at": ts(row.updated_at)}


def _subscription_row(session: Session, org_id: str, contact_id: str, topic_id: str | None) -> Subscription:
    key = topic_id or ALL_MARKETING
    q = select(Subscription).where(Subscription.org_id == org_id, Subscription.contact_id == contact_id,
                                   Subscription.topic_key == key)
    row = session.scalars(q).first()
    if row is None:
        row = Subscription(id=new_id(), org_id=org_id, contact_id=contact_id, topic_id=topic_id, topic_key=key,
                           status="subscribed", frequency="immediate", channel="email", created_at=clock.now())
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            row = session.scalars(q).one()
    return row


def announce(session: Session, name: str, org_id: str, data: dict) -> None:
    """Publish a consent domain event (``consent.unsubscribed`` and the like; declared in
    ``core.events``): ids and codes only. Tracking turns them into webhooks (wired by
    ``carepost.assembly``); consent never imports tracking."""
    from carepost.core import events

    events.publish(name, session, org_id, {k: v for k, v in data.items()})


def _subscription_event(row: Subscription, source: str, **extra) -> dict:
    return {"subscription_id": row.id, "contact_id": row.contact_id, "topic_id": row.topic_id,
            "scope": "topic" if row.topic_id else "marketing", "status": row.status, "source": source[:32],
            "recipient_id": None, "message_id": None, **extra}


def unsubscribe_contact(session: Session, org_id: str, contact_id: str, topic_id: str | None, *, source: str,
                        extra_indexes: Iterable[str] = (), recipient_id: str | None = None,
                        message_id: str | None = None) -> Subscription:
    """Opt a contact out of one topic (``topic_id``) or of all marketing (None), at once: the
    contact's subscription says so, and every address of the contact (plus ``extra_indexes``,
    e.g. the address a message went to) gets an address-level ``unsubscribe`` suppression."""
    now = clock.now()
    row = _subscription_row(session, org_id, contact_id, topic_id)
    changed = row.status != "unsubscribed"
    if changed:
        row.status = "unsubscribed"
        row.unsubscribed_at = now
    row.source = source[:32]
    row.updated_at = now
    scope = "topic" if topic_id else "marketing"
    indexes = list(dict.fromkeys([*contact_email_indexes(session, org_id, [contact_id]).get(contact_id, []), *extra_indexes]))
    for idx in indexes:
        add_suppression_by_index(session, org_id, idx, "unsubscribe", scope, topic_id, source=source,
                                 details={"contact_id": contact_id})
    session.flush()
    if changed:
        announce(session, "consent.unsubscribed", org_id,
                 _subscription_event(row, source, recipient_id=recipient_id, message_id=message_id))
    return row


def resubscribe_contact(session: Session, org_id: str, contact_id: str, topic_id: str | None, *, source: str,
                        frequency: str | None = None, confirmed: bool = False) -> Subscription:
    """Opt back in (the patient, through the preference center or a confirmed form). A topic
    with double opt-in stays ``pending`` until the confirmation link is used, unless
    ``confirmed``. Lifts the contact's own ``unsubscribe`` suppressions for that scope; bounces,
    complaints, manual entries and holds stay."""
    topic = get_topic(session, org_id, topic_id) if topic_id else None
    now = clock.now()
    row = _subscription_row(session, org_id, contact_id, topic_id)
    if frequency is not None:
        if frequency not in FREQUENCIES:
            raise ValidationFailed(f"frequency must be one of {', '.join(FREQUENCIES)}.", field="frequency")
        row.frequency = frequency
    was_subscribed = row.status == "subscribed"
    needs_confirmation = topic is not None and topic.opt_in_required and topic.double_opt_in and not confirmed
    if row.status == "subscribed" and row.confirmed_at is not None:
        needs_confirmation = False
    if needs_confirmation:
        if row.status != "pending":
            row.status = "pending"
            _send_confirmation(session, org_id, row, topic)
    else:
        row.status = "subscribed"
        row.confirmed_at = row.confirmed_at or now
        _lift_unsubscribes(session, org_id, contact_id, topic_id)
    row.source = source[:32]
    row.updated_at = now
    session.flush()
    if row.status == "subscribed" and not was_subscribed:
        announce(session, "consent.subscribed", org_id, _subscription_event(row, source))
    return row


def _lift_unsubscribes(session: Session, org_id: str, contact_id: str, topic_id: str | None) -> None:
    indexes = contact_email_indexes(session, org_id, [contact_id]).get(contact_id, [])
    if indexes:
        session.execute(
            delete(Suppression).where(
                Suppression.org_id == org_id, Suppression.address_index.in_(indexes),
                Suppression.scope_key == _scope_key("topic" if topic_id else "marketing", topic_id),
                Suppression.reason == "unsubscribe",
            )
        )


def _send_confirmation(session: Session, org_id: str, row: Subscription, topic: Topic) -> None:
    from datetime import timedelta

    from carepost.consent import tokens

    hours = consent_settings(session, org_id)["confirmation_link_hours"]
    token = tokens.make(session, "c", org_id, "s", row.id, expires_at=clock.now() + timedelta(hours=hours))
    link = public_url(f"/t/confirm/{token}")
    message_id = send_patient_email(session, PatientEmail(
        org_id=org_id, contact_id=row.contact_id, kind="subscription_confirmation",
        subject="Please confirm your subscription",
        text=(f"Please confirm that you want to receive \"{topic.name}\" messages by opening this link:\n\n{link}\n\n"
              f"The link is valid for {hours} hours. If you did not ask for this, ignore this message."),
    ))
    row.confirmation_sent_at = clock.now() if message_id else None


def confirm_subscription(session: Session, token: str) -> Subscription:
    """Use a double opt-in link (``InvalidToken`` when forged or expired)."""
    from carepost.consent import tokens

    data = tokens.verify(session, token, "c")
    if data.ref_kind != "s":
        raise tokens.InvalidToken()
    session.info.pop("scope", None)
    session.info["org_id"] = data.org_id
    row = session.scalars(select(Subscription).where(Subscription.org_id == data.org_id,
                                                     Subscription.id == data.ref_id)).first()
    if row is None:
        raise tokens.InvalidToken()
    if row.status == "pending":
        row.status = "subscribed"
        row.confirmed_at = clock.now()
        row.updated_at = clock.now()
        _lift_unsubscribes(session, data.org_id, row.contact_id, row.topic_id)
        session.flush()
        announce(session, "consent.subscribed", data.org_id, _subscription_event(row, "confirmation"))
    return row


def confirmation_token(session: Session, org_id: str, subscription_id: str) -> str:
    """A fresh double opt-in confirmation token (for a mailer, or a resend)."""
    from datetime import timedelta

    from carepost.consent import tokens

    hours = consent_settings(session, org_id)["confirmation_link_hours"]
    return tokens.make(session, "c", org_id, "s", subscription_id, expires_at=clock.now() + timedelta(hours=hours))


# --------------------------------------------------------------------------- unsubscribe links

UnsubscribeListener = Callable[[Session, dict], None]
_UNSUBSCRIBE_LISTENERS: list[UnsubscribeListener] = []


def register_unsubscribe_listener(listener: UnsubscribeListener) -> None:
    """``listener(session, event)`` runs in the unsubscribe's transaction; ``event`` holds ids and
    codes only: org_id, recipient_id, message_id, contact_id, topic_id, scope, method."""
    if listener not in _UNSUBSCRIBE_LISTENERS:
        _UNSUBSCRIBE_LISTENERS.append(listener)


def unsubscribe_token(session: Session, org_id: str, recipient_ref: str, topic_id: str | None = None,
                      *, ref_kind: str = "r", key: bytes | None = None) -> str:
    """The opaque token of an unsubscribe link: ``ref_kind`` ``r`` = a message recipient id,
    ``c`` = a contact id. ``key``: the organization's consent key, when looked up once for a batch."""
    from carepost.consent import tokens

    return tokens.make(session, "u", org_id, ref_kind, recipient_ref, topic_id=topic_id, key=key)


def preferences_token(session: Session, org_id: str, recipient_ref: str, *, ref_kind: str = "r") -> str:
    from carepost.consent import tokens

    return tokens.make(session, "p", org_id, ref_kind, recipient_ref)


def unsubscribe_url(session: Session, org_id: str, recipient_ref: str, topic_id: str | None = None,
                    *, ref_kind: str = "r", key: bytes | None = None) -> str:
    """The visible unsubscribe link for a message body (the same URL as the header)."""
    return public_url("/t/u/" + unsubscribe_token(session, org_id, recipient_ref, topic_id, ref_kind=ref_kind,
                                                  key=key))


def preferences_url(session: Session, org_id: str, recipient_ref: str, *, ref_kind: str = "r") -> str:
    """The hosted preference center link for a message body."""
    return public_url("/t/preferences/" + preferences_token(session, org_id, recipient_ref, ref_kind=ref_kind))


def unsubscribe_headers(session: Session, org_id: str, recipient_ref: str, topic_id: str | None = None,
                        *, ref_kind: str = "r") -> dict[str, str]:
    """RFC 8058 headers for one recipient: ``List-Unsubscribe: <https://.../t/u/<token>>`` and
    ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (both must be covered by DKIM ``h=``).
    With ``delivery.mime.compose`` pass ``list_unsubscribe=[url], list_unsubscribe_post=True``."""
    url = unsubscribe_url(session, org_id, recipient_ref, topic_id, ref_kind=ref_kind)
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


FOOTER_TEXT = {
    "en": ("Unsubscribe", "Email preferences", "You receive this message from {org}."),
    "es": ("Cancelar la suscripción", "Preferencias de correo", "Recibe este mensaje de {org}."),
}


def unsubscribe_footer(session: Session, org_id: str, recipient_ref: str, topic_id: str | None = None, *,
                       ref_kind: str = "r", language: str = "en") -> dict[str, str]:
    """The visible opt-out for a message body (CAN-SPAM: clear and conspicuous): ``{"text",
    "html", "unsubscribe_url", "preferences_url"}``. The HTML is escaped; the URLs carry only
    the opaque tokens."""
    from html import escape

    from carepost.accounts.models import Organization

    org = session.get(Organization, org_id)
    unsub = unsubscribe_url(session, org_id, recipient_ref, topic_id, ref_kind=ref_kind)
    prefs = preferences_url(session, org_id, recipient_ref, ref_kind=ref_kind)
    label_unsub, label_prefs, sent_by = FOOTER_TEXT.get((language or "en")[:2], FOOTER_TEXT["en"])
    sent_by = sent_by.format(org=org.name if org else "")
    return {
        "unsubscribe_url": unsub,
        "preferences_url": prefs,
        "text": f"{sent_by}\n{label_unsub}: {unsub}\n{label_prefs}: {prefs}\n",
        "html": (f'<p>{escape(sent_by)} <a href="{escape(unsub)}">{escape(label_unsub)}</a> · '
                 f'<a href="{escape(prefs)}">{escape(label_prefs)}</a></p>'),
    }


@dataclass
class LinkSubject:
    """Whom a patient link speaks for: a contact and/or one address (by blind index)."""

    org_id: str
    contact_id: str | None
    address_index: str | None
    recipient_id: str | None = None
    message_id: str | None = None
    topic_id: str | None = None


def resolve_link(session: Session, data) -> LinkSubject:
    """Turn a verified token into the contact/address it speaks for, scoping the session to the
    token's organization. A recipient or contact deleted since: the link still opts out the
    address when it is known, else :class:`~carepost.consent.tokens.InvalidToken`."""
    from carepost.consent import tokens

    session.info.pop("scope", None)
    session.info["org_id"] = data.org_id
    if data.ref_kind == "r":
        from carepost.delivery.models import MessageRecipient

        rec = session.scalars(select(MessageRecipient).where(MessageRecipient.org_id == data.org_id,
                                                             MessageRecipient.id == data.ref_id)).first()
        if rec is None:
            raise tokens.InvalidToken()
        contact_id = rec.contact_id
        if contact_id:
            from carepost.patients.models import Contact

            if session.get(Contact, contact_id) is None:
                contact_id = None
        return LinkSubject(data.org_id, contact_id, rec.address_index, rec.id, rec.message_id, data.topic_id)
    if data.ref_kind == "c":
        from carepost.patients.models import Contact

        contact = session.get(Contact, data.ref_id)
        if contact is None or contact.org_id != data.org_id:
            raise tokens.InvalidToken()
        return LinkSubject(data.org_id, contact.id, None, None, None, data.topic_id)
    raise tokens.InvalidToken()


def apply_unsubscribe(session: Session, subject: LinkSubject, *, all_marketing: bool, method: str,
                      context: dict | None = None) -> dict:
    """Unsubscribe the link's subject from its topic, or from all marketing (``all_marketing``,
    or when the message had no topic). Idempotent: using the link again changes nothing."""
    from carepost.audit.service import record

    topic_id = None if all_marketing else subject.topic_id
    if topic_id is not None and session.get(Topic, topic_id) is None:
        topic_id = None  # the topic was deleted since: honor the wider opt-out
    if subject.contact_id:
        unsubscribe_contact(session, subject.org_id, subject.contact_id, topic_id, source=f"link:{method}"[:32],
                            extra_indexes=[subject.address_index] if subject.address_index else [],
                            recipient_id=subject.recipient_id, message_id=subject.message_id)
    elif subject.address_index:
        add_suppression_by_index(session, subject.org_id, subject.address_index, "unsubscribe",
                                 "topic" if topic_id else "marketing", topic_id, source=f"link:{method}")
        announce(session, "consent.unsubscribed", subject.org_id, {
            "subscription_id": None, "contact_id": None, "topic_id": topic_id,
            "scope": "topic" if topic_id else "marketing", "status": "unsubscribed",
            "source": f"link:{method}"[:32], "recipient_id": subject.recipient_id, "message_id": subject.message_id})
    event = {"org_id": subject.org_id, "recipient_id": subject.recipient_id, "message_id": subject.message_id,
             "contact_id": subject.contact_id, "topic_id": topic_id, "scope": "topic" if topic_id else "marketing",
             "method": method}
    ctx = context or {}
    record(session, org_id=subject.org_id, actor_type="patient", actor_id=subject.contact_id,
           action="consent.unsubscribe", target_type="contact" if subject.contact_id else "message_recipient",
           target_id=subject.contact_id or subject.recipient_id,
           details={k: v for k, v in event.items() if k not in ("org_id",) and v is not None},
           ip=ctx.get("ip"), user_agent=ctx.get("user_agent"), request_id=ctx.get("request_id"))
    for listener in list(_UNSUBSCRIBE_LISTENERS):
        listener(session, event)
    session.flush()
    return event


# --------------------------------------------------------------------------- patient deletion


def forget_contact(session: Session, org_id: str, contact_id: str, indexes: dict[str, list[str]]) -> None:
    """Opt-outs outlive the patient: the contact's unsubscribes become address-level
    suppressions of every address it had (by blind index), and suppressions of those addresses
    drop their clear-text copy. Signed authorizations stay as evidence (164.508(b)(6),
    164.530(j)), findable by ``subject_index``; their ``contact_id`` is cleared by the database."""
    from carepost.core.reindex import current_copy

    # read by the caller before this transaction held the index version: brought forward if a
    # blind-index rotation committed in between (docs/keys.md)
    emails = [current_copy(session, org_id, idx) for idx in indexes.get("email", [])]
    for row in subscriptions_of(session, org_id, contact_id):
        if row.status == "unsubscribed":
            for idx in emails:
                add_suppression_by_index(session, org_id, idx, "unsubscribe",
                                         "topic" if row.topic_id else "marketing", row.topic_id,
                                         source="contact_deleted")
    if emails:
        session.execute(
            update(Suppression)
            .where(Suppression.org_id == org_id, Suppression.address_index.in_(emails))
            .values(address_enc=None)
        )
    session.execute(update(Authorization).where(Authorization.org_id == org_id, Authorization.contact_id == contact_id)
                    .values(contact_id=None))


def forget_contacts(session: Session, org_id: str, indexes_by_contact: dict[str, dict[str, list[str]]]) -> None:
    """:func:`forget_contact` for a set of contacts at once (a retention purge's chunk): their
    unsubscribes become address-level suppressions of every address each had, the suppressions of
    those addresses drop their clear-text copy, their authorizations stay without a contact — one
    query for the subscriptions and one statement for each update, whatever the set's size."""
    from carepost.core.reindex import current_copy

    ids = sorted(indexes_by_contact)
    if not ids:
        return
    emails = {cid: [current_copy(session, org_id, idx) for idx in indexes.get("email", [])]
              for cid, indexes in indexes_by_contact.items()}
    every = sorted({idx for found in emails.values() for idx in found})
    wanted = [(idx, row.topic_id) for row in session.scalars(
        select(Subscription).where(Subscription.org_id == org_id, Subscription.contact_id.in_(ids),
                                   Subscription.status == "unsubscribed").order_by(Subscription.contact_id, Subscription.id))
        for idx in emails.get(row.contact_id, [])]
    existing = {(r.address_index, r.scope_key): r for r in session.scalars(select(Suppression).where(
        Suppression.org_id == org_id, Suppression.address_index.in_(sorted({idx for idx, _t in wanted}))))} if wanted else {}
    for idx, topic_id in wanted:
        scope = "topic" if topic_id else "marketing"
        row = existing.get((idx, _scope_key(scope, topic_id)))
        if row is not None and row.expires_at is None and \
                REASON_STRENGTH.get(row.reason, 0) >= REASON_STRENGTH["unsubscribe"]:
            continue  # suppressed for ever with this or a stronger reason already (unsubscribe_contact wrote it)
        add_suppression_by_index(session, org_id, idx, "unsubscribe", scope, topic_id, source="contact_deleted")
    if every:
        session.execute(update(Suppression).where(Suppression.org_id == org_id, Suppression.address_index.in_(every))
                        .values(address_enc=None))
    session.execute(update(Authorization).where(Authorization.org_id == org_id, Authorization.contact_id.in_(ids))
                    .values(contact_id=None))


def export_section(session: Session, org_id: str, contact_id: str) -> dict:
    """The patient's consent records for a right-of-access export (45 CFR 164.524)."""
    from carepost.consent import authorizations

    return {
        "authorizations": [authorizations.authorization_dict(session, a, include_evidence=True)
                           for a in authorizations.authorizations_of(session, org_id, contact_id)],
        "subscriptions": [subscription_dict(s) for s in subscriptions_of(session, org_id, contact_id)],
    }


def check_eligibility(session: Session, contact_ids: Iterable[str], purpose: str, topic=None, channel: str = "email",
                      at: datetime | None = None, **options) -> dict[str, str]:
    """The one set-based eligibility function (ARCHITECTURE.md section 4); see ``consent.eligibility``."""
    from carepost.consent.eligibility import check_eligibility as _check

    return _check(session, contact_ids, purpose, topic, channel, at, **options)


def ensure_default_texts(session: Session, org_id: str) -> list:
    """A new organization's default authorization texts (see ``authorizations``)."""
    from carepost.consent.authorizations import ensure_default_texts as _ensure

    return _ensure(session, org_id)
