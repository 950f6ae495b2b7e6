"""The retention purge (issue 16 items 1, 2 and 4): delete what passed its maximum period, in
chunks, resumable; destroy the per-period keys of what is gone (crypto-shredding); write a
signed destruction certificate and the audit events.

Set-based deletes: the purge removes rows of several capabilities' tables (messages and their
recipients, events, attachments, links and engagement; portal messages; form submissions;
imports; engagement events; webhook and inbound report logs) with one DELETE per table and chunk,
addressing the tables by name through the metadata instead of each owner's service (a
per-record service call would make a million-message purge take hours). Foreign keys with
``ON DELETE CASCADE`` remove whatever else hangs off a deleted row. Authorizations (with their
scans) and policy versions and acknowledgements are deleted the same way, counted from when they
were last in effect. Two classes go through their owner instead: inactive contacts through
``patients.service.delete_contacts`` (a chunk at a time, set-based; its deletion hooks keep
opt-outs and suppressions; one ``contact.delete`` audit event per contact), audit
events through :mod:`carepost.audit.pruning` (only from the chain's start, with a signed anchor
so the remainder still verifies).

Safety:

* **one purge at a time per organization** — the ``running`` :class:`PurgeRun` row is the lock
  (a partial unique index); a second start is refused with :class:`Conflict`;
* **nothing half-deleted** — each chunk (a message with all its dependants) is deleted in one
  transaction together with the run's progress counts; a kill -9 loses at most the chunk in
  flight, which rolls back whole;
* **resumable** — a run whose process died (no heartbeat for ``stale_seconds``) is taken over
  by the next start (compare-and-set on the heartbeat) and continues with the cutoff it began
  with; its counts carry on;
* **legal holds win** — rows a protecting hold covers are never selected (see
  :func:`carepost.retention.service.hold_filter`), and a period key is destroyed only when no
  row of its class and month (with a day's margin each side) is left in the database;
* **no lock that stalls sending** — chunks are small, ordered by the creation-time index, and
  only expired rows (no sender touches them) are locked.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import (
    String,
    and_,
    any_,
    bindparam,
    delete,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.audit import pruning
from carepost.core import clock
from carepost.core.crypto import (
    PERIOD_KEY_CLASSES,
    PERIOD_KEY_KIND,
    OrgKey,
    get_keyring,
    period_of_key_version,
)
from carepost.core.database import Base, org_session, read_only_session
from carepost.core.errors import Conflict, NotFound
from carepost.core.ids import is_id, new_id
from carepost.core.logging import get_logger
from carepost.retention import held, service
from carepost.retention.models import DestructionCertificate, PurgeRun

log = get_logger("carepost.retention")

CHUNK = 2000
STALE_SECONDS = 120
CERT_KEY_KIND = "retcert"  # the organization's Ed25519 seed for destruction certificates (a named secret)


@dataclass(frozen=True)
class Target:
    table: str
    time_column: str  # the record's own date (date range holds test it)
    children: tuple[tuple[str, str], ...] = ()  # (table, column naming the parent id), deleted first
    key_class: str | None = None  # per-period keys of this class are destroyed when their month is gone
    # When the record stopped being in effect, if not its own date (HIPAA documentation is kept six
    # years "from the date of its creation or the date when it last was in effect", 164.316(b)(2)(i)):
    # ``ended(table)`` is a SQL expression, NULL while the record is still in effect (never purged).
    ended: Callable | None = None
    # Rows the deleted rows referenced, deleted with them once nothing else references them:
    # (table, column of this table holding their id) — an authorization's scanned paper form.
    referenced: tuple[tuple[str, str], ...] = ()
    in_effect_for: timedelta = timedelta(0)  # how long after its date the record stays in effect


def _authorization_ended(t):
    """Revoked, expired, or its expiration event recorded; NULL while it is in effect."""
    return func.coalesce(t.c.revoked_at, t.c.expiration_event_at, t.c.expires_at)


def _policy_superseded(t):
    """Retired, or the publication of the next version of the same key; NULL while current."""
    newer = t.alias("newer")
    return func.coalesce(t.c.retired_at, select(func.min(newer.c.published_at)).where(
        newer.c.org_id == t.c.org_id, newer.c.key == t.c.key, newer.c.version > t.c.version).scalar_subquery())


# An acknowledgement counts for the organization's acknowledgement period, at most 365 days
# (compliance.training.update_settings refuses more): it was last in effect a year after it was made.
ACKNOWLEDGEMENT_IN_EFFECT = timedelta(days=366)



_MESSAGE_CHILDREN = (
    ("engagement_events", "message_id"), ("engagement_counts", "message_id"), ("archive_terms", "message_id"),
    ("message_links", "message_id"), ("sandbox_captures", "message_id"), ("message_events", "message_id"),
    ("message_attachments", "message_id"), ("portal_messages", "message_id"), ("message_recipients", "message_id"),
)
TARGETS: dict[str, tuple[Target, ...]] = {
    "messages": (Target("messages", "created_at", _MESSAGE_CHILDREN, key_class="messages"),),
    "portal": (Target("portal_messages", "created_at"),),
    "forms": (Target("form_submissions", "created_at"),),
    "imports": (Target("import_jobs", "created_at"),),
    "events": (Target("engagement_events", "occurred_at"),),
    "logs": (Target("webhook_events", "created_at"), Target("inbound_reports", "received_at"),
             Target("dmarc_reports", "received_at"), Target("tls_reports", "received_at")),
    "authorizations": (Target("authorizations", "signed_at", ended=_authorization_ended,
                              referenced=(("authorization_scans", "scan_id"),)),),
    "policies": (Target("policy_documents", "published_at", ended=_policy_superseded),
                 Target("policy_acknowledgements", "acknowledged_at", in_effect_for=ACKNOWLEDGEMENT_IN_EFFECT)),
}
# Classes purged by their own step rather than table deletes: contacts through the patients
# service (its deletion hooks keep opt-outs as blind indexes), audit events from the chain's
# start only (carepost.audit.pruning). Contacts go before authorizations (deleting a contact
# clears their authorizations' contact_id, not the evidence); audit last.
ORDER = ("messages", "portal", "forms", "imports", "events", "logs", "contacts", "authorizations", "policies", "audit")


def _table(name: str):
    return Base.metadata.tables.get(name)


def _ts(value) -> str | None:
    return clock.aware(value).isoformat() if value is not None else None


def _expired_query(session: Session, org_id: str, target: Target, cutoff: datetime, holds):
    """``(condition, table, expiry expression)``: the target's rows past ``cutoff`` that no hold
    covers (condition None: an organization-wide hold covers them all)."""
    t = _table(target.table)
    col = target.ended(t) if target.ended else t.c[target.time_column]
    conds = [t.c.org_id == org_id, col < cutoff - target.in_effect_for]
    contact_ids_of = None
    if target.table == "messages":
        r = _table("message_recipients")

        def contact_ids_of(patients):
            return exists().where(r.c.message_id == t.c.id, r.c.contact_id.in_(patients))
    held = service.hold_filter(holds, t, time_column=t.c[target.time_column], contact_ids_of=contact_ids_of)
    if held is None:
        return None, t, col
    return and_(*conds, *held), t, col


def _cutoff(sched, now: datetime) -> datetime:
    """Records whose date is before this are past the schedule's maximum. Contacts: their last
    activity must be older than both ``inactive_months`` (calendar months) and ``max_days``."""
    cutoff = now - timedelta(days=sched.max_days)
    if sched.record_class == "contacts" and sched.inactive_months:
        y, m = divmod(now.year * 12 + now.month - 1 - sched.inactive_months, 12)
        day = min(now.day, calendar.monthrange(y, m + 1)[1])
        cutoff = min(cutoff, now.replace(year=y, month=m + 1, day=day))
    return cutoff


# --------------------------------------------------------------------------- inactive contacts

# Tables whose rows name a contact but are not the contact's activity.
_NOT_ACTIVITY = frozenset({"legal_holds"})
_ACTIVITY_COLUMNS = ("updated_at", "occurred_at", "received_at", "created_at", "signed_at", "disclosed_at")


def _inactive_contacts(org_id: str, cutoff: datetime, holds):
    """``(condition, contacts table)``: contacts created and last changed before ``cutoff`` of whom
    no row of any table naming them (messages addressed to them, events, form submissions,
    authorizations, clinical facts, journey runs, ...) is newer, and whom no hold covers: a
    patient or organization hold, a date range hold by creation date, or a message or campaign
    hold on a message addressed to them. None: an organization-wide hold."""
    c = _table("contacts")
    held = service.hold_filter(holds, c, time_column=c.c.created_at, contact_ids_of=lambda patients: c.c.id.in_(patients))
    if held is None:
        return None, c
    conds = [c.c.org_id == org_id, c.c.created_at < cutoff, c.c.updated_at < cutoff, *held]
    for name, t in sorted(Base.metadata.tables.items()):
        if name == "contacts" or name in _NOT_ACTIVITY or "contact_id" not in t.c:
            continue
        col = next((t.c[n] for n in _ACTIVITY_COLUMNS if n in t.c), None)
        if col is not None:
            conds.append(~exists().where(t.c.contact_id == c.c.id, col >= cutoff))
    r, m = _table("message_recipients"), _table("messages")
    messages = [h.message_id for h in holds if h.scope == "message"]
    if messages:
        conds.append(~exists().where(r.c.contact_id == c.c.id, r.c.message_id.in_(messages)))
    campaigns = [h.campaign_id for h in holds if h.scope == "campaign"]
    if campaigns:
        conds.append(~exists().where(r.c.contact_id == c.c.id, r.c.message_id == m.c.id, m.c.campaign_id.in_(campaigns)))
    return and_(*conds), c


def _contacts_chunk(s: Session, org_id: str, cutoff: datetime, holds, chunk: int, actor: service.Actor,
                    run_id: str) -> _Chunk:
    """One chunk of inactive contacts, set-based: ``patients.service.delete_contacts`` (one
    statement per table for the chunk; its deletion hooks keep opt-outs as suppressions by blind
    index and authorizations without the contact) and one ``contact.delete`` audit event per
    contact — the same event as a deletion through the API — appended together (one INSERT); all in the
    chunk's transaction with the run's progress (a kill -9 rolls the whole chunk back)."""
    from carepost.audit.service import append_many
    from carepost.patients.service import delete_contacts

    cond, c = _inactive_contacts(org_id, cutoff, holds)
    out = _Chunk()
    if cond is None:
        return out
    rows = s.execute(select(c.c.id, c.c.created_at).where(cond).order_by(c.c.created_at, c.c.id).limit(chunk)).all()
    if not rows:
        return out
    results = {r.contact_id: r for r in delete_contacts(s, org_id, [row[0] for row in rows])}
    ctx = actor.context or {}
    append_many(s, [{  # in the chunk's order; id and counts only, none of the deleted PHI
        "org_id": org_id, "actor_type": actor.kind, "actor_id": actor.id, "action": "contact.delete",
        "target_type": "contact", "target_id": contact_id, "ip": ctx.get("ip"), "user_agent": ctx.get("user_agent"),
        "request_id": ctx.get("request_id"),
        "details": {"removed": results[contact_id].removed, "kept_index_kinds": sorted(results[contact_id].kept_indexes),
                    "via": "retention.purge", "purge_run": run_id}}
        for contact_id, _created in rows if contact_id in results])
    out.count = len(results)
    out.first, out.last = rows[0][1], rows[-1][1]
    return out


# --------------------------------------------------------------------------- audit events


def _audit_keep(org_id: str, holds, dialect: str) -> pruning.Keep:
    """What of the audit chain a hold keeps: every event about a held patient, message or campaign
    or about one of their records (:func:`carepost.retention.held.audit_condition` — a message
    sent to the held patient, its recipients and portal message, their form submissions,
    authorizations, exports naming them, ...), events within a held date range; everything for an
    organization hold."""
    events = _table("audit_events")
    return pruning.Keep(
        everything=any(h.scope == "organization" for h in holds),
        targets=frozenset(filter(None, (h.contact_id or h.message_id or h.campaign_id for h in holds))),
        days=tuple((h.starts_on, h.ends_on) for h in holds if h.scope == "date_range"),
        about=held.audit_condition(held.Held.of(org_id, holds), events, dialect))


def _dialect(s: Session) -> str:
    return s.get_bind().dialect.name


def _audit_chunk(s: Session, org_id: str, cutoff: datetime, holds, chunk: int) -> _Chunk:
    got = pruning.remove_oldest(s, org_id, cutoff, _audit_keep(org_id, holds, _dialect(s)), limit=chunk)
    return _Chunk(count=got.count, first=got.first, last=got.last)


# --------------------------------------------------------------------------- dry run


def _add_to_plan(entry: dict, count, held, first, last) -> None:
    entry["count"] += count or 0
    entry["held"] += held or 0
    if first is not None:
        entry["date_from"] = min(filter(None, [entry["date_from"], _ts(first)]))
        entry["date_to"] = max(filter(None, [entry["date_to"], _ts(last)]))


def plan(session: Session, org_id: str) -> dict:
    """What a purge would do now, deleting nothing: per class the records past their maximum,
    how many a hold keeps, their date range, and the period keys that would be destroyed."""
    holds = service.protecting_holds(session, org_id)
    now = clock.now()
    out = {"organization_id": org_id, "as_of": now.isoformat(), "holds_in_force": len(holds), "classes": []}
    for record_class in ORDER:
        sched = service.get_schedule(session, org_id, record_class)
        if sched is None or not sched.enabled:
            continue
        cutoff = _cutoff(sched, now)
        entry = {"record_class": record_class, "cutoff": cutoff.isoformat(), "max_days": sched.max_days,
                 "count": 0, "held": 0, "date_from": None, "date_to": None, "keys_to_destroy": []}
        add = partial(_add_to_plan, entry)

        if record_class == "contacts":
            c = _table("contacts")
            everyone, _c = _inactive_contacts(org_id, cutoff, [])
            total = session.scalar(select(func.count()).where(everyone)) or 0
            cond, _c = _inactive_contacts(org_id, cutoff, holds)
            if cond is None:
                add(0, total, None, None)
            else:
                count, first, last = session.execute(select(func.count(), func.min(c.c.created_at),
                                                            func.max(c.c.created_at)).where(cond)).one()
                add(count, total - (count or 0), first, last)
        elif record_class == "audit":
            everyone = pruning.removable_through(session, org_id, cutoff)
            through = pruning.removable_through(session, org_id, cutoff, _audit_keep(org_id, holds, _dialect(session)))
            anchor = pruning.get_anchor(session, org_id)
            start = anchor.seq if anchor else 0
            first, last = pruning.time_span(session, org_id, start + 1, through)
            add(through - start, everyone - through, first, last)
        for target in TARGETS.get(record_class, ()):
            if _table(target.table) is None:
                continue
            cond, t, col = _expired_query(session, org_id, target, cutoff, holds)
            total = session.scalar(select(func.count()).select_from(t).where(
                t.c.org_id == org_id, col < cutoff - target.in_effect_for)) or 0
            if cond is None:
                add(0, total, None, None)
                continue
            count, first, last = session.execute(select(func.count(), func.min(col), func.max(col)).where(cond)).one()
            add(count, total - (count or 0), first, last)
            if target.key_class:
                entry["keys_to_destroy"] = [p for p, _v in _shreddable(session, org_id, target, cutoff, cond)]
        out["classes"].append(entry)
    return out


# --------------------------------------------------------------------------- the run


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"


def start_run(org_id: str, actor: service.Actor, *, stale_seconds: float = STALE_SECONDS) -> tuple[str, str]:
    """Take the organization's purge lock: a new run, or the takeover of a run whose process died
    (no heartbeat for ``stale_seconds``). Returns ``(run id, owner)``. A live run: ``Conflict``."""
    owner = _owner()
    with org_session(org_id) as s:
        run = PurgeRun(org_id=org_id, started_by=actor.id, owner=owner, status="running", progress={})
        try:
            with s.begin_nested():
                s.add(run)
                s.flush()
        except IntegrityError:
            current = s.scalars(select(PurgeRun).where(PurgeRun.org_id == org_id, PurgeRun.status == "running")).first()
            if current is None:
                raise Conflict("Another purge of this organization just started; try again.", field="purge") from None
            beat = clock.aware(current.heartbeat_at)
            if (clock.now() - beat).total_seconds() < stale_seconds:
                service._audit(s, org_id, actor, "retention.purge_started", "purge_run", current.id,
                               {"refused": "another purge is running"}, outcome="denied")
                s.commit()
                raise Conflict(f"A purge of this organization is already running (run {current.id}, started "
                               f"{_ts(current.started_at)}, last progress {_ts(current.heartbeat_at)}). Only one purge "
                               f"runs at a time; a run whose process died is resumed after {int(stale_seconds)} s "
                               f"without progress.", field="purge") from None
            taken = s.execute(update(PurgeRun).where(PurgeRun.id == current.id, PurgeRun.status == "running",
                                                     PurgeRun.heartbeat_at == current.heartbeat_at)
                              .values(owner=owner, heartbeat_at=clock.now(), resumed=PurgeRun.resumed + 1)).rowcount
            if not taken:
                raise Conflict("Another process resumed the stopped purge first.", field="purge") from None
            service._audit(s, org_id, actor, "retention.purge_resumed", "purge_run", current.id,
                           {"previous_owner_silent_since": _ts(beat)})
            s.commit()
            return current.id, owner
        service._audit(s, org_id, actor, "retention.purge_started", "purge_run", run.id, {})
        s.commit()
        return run.id, owner


@dataclass
class _Chunk:
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    keys: list[str] = field(default_factory=list)


def _load_run(s: Session, run_id: str, owner: str) -> PurgeRun:
    run = s.get(PurgeRun, run_id)
    if run is None or run.status != "running" or run.owner != owner:
        raise Conflict("This purge run was taken over by another process.", field="purge")
    return run


def _delete_chunk(s: Session, org_id: str, target: Target, cond, col, t, chunk: int) -> _Chunk:
    refs = [t.c[column] for _table_name, column in target.referenced]
    rows = s.execute(select(t.c.id, col, *refs).where(cond).order_by(col, t.c.id).limit(chunk)).all()
    out = _Chunk()
    if not rows:
        return out
    ids = [r[0] for r in rows]
    if s.get_bind().dialect.name == "postgresql":
        # One array parameter instead of thousands of bound values (their rendering cost more
        # client CPU than the deletes).
        bound = bindparam("ids", ids, type_=ARRAY(String(32)))

        def among(col):
            return col == any_(bound)
    else:
        def among(col):
            return col.in_(ids)
    for child, fk in target.children:
        ct = _table(child)
        if ct is not None:
            s.execute(delete(ct).where(ct.c.org_id == org_id, among(ct.c[fk])))
    out.count = s.execute(delete(t).where(t.c.org_id == org_id, among(t.c.id))).rowcount
    for i, (ref_table, column) in enumerate(target.referenced):
        rt = _table(ref_table)
        gone = sorted({r[2 + i] for r in rows if r[2 + i] is not None})
        if rt is not None and gone:  # unless a remaining row still references it
            s.execute(delete(rt).where(rt.c.org_id == org_id, rt.c.id.in_(gone),
                                       ~exists().where(t.c[column] == rt.c.id)))
    out.first, out.last = rows[0][1], rows[-1][1]
    return out


def _shreddable(session: Session, org_id: str, target: Target, cutoff: datetime, cond=None) -> list[tuple[str, int]]:
    """Period keys of ``target.key_class`` whose whole month (plus a day each side) is before
    ``cutoff`` and of which no row is left — or, for a dry run (``cond`` given), none would be
    left after purging the rows ``cond`` selects. ``[(\"messages 2026-01\", version)]``."""
    code = PERIOD_KEY_CLASSES[target.key_class]
    versions = session.scalars(select(OrgKey.version).where(
        OrgKey.org_id == org_id, OrgKey.kind == PERIOD_KEY_KIND, OrgKey.retired_at.is_(None),
        OrgKey.version >= code * 1_000_000, OrgKey.version < (code + 1) * 1_000_000)).all()
    t = _table(target.table)
    col = t.c[target.time_column]
    tz = clock.now().tzinfo
    out = []
    for v in sorted(versions):
        _cls, year, month = period_of_key_version(v)
        start = datetime(year, month, 1, tzinfo=tz)
        end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=tz)
        lo, hi = start - timedelta(days=1), end + timedelta(days=1)
        if hi > cutoff:
            continue
        left = select(t.c.id).where(t.c.org_id == org_id, col >= lo, col < hi)
        if cond is not None:
            left = left.where(~cond)
        if session.execute(left.limit(1)).first() is None:
            out.append((f"{target.key_class} {year:04d}-{month:02d}", v))
    return out


def _steps(org_id: str, record_class: str, cutoff: datetime, chunk: int, actor: service.Actor, run_id: str):
    """``[(target or None, step)]`` of a class: ``step(session, holds)`` deletes one chunk in the
    session's transaction (the caller commits it with the run's progress) and returns it."""
    if record_class == "contacts":
        return [(None, lambda s, holds: _contacts_chunk(s, org_id, cutoff, holds, chunk, actor, run_id))]
    if record_class == "audit":
        return [(None, lambda s, holds: _audit_chunk(s, org_id, cutoff, holds, chunk))]

    def table_step(target):
        def step(s, holds):
            cond, t, col = _expired_query(s, org_id, target, cutoff, holds)
            if cond is None:  # an organization-wide hold: nothing of it goes
                return _Chunk()
            return _delete_chunk(s, org_id, target, cond, col, t, chunk)
        return step

    return [(target, table_step(target)) for target in TARGETS.get(record_class, ()) if _table(target.table) is not None]


def run_purge(org_id: str, actor: service.Actor, *, chunk: int = CHUNK, pause: float = 0.0,
              duty: float | None = None, stale_seconds: float = STALE_SECONDS, progress=None) -> dict:
    """Purge everything of ``org_id`` past its maximum period (a resumed run keeps its cutoffs),
    destroy the period keys of months now empty, sign the certificate. Returns the run as a dict
    with its certificate. ``pause``: seconds to sleep between chunks (throttle on a busy
    database). ``duty``: the share of wall time the purge may work (0 < duty <= 1, default
    ``CAREPOST_RETENTION_PURGE_DUTY``): after a chunk that took ``t`` seconds it rests
    ``t * (1 - duty) / duty``, so it yields the CPU and the database to sending in proportion to
    its own cost, whatever the machine. ``progress(record_class, deleted_so_far)`` is called after
    each chunk."""
    if duty is None:
        from carepost.core.config import get_settings

        duty = get_settings().retention_purge_duty
    if not 0 < duty <= 1:
        raise ValueError("duty: must be more than 0 and at most 1")
    rest_per_busy = (1 - duty) / duty
    run_id, owner = start_run(org_id, actor, stale_seconds=stale_seconds)
    try:
        for record_class in ORDER:
            with org_session(org_id) as s:
                sched = service.get_schedule(s, org_id, record_class)
                run = _load_run(s, run_id, owner)
                state = dict(run.progress or {})
                entry = state.get(record_class)
                if entry is None and (sched is None or not sched.enabled):
                    continue
                if entry is None:  # first visit: fix the cutoff for the whole run (a resume keeps it)
                    entry = {"count": 0, "first": None, "last": None, "keys": [], "done": False,
                             "cutoff": _cutoff(sched, clock.now()).isoformat(),
                             "max_days": sched.max_days, "min_days": sched.min_days,
                             "inactive_months": sched.inactive_months,
                             "configured_by": sched.configured_by, "configured_at": _ts(sched.configured_at)}
                    state[record_class] = entry
                    run.progress = state
                    s.commit()
                if entry.get("done"):
                    continue
            cutoff = datetime.fromisoformat(entry["cutoff"])
            for target, step in _steps(org_id, record_class, cutoff, chunk, actor, run_id):
                while True:
                    started = time.monotonic()
                    with org_session(org_id) as s:
                        run = _load_run(s, run_id, owner)
                        got = step(s, service.protecting_holds(s, org_id))
                        if not got.count:  # done, or an organization-wide hold keeps the rest
                            s.rollback()
                            break
                        state = dict(run.progress)
                        e = dict(state[record_class])
                        e["count"] += got.count
                        e["first"] = min(filter(None, [e["first"], _ts(got.first)]))
                        e["last"] = max(filter(None, [e["last"], _ts(got.last)]))
                        state[record_class] = e
                        run.progress, run.heartbeat_at = state, clock.now()
                        s.commit()
                        total = e["count"]
                    if progress is not None:
                        progress(record_class, total)
                    rest = pause + (time.monotonic() - started) * rest_per_busy
                    if rest:
                        time.sleep(rest)
                if target is not None and target.key_class:
                    _shred(org_id, run_id, owner, record_class, target, cutoff)
            with org_session(org_id) as s:
                run = _load_run(s, run_id, owner)
                state = dict(run.progress)
                state[record_class] = {**state[record_class], "done": True}
                run.progress, run.heartbeat_at = state, clock.now()
                s.commit()
        return _finish(org_id, run_id, owner, actor)
    except Conflict:
        raise
    except Exception as exc:
        with org_session(org_id) as s:
            s.execute(update(PurgeRun).where(PurgeRun.id == run_id, PurgeRun.owner == owner, PurgeRun.status == "running")
                      .values(status="failed", failure=type(exc).__name__, finished_at=clock.now()))
            service._audit(s, org_id, actor, "retention.purge_failed", "purge_run", run_id,
                           {"error": type(exc).__name__}, outcome="failure")
            s.commit()
        raise


def _shred(org_id: str, run_id: str, owner: str, record_class: str, target: Target, cutoff: datetime) -> None:
    with org_session(org_id) as s:
        run = _load_run(s, run_id, owner)
        destroyed = []
        for label, version in _shreddable(s, org_id, target, cutoff):
            if get_keyring().destroy_period_key(s, org_id, version):
                destroyed.append(label)
        if destroyed:
            state = dict(run.progress)
            e = dict(state[record_class])
            e["keys"] = sorted(set(e.get("keys", [])) | set(destroyed))
            state[record_class] = e
            run.progress, run.heartbeat_at = state, clock.now()
        s.commit()


# --------------------------------------------------------------------------- certificates


def _signing_key(session: Session, org_id: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(get_keyring().named_key(session, org_id, CERT_KEY_KIND))


def public_key_b64(session: Session, org_id: str) -> str:
    raw = _signing_key(session, org_id).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _finish(org_id: str, run_id: str, owner: str, actor: service.Actor) -> dict:
    with org_session(org_id) as s:
        run = _load_run(s, run_id, owner)
        now = clock.now()
        classes = []
        for record_class, e in (run.progress or {}).items():
            label = service.RECORD_CLASSES[record_class][0]
            method = "deleted" + (" and crypto-shredded" if e.get("keys") else "")
            extra = {}
            if record_class == "audit":  # where the chain now starts: verification begins there
                extra["audit_anchor"] = pruning.anchor_dict(pruning.get_anchor(s, org_id))
                method = "deleted from the start of the audit chain (verification starts at the signed anchor)"
            schedule = {"min_days": e["min_days"], "max_days": e["max_days"],
                        "configured_by": e["configured_by"], "configured_at": e["configured_at"]}
            if e.get("inactive_months"):
                schedule["inactive_months"] = e["inactive_months"]
            classes.append({"record_class": record_class, "label": label, "count": e["count"],
                            "date_from": e["first"], "date_to": e["last"], "method": method,
                            "keys_destroyed": e.get("keys", []), "cutoff": e["cutoff"], "schedule": schedule, **extra})
            service._audit(s, org_id, actor, "retention.purged", "purge_run", run.id,
                           {"record_class": record_class, "count": e["count"], "date_from": e["first"],
                            "date_to": e["last"], "method": method, "keys_destroyed": e.get("keys", []),
                            "configured_by": e["configured_by"], **extra})
        document = {"type": "carepost.destruction_certificate", "version": 1, "organization_id": org_id,
                    "run_id": run.id, "run_by": run.started_by, "started_at": _ts(run.started_at),
                    "finished_at": now.isoformat(), "resumed": run.resumed, "classes": classes,
                    "holds_in_force": len(service.protecting_holds(s, org_id))}
        body = canonical(document)
        key = _signing_key(s, org_id)
        cert = DestructionCertificate(org_id=org_id, run_id=run.id, document=body.decode(),
                                      signature=base64.b64encode(key.sign(body)).decode(),
                                      public_key=public_key_b64(s, org_id))
        s.add(cert)
        run.status, run.finished_at, run.heartbeat_at = "finished", now, now
        s.flush()
        service._audit(s, org_id, actor, "retention.purge_finished", "purge_run", run.id,
                       {"certificate_id": cert.id, "certificate_sha256": hashlib.sha256(body).hexdigest(),
                        "records": sum(c["count"] for c in classes)})
        s.commit()
        log.info("retention purge finished", extra={"run_id": run.id, "records": sum(c["count"] for c in classes)})
        return run_dict(run, cert)


def run_dict(run: PurgeRun, cert: DestructionCertificate | None = None) -> dict:
    return {"id": run.id, "status": run.status, "started_by": run.started_by, "started_at": _ts(run.started_at),
            "finished_at": _ts(run.finished_at), "heartbeat_at": _ts(run.heartbeat_at), "resumed": run.resumed,
            "progress": run.progress or {}, "failure": run.failure,
            "certificate_id": cert.id if cert is not None else None}


def list_runs(session: Session, org_id: str, limit: int = 50) -> list[dict]:
    runs = session.scalars(select(PurgeRun).where(PurgeRun.org_id == org_id)
                           .order_by(PurgeRun.started_at.desc()).limit(limit)).all()
    certs = {c.run_id: c for c in session.scalars(select(DestructionCertificate).where(
        DestructionCertificate.org_id == org_id, DestructionCertificate.run_id.in_([r.id for r in runs])))}
    return [run_dict(r, certs.get(r.id)) for r in runs]


def certificate_bundle(session: Session, org_id: str, run_id: str) -> dict:
    """The downloadable signed certificate: the document, its Ed25519 signature over the canonical
    JSON, and the public key (compare it with the organization's published key)."""
    cert = session.scalars(select(DestructionCertificate).where(DestructionCertificate.org_id == org_id,
                                                               DestructionCertificate.run_id == run_id)).first() \
        if is_id(run_id) else None
    if cert is None:
        raise NotFound("No certificate for this purge run (unknown run, or not finished).")
    return {"certificate": json.loads(cert.document), "canonical_json": cert.document,
            "algorithm": "Ed25519", "signature": cert.signature, "public_key": cert.public_key,
            "canonicalization": "JSON with sorted keys, separators ',' and ':', UTF-8; the signature covers canonical_json"}


def verify_bundle(bundle: dict, expected_public_key: str | None = None) -> tuple[bool, str]:
    """Offline check of a downloaded certificate (no database, no CarePost keys)."""
    try:
        body = bundle["canonical_json"].encode()
        if json.loads(body) != bundle["certificate"]:
            return False, "the certificate differs from the signed canonical JSON"
        if expected_public_key and bundle["public_key"] != expected_public_key:
            return False, "signed with another key than the organization's"
        Ed25519PublicKey.from_public_bytes(base64.b64decode(bundle["public_key"])).verify(
            base64.b64decode(bundle["signature"]), body)
    except Exception as exc:  # noqa: BLE001 - any failure is "not valid", with its reason
        return False, f"signature not valid ({type(exc).__name__})"
    return True, "signature valid"


def running_run(org_id: str) -> dict | None:
    with read_only_session(org_id) as s:
        run = s.scalars(select(PurgeRun).where(PurgeRun.org_id == org_id, PurgeRun.status == "running")).first()
        return run_dict(run) if run else None
