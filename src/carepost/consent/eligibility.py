"""Who may receive a message: one set-based answer for a whole set of recipients.

:func:`check_eligibility` answers, for each contact id, ``"eligible"`` or one reason code
(:data:`REASONS`). It runs a fixed number of SQL queries per chunk of ids (contacts with their
primary address, suppressions of those addresses, contact-level opt-outs, authorizations,
recent marketing sends) — never a query per contact — so a campaign can plan a million
recipients with it. :func:`check_addresses` does the same for addresses that match no contact,
and :func:`delivery_check` for message recipient rows when the pipeline claims them (a
revocation or unsubscribe between acceptance and delivery wins).

This module reads the tables of patients (contacts, their email identifiers) and delivery
(recent messages, for frequency caps) directly: a set-based answer needs joins, which calling
their services one contact at a time cannot give. It only reads them.

Order of the checks, first match wins: a deceased contact (``deceased``, every purpose,
transactional included: nobody is mailed after death); the address (no_address, invalid_address); address-level
suppressions (bounce, complaint, manual and legal-hold entries, unsubscribes); contact-level
opt-outs (unsubscribed_topic, unsubscribed_all, or not subscribed to an opt-in topic); the
authorization the purpose needs (164.508(a)(3)); the frequency cap. Quiet hours never exclude:
:func:`quiet_hours_deferral` gives the next allowed time instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import String, and_, bindparam, func, literal_column, select
from sqlalchemy.orm import Session

from carepost.core import purposes
from carepost.consent.models import ALL_MARKETING, Authorization, Subscription, Suppression, Topic
from carepost.consent.service import consent_settings, get_topic, suppression_reason
from carepost.core import clock
from carepost.core.errors import ValidationFailed

ELIGIBLE = "eligible"
REASONS = (
    "deceased", "no_authorization", "authorization_expired", "authorization_revoked", "unsubscribed_topic", "unsubscribed_all",
    "suppressed_bounce", "suppressed_complaint", "suppressed_manual", "frequency_cap", "no_address", "invalid_address",
    "no_postal_address", "no_opt_out",
)
REASON_TEXT = {
    "eligible": "Eligible",
    "deceased": "The patient is deceased",
    "no_authorization": "No signed authorization for this purpose",
    "authorization_expired": "The authorization expired",
    "authorization_revoked": "The authorization was revoked",
    "unsubscribed_topic": "Unsubscribed from this topic (or not subscribed to an opt-in topic)",
    "unsubscribed_all": "Unsubscribed from all marketing",
    "suppressed_bounce": "The address bounced",
    "suppressed_complaint": "The recipient reported a message as spam",
    "suppressed_manual": "The address is suppressed (manual entry or legal hold)",
    "frequency_cap": "The organization's frequency cap was reached",
    "no_address": "No email address",
    "invalid_address": "The email address is invalid or does not exist",
    "no_postal_address": "The organization's postal address (consent settings) is needed for commercial messages",
    "no_opt_out": "No working unsubscribe link could be formed for this commercial message",
}
CHANNELS = ("email",)
CHUNK = 1000
# Recipient statuses that count as "sent" for frequency caps (an exclusion or failure does not).
CAP_COUNTED_STATUSES = ("queued", "deferred", "sent", "delivered", "portal_viewed")
# Hard bounces whose enhanced status says the address does not exist (RFC 3463).
NONEXISTENT_STATUSES = ("5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10")


def _by_ids(session: Session, entity, columns: tuple, org_id: str, ids: Sequence[str]) -> list[tuple]:
    """``columns`` (the first one ``entity.id``) of ``entity``'s rows of ``org_id`` whose id is in
    ``ids``, looked up by primary key whatever SQLite's statistics. Written ``org_id = ? AND id IN
    (...)``, SQLite without statistics (a database never analyzed: ``delivery.refresh_statistics``
    runs in the worker) or with stale ones estimates the org_id index at 10 rows, fewer than the
    list, and reads every row of the organization instead (issue 17: 16 ms of each group of
    accepted API requests at 3,000 stored messages, growing with them). On SQLite the ids are one
    JSON parameter (one cached statement whatever their number) LEFT JOINed to the table: a LEFT
    JOIN keeps the ids as the outer loop, one primary-key probe each (its condition, the
    organization's included, stays in ON; an id without a row gives NULLs, dropped here).
    PostgreSQL plans ``IN`` with the statistics autovacuum keeps."""
    if session.get_bind().dialect.name != "sqlite":
        return list(session.execute(select(*columns).where(entity.org_id == org_id, entity.id.in_(list(ids)))).tuples())
    wanted = func.json_each(bindparam(None, json.dumps(list(ids)))).table_valued("value").alias("wanted")
    # The organization's condition is written "+table.org_id = ?" (SQLite's unary plus keeps a term
    # from choosing an index), in a Core statement: the ORM's tenant scope would add a plain
    # "table.org_id = ?" to the ON clause. With statistics taken before this organization had rows
    # (an ANALYZE's samples know nothing of its org_id), SQLite otherwise probed each id through an
    # org_id index: every row of the organization per id, 20 s for 500 ids at 20,000 messages,
    # under the write lock, while the other delivery threads failed "database is locked"
    # (bench/campaign_send.py's transactional phase; tests/test_api_messages_group.py).
    if session.info.get("org_id") not in (None, org_id):
        raise ValidationFailed("Another organization's rows.", field="org_id")
    table = entity.__table__
    org = literal_column(f"+{table.name}.org_id", type_=String) == bindparam(None, org_id)
    query = select(*(c.property.columns[0] for c in columns)).select_from(wanted).outerjoin(
        table, and_(table.c.id == wanted.c.value, org))
    return [row for row in session.execute(query).tuples() if row[0] is not None]


@dataclass
class _Subject:
    key: str
    contact_id: str | None
    address_index: str | None
    address_invalid: bool = False
    deceased: bool = False


def _suppression_code(row: Suppression) -> str:
    if row.reason in ("bounce_hard", "bounce_soft"):
        details = row.details or {}
        if details.get("invalid_address") or str(details.get("status", "")) in NONEXISTENT_STATUSES:
            return "invalid_address"
        return "suppressed_bounce"
    if row.reason == "complaint":
        return "suppressed_complaint"
    if row.reason == "unsubscribe":
        return "unsubscribed_topic" if row.scope == "topic" else "unsubscribed_all"
    return "suppressed_manual"  # manual, legal_hold


def _org_of(session: Session, org_id: str | None) -> str:
    org_id = org_id or session.info.get("org_id")
    if not org_id:
        raise ValidationFailed("An organization is needed.", field="org_id")
    return org_id


def _resolve(session: Session, org_id: str, purpose: str, topic, channel: str, remuneration: str,
             prescription_lapsed_days: int | None) -> tuple[purposes.Requirements, Topic | None]:
    req = purposes.requirements(purpose, remuneration=remuneration, prescription_lapsed_days=prescription_lapsed_days)
    if channel not in CHANNELS:
        raise ValidationFailed(f"channel must be one of {', '.join(CHANNELS)}.", field="channel")
    if topic is None or isinstance(topic, Topic):
        return req, topic
    return req, get_topic(session, org_id, topic, "topic")


def check_eligibility(
    session: Session,
    contact_ids: Iterable[str],
    purpose: str,
    topic: str | Topic | None = None,
    channel: str = "email",
    at: datetime | None = None,
    *,
    org_id: str | None = None,
    remuneration: str = "none",
    prescription_lapsed_days: int | None = None,
    exclude_message_ids: Sequence[str] = (),
    chunk_size: int = CHUNK,
) -> dict[str, str]:
    """``{contact_id: "eligible" | reason code}`` for every id given (an id that names no contact
    of the organization has no address: ``no_address``). ``topic`` is a topic id or key."""
    from carepost.patients.models import Contact, ContactIdentifier

    org_id = _org_of(session, org_id)
    req, topic_row = _resolve(session, org_id, purpose, topic, channel, remuneration, prescription_lapsed_days)
    at = clock.aware(at) if at else clock.now()
    ids = list(dict.fromkeys(contact_ids))
    out: dict[str, str] = {}
    for i in range(0, len(ids), chunk_size):
        chunk = ids[i : i + chunk_size]
        # One query: every contact of the chunk with its email identifiers (primary = lowest rank).
        primary: dict[str, tuple[int, str] | None] = {}
        deceased: set[str] = set()
        rows = session.execute(
            select(Contact.id, ContactIdentifier.rank, ContactIdentifier.id, ContactIdentifier.blind_index, Contact.deceased)
            .outerjoin(ContactIdentifier, (ContactIdentifier.contact_id == Contact.id)
                       & (ContactIdentifier.kind == "email") & (ContactIdentifier.org_id == org_id))
            .where(Contact.org_id == org_id, Contact.id.in_(chunk))
        )
        for cid, rank, ident_id, idx, is_deceased in rows:
            if is_deceased:
                deceased.add(cid)
            cur = primary.get(cid)
            if idx is None:
                primary.setdefault(cid, None)
            elif cur is None or (rank, ident_id) < cur[0]:
                primary[cid] = ((rank, ident_id), idx)
        subjects = [_Subject(cid, cid if cid in primary else None, primary[cid][1] if primary.get(cid) else None,
                             deceased=cid in deceased) for cid in chunk]
        out.update(_evaluate(session, org_id, subjects, req, topic_row, at, exclude_message_ids))
    return out


def check_addresses(
    session: Session,
    org_id: str,
    addresses: Iterable[str],
    purpose: str,
    topic: str | Topic | None = None,
    at: datetime | None = None,
    *,
    channel: str = "email",
    remuneration: str = "none",
    prescription_lapsed_days: int | None = None,
) -> dict[str, str]:
    """``{address: "eligible" | reason}`` for recipients that match no contact: the address must
    be valid, suppressions apply, and a purpose that needs an authorization excludes it (nobody
    signed one)."""
    from carepost.consent.service import address_index
    from carepost.delivery.mime import parse_address

    req, topic_row = _resolve(session, org_id, purpose, topic, channel, remuneration, prescription_lapsed_days)
    at = clock.aware(at) if at else clock.now()
    subjects = []
    for address in dict.fromkeys(addresses):
        try:
            parsed = parse_address(address, allow_display_name=False)
        except ValidationFailed:
            subjects.append(_Subject(address, None, None, address_invalid=True))
            continue
        subjects.append(_Subject(address, None, address_index(session, org_id, parsed.addr_spec)))
    out: dict[str, str] = {}
    for i in range(0, len(subjects), CHUNK):
        out.update(_evaluate(session, org_id, subjects[i : i + CHUNK], req, topic_row, at, ()))
    return out


def delivery_check(
    session: Session,
    org_id: str,
    recipient_rows: Iterable,
    purpose: str | None,
    topic: str | Topic | None = None,
    at: datetime | None = None,
    *,
    remuneration: str = "none",
) -> dict[str, str]:
    """``{recipient id: "eligible" | reason}`` for message recipient rows (objects or dicts with
    ``id``, ``contact_id``, ``address_index`` and optionally ``message_id``), at acceptance and
    again when the pipeline claims them. The row's own address is checked (not the contact's
    primary one); contact-level opt-outs, authorizations and caps by its contact. A message's
    own recipients never count towards its frequency cap."""
    from carepost.patients.models import Contact

    def get(row, name):
        return row.get(name) if isinstance(row, dict) else getattr(row, name, None)

    rows = list(recipient_rows)
    req, topic_row = _resolve(session, org_id, purpose or "transactional", topic, "email", remuneration, None)
    at = clock.aware(at) if at else clock.now()
    contact_ids = {get(r, "contact_id") for r in rows if get(r, "contact_id")}
    existing: set[str] = set()
    deceased: set[str] = set()
    ids = list(contact_ids)
    for i in range(0, len(ids), CHUNK):
        for cid, is_deceased in _by_ids(session, Contact, (Contact.id, Contact.deceased), org_id, ids[i : i + CHUNK]):
            existing.add(cid)
            if is_deceased:
                deceased.add(cid)
    message_ids = tuple({get(r, "message_id") for r in rows if get(r, "message_id")})
    subjects = [_Subject(get(r, "id"), get(r, "contact_id") if get(r, "contact_id") in existing else None,
                         get(r, "address_index"), deceased=get(r, "contact_id") in deceased) for r in rows]
    out: dict[str, str] = {}
    for i in range(0, len(subjects), CHUNK):
        out.update(_evaluate(session, org_id, subjects[i : i + CHUNK], req, topic_row, at, message_ids))
    return out


def _evaluate(session: Session, org_id: str, subjects: list[_Subject], req: purposes.Requirements,
              topic: Topic | None, at: datetime, exclude_message_ids: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    pending: list[_Subject] = []
    for s in subjects:
        if s.deceased:
            out[s.key] = "deceased"  # every purpose: treatment and transactional mail stop too
        elif s.address_invalid:
            out[s.key] = "invalid_address"
        elif not s.address_index:
            out[s.key] = "no_address"
        else:
            pending.append(s)

    # Address-level suppressions (one query).
    found = suppression_reason(session, org_id, [s.address_index for s in pending], req.suppression_scope,
                               topic.id if topic else None, at)
    rest = []
    for s in pending:
        row = found.get(s.address_index)
        if row is not None:
            out[s.key] = _suppression_code(row)
        else:
            rest.append(s)

    contact_ids = list({s.contact_id for s in rest if s.contact_id})
    # Contact-level opt-outs (one query).
    if contact_ids and (topic is not None or req.opt_out_required):
        keys = ([topic.id] if topic is not None else []) + ([ALL_MARKETING] if req.opt_out_required else [])
        subs: dict[tuple[str, str], str] = {
            (cid, key): status
            for cid, key, status in session.execute(
                select(Subscription.contact_id, Subscription.topic_key, Subscription.status).where(
                    Subscription.org_id == org_id, Subscription.contact_id.in_(contact_ids), Subscription.topic_key.in_(keys)))
        }
        kept = []
        for s in rest:
            if s.contact_id is None:
                if topic is not None and topic.opt_in_required:
                    out[s.key] = "unsubscribed_topic"  # an address nobody subscribed
                else:
                    kept.append(s)
                continue
            if subs.get((s.contact_id, ALL_MARKETING)) == "unsubscribed":
                out[s.key] = "unsubscribed_all"
            elif topic is not None and (
                subs.get((s.contact_id, topic.id)) == "unsubscribed"
                or (topic.opt_in_required and subs.get((s.contact_id, topic.id)) != "subscribed")
            ):
                out[s.key] = "unsubscribed_topic"
            else:
                kept.append(s)
        rest = kept

    # The authorization the purpose needs (164.508(a)(3)): one query.
    if req.authorization_required:
        states = _authorization_states(session, org_id, [s.contact_id for s in rest if s.contact_id],
                                       req.effective_purpose, topic.id if topic else None, at)
        kept = []
        for s in rest:
            state = states.get(s.contact_id) if s.contact_id else None
            if state is None:
                out[s.key] = "no_authorization"
            elif state != "valid":
                out[s.key] = f"authorization_{state}"
            else:
                kept.append(s)
        rest = kept

    # Frequency caps across all marketing (one query).
    if req.effective_purpose in purposes.MARKETING_PURPOSES:
        capped = _over_cap(session, org_id, [s.contact_id for s in rest if s.contact_id], at, exclude_message_ids)
        for s in rest:
            if s.contact_id in capped:
                out[s.key] = "frequency_cap"
    for s in rest:
        out.setdefault(s.key, ELIGIBLE)
    return out


def verdict_select(session: Session, org_id: str, contacts, purpose: str, topic: str | Topic | None = None,
                   at: datetime | None = None, *, remuneration: str = "none",
                   prescription_lapsed_days: int | None = None):
    """The eligibility check as **one SELECT** over a set of contacts given as SQL, for callers that
    handle a large audience (campaign planning): ``contacts`` is a subquery or CTE of rows of the
    organization's ``contacts`` table with the columns ``id``, ``deceased`` and ``time_zone``.
    Rows: ``(contact_id, time_zone, verdict)``, ordered by contact id; ``verdict`` is
    ``"eligible"`` or a reason code exactly as :func:`check_eligibility` gives it, or **NULL where
    only check_eligibility can say**: the contact's primary address has an active suppression
    (its code depends on the strongest row and its details), or the contact has authorizations
    for the purpose but none valid (revoked or expired: the most recently signed decides).
    Callers send those few ids to :func:`check_eligibility` (tests compare both on every reason).

    The same rules in the same order, first match wins: deceased; no address (no email
    identifier; the primary one is the lowest rank, then id); suppressions (undecided); the
    contact-level opt-outs; the authorization; the frequency cap. Each rule is a correlated
    look-up by index that the database evaluates only for the rows reaching it (CASE), written
    as ``(SELECT 1 ... LIMIT 1)`` rather than ``EXISTS`` so PostgreSQL probes the index per row
    instead of hashing the whole table for each chunk; no id list crosses the wire."""
    from sqlalchemy import and_, case, literal, null, or_

    from carepost.delivery.models import Message, MessageRecipient
    from carepost.delivery.suppressions import _active, _scope_key
    from carepost.patients.models import ContactIdentifier

    req, topic_row = _resolve(session, org_id, purpose, topic, "email", remuneration, prescription_lapsed_days)
    at = clock.aware(at) if at else clock.now()
    cid = contacts.c.id

    def found(entity, *where):  # a row exists: one index probe for this contact
        return (select(literal(1)).select_from(entity).where(*where).correlate(contacts).limit(1)
                .scalar_subquery().is_not(None))

    ci = ContactIdentifier
    address = (select(ci.blind_index).where(ci.org_id == org_id, ci.contact_id == cid, ci.kind == "email",
                                            ci.blind_index.is_not(None)).correlate(contacts)
               .order_by(ci.rank, ci.id).limit(1).scalar_subquery())  # the primary email identifier
    whens = [(contacts.c.deceased.is_(True), literal("deceased")), (address.is_(None), literal("no_address"))]

    # Address-level suppressions: the same rows suppression_reason reads; their code is undecided here.
    if req.suppression_scope not in ("all", "marketing"):
        raise ValidationFailed("scope must be 'all' or 'marketing'.", field="scope")
    keys = ["all:"] + (["marketing:"] if req.suppression_scope == "marketing" else [])
    if topic_row is not None:
        keys.append(_scope_key("topic", topic_row.id))
    whens.append((found(Suppression, Suppression.org_id == org_id, Suppression.address_index == address,
                        Suppression.scope_key.in_(keys), _active(at)), null()))

    def subscribed(key: str, status: str):
        return found(Subscription, Subscription.org_id == org_id, Subscription.contact_id == cid,
                     Subscription.topic_key == key, Subscription.status == status)

    # Contact-level opt-outs.
    if req.opt_out_required:
        whens.append((subscribed(ALL_MARKETING, "unsubscribed"), literal("unsubscribed_all")))
    if topic_row is not None:
        opted_out = subscribed(topic_row.id, "unsubscribed")
        if topic_row.opt_in_required:
            opted_out = or_(opted_out, ~subscribed(topic_row.id, "subscribed"))
        whens.append((opted_out, literal("unsubscribed_topic")))

    # The authorization the purpose needs (164.508(a)(3)).
    if req.authorization_required:
        a = Authorization
        signed = [a.org_id == org_id, a.contact_id == cid, a.purpose == req.effective_purpose, a.signed_at <= at,
                  a.topic_id.is_(None) | (a.topic_id == topic_row.id) if topic_row is not None else a.topic_id.is_(None)]
        valid = and_(or_(a.status.is_(None), a.status != "revoked", a.revoked_at.is_(None), a.revoked_at > at),
                     or_(a.expires_at.is_(None), a.expires_at > at))
        whens.append((~found(a, *signed), literal("no_authorization")))
        whens.append((~found(a, *signed, valid), null()))  # revoked or expired: the latest decides

    # Frequency caps across all marketing.
    cfg = consent_settings(session, org_id)
    daily, weekly = cfg["frequency_cap_daily"], cfg["frequency_cap_weekly"]
    if req.effective_purpose in purposes.MARKETING_PURPOSES and (daily or weekly):
        day_ago, week_ago = at - timedelta(days=1), at - timedelta(days=7)
        since = week_ago if weekly else day_ago
        over = []
        if weekly:
            over.append(func.count(func.distinct(Message.id)) >= weekly)
        if daily:
            over.append(func.coalesce(func.sum(_case_after(Message.created_at, day_ago)), 0) >= daily)
        from sqlalchemy import case as case_

        capped = (select(case_((or_(*over), 1), else_=0))
                  .select_from(MessageRecipient).join(Message, Message.id == MessageRecipient.message_id)
                  .where(MessageRecipient.org_id == org_id, Message.org_id == org_id, MessageRecipient.contact_id == cid,
                         MessageRecipient.status.in_(CAP_COUNTED_STATUSES),
                         Message.purpose.in_(purposes.MARKETING_PURPOSES),
                         Message.created_at > since, Message.created_at <= at).correlate(contacts).scalar_subquery())
        whens.append((capped == 1, literal("frequency_cap")))

    verdict = case(*whens, else_=literal(ELIGIBLE))
    return select(cid, contacts.c.time_zone, verdict.label("verdict")).order_by(cid)


def _authorization_states(session: Session, org_id: str, contact_ids: list[str], purpose: str,
                          topic_id: str | None, at: datetime) -> dict[str, str]:
    """For each contact: ``valid`` when any authorization is valid at ``at``; else the state
    (``revoked``/``expired``) of the most recently signed one. Topic-bound authorizations count
    only for their topic; one without a topic covers every topic of the purpose."""
    if not contact_ids:
        return {}
    q = select(Authorization.contact_id, Authorization.status, Authorization.revoked_at, Authorization.expires_at,
               Authorization.signed_at).where(
        Authorization.org_id == org_id, Authorization.contact_id.in_(contact_ids), Authorization.purpose == purpose,
        Authorization.signed_at <= at)
    q = q.where(Authorization.topic_id.is_(None) | (Authorization.topic_id == topic_id)) if topic_id else \
        q.where(Authorization.topic_id.is_(None))
    best: dict[str, tuple[datetime, str]] = {}
    for cid, status, revoked_at, expires_at, signed_at in session.execute(q):
        if status == "revoked" and revoked_at is not None and clock.aware(revoked_at) <= at:
            state = "revoked"
        elif expires_at is not None and clock.aware(expires_at) <= at:
            state = "expired"
        else:
            state = "valid"
        cur = best.get(cid)
        if cur is not None and cur[1] == "valid":
            continue
        signed = clock.aware(signed_at)
        if state == "valid" or cur is None or signed > cur[0]:
            best[cid] = (signed, state)
    return {cid: state for cid, (_, state) in best.items()}


def _over_cap(session: Session, org_id: str, contact_ids: list[str], at: datetime,
              exclude_message_ids: Sequence[str]) -> set[str]:
    cfg = consent_settings(session, org_id)
    daily, weekly = cfg["frequency_cap_daily"], cfg["frequency_cap_weekly"]
    if not contact_ids or not (daily or weekly):
        return set()
    from carepost.delivery.models import Message, MessageRecipient

    day_ago, week_ago = at - timedelta(days=1), at - timedelta(days=7)
    since = week_ago if weekly else day_ago
    in_day = func.sum(_case_after(Message.created_at, day_ago))
    q = (
        select(MessageRecipient.contact_id, func.count(func.distinct(Message.id)), in_day)
        .join(Message, Message.id == MessageRecipient.message_id)
        .where(MessageRecipient.org_id == org_id, Message.org_id == org_id,
               MessageRecipient.contact_id.in_(contact_ids),
               MessageRecipient.status.in_(CAP_COUNTED_STATUSES),
               Message.purpose.in_(purposes.MARKETING_PURPOSES),
               Message.created_at > since, Message.created_at <= at)
        .group_by(MessageRecipient.contact_id)
    )
    if exclude_message_ids:
        q = q.where(Message.id.not_in(list(exclude_message_ids)))
    capped = set()
    for cid, in_window, last_day in session.execute(q):
        if weekly and in_window >= weekly:
            capped.add(cid)
        if daily and (last_day or 0) >= daily:
            capped.add(cid)
    return capped


def _case_after(column, when: datetime):
    from sqlalchemy import case

    return case((column > when, 1), else_=0)


# --------------------------------------------------------------------------- quiet hours


def _parse_hhmm(value: str) -> time:
    h, m = value.split(":")
    return time(int(h), int(m))


def next_allowed_time(at: datetime, tz_name: str | None, start: str | None, end: str | None,
                      default_tz: str = "UTC") -> datetime | None:
    """When ``at`` falls in the quiet hours [start, end) of the recipient's time zone, the end of
    them (UTC); otherwise None (send now). A window may span midnight (21:00-08:00)."""
    if not start or not end:
        return None
    try:
        tz = ZoneInfo(tz_name or default_tz)
    except (ZoneInfoNotFoundError, ValueError):
        tz = ZoneInfo(default_tz)
    local = clock.aware(at).astimezone(tz)
    s, e = _parse_hhmm(start), _parse_hhmm(end)
    now_t = local.time()
    if s < e:
        inside = s <= now_t < e
        end_day = local.date()
    else:
        inside = now_t >= s or now_t < e
        end_day = local.date() + timedelta(days=1) if now_t >= s else local.date()
    if not inside:
        return None
    resume = datetime.combine(end_day, e, tzinfo=tz)
    return resume.astimezone(ZoneInfo("UTC"))


def quiet_hours_deferral(session: Session, contact_ids: Iterable[str], at: datetime | None = None, *,
                         org_id: str | None = None) -> dict[str, datetime]:
    """``{contact_id: next allowed time}`` for the contacts now inside the organization's quiet
    hours in their own time zone (the contact's ``time_zone``, else the organization default).
    Contacts not listed may be sent to now. Quiet hours defer; they never exclude."""
    from carepost.patients.models import Contact

    org_id = _org_of(session, org_id)
    cfg = consent_settings(session, org_id)
    if not cfg["quiet_hours_start"]:
        return {}
    at = clock.aware(at) if at else clock.now()
    ids = list(dict.fromkeys(contact_ids))
    out: dict[str, datetime] = {}
    by_zone: dict[str | None, datetime | None] = {}
    for i in range(0, len(ids), CHUNK):
        for cid, tz in _by_ids(session, Contact, (Contact.id, Contact.time_zone), org_id, ids[i : i + CHUNK]):
            if tz not in by_zone:
                by_zone[tz] = next_allowed_time(at, tz, cfg["quiet_hours_start"], cfg["quiet_hours_end"],
                                                cfg["default_time_zone"])
            if by_zone[tz] is not None:
                out[cid] = by_zone[tz]
    return out


# --------------------------------------------------------------------------- delivery pipeline hooks

TOPIC_TAG = "topic:"


def message_topics(session: Session, org_id: str, message_ids: Iterable[str]) -> dict[str, str | None]:
    """A message's topic: its ``topic_id`` field; for messages stored before the field, the tag
    ``topic:<key or id>``."""
    from carepost.delivery.models import Message

    ids = list(dict.fromkeys(message_ids))
    topics: dict[str, str] | None = None
    out: dict[str, str | None] = {}
    for i in range(0, len(ids), CHUNK):
        for mid, topic_id, tags in _by_ids(session, Message, (Message.id, Message.topic_id, Message.tags), org_id,
                                           ids[i : i + CHUNK]):
            if topic_id:
                out[mid] = topic_id
                continue
            ref = next((t[len(TOPIC_TAG):] for t in (tags or []) if isinstance(t, str) and t.startswith(TOPIC_TAG)), None)
            if ref and topics is None:
                topics = {t.key: t.id for t in _topics(session, org_id)}
            out[mid] = (topics.get(ref) or (ref if ref in set(topics.values()) else None)) if ref else None
    return out


def resolve_message_topic(session: Session, org_id: str, ref: str) -> str:
    """The delivery port ``messages.topic_of``: a message names its topic by id or short name; an
    unknown or archived topic is refused (422 naming ``topic``)."""
    from carepost.core.errors import NotFound

    try:
        topic = get_topic(session, org_id, ref, "topic")
    except NotFound:
        raise ValidationFailed("No such topic: use a topic's id or short name (see /api/v1/topics).",
                               field="topic") from None
    if topic.archived:
        raise ValidationFailed("This topic is archived: messages can no longer be sent in it.", field="topic")
    return topic.id


def _topics(session: Session, org_id: str) -> list[Topic]:
    from carepost.consent.service import list_topics

    return list_topics(session, org_id, include_archived=True)


def pipeline_eligibility(session: Session, candidates: list) -> dict[str, str]:
    """The delivery pipeline's ``eligibility`` step (filled by ``carepost.assembly``): the full check for recipients being delivered
    (at claim time), grouped by organization, purpose and topic. Returns the excluded ones:
    ``{recipient id: reason code}``. Invalid addresses stay excluded as ``invalid_address``."""
    from carepost.core.crypto import get_keyring
    from carepost.delivery.mime import parse_address
    from carepost.delivery.models import MessageRecipient

    excluded: dict[str, str] = {}
    groups: dict[tuple[str, str, str | None], list] = {}
    by_org: dict[str, list] = {}
    for c in candidates:
        try:
            parse_address(c.address, field_name="to", allow_display_name=False)
        except ValidationFailed:
            excluded[c.recipient_id] = "invalid_address"
            continue
        by_org.setdefault(c.org_id, []).append(c)
    for org_id, group in by_org.items():
        topics = message_topics(session, org_id, [c.message_id for c in group])
        for c in group:
            purpose = c.purpose if c.purpose in purposes.PURPOSES else "transactional"
            groups.setdefault((org_id, purpose, topics.get(c.message_id)), []).append(c)
    fresh: dict[str, str] = {}
    for org_id, group in by_org.items():
        # The candidates' address indexes were read before this transaction held the index
        # version: lock it, then read them again, so a blind-index rotation that committed in
        # between cannot let a suppressed address through (docs/keys.md).
        get_keyring().index_version(session, org_id)
        ids = [c.recipient_id for c in group]
        for start in range(0, len(ids), 500):
            fresh.update(_by_ids(session, MessageRecipient, (MessageRecipient.id, MessageRecipient.address_index), org_id,
                                 ids[start:start + 500]))
    capped: dict[str, list] = {}
    for (org_id, purpose, topic_id), group in groups.items():
        rows = [{"id": c.recipient_id, "contact_id": c.contact_id, "address_index": fresh.get(c.recipient_id, c.address_index),
                 "message_id": c.message_id} for c in group]
        checked = recipients_eligibility(session, org_id, rows, purpose, topic_id)
        excluded.update({rid: code for rid, code in checked.items() if code != ELIGIBLE})
        if purposes.requirements(purpose).effective_purpose in purposes.MARKETING_PURPOSES:
            capped.setdefault(org_id, []).extend(
                c for c in group if c.contact_id and checked.get(c.recipient_id) == ELIGIBLE)
    for org_id, group in capped.items():
        excluded.update({rid: "frequency_cap" for rid in hold_cap_places(session, org_id, group)})
    return excluded


def hold_cap_places(session: Session, org_id: str, candidates: list) -> set[str]:
    """The frequency cap across workers: each marketing candidate the database found eligible
    takes a place in its contact's windows (``core.limits.admit_many``: one Lua script per
    contact in Redis when configured, shared by every worker; this process's memory otherwise),
    its message the member. Returns the recipient ids refused a place (``frequency_cap``).

    Why both: the database's count (:func:`_over_cap`) sees only committed messages, so two
    workers accepting or delivering messages to one contact at the same moment (two campaigns,
    a campaign and a journey, or two messages in one delivery batch) would each see the count
    under the cap. The places are taken atomically in Redis, in order; a message that already
    holds a place keeps it (its delivery after acceptance, a retry, a deferral). The database
    stays the source of truth: after a Redis restart the places are gone but every message
    accepted before it is counted there. Keys name the organization and contact ids, never PHI.
    A place is kept for its window even when its message is not delivered after all (a bounce,
    a later exclusion): the cap errs toward sending less, never more. Redis unreachable: the
    check raises ``LimitsUnavailable`` (the acceptance or delivery run is retried), it never
    lets the message through uncounted."""
    from carepost.core.limits import get_limits
    from carepost.delivery.models import Message

    cfg = consent_settings(session, org_id)
    daily, weekly = cfg["frequency_cap_daily"], cfg["frequency_cap_weekly"]
    if not candidates or not (daily or weekly):
        return set()
    windows = ([(86400.0, int(daily))] if daily else []) + ([(7 * 86400.0, int(weekly))] if weekly else [])
    message_ids = sorted({c.message_id for c in candidates})
    created: dict[str, datetime] = {}
    for i in range(0, len(message_ids), 500):
        created.update(_by_ids(session, Message, (Message.id, Message.created_at), org_id, message_ids[i:i + 500]))
    now = clock.now()
    items = [(f"fcap:{org_id}:{c.contact_id}", c.message_id,
              clock.aware(created.get(c.message_id) or now).timestamp()) for c in candidates]
    limits = get_limits()
    admitted = limits.admit_many(items, now.timestamp(), windows)
    refused = [(c, item) for c, item, ok in zip(candidates, items, admitted) if not ok]
    if refused and _forget_stale_places(session, org_id, limits, {item[0]: c.contact_id for c, item in refused}, now):
        again = limits.admit_many([item for _, item in refused], now.timestamp(), windows)
        refused = [(c, item) for (c, item), ok in zip(refused, again) if not ok]
    return {c.recipient_id for c, _ in refused}


STALE_PLACE = timedelta(minutes=10)  # a place whose message no transaction committed in this long


def _forget_stale_places(session: Session, org_id: str, limits, keys: dict[str, str], now: datetime) -> bool:
    """Free the places that count nothing in the database: the member's message holds no
    recipient of that contact with a counted status (it was excluded, failed or bounced), or the
    message does not exist ``STALE_PLACE`` after it took the place (its transaction rolled
    back). A message not yet committed by another worker is younger than that: it keeps its
    place. True when any was freed."""
    from carepost.delivery.models import Message, MessageRecipient

    freed = False
    for key, contact_id in keys.items():
        held = limits.admitted(key)
        if not held:
            continue
        ids = list(held)
        existing = set(session.scalars(select(Message.id).where(Message.org_id == org_id, Message.id.in_(ids))))
        counted = set(session.scalars(select(MessageRecipient.message_id).where(
            MessageRecipient.org_id == org_id, MessageRecipient.message_id.in_(ids),
            MessageRecipient.contact_id == contact_id, MessageRecipient.status.in_(CAP_COUNTED_STATUSES))))
        stale = [m for m, score in held.items()
                 if m not in counted and (m in existing or score < (now - STALE_PLACE).timestamp())]
        if stale:
            limits.forget(key, stale)
            freed = True
    return freed


def recipients_eligibility(session: Session, org_id: str, rows: list[dict], purpose: str,
                           topic_id: str | None) -> dict[str, str]:
    """``{row id: "eligible" | reason}`` for recipient rows of one purpose and topic: the
    delivery check plus the CAN-SPAM rule that commercial mail needs the sender's postal address.
    The pipeline's eligibility uses it, and so does the compose page's preview (delivery port
    ``compose.recipient_eligibility``) for a message not stored yet."""
    topic = session.get(Topic, topic_id) if topic_id else None
    checked = delivery_check(session, org_id, rows, purpose, topic)
    if purposes.requirements(purpose).opt_out_required and not consent_settings(session, org_id).get("postal_address"):
        # CAN-SPAM: never sent without the sender's postal address
        checked = {rid: ("no_postal_address" if code == ELIGIBLE else code) for rid, code in checked.items()}
    return checked


def compose_topics(session: Session, org_id: str) -> list[dict]:
    """The delivery port ``compose.topic_choices``: topics a new message may name (not archived)."""
    from carepost.consent.service import list_topics

    return [{"id": t.id, "key": t.key, "name": t.name} for t in list_topics(session, org_id)]


def reason_sentence(code: str) -> str:
    """The delivery port ``compose.reason_text``: an exclusion reason in words."""
    return REASON_TEXT.get(code, code.replace("_", " "))


def mailto_unsubscribe(session: Session, org_id: str, recipient_id: str) -> None:
    """The return path received a mail at a recipient's List-Unsubscribe ``mailto:`` address
    (``carepost inbound``; filled into ``delivery.inbound.unsubscribe_request`` by the composition
    root): unsubscribe that recipient from the message's topic, or from all marketing."""
    from carepost.consent.service import LinkSubject, apply_unsubscribe
    from carepost.delivery.models import MessageRecipient

    rec = session.scalars(select(MessageRecipient).where(MessageRecipient.org_id == org_id,
                                                         MessageRecipient.id == recipient_id)).first()
    if rec is None:
        return
    topic_id = message_topics(session, org_id, [rec.message_id]).get(rec.message_id)
    contact_id = rec.contact_id
    if contact_id:
        from carepost.patients.models import Contact

        if session.get(Contact, contact_id) is None:
            contact_id = None
    apply_unsubscribe(session, LinkSubject(org_id, contact_id, rec.address_index, rec.id, rec.message_id, topic_id),
                      all_marketing=False, method="mailto")


def pipeline_list_unsubscribe(session: Session, candidates: list) -> dict[str, list[str]]:
    """The delivery pipeline's ``list_unsubscribe`` step: the unsubscribe URL for every recipient whose
    message needs an opt-out (commercial purposes) or belongs to a topic — https (RFC 8058 one-click)
    when ``CAREPOST_BASE_URL`` is https, else the http link; the pipeline adds the ``mailto:`` of the
    return path and the visible footer, and excludes (``no_opt_out``) a commercial copy with no link."""
    from carepost.consent import tokens
    from carepost.consent.service import unsubscribe_url
    from carepost.core.crypto import get_keyring

    out: dict[str, list[str]] = {}
    by_org: dict[str, list] = {}
    for c in candidates:
        by_org.setdefault(c.org_id, []).append(c)
    for org_id, group in by_org.items():
        topics = message_topics(session, org_id, [c.message_id for c in group])
        key = None  # the organization's consent key: looked up once for the group, at its first link
        for c in group:
            topic_id = topics.get(c.message_id)
            purpose = c.purpose if c.purpose in purposes.PURPOSES else "transactional"
            if topic_id or purposes.requirements(purpose).opt_out_required:
                if key is None:
                    key = get_keyring().named_key(session, org_id, tokens.KEY_KIND)
                url = unsubscribe_url(session, org_id, c.recipient_id, topic_id, key=key)
                if url.startswith(("https://", "http://")):
                    out[c.recipient_id] = [url]
    return out


def pipeline_quiet_hours(session: Session, candidates: list) -> dict[str, datetime]:
    """The delivery pipeline's ``quiet_hours`` step: recipients of messages that need an opt-out (marketing
    and the like) who are inside the organization's quiet hours in their own time zone get
    the next allowed time — a deferral, never an exclusion."""
    out: dict[str, datetime] = {}
    by_org: dict[str, list] = {}
    for c in candidates:
        purpose = c.purpose if c.purpose in purposes.PURPOSES else "transactional"
        if c.contact_id and purposes.requirements(purpose).opt_out_required:
            by_org.setdefault(c.org_id, []).append(c)
    for org_id, group in by_org.items():
        until = quiet_hours_deferral(session, [c.contact_id for c in group], org_id=org_id)
        for c in group:
            if c.contact_id in until:
                out[c.recipient_id] = until[c.contact_id]
    return out
