"""Disclosures of PHI and the accounting of disclosures (45 CFR 164.528).

An individual may ask for an accounting of the disclosures of their PHI made in the six years
before the request (164.528(a)), except those for treatment, payment and health care operations,
to the individual, incident to a permitted use, under an authorization, for the facility
directory, for national security, to correctional institutions, as part of a limited data set,
and those before the compliance date (164.528(a)(1)(i)-(ix)). Each entry gives the date, the
recipient's name and address if known, a brief description of the PHI and a brief statement of
the purpose (164.528(b)(2)).

Two kinds of entries make up an accounting:

* **recorded** disclosures (:class:`~carepost.audit.models.Disclosure`): staff record those made
  outside CarePost by hand (``source="manual"``), and a capability may record those it makes;
* **derived** disclosures, computed when the accounting is produced from what CarePost logged
  anyway, by *sources* that higher capabilities register (:func:`register_source`, wired by the
  composition root) — audit sits below them and cannot read their tables. Today: deliveries of
  webhooks to endpoints configured with ``include_phi`` (``compliance.disclosure_sources``).

Audit events still hold references only; the free text of a disclosure (recipient, description,
purpose) is encrypted in its own row.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.audit.models import AuditEvent, Disclosure
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import ValidationFailed
from carepost.core.ids import new_id

ACCOUNTING_YEARS = 6  # 164.528(a)(1) and (a)(3): up to six years before the request
SOURCES = ("manual", "webhook", "export", "portal")
LIMITS = {"recipient_name": 200, "recipient_address": 500, "description": 2000, "purpose": 1000}
TABLE = Disclosure.__tablename__

# name -> fn(session, org_id, contact_id, since, until) -> list of entry dicts (see _entry)
DisclosureSource = Callable[[Session, str, str, datetime, datetime], list[dict]]
_SOURCES: dict[str, DisclosureSource] = {}


def register_source(name: str, source: DisclosureSource) -> None:
    """A higher capability contributes the disclosures it can derive for one patient (composition
    root only; registering twice under one name replaces)."""
    _SOURCES[name] = source


def registered_sources() -> list[str]:
    return sorted(_SOURCES)


def years_before(day: date, years: int) -> date:
    if day.year - years < date.min.year:
        return date.min
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


def accounting_start(until: date) -> date:
    return years_before(until, ACCOUNTING_YEARS)


def _text(value: str | None, field: str, *, required: bool) -> str | None:
    value = (value or "").strip()
    if not value:
        if required:
            raise ValidationFailed("Required.", field=field)
        return None
    if len(value) > LIMITS[field]:
        raise ValidationFailed(f"At most {LIMITS[field]} characters.", field=field)
    return value


def _as_datetime(value: date | datetime, field: str) -> datetime:
    if isinstance(value, datetime):
        return clock.aware(value).astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, 12, tzinfo=UTC)
    raise ValidationFailed("Use a date (YYYY-MM-DD) or an ISO 8601 date-time.", field=field)


def record_disclosure(session: Session, org_id: str, *, contact_id: str, disclosed_at: date | datetime,
                      recipient_name: str, description: str, purpose: str, recipient_address: str | None = None,
                      source: str = "manual", source_ref: str | None = None, recorded_by: str | None = None,
                      actor_type: str = "user", context: dict | None = None) -> Disclosure:
    """Record one disclosure (the caller checked that ``contact_id`` is a patient of ``org_id``
    and commits). Refused with the field named: an empty recipient, description or purpose, a
    date in the future or more than six years back (outside any accounting)."""
    if source not in SOURCES:
        raise ValidationFailed(f"Choose one of {', '.join(SOURCES)}.", field="source")
    when = _as_datetime(disclosed_at, "disclosed_at")
    now = clock.now()
    if when > now + timedelta(minutes=5):
        raise ValidationFailed("A disclosure cannot be in the future.", field="disclosed_at")
    earliest = accounting_start(now.date())
    if when.date() < earliest:
        raise ValidationFailed(f"Must be on or after {earliest.isoformat()}: the accounting covers six years.",
                               field="disclosed_at")
    name = _text(recipient_name, "recipient_name", required=True)
    address = _text(recipient_address, "recipient_address", required=False)
    what = _text(description, "description", required=True)
    why = _text(purpose, "purpose", required=True)
    row = Disclosure(id=new_id(), org_id=org_id, contact_id=contact_id, disclosed_at=when, source=source,
                     source_ref=source_ref, recorded_by=recorded_by, recorded_at=now)
    encrypt = get_keyring().encryptor(session, org_id)
    row.recipient_name_enc = encrypt(TABLE, "recipient_name", row.id, name)
    row.recipient_address_enc = encrypt(TABLE, "recipient_address", row.id, address) if address else None
    row.description_enc = encrypt(TABLE, "description", row.id, what)
    row.purpose_enc = encrypt(TABLE, "purpose", row.id, why)
    session.add(row)
    from carepost.audit.service import record

    record(session, org_id=org_id, actor_type=actor_type, actor_id=recorded_by, action="disclosure.recorded",
           target_type="contact", target_id=contact_id,
           details={"disclosure_id": row.id, "source": source}, **(context or {}))
    return row


def _entry(*, disclosed_at: datetime, recipient_name: str | None, recipient_address: str | None,
           description: str | None, purpose: str | None, source: str, source_ref: str | None,
           disclosure_id: str | None = None) -> dict:
    return {"disclosed_at": clock.aware(disclosed_at).astimezone(UTC), "recipient_name": recipient_name,
            "recipient_address": recipient_address, "description": description, "purpose": purpose,
            "source": source, "source_ref": source_ref, "disclosure_id": disclosure_id}


def recorded_disclosures(session: Session, org_id: str, contact_id: str, since: datetime, until: datetime) -> list[dict]:
    """The recorded disclosures of one patient in ``[since, until)``, decrypted."""
    rows = session.scalars(select(Disclosure).where(
        Disclosure.org_id == org_id, Disclosure.contact_id == contact_id,
        Disclosure.disclosed_at >= since, Disclosure.disclosed_at < until,
    ).order_by(Disclosure.disclosed_at, Disclosure.id))
    decrypt = get_keyring().text_decryptor(session, org_id)
    out = []
    for r in rows:
        out.append(_entry(
            disclosed_at=r.disclosed_at, source=r.source, source_ref=r.source_ref, disclosure_id=r.id,
            recipient_name=decrypt(TABLE, "recipient_name", r.id, r.recipient_name_enc),
            recipient_address=decrypt(TABLE, "recipient_address", r.id, r.recipient_address_enc),
            description=decrypt(TABLE, "description", r.id, r.description_enc),
            purpose=decrypt(TABLE, "purpose", r.id, r.purpose_enc),
        ))
    return out


def phi_webhook_events(session: Session, org_id: str, since: datetime, until: datetime) -> list[AuditEvent]:
    """The organization's ``webhook.phi_disclosed`` audit events in ``[since, until)``: tracking
    appends one per successful delivery of PHI to an endpoint set to receive it."""
    return list(session.scalars(select(AuditEvent).where(
        AuditEvent.chain == org_id, AuditEvent.action == "webhook.phi_disclosed",
        AuditEvent.occurred_at >= since, AuditEvent.occurred_at < until,
    ).order_by(AuditEvent.seq)))


def accounting(session: Session, org_id: str, contact_id: str, *, period_start: date | None = None,
               period_end: date | None = None) -> dict:
    """The accounting of one patient's disclosures: recorded ones and those every registered
    source derives, oldest first, for ``period_start`` .. ``period_end`` (inclusive dates;
    default: the six years up to today)."""
    today = clock.now().date()
    end = period_end or today
    if end > today:
        raise ValidationFailed("Cannot be in the future.", field="period_end")
    start = period_start or accounting_start(end)
    if start > end:
        raise ValidationFailed("Must be on or before the end of the period.", field="period_start")
    if start < accounting_start(end):
        raise ValidationFailed("An accounting covers at most six years.", field="period_start")
    since = datetime(start.year, start.month, start.day, tzinfo=UTC)
    until = datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1)
    entries = recorded_disclosures(session, org_id, contact_id, since, until)
    for name in sorted(_SOURCES):
        for item in _SOURCES[name](session, org_id, contact_id, since, until):
            entries.append(_entry(**{**item, "source": item.get("source") or name}))
    entries.sort(key=lambda e: (e["disclosed_at"], e["source"], e["source_ref"] or ""))
    return {"contact_id": contact_id, "period_start": start, "period_end": end, "entries": entries,
            "sources": ["manual", *sorted(_SOURCES)], "produced_at": clock.now()}


def accounting_text(acc: dict, *, organization: str, patient: str) -> str:
    """The accounting as a plain-text document for the individual (164.528(b))."""
    lines = [
        "ACCOUNTING OF DISCLOSURES OF PROTECTED HEALTH INFORMATION",
        "(45 CFR 164.528)",
        "",
        f"Organization: {organization}",
        f"Individual:   {patient}",
        f"Period:       {acc['period_start'].isoformat()} to {acc['period_end'].isoformat()}",
        f"Produced:     {acc['produced_at'].astimezone(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
    ]
    if not acc["entries"]:
        lines.append("No disclosures subject to accounting were made in this period.")
    for n, e in enumerate(acc["entries"], 1):
        lines += [
            f"{n}. Date:        {e['disclosed_at'].strftime('%Y-%m-%d')}",
            f"   Recipient:   {e['recipient_name'] or 'not recorded'}",
            f"   Address:     {e['recipient_address'] or 'not known'}",
            f"   Description: {e['description'] or ''}",
            f"   Purpose:     {e['purpose'] or ''}",
            "",
        ]
    lines += [
        "",
        "This accounting does not list disclosures for treatment, payment or health care operations,",
        "disclosures to you, disclosures you authorized in writing, or the other disclosures that",
        "45 CFR 164.528(a)(1) excludes. You may ask for one accounting in any 12 months without charge.",
    ]
    return "\n".join(lines) + "\n"
