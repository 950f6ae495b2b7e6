"""Compile a segment's JSON tree into ONE SQLAlchemy Core ``select(contacts.id)``.

The database evaluates the whole query: every criterion becomes a predicate on the contact row
(a column comparison, or ``contacts.id IN (subquery)`` over a fact table), groups become
AND / OR / NOT of those predicates, and nothing iterates contacts in Python. The same code path
serves SQLite (SQLCipher) and PostgreSQL: dates and periods are computed here and passed as bind
parameters, so no dialect-specific date function is needed; values are always bind parameters.

Every predicate is two-valued (never SQL NULL): a comparison on a nullable column is guarded by
``IS NOT NULL`` and subqueries never yield NULL ids, so ``NOT`` is the exact complement.

Reading other capabilities' tables: a segment is a set-based join over patients (contacts,
clinical facts, custom attributes, identifiers), consent (authorizations, subscriptions, topics,
suppressions), delivery (message recipients and messages), portal (portal messages) and forms
(form submissions), tracking (engagement events: opens and clicks) and campaigns (a campaign named
in ``in campaign``). Calling their services one contact at a time cannot give one statement, so
this module reads those tables directly (ARCHITECTURE.md section 3 allows it for segments); it
never writes them. ``forms`` and ``campaigns`` sit above segments and ``tracking`` beside it, so
their tables are looked up by name in the shared metadata instead of imported.

Organization scoping: the statement is built from ORM entities and executed through an
organization-scoped session, so the central mechanism (``core.database``) adds
``org_id = :org`` to every entity, in subqueries too (``with_loader_criteria``). The one Core
tables (form submissions, engagement events, campaigns) get their ``org_id`` filter here.
"""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import and_, extract, false, func, not_, or_, select, true
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from carepost.consent.models import Authorization, Subscription, Suppression, Topic
from carepost.core import clock
from carepost.delivery.models import Message, MessageRecipient
from carepost.patients.models import (
    Appointment,
    CarePlan,
    Condition,
    Contact,
    ContactIdentifier,
    CustomAttributeDefinition,
    CustomAttributeValue,
    Encounter,
    Immunization,
    Medication,
    Observation,
    Procedure,
)
from carepost.portal.models import PortalMessage
from carepost.segments import language as lang
from carepost.segments.language import Pos, SegmentQueryError, where_of
from carepost.segments.models import Segment, SegmentMember
from carepost.segments.valuesets import org_value_sets

# --------------------------------------------------------------------------- definitions shared with the docs

CONDITION_ACTIVE = ("active", "recurrence", "relapse")
CONDITION_RESOLVED = ("resolved", "inactive", "remission")
APPOINTMENT_UPCOMING = ("booked", "pending", "proposed", "arrived", "checked-in", "waitlist")
RECEIVED_STATUSES = ("sent", "delivered", "portal_viewed")
DELIVERED_STATUSES = ("delivered", "portal_viewed")
FORM_SUBMITTED_STATUSES = ("received", "pending_confirmation", "confirmed")
ATTR_TYPES = {"text": "text", "number": "number", "date": "date", "boolean": "boolean", "list": "list"}

# kind -> (model, the column that dates it)
FACTS = {
    "condition": (Condition, "onset"),
    "medication": (Medication, "start"),
    "procedure": (Procedure, "performed_start"),
    "observation": (Observation, "effective_at"),
    "immunization": (Immunization, "occurrence_date"),
    "encounter": (Encounter, "start_at"),
    "hospitalization": (Encounter, "start_at"),
    "appointment": (Appointment, "start_at"),
    "care_plan": (CarePlan, "period_start"),
}


def fact_date_column(kind: str, model):
    if kind == "condition":
        return func.coalesce(model.onset_date, model.recorded_date)
    if kind == "medication":
        return func.coalesce(model.start_date, model.authored_on)
    return getattr(model, FACTS[kind][1])


# --------------------------------------------------------------------------- dates


def shift(d: date, n: int, unit: str) -> date:
    """``d`` moved by ``n`` units (negative: back); months and years clamp to the month's end."""
    if unit == "days":
        return d + timedelta(days=n)
    if unit == "weeks":
        return d + timedelta(weeks=n)
    months = n * (12 if unit == "years" else 1)
    y, m = divmod(d.month - 1 + months, 12)
    year, month = d.year + y, m + 1
    year = min(max(year, 1), 9999)
    return date(year, month, min(d.day, calendar.monthrange(year, month)[1]))


def _start_of(d: date) -> datetime:
    return datetime.combine(d, time.min, tzinfo=timezone.utc)


@dataclass
class Window:
    """A time window as bounds: ``lo <= x`` (or ``<``), ``x <= hi`` (or ``<``), by day or instant."""

    lo: date | datetime | None = None
    lo_strict: bool = False
    hi: date | datetime | None = None
    hi_strict: bool = False


def window(t: dict, at: datetime, *, is_date: bool) -> Window:
    """The bounds of a time clause at evaluation time ``at`` (dates for DATE columns, instants
    for timestamp columns: ``within 12 months`` = from the same instant 12 months ago to now)."""
    (key, v), = t.items()
    today = at.date()
    if key in ("within", "next"):
        n, unit = v
        if is_date:
            other = shift(today, -n if key == "within" else n, unit)
            return Window(other, False, today) if key == "within" else Window(today, False, other)
        other_day = shift(today, -n if key == "within" else n, unit)
        other = datetime.combine(other_day, at.timetz())
        return Window(other, False, at) if key == "within" else Window(at, False, other)
    day = date.fromisoformat(v) if key != "between" else None
    if key == "before":
        return Window(hi=day if is_date else _start_of(day), hi_strict=True)
    if key == "after":
        return Window(lo=day, lo_strict=True) if is_date else Window(lo=_start_of(day + timedelta(days=1)))
    if key == "since":
        return Window(lo=day if is_date else _start_of(day))
    a, b = (date.fromisoformat(x) for x in v)
    if is_date:
        return Window(a, False, b, False)
    return Window(_start_of(a), False, _start_of(b + timedelta(days=1)), True)


def window_predicate(col, w: Window) -> ColumnElement:
    parts = [col.isnot(None)]
    if w.lo is not None:
        parts.append(col > w.lo if w.lo_strict else col >= w.lo)
    if w.hi is not None:
        parts.append(col < w.hi if w.hi_strict else col <= w.hi)
    return and_(*parts)


def age_floor_date(at_day: date, years: int) -> date | None:
    """The latest birth date of someone at least ``years`` old on ``at_day`` (None: nobody is)."""
    y = at_day.year - years
    if y < 1:
        return None
    if y > 9999:
        return date.max
    return date(y, at_day.month, min(at_day.day, calendar.monthrange(y, at_day.month)[1]))


def birthday_keys(at_day: date, days: int) -> set[int]:
    """``month*100 + day`` of every birthday falling in the next ``days`` days (today included);
    a 29 February birthday is celebrated on 28 February in common years."""
    keys: set[int] = set()
    for k in range(days + 1):
        d = at_day + timedelta(days=k)
        keys.add(d.month * 100 + d.day)
        if d.month == 2 and d.day == 28 and not calendar.isleap(d.year):
            keys.add(229)
    return keys


# --------------------------------------------------------------------------- compile


@dataclass
class Compiled:
    statement: object  # select(Contact.id)
    predicate: object  # the WHERE clause over contacts
    sensitive_categories: list[str]
    value_sets: list[str]
    segments: list[str]
    at: datetime

    @property
    def sensitive(self) -> bool:
        return bool(self.sensitive_categories)


@dataclass
class _Ctx:
    session: Session
    org_id: str
    at: datetime
    stack: tuple[str, ...] = ()
    categories: set[str] = field(default_factory=set)
    value_sets: set[str] = field(default_factory=set)
    segments: set[str] = field(default_factory=set)
    _sensitive: list | None = None
    _attrs: dict | None = None


def compile_query(session: Session, org_id: str, tree: dict, at: datetime | None = None, *,
                  segment_id: str | None = None) -> Compiled:
    """One ``select(contacts.id)`` for a validated tree (see :func:`language.validate`)."""
    ctx = _Ctx(session, org_id, clock.aware(at) if at else clock.now(), stack=(segment_id,) if segment_id else ())
    pred = _segment_predicate(ctx, tree)
    stmt = select(Contact.id).where(pred)
    return Compiled(stmt, pred, sorted(ctx.categories), sorted(ctx.value_sets), sorted(ctx.segments), ctx.at)


def _names_deceased(tree) -> bool:
    if isinstance(tree, dict):
        if tree.get("type") == "field" and tree.get("field") == "deceased":
            return True
        return any(_names_deceased(v) for v in tree.values())
    if isinstance(tree, list):
        return any(_names_deceased(v) for v in tree)
    return False


def _segment_predicate(ctx: _Ctx, tree: dict) -> ColumnElement:
    pred = _node(ctx, tree, "query")
    if not _names_deceased(tree):
        pred = and_(Contact.deceased.isnot(True), pred)
    return pred


def _node(ctx: _Ctx, node: dict, path: str) -> ColumnElement:
    if "and" in node:
        return and_(*[_node(ctx, ch, f"{path}.and[{i}]") for i, ch in enumerate(node["and"])])
    if "or" in node:
        return or_(*[_node(ctx, ch, f"{path}.or[{i}]") for i, ch in enumerate(node["or"])])
    if "not" in node:
        return not_(_node(ctx, node["not"], f"{path}.not"))
    pos = where_of(node, path)
    return CRITERIA[node["type"]](ctx, node, pos)


def _in(subquery) -> ColumnElement:
    return Contact.id.in_(subquery)


# ---- codes


def _entries_for_codes(codes: list[str]) -> list[dict]:
    """Language codes (``icd10:E11.*``) -> value-set entries in stored system names."""
    out = []
    for c in codes:
        system, _, value = c.partition(":")
        prefix = value.endswith("*")
        value = value.rstrip("*").rstrip(".") if prefix else value
        for stored in lang.CODE_SYSTEMS[system]:
            out.append({"system": stored, "prefix" if prefix else "code": value})
    return out


def _variants(system: str, value: str) -> list[str]:
    raw = value.strip().upper() if system in ("icd10cm", "icd10", "icd10pcs", "cpt") else value.strip()
    if system in ("icd10cm", "icd10"):
        bare = raw.replace(".", "")
        dotted = bare[:3] + "." + bare[3:] if len(bare) > 3 else bare
        return list(dict.fromkeys([dotted, bare]))
    return [raw]


def code_predicate(model, entries: list[dict]) -> ColumnElement:
    """``(code_system = s AND (code IN (...) OR code LIKE 'p%' ...)) OR ...`` for value-set entries.
    ICD-10 codes match with or without their dot. Prefixes never hold LIKE wildcards (checked)."""
    by_system: dict[str, tuple[list[str], list[str]]] = {}
    for e in entries:
        codes, likes = by_system.setdefault(e["system"], ([], []))
        if "code" in e:
            codes.extend(v for v in _variants(e["system"], e["code"]) if v not in codes)
        else:
            likes.extend(v + "%" for v in _variants(e["system"], e["prefix"]) if v + "%" not in likes)
    terms, every_code, any_like = [], [], False
    for system, (codes, likes) in sorted(by_system.items()):
        alts = []
        if codes:
            alts.append(model.code.in_(codes))
            every_code.extend(c for c in codes if c not in every_code)
        alts.extend(model.code.like(p) for p in likes)
        any_like = any_like or bool(likes)
        terms.append(and_(model.code_system == system, or_(*alts)))
    if not terms:
        return false()
    conds = []
    verified = getattr(model, "code_verified", None)  # a code that failed its format check never matches
    if verified is not None:
        conds.append(verified.is_(True))
    if len(terms) > 1 and not any_like:
        # Implied by the OR below (each term tests ``code IN`` its own codes); stated once over all
        # systems so the planner can use ONE range scan of a ``(org_id, code, date)`` index instead of
        # a BitmapOr of one scan per system, which cannot be index-only.
        conds.append(model.code.in_(every_code))
    conds.append(or_(*terms))
    return and_(*conds)


def _entry_matches(system: str, code: str, entry: dict) -> bool:
    if system != entry["system"]:
        return False
    norm = lambda v: v.strip().upper().replace(".", "") if system in ("icd10cm", "icd10") else v.strip().upper()  # noqa: E731
    if "code" in entry:
        return norm(code) == norm(entry["code"])
    return norm(code).startswith(norm(entry["prefix"]))


def _overlaps(literal: dict, entry: dict) -> bool:
    """Whether a literal code or prefix could match a code of a sensitive value-set entry."""
    system = literal["system"]
    if system != entry["system"]:
        return False
    if "code" in literal:
        return _entry_matches(system, literal["code"], entry)
    norm = lambda v: v.strip().upper().replace(".", "") if system in ("icd10cm", "icd10") else v.strip().upper()  # noqa: E731
    p = norm(literal["prefix"])
    other = norm(entry.get("code") or entry.get("prefix"))
    return other.startswith(p) or ("prefix" in entry and p.startswith(other))


def _codes_of(ctx: _Ctx, node: dict, pos: Pos) -> list[dict] | None:
    """The entries a criterion names (None: any code), noting value sets and sensitive categories."""
    if "valueset" in node:
        key = node["valueset"]
        vs = org_value_sets(ctx.session, ctx.org_id).get(key)
        if vs is None:
            raise pos.error(f"unknown value set '{lang._short(key)}'", found=lang._short(key))
        ctx.value_sets.add(key)
        if vs.get("sensitive_category"):
            ctx.categories.add(vs["sensitive_category"])
        entries = [{k: v for k, v in e.items() if k in ("system", "code", "prefix")} for e in vs["codes"]]
        # icd10cm entries also match codes stored under the WHO ICD-10 system
        entries += [{**e, "system": "icd10"} for e in entries if e["system"] == "icd10cm"]
        return entries
    if "codes" in node:
        entries = _entries_for_codes(node["codes"])
        if ctx._sensitive is None:
            ctx._sensitive = [vs for vs in org_value_sets(ctx.session, ctx.org_id).values() if vs.get("sensitive_category")]
        for vs in ctx._sensitive:
            vs_entries = vs["codes"] + [{**e, "system": "icd10"} for e in vs["codes"] if e["system"] == "icd10cm"]
            if any(_overlaps(lit, e) for lit in entries for e in vs_entries):
                ctx.categories.add(vs["sensitive_category"])
        return entries
    return None


# ---- clinical


def _fact_conditions(ctx: _Ctx, node: dict, pos: Pos, model, kind: str) -> list:
    conds = []
    entries = _codes_of(ctx, node, pos) if kind in lang.CODED_KINDS else None
    if entries is not None:
        conds.append(code_predicate(model, entries))
    q = node.get("qualifier")
    if kind == "condition":
        if q == "active":
            conds.append(model.status.in_(CONDITION_ACTIVE))
        elif q == "resolved":
            conds.append(model.status.in_(CONDITION_RESOLVED))
    elif kind == "medication" and q == "active":
        conds.append(model.status == "active")
    elif kind == "care_plan" and q == "active":
        conds.append(and_(model.status == "active",
                          or_(model.period_end.is_(None), model.period_end >= ctx.at.date())))
    elif kind == "immunization":
        conds.append(or_(model.status.is_(None), model.status != "not-done"))
    elif kind == "hospitalization":
        conds.append(model.is_hospitalization.is_(True))
    elif kind == "appointment":
        if q == "upcoming":
            conds.append(and_(model.status.in_(APPOINTMENT_UPCOMING), model.start_at >= ctx.at))
        elif q == "missed":
            conds.append(model.status == "noshow")
        elif q in ("fulfilled", "cancelled"):
            conds.append(model.status == q)
    if node.get("time"):
        col = fact_date_column(kind, model)
        is_date = kind in ("condition", "medication", "immunization", "care_plan")
        conds.append(window_predicate(col, window(node["time"], ctx.at, is_date=is_date)))
    return conds


def _event_source(ctx: _Ctx, kind: str, node: dict):
    """(contact id column, conditions, date column, from-clause entity) of an engagement kind."""
    if kind in ("message_received", "message_delivered", "message_bounced"):
        statuses = {"message_received": RECEIVED_STATUSES, "message_delivered": DELIVERED_STATUSES,
                    "message_bounced": ("bounced",)}[kind]
        conds = [MessageRecipient.contact_id.isnot(None), MessageRecipient.status.in_(statuses),
                 Message.sandbox.is_(False)]
        base = select(MessageRecipient.contact_id).join(Message, Message.id == MessageRecipient.message_id)
        return MessageRecipient.contact_id, conds, Message.created_at, base, MessageRecipient.id
    if kind == "portal_message_opened":
        conds = [MessageRecipient.contact_id.isnot(None), PortalMessage.first_viewed_at.isnot(None)]
        base = select(MessageRecipient.contact_id).join(PortalMessage, PortalMessage.recipient_id == MessageRecipient.id)
        return MessageRecipient.contact_id, conds, PortalMessage.first_viewed_at, base, PortalMessage.id
    if kind == "form_submitted":
        from carepost.core.database import Base

        forms = Base.metadata.tables.get("form_submissions")
        if forms is None:  # pragma: no cover - the composition root loads every model
            raise SegmentQueryError("form submissions are not available", where="query")
        conds = [forms.c.contact_id.isnot(None), forms.c.status.in_(FORM_SUBMITTED_STATUSES),
                 forms.c.org_id == ctx.org_id]
        return forms.c.contact_id, conds, forms.c.created_at, select(forms.c.contact_id), forms.c.id
    if kind in lang.TRACKED_KINDS:
        return _tracked_source(ctx, kind, node)
    raise AssertionError(kind)  # pragma: no cover


def _table(name: str):
    """A table of a capability this module may not import (tracking sits beside segments,
    campaigns above), looked up in the shared metadata."""
    from carepost.core.database import Base

    table = Base.metadata.tables.get(name)
    if table is None:  # pragma: no cover - the composition root loads every model
        raise SegmentQueryError(f"{name} are not available", where="query")
    return table


def _tracked_source(ctx: _Ctx, kind: str, node: dict):
    """Opens or clicks from tracking's append-only ``engagement_events``, joined to the recipient
    row for the contact: a person's events only unless qualified ``any`` (privacy proxies and
    security scanners are not people reading); ``in campaign`` keeps that campaign's messages.
    Counted per message (two opens of one message are one). Organizations in privacy mode keep no
    per-recipient events: nobody matches there."""
    events = _table("engagement_events")
    conds = [events.c.org_id == ctx.org_id, events.c.type == ("opened" if kind == "message_opened" else "clicked"),
             MessageRecipient.contact_id.isnot(None)]
    if node.get("qualifier") != "any":
        conds.append(events.c.classification == "human")
    base = select(MessageRecipient.contact_id).select_from(events).join(
        MessageRecipient, MessageRecipient.id == events.c.recipient_id)
    if node.get("campaign") is not None:
        campaign_id = _campaign_id(ctx, node)
        base = base.join(Message, Message.id == events.c.message_id)
        conds.append(Message.campaign_id == campaign_id)
    return MessageRecipient.contact_id, conds, events.c.occurred_at, base, events.c.message_id


def _campaign_id(ctx: _Ctx, node: dict) -> str:
    """A campaign named by id or name (the id wins), resolved when the query compiles."""
    from carepost.core.ids import is_id

    campaigns = _table("campaigns")
    value = node["campaign"]
    found = None
    if is_id(value):
        found = ctx.session.scalar(select(campaigns.c.id).where(campaigns.c.org_id == ctx.org_id,
                                                                campaigns.c.id == value))
    if found is None:
        found = ctx.session.scalar(select(campaigns.c.id).where(campaigns.c.org_id == ctx.org_id,
                                                                campaigns.c.name == value).limit(1))
    if found is None:
        raise where_of(node, "query").error(f"unknown campaign '{lang._short(value)}'", found=lang._short(value))
    return found


def _has(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    kind = node["kind"]
    if kind in FACTS:
        model = FACTS[kind][0]
        conds = _fact_conditions(ctx, node, pos, model, kind)
        id_col, row_col = model.contact_id, None
        base = select(model.contact_id)
    else:
        id_col, conds, date_col, base, row_col = _event_source(ctx, kind, node)
        if node.get("time"):
            conds = conds + [window_predicate(date_col, window(node["time"], ctx.at, is_date=False))]
    matching = base.where(*conds)
    # Opens and clicks count messages (a message opened five times is one); the rest count rows.
    counted = func.count(func.distinct(row_col)) if kind in lang.TRACKED_KINDS else func.count()
    op, n = node.get("count") or [">=", 1]
    if op == ">=":
        if n <= 0:
            return true()
        if n == 1:
            return _in(matching)
        return _in(matching.group_by(id_col).having(counted >= n))
    if op == "=" and n == 0 or op == "<=" and n == 0:
        return not_(_in(matching))
    if op == "<=":
        return not_(_in(matching.group_by(id_col).having(counted > n)))
    return _in(matching.group_by(id_col).having(counted == n))


def _last(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    """The latest observation of the codes (within the window) has a value that compares true."""
    obs = Observation
    entries = _codes_of(ctx, node, pos)
    conds = [code_predicate(obs, entries), obs.effective_at.isnot(None)]
    if node.get("time"):
        conds.append(window_predicate(obs.effective_at, window(node["time"], ctx.at, is_date=False)))
    ranked = select(
        obs.contact_id.label("contact_id"), obs.value_quantity.label("value"),
        func.row_number().over(partition_by=obs.contact_id, order_by=(obs.effective_at.desc(), obs.id.desc())).label("rn"),
    ).where(*conds).subquery("latest")
    v = node["value"]
    cmp = {"=": ranked.c.value == v, "!=": ranked.c.value != v, "<": ranked.c.value < v, "<=": ranked.c.value <= v,
           ">": ranked.c.value > v, ">=": ranked.c.value >= v}[node["op"]]
    return _in(select(ranked.c.contact_id).where(ranked.c.rn == 1, ranked.c.value.isnot(None), cmp))


def _refill_due(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    today = ctx.at.date()
    conds = [Medication.status == "active", Medication.next_refill_due.isnot(None),
             Medication.next_refill_due >= today, Medication.next_refill_due <= today + timedelta(days=node["days"])]
    entries = _codes_of(ctx, node, pos)
    if entries is not None:
        conds.append(code_predicate(Medication, entries))
    return _in(select(Medication.contact_id).where(*conds))


# ---- demographic


def _text_col(fieldname: str):
    if fieldname == "zip":
        return func.substr(Contact.postal_code, 1, 5)
    if fieldname == "zip3":
        return func.substr(Contact.postal_code, 1, 3)
    if fieldname == "stage":
        return Contact.care_stage
    return getattr(Contact, fieldname)


def _age(ctx: _Ctx, node: dict) -> ColumnElement:
    day = date.fromisoformat(node["at"]) if node.get("at") else ctx.at.date()
    b = Contact.birth_date

    def ge(k: int) -> ColumnElement:  # age >= k
        limit = age_floor_date(day, k)
        return and_(b.isnot(None), b <= limit) if limit is not None else false()

    def lt(k: int) -> ColumnElement:  # age < k
        limit = age_floor_date(day, k)
        return and_(b.isnot(None), b > limit) if limit is not None else b.isnot(None)

    def eq(v) -> ColumnElement:
        if v != int(v):
            return false()
        return and_(ge(int(v)), lt(int(v) + 1))

    op, v = node["op"], node.get("value")
    if op == "is empty":
        return b.is_(None)
    if op == "is not empty":
        return b.isnot(None)
    if op == ">=":
        return ge(math.ceil(v))
    if op == ">":
        return ge(math.floor(v) + 1)
    if op == "<=":
        return lt(math.floor(v) + 1)
    if op == "<":
        return lt(math.ceil(v))
    if op == "=":
        return eq(v)
    if op == "!=":
        return and_(b.isnot(None), not_(eq(v)))
    if op == "between":
        return and_(ge(math.ceil(v[0])), lt(math.floor(v[1]) + 1))
    if op == "in":
        return or_(*[eq(x) for x in v])
    if op == "not in":
        return and_(b.isnot(None), not_(or_(*[eq(x) for x in v])))
    raise AssertionError(op)  # pragma: no cover


def compare(col, ftype: str, op: str, value, ctx: _Ctx, node: dict) -> ColumnElement:
    """A two-valued comparison of one column (text compares case-insensitively)."""
    if op == "is empty":
        return or_(col.is_(None), col == "") if ftype in ("text", "enum", "zip", "zip3", "list") else col.is_(None)
    if op == "is not empty":
        return and_(col.isnot(None), col != "") if ftype in ("text", "enum", "zip", "zip3", "list") else col.isnot(None)
    if op == "time":
        return window_predicate(col, window(node["time"], ctx.at, is_date=True))
    if ftype in ("text", "list"):
        target = func.lower(col)
        value = [str(v).lower() for v in value] if isinstance(value, list) else str(value).lower()
    else:
        target = col
        if ftype == "date":
            value = [date.fromisoformat(v) for v in value] if isinstance(value, list) else date.fromisoformat(value)
    guard = col.isnot(None)
    if op == "=":
        return and_(guard, target == value)
    if op == "!=":
        return and_(guard, target != value)
    if op == "<":
        return and_(guard, target < value)
    if op == "<=":
        return and_(guard, target <= value)
    if op == ">":
        return and_(guard, target > value)
    if op == ">=":
        return and_(guard, target >= value)
    if op == "between":
        return and_(guard, target >= value[0], target <= value[1])
    if op == "in":
        return and_(guard, target.in_(value))
    if op == "not in":
        return and_(guard, target.not_in(value))
    raise AssertionError(op)  # pragma: no cover


def _attribute(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    key = lang.ATTR_RE.match(node["field"]).group(1)
    if ctx._attrs is None:
        ctx._attrs = {d.key: d for d in ctx.session.scalars(
            select(CustomAttributeDefinition).where(CustomAttributeDefinition.org_id == ctx.org_id))}
    d = ctx._attrs.get(key)
    if d is None:
        raise pos.error(f"unknown custom attribute '{lang._short(key)}'", found=node["field"],
                        expected=sorted("attr." + k for k in ctx._attrs))
    ftype = ATTR_TYPES[d.type]
    checked = lang.check_field_value(node, ftype, pos)
    col = {"text": CustomAttributeValue.value_text, "list": CustomAttributeValue.value_text,
           "number": CustomAttributeValue.value_number, "date": CustomAttributeValue.value_date,
           "boolean": CustomAttributeValue.value_boolean}[ftype]
    values = select(CustomAttributeValue.contact_id).where(CustomAttributeValue.definition_id == d.id)
    op = checked["op"]
    has_value = _in(values.where(col.isnot(None)))
    if op == "is empty":
        return not_(has_value)
    if op == "is not empty":
        return has_value
    if op in ("!=", "not in"):
        positive = "=" if op == "!=" else "in"
        return and_(has_value, not_(_in(values.where(compare(col, ftype, positive, checked.get("value"), ctx, checked)))))
    return _in(values.where(compare(col, ftype, op, checked.get("value"), ctx, checked)))


def _field(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    name = node["field"]
    if name.startswith("attr."):
        return _attribute(ctx, node, pos)
    if name == "age":
        return _age(ctx, node)
    ftype = lang.CONTACT_FIELDS[name][0]
    col = Contact.birth_date if name == "birth_date" else _text_col(name)
    if ftype == "boolean":
        col = Contact.deceased
        if node["op"] in ("=", "!="):
            want = node["value"] if node["op"] == "=" else not node["value"]
            return col.is_(True) if want else col.isnot(True)
    return compare(col, ftype, node["op"], node.get("value"), ctx, node)


def _birthday(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    keys = sorted(birthday_keys(ctx.at.date(), node["days"]))
    b = Contact.birth_date
    return and_(b.isnot(None), (extract("month", b) * 100 + extract("day", b)).in_(keys))


def _distance(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    from carepost.segments import geo

    if "location" in node:
        from carepost.segments import locations

        place = locations.find(ctx.session, ctx.org_id, node["location"])
        if place is None:
            raise pos.error(f"the organization has no location named '{node['location']}'", found=node["location"])
        center = place.postal_code
    else:
        center = node["zip"]
    try:
        zips = geo.zips_within(center, float(node["miles"]))
    except ValueError as exc:
        raise pos.error(str(exc)) from None
    if not zips:
        raise pos.error(f"unknown ZIP code '{center}'", found=center)
    col = func.substr(Contact.postal_code, 1, 5)
    return and_(Contact.postal_code.isnot(None), col.in_(zips))


def _stage_changed(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    return window_predicate(Contact.care_stage_changed_at, window(node["time"], ctx.at, is_date=False))


# ---- consent


def _authorized(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    a, at = Authorization, ctx.at
    valid = select(a.contact_id).where(
        a.contact_id.isnot(None), a.purpose == node["purpose"], a.signed_at <= at,
        not_(and_(a.status == "revoked", a.revoked_at.isnot(None), a.revoked_at <= at)),
        or_(a.expires_at.is_(None), a.expires_at > at))
    return _in(valid)


def _topic_key(ctx: _Ctx, node: dict, pos: Pos) -> str:
    if node["topic"] == "all":
        return "*"
    topic = ctx.session.scalar(select(Topic).where(Topic.org_id == ctx.org_id, Topic.key == node["topic"]))
    if topic is None:
        raise pos.error(f"unknown topic '{lang._short(node['topic'])}'", found=lang._short(node["topic"]))
    return topic.id


def _subscribed(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    s = Subscription
    return _in(select(s.contact_id).where(s.topic_key == _topic_key(ctx, node, pos), s.status == "subscribed"))


def _unsubscribed(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    s = Subscription
    conds = [s.topic_key == _topic_key(ctx, node, pos), s.status == "unsubscribed"]
    if node.get("time"):
        conds.append(window_predicate(s.unsubscribed_at, window(node["time"], ctx.at, is_date=False)))
    return _in(select(s.contact_id).where(*conds))


def _suppressed(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    """An email address of the contact is suppressed for everything or for all marketing."""
    sup = select(Suppression.address_index).where(Suppression.scope_key.in_(("all:", "marketing:")),
                                                  or_(Suppression.expires_at.is_(None), Suppression.expires_at > ctx.at))
    ident = aliased(ContactIdentifier)
    return _in(select(ident.contact_id).where(ident.kind == "email", ident.blind_index.in_(sup)))


# ---- other segments


def find_segment(session: Session, org_id: str, ref: str) -> Segment | None:
    seg = session.scalar(select(Segment).where(Segment.org_id == org_id, Segment.id == ref))
    return seg or session.scalar(select(Segment).where(Segment.org_id == org_id, Segment.name == ref))


def _segment(ctx: _Ctx, node: dict, pos: Pos) -> ColumnElement:
    seg = find_segment(ctx.session, ctx.org_id, node["segment"])
    if seg is None:
        raise pos.error(f"unknown segment '{lang._short(node['segment'])}'", found=lang._short(node["segment"]))
    if seg.id in ctx.stack:
        raise pos.error("a segment may not refer to itself (directly or through others)", found=node["segment"])
    ctx.segments.add(seg.id)
    if seg.sensitive:
        ctx.categories.update(seg.sensitive_categories or [])
    if seg.kind == "snapshot":
        return _in(select(SegmentMember.contact_id).where(SegmentMember.segment_id == seg.id))
    inner = _Ctx(ctx.session, ctx.org_id, ctx.at, ctx.stack + (seg.id,), ctx.categories, ctx.value_sets, ctx.segments,
                 ctx._sensitive, ctx._attrs)
    try:
        tree = lang.validate(seg.query)
        return _segment_predicate(inner, tree)
    except SegmentQueryError as exc:
        raise pos.error(f"segment '{lang._short(seg.name)}' cannot be used: {exc.message}") from None


CRITERIA = {
    "field": _field, "has": _has, "last": _last, "refill_due": _refill_due, "birthday": _birthday,
    "distance": _distance, "stage_changed": _stage_changed, "authorized": _authorized, "subscribed": _subscribed,
    "unsubscribed": _unsubscribed, "suppressed": _suppressed, "segment": _segment,
}


def to_sql(session: Session, statement) -> str:
    """The statement as the database receives it (parameters shown as placeholders)."""
    return str(statement.compile(dialect=session.get_bind().dialect))
