"""Segments: evaluate a query (count, preview, breakdown, explain), saved segments (dynamic or
snapshot), daily counts, who used them, and the evaluation audit of sensitive segments.

Every evaluation runs the ONE statement :mod:`carepost.segments.compiler` builds, through the
caller's organization-scoped session. Small cells: a viewer without ``phi:read_unmasked`` sees
counts from 1 to 10 as "fewer than 11" (:func:`present_count`), in totals and breakdowns alike.
Sensitive segments (touching a sensitive value set) may be built, evaluated and viewed only with
``phi:read_unmasked``; every evaluation of one writes an audit event naming the segment and its
categories.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import and_, case, delete, event, func, literal, select, text
from sqlalchemy.orm import Session

from carepost.accounts.permissions import Permission
from carepost.audit.service import record
from carepost.core import clock
from carepost.core.ids import new_id
from carepost.core.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from carepost.patients.models import Contact
from carepost.segments import compiler, language
from carepost.segments.compiler import Compiled, age_floor_date
from carepost.segments.language import SegmentQueryError
from carepost.segments.models import SEGMENT_KINDS, Segment, SegmentDailyCount, SegmentMember, SegmentUse
from carepost.segments.valuesets import resolve_value_set  # noqa: F401  (re-exported)

SMALL_CELL = 11  # counts 1..10 are shown as "fewer than 11" to viewers without PHI rights
BREAKDOWNS = ("age_band", "sex", "stage", "zip3")
AGE_BANDS = ((0, 17), (18, 34), (35, 49), (50, 64), (65, 74), (75, None))
PREVIEW_MAX = 50
MEMBERS_PAGE_MAX = 1000


@dataclass
class Actor:
    """Who evaluates: for audit events and segment uses (never PHI)."""

    kind: str
    id: str | None
    permissions: frozenset[str] = frozenset()
    on_behalf_of: str | None = None
    context: dict | None = None

    @classmethod
    def of(cls, principal, request=None) -> Actor:
        from carepost.accounts.access import request_context

        return cls(principal.kind, principal.actor_id, frozenset(principal.permissions), principal.on_behalf_of,
                   request_context(request) if request is not None else {})

    @property
    def unmasked(self) -> bool:
        return Permission.PHI_READ_UNMASKED in self.permissions


SYSTEM = Actor("system", "cli", frozenset({Permission.PHI_READ_UNMASKED}))


# --------------------------------------------------------------------------- queries


def read_query(query: Any) -> dict:
    """Text or a JSON tree -> a validated tree (text keeps positions for later errors)."""
    if isinstance(query, str):
        return language.parse(query)
    if isinstance(query, dict):
        return language.validate(query)
    raise SegmentQueryError("the query is text or a JSON object", where="query")


def compile_for(session: Session, org_id: str, query: Any, actor: Actor, *, at: datetime | None = None,
                segment: Segment | None = None) -> Compiled:
    """Parse and compile; refuses a sensitive query to a viewer without ``phi:read_unmasked``."""
    tree = read_query(query)
    compiled = compiler.compile_query(session, org_id, tree, at, segment_id=segment.id if segment else None)
    if compiled.sensitive and not actor.unmasked:
        raise PermissionDenied("This segment touches a sensitive category; it needs the unmasked-PHI permission.")
    return compiled


def _audit_sensitive(session: Session, org_id: str, compiled: Compiled, actor: Actor, action: str,
                     segment: Segment | None, **details) -> None:
    if not compiled.sensitive:
        return
    record(session, org_id=org_id, actor_type=actor.kind, actor_id=actor.id, on_behalf_of=actor.on_behalf_of,
           action=f"segment.{action}", target_type="segment", target_id=segment.id if segment else None,
           details={"sensitive_categories": compiled.sensitive_categories, "value_sets": compiled.value_sets,
                    "segments": compiled.segments, **details}, **(actor.context or {}))


def present_count(n: int, actor: Actor) -> int | str:
    """Small-cell suppression for viewers without PHI rights."""
    if not actor.unmasked and 0 < n < SMALL_CELL:
        return f"fewer than {SMALL_CELL}"
    return n


@contextmanager
def planner_settings(session: Session):
    """PostgreSQL runs a segment's statement without JIT compilation (restored afterwards). The
    compiled statements are index-driven; at 1,000,000 contacts their estimated cost still passes
    ``jit_above_cost``, and compiling took 0.4-7 s against 0.5-5 s of execution
    (docs/performance.md, Segments). Nothing changes on SQLite."""
    if session.get_bind().dialect.name != "postgresql":
        yield
        return
    previous = session.execute(text("SELECT current_setting('jit')")).scalar()
    session.execute(text("SELECT set_config('jit', 'off', true)"))
    try:
        yield
    finally:
        session.execute(text("SELECT set_config('jit', :v, true)"), {"v": previous})


def _run_count(session: Session, compiled: Compiled) -> int:
    with planner_settings(session):
        return int(session.scalar(select(func.count(Contact.id)).where(compiled.predicate)) or 0)


def count(session: Session, org_id: str, query: Any, actor: Actor, *, at: datetime | None = None,
          segment: Segment | None = None) -> dict:
    started = time.perf_counter()
    compiled = compile_for(session, org_id, query, actor, at=at, segment=segment)
    if segment is not None and segment.kind == "snapshot":
        n = int(session.scalar(select(func.count()).select_from(SegmentMember).where(
            SegmentMember.segment_id == segment.id)) or 0)
    else:
        n = _run_count(session, compiled)
    elapsed = time.perf_counter() - started
    _audit_sensitive(session, org_id, compiled, actor, "count", segment, count=n)
    if segment is not None:
        _note_use(session, segment, actor, "count", n)
    return {"count": present_count(n, actor), "exact": actor.unmasked or not 0 < n < SMALL_CELL,
            "sensitive": compiled.sensitive, "sensitive_categories": compiled.sensitive_categories,
            "elapsed_ms": round(elapsed * 1000, 2)}


def contact_ids(session: Session, org_id: str, query: Any, actor: Actor, *, at: datetime | None = None,
                offset: int = 0, limit: int | None = None, after: str | None = None) -> list[str]:
    compiled = compile_for(session, org_id, query, actor, at=at)
    stmt = compiled.statement.order_by(Contact.id)
    if after:
        stmt = stmt.where(Contact.id > after)
    if offset:
        stmt = stmt.offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    with planner_settings(session):
        return list(session.scalars(stmt))


def preview(session: Session, org_id: str, query: Any, actor: Actor, *, limit: int = 10,
            at: datetime | None = None, segment: Segment | None = None) -> dict:
    """A sample of matching contacts, masked unless the viewer holds ``phi:read_unmasked``."""
    from carepost.patients import masking
    from carepost.patients import service as patients

    limit = max(1, min(int(limit), PREVIEW_MAX))
    compiled = compile_for(session, org_id, query, actor, at=at, segment=segment)
    ids = list(session.scalars(compiled.statement.order_by(Contact.id).limit(limit)))
    contacts = list(session.scalars(select(Contact).where(Contact.id.in_(ids)).order_by(Contact.id))) if ids else []
    rows = [masking.present(d, actor.unmasked) for d in patients.contact_dicts(session, contacts)]
    n = _run_count(session, compiled)
    record(session, org_id=org_id, actor_type=actor.kind, actor_id=actor.id, on_behalf_of=actor.on_behalf_of,
           action="segment.preview", target_type="segment", target_id=segment.id if segment else None,
           details={"contact_ids": ids, "masked": not actor.unmasked,
                    "sensitive_categories": compiled.sensitive_categories}, **(actor.context or {}))
    if segment is not None:
        _note_use(session, segment, actor, "preview", n)
    return {"count": present_count(n, actor), "contacts": rows, "masked": not actor.unmasked,
            "sensitive": compiled.sensitive, "sensitive_categories": compiled.sensitive_categories}


def _age_band_expr(day: date):
    b = Contact.birth_date
    whens = []
    for lo, hi in AGE_BANDS:
        label = f"{lo}-{hi}" if hi is not None else f"{lo}+"
        conds = [b <= age_floor_date(day, lo)]
        if hi is not None:
            conds.append(b > age_floor_date(day, hi + 1))
        whens.append((and_(*conds), literal(label)))
    return case(*whens, else_=literal("unknown"))


def breakdown(session: Session, org_id: str, query: Any, by: str, actor: Actor, *, at: datetime | None = None) -> dict:
    """The count split by one field (age band, sex, stage or ZIP3), in the same statement."""
    if by not in BREAKDOWNS:
        raise ValidationFailed(f"breakdown is one of {', '.join(BREAKDOWNS)}", field="by")
    compiled = compile_for(session, org_id, query, actor, at=at)
    if by == "age_band":
        key = _age_band_expr(compiled.at.date())
    elif by == "sex":
        key = func.coalesce(Contact.sex, literal("unknown"))
    elif by == "stage":
        key = Contact.care_stage
    else:
        key = func.coalesce(func.substr(Contact.postal_code, 1, 3), literal("unknown"))
    key = key.label("value")
    rows = session.execute(select(key, func.count(Contact.id)).where(compiled.predicate).group_by(key).order_by(key))
    out = [{"value": v, "count": present_count(int(n), actor)} for v, n in rows]
    _audit_sensitive(session, org_id, compiled, actor, "breakdown", None, by=by)
    return {"by": by, "groups": out, "sensitive": compiled.sensitive}


def explain(session: Session, org_id: str, query: Any, actor: Actor, *, at: datetime | None = None) -> dict:
    """The SQL the database runs (with its org filter) and the database's plan for it."""
    compiled = compile_for(session, org_id, query, actor, at=at)
    stmt = select(func.count(Contact.id)).where(compiled.predicate)
    # Let the session apply the tenant criteria, and catch the final SQL on its way to the driver.
    conn = session.connection()
    dialect = conn.dialect
    captured: dict = {}

    def grab(_conn, _cursor, statement, parameters, _context, _many):
        captured.setdefault("sql", statement)
        captured.setdefault("params", parameters)

    event.listen(conn, "before_cursor_execute", grab)
    try:
        session.execute(stmt).scalar()
    finally:
        event.remove(conn, "before_cursor_execute", grab)
    sql, params = captured["sql"], captured["params"]
    prefix = "EXPLAIN QUERY PLAN " if dialect.name == "sqlite" else "EXPLAIN "
    plan_rows = conn.exec_driver_sql(prefix + sql, params).fetchall()
    plan = [" | ".join(str(c) for c in row) for row in plan_rows]
    _audit_sensitive(session, org_id, compiled, actor, "explain", None)
    return {"sql": sql, "plan": plan, "dialect": dialect.name}


# --------------------------------------------------------------------------- saved segments


def segment_dict(seg: Segment, *, with_query: bool = True) -> dict:
    out = {"id": seg.id, "name": seg.name, "description": seg.description, "owner_id": seg.owner_id,
           "kind": seg.kind, "sensitive": seg.sensitive, "sensitive_categories": list(seg.sensitive_categories or []),
           "references": list(seg.references or []),
           "snapshot_at": seg.snapshot_at.isoformat() if seg.snapshot_at else None,
           "last_count": seg.last_count,
           "last_evaluated_at": seg.last_evaluated_at.isoformat() if seg.last_evaluated_at else None,
           "created_at": seg.created_at.isoformat() if seg.created_at else None,
           "updated_at": seg.updated_at.isoformat() if seg.updated_at else None}
    if with_query:
        out["query"] = seg.query
        out["query_text"] = seg.query_text
    return out


def get_segment(session: Session, org_id: str, segment_id: str, actor: Actor | None = None) -> Segment:
    seg = session.scalar(select(Segment).where(Segment.org_id == org_id, Segment.id == segment_id))
    if seg is None:
        raise NotFound("No such segment.", field="segment_id")
    if actor is not None and seg.sensitive and not actor.unmasked:
        raise PermissionDenied("This segment touches a sensitive category; it needs the unmasked-PHI permission.")
    return seg


def list_segments(session: Session, org_id: str, actor: Actor) -> list[Segment]:
    rows = session.scalars(select(Segment).where(Segment.org_id == org_id).order_by(Segment.name))
    return [s for s in rows if actor.unmasked or not s.sensitive]


def _apply(session: Session, org_id: str, seg: Segment, query: Any, actor: Actor) -> None:
    tree = read_query(query)
    compiled = compiler.compile_query(session, org_id, tree, segment_id=seg.id)
    if compiled.sensitive and not actor.unmasked:
        raise PermissionDenied("This segment touches a sensitive category; it needs the unmasked-PHI permission.")
    clean = language.strip_positions(tree)
    seg.query = clean
    seg.query_text = language.to_text(clean)
    seg.sensitive = compiled.sensitive
    seg.sensitive_categories = compiled.sensitive_categories
    seg.references = compiled.segments


def create_segment(session: Session, org_id: str, data: dict, actor: Actor) -> Segment:
    name = (data.get("name") or "").strip()
    if not name or len(name) > 200:
        raise ValidationFailed("A segment needs a name (up to 200 characters).", field="name")
    kind = data.get("kind") or "dynamic"
    if kind not in SEGMENT_KINDS:
        raise ValidationFailed("kind is dynamic or snapshot", field="kind")
    if session.scalar(select(Segment.id).where(Segment.org_id == org_id, Segment.name == name)):
        raise Conflict("A segment with this name exists.", field="name")
    seg = Segment(org_id=org_id, name=name, description=data.get("description") or "", owner_id=actor.id, kind=kind)
    seg.id = new_id()
    _apply(session, org_id, seg, data.get("query"), actor)
    session.add(seg)
    session.flush()
    if kind == "snapshot":
        take_snapshot(session, org_id, seg, actor)
    return seg


def update_segment(session: Session, org_id: str, seg: Segment, data: dict, actor: Actor) -> Segment:
    if "name" in data and data["name"] is not None:
        name = data["name"].strip()
        if not name or len(name) > 200:
            raise ValidationFailed("A segment needs a name (up to 200 characters).", field="name")
        clash = session.scalar(select(Segment.id).where(Segment.org_id == org_id, Segment.name == name, Segment.id != seg.id))
        if clash:
            raise Conflict("A segment with this name exists.", field="name")
        seg.name = name
    if data.get("description") is not None:
        seg.description = data["description"]
    if data.get("query") is not None:
        _apply(session, org_id, seg, data["query"], actor)
    if data.get("kind") is not None and data["kind"] != seg.kind:
        if data["kind"] not in SEGMENT_KINDS:
            raise ValidationFailed("kind is dynamic or snapshot", field="kind")
        seg.kind = data["kind"]
        if seg.kind == "dynamic":
            session.execute(delete(SegmentMember).where(SegmentMember.segment_id == seg.id))
            seg.snapshot_at = None
    session.flush()
    if seg.kind == "snapshot" and (data.get("query") is not None or data.get("kind") == "snapshot"
                                   or data.get("refresh_snapshot")):
        take_snapshot(session, org_id, seg, actor)
    return seg


def delete_segment(session: Session, org_id: str, seg: Segment) -> None:
    users = [s.name for s in session.scalars(select(Segment).where(Segment.org_id == org_id, Segment.id != seg.id))
             if seg.id in (s.references or [])]
    if users:
        raise Conflict(f"Other segments use this one: {', '.join(sorted(users)[:5])}.", field="segment_id")
    session.delete(seg)
    session.flush()


SNAPSHOT_CHUNK = 5000


def take_snapshot(session: Session, org_id: str, seg: Segment, actor: Actor) -> int:
    """Freeze the current members. The ids are read through the organization-scoped SELECT in
    keyset chunks and written in bulk: an ``INSERT ... SELECT`` would bypass the central tenant
    criteria, which apply to SELECT, UPDATE and DELETE statements only."""
    compiled = compiler.compile_query(session, org_id, language.validate(seg.query), segment_id=seg.id)
    session.execute(delete(SegmentMember).where(SegmentMember.segment_id == seg.id))
    table = SegmentMember.__table__
    n, after = 0, None
    while True:
        stmt = compiled.statement.order_by(Contact.id).limit(SNAPSHOT_CHUNK)
        if after is not None:
            stmt = stmt.where(Contact.id > after)
        ids = list(session.scalars(stmt))
        if not ids:
            break
        session.execute(table.insert(), [{"org_id": org_id, "segment_id": seg.id, "contact_id": cid} for cid in ids])
        n += len(ids)
        after = ids[-1]
        if len(ids) < SNAPSHOT_CHUNK:
            break
    seg.snapshot_at = clock.now()
    _audit_sensitive(session, org_id, compiled, actor, "snapshot", seg, count=n)
    _note_use(session, seg, actor, "snapshot", n)
    return n


def members(session: Session, org_id: str, seg: Segment, actor: Actor, *, after: str | None = None,
            limit: int = 100) -> tuple[list[str], str | None]:
    """A page of member ids (keyset pagination by id)."""
    limit = max(1, min(int(limit), MEMBERS_PAGE_MAX))
    if seg.kind == "snapshot":
        stmt = select(SegmentMember.contact_id).where(SegmentMember.segment_id == seg.id)
        if after:
            stmt = stmt.where(SegmentMember.contact_id > after)
        ids = list(session.scalars(stmt.order_by(SegmentMember.contact_id).limit(limit + 1)))
        compiled = None
    else:
        compiled = compile_for(session, org_id, seg.query, actor, segment=seg)
        stmt = compiled.statement
        if after:
            stmt = stmt.where(Contact.id > after)
        ids = list(session.scalars(stmt.order_by(Contact.id).limit(limit + 1)))
    more = len(ids) > limit
    ids = ids[:limit]
    record(session, org_id=org_id, actor_type=actor.kind, actor_id=actor.id, on_behalf_of=actor.on_behalf_of,
           action="segment.members", target_type="segment", target_id=seg.id,
           details={"returned": len(ids), "sensitive_categories": list(seg.sensitive_categories or [])},
           **(actor.context or {}))
    _note_use(session, seg, actor, "members", None)
    return ids, (ids[-1] if more and ids else None)


def _note_use(session: Session, seg: Segment, actor: Actor, purpose: str, n: int | None) -> None:
    session.add(SegmentUse(org_id=seg.org_id, segment_id=seg.id, actor_type=actor.kind, actor_id=actor.id,
                           purpose=purpose[:64], used_at=clock.now()))
    if n is not None:
        seg.last_count = n
        seg.last_evaluated_at = clock.now()
        _store_daily(session, seg, n)


def record_use(session: Session, seg: Segment, actor: Actor, purpose: str) -> None:
    """For callers above (campaigns, journeys): note that ``purpose`` used the segment."""
    _note_use(session, seg, actor, purpose, None)


def _store_daily(session: Session, seg: Segment, n: int) -> None:
    day = clock.now().date()
    row = session.scalar(select(SegmentDailyCount).where(SegmentDailyCount.segment_id == seg.id,
                                                         SegmentDailyCount.day == day))
    if row is None:
        session.add(SegmentDailyCount(org_id=seg.org_id, segment_id=seg.id, day=day, count=n))
    else:
        row.count = n


def record_daily_counts(session: Session, org_id: str) -> int:
    """Count every saved segment of the organization now and keep today's figure (run daily)."""
    done = 0
    for seg in session.scalars(select(Segment).where(Segment.org_id == org_id)).all():
        try:
            result = count(session, org_id, seg.query, SYSTEM, segment=seg)
        except (SegmentQueryError, NotFound):
            continue
        assert isinstance(result["count"], int)
        done += 1
    return done


def daily_counts(session: Session, seg: Segment, actor: Actor, days: int = 90) -> list[dict]:
    rows = session.scalars(select(SegmentDailyCount).where(SegmentDailyCount.segment_id == seg.id)
                           .order_by(SegmentDailyCount.day.desc()).limit(max(1, min(days, 3660))))
    return [{"day": r.day.isoformat(), "count": present_count(r.count, actor)} for r in reversed(list(rows))]


def uses(session: Session, seg: Segment, limit: int = 100) -> list[dict]:
    rows = session.scalars(select(SegmentUse).where(SegmentUse.segment_id == seg.id)
                           .order_by(SegmentUse.used_at.desc()).limit(max(1, min(limit, 1000))))
    return [{"actor_type": r.actor_type, "actor_id": r.actor_id, "purpose": r.purpose, "used_at": r.used_at.isoformat()}
            for r in rows]


# --------------------------------------------------------------------------- the field catalog


def field_catalog() -> dict:
    """Everything the language can ask, grouped for a builder's field picker."""
    demographic = [{"field": k, "type": t, "description": d, "ops": list(language.OPS_BY_TYPE[t])}
                   for k, (t, d) in language.CONTACT_FIELDS.items() if k != "stage"]
    demographic += [
        {"field": "attr.<key>", "type": "custom", "description": "A custom attribute, typed by its definition"},
        {"criterion": "birthday", "example": "birthday within 30 days"},
        {"criterion": "distance", "example": 'within 10 miles of zip "02139"'},
        {"criterion": "distance", "example": 'within 10 miles of location "Main Street Clinic"'},
    ]
    clinical = [{"criterion": "has", "kind": k, "qualifiers": list(language.QUALIFIERS.get(k, ())),
                 "example": f"has {k} within 12 months"} for k in language.CLINICAL_KINDS]
    clinical += [{"criterion": "last", "example": "last observation loinc:4548-4 > 8 within 12 months"},
                 {"criterion": "refill_due", "example": "refill due within 7 days"}]
    journey = [{"field": "stage", "type": "enum", "ops": list(language.TEXT_OPS),
                "description": language.CONTACT_FIELDS["stage"][1]},
               {"criterion": "stage_changed", "example": "stage changed within 30 days"}]
    engagement = [{"criterion": "has", "kind": k, "example": f"has at least 2 {k} within 30 days"}
                  for k in language.ENGAGEMENT_KINDS]
    consent = [{"criterion": "authorized", "example": "authorized for marketing"},
               {"criterion": "subscribed", "example": 'subscribed to "newsletter"'},
               {"criterion": "unsubscribed", "example": 'unsubscribed from "all" within 90 days'},
               {"criterion": "suppressed", "example": "suppressed"}]
    other = [{"criterion": "segment", "example": 'in segment "Diabetics 50+"'}]
    return {"demographic": demographic, "clinical": clinical, "journey": journey, "engagement": engagement,
            "consent": consent, "segments": other,
            "code_systems": sorted(language.CODE_SYSTEMS), "time_windows": ["within N unit", "in next N unit",
                                                                              "before DATE", "after DATE",
                                                                              "since DATE", "between DATE and DATE"],
            "units": sorted(set(language.UNITS.values())), "breakdowns": list(BREAKDOWNS)}

