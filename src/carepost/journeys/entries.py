"""Who enters a journey, who leaves it early: entries, re-entry, goals, waits for an event and the
exits on unsubscribe and revocation (issue 15 item 1).

* **Event entries, goals, waits** — :func:`on_contact_event` hears ``contact.event_recorded``
  (``tracking.conversions.record_event``: ``POST /api/v1/events`` and the ``ehr`` package's
  HL7/FHIR events) in the transaction that records the event. In order: the contact's open runs
  whose journey's goal is this event (and the event falls within ``goal.within_days`` of the
  run's entry) end as ``completed``/``goal`` with ``converted_at``; runs waiting for this event
  (``wait_event``) move to the step's ``next`` and are due now; every live journey whose entry is
  this event (and whose ``where`` matches the event's properties, decrypted in memory only when a
  ``where`` is given) starts a run. The event is the organization's own (``record_event`` resolved
  its contact within the organization), so another organization's patient starts nothing. A
  duplicate event (the same idempotency key) is not published again; a run's ``entry_key``
  (``event:<event id>``) is unique per journey and contact as a last guard.
* **Segment and date entries** — :func:`evaluate_due`, called by the tick, evaluates each live
  journey's entry at most every :data:`ENTRY_INTERVAL`, set-wise in SQL:

  - ``segment``: the contacts that joined the segment since the previous evaluation (at the
    first, every current member), from the journey's own member list
    (``models.JourneySegmentMember``: who left is removed, so leaving and coming back is a new
    join), admitted by the re-entry rule;
  - ``date``: rows whose date plus ``offset`` falls between the previous evaluation and
    :data:`HORIZON` ahead (``appointment.start`` per booked appointment, ``birth_date`` — each
    year with ``anniversary`` — ``last_visit`` (the latest encounter), ``refill_due`` per
    medication). The run is created at once and waits (``wake_at``) until that moment, at
    ``at`` in the contact's time zone when given. ``entry_key`` names the occurrence
    (``appt:<id>:<start>``, ``date:<day>``, ``refill:<id>:<day>``), so evaluating a window twice
    starts nothing twice. The first evaluation starts at the version's publication: occurrences
    already past are not started.
* **Re-entry** (``reentry.mode``): never (one run per contact, ever), after N days (since the
  previous run entered), always. In every mode a contact is in a journey at most once at a time
  (``active_key`` unique per journey).
* **Exits** — :func:`on_unsubscribed` (``consent.unsubscribed``): a contact's open runs of
  journeys with ``unsubscribe`` in ``exit_on`` end ``exited``/``unsubscribe`` when the opt-out is
  from the journey's topic, or from all marketing and the journey's purpose is one that opt-out
  covers (``opt_out_required``: marketing and other commercial purposes; a treatment journey such
  as an appointment reminder goes on, as its sends stay eligible); :func:`on_revoked` (``authorization.revoked``):
  runs of journeys with ``revocation`` in ``exit_on`` whose purpose the revoked authorization
  covered (or whose topic it named) end ``exited``/``revocation``. The send-time eligibility
  check refuses the next send anyway; these exits stop the rest of the run (notices, webhooks).

* **Screening due** — ``screening_due:<value set>`` date entries: the latest procedure or observation whose code is in that
  shipped value set (``segments/library/valuesets``: ``mammography``, ``colorectal_cancer_screening``,
  ``hba1c``...), plus ``offset`` as the screening interval (``2y``): the day the next one is due.
  A newer screening moves the anchor, so the occurrence (``screen:<set>:<day>``) is a new one;
  contacts never screened are not included.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta

from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.database import org_session, system_session
from carepost.core.ids import new_id
from carepost.core.logging import get_logger
from carepost.journeys.models import (
    OPEN_STATES,
    Journey,
    JourneyRun,
    JourneyRunStep,
    JourneyVersion,
)

log = get_logger("carepost.journeys.entries")

ENTRY_INTERVAL = timedelta(minutes=5)
HORIZON = timedelta(days=1)
INSERT_CHUNK = 1000
_PENDING = "carepost_journeys_advance_pending"


# --------------------------------------------------------------------------- live journeys


def live_journeys(session: Session, org_id: str) -> list[tuple[str, int, str, dict]]:
    """``[(journey id, version, version id, definition)]`` of the organization's live journeys."""
    from carepost.journeys.engine import definitions

    if session.info.get("org_id") == org_id:  # a scoped Core statement: no ORM cost (each HL7 group asks)
        from carepost.core.scoped_select import org_select

        if session.autoflush:
            session.flush()  # what an ORM query would have written first (a Core one does not)
        rows = org_select(session, _LIVE_JOURNEYS).all()
        if not rows:
            return []
    else:
        rows = session.execute(select(Journey.id, JourneyVersion.version, JourneyVersion.id).join(
            JourneyVersion, and_(JourneyVersion.journey_id == Journey.id,
                                 JourneyVersion.version == Journey.current_version))
            .where(Journey.org_id == org_id, Journey.status == "live")).all()
    defs = definitions(session, [r[2] for r in rows])
    return [(jid, ver, vid, defs.get(vid) or {}) for jid, ver, vid in rows]


_J, _JV, _JR = Journey.__table__, JourneyVersion.__table__, JourneyRun.__table__
# Core statements for :func:`carepost.core.scoped_select.org_select` (it adds the organization to
# every table, the joined one in its ON clause).
_LIVE_JOURNEYS = (
    select(_J.c.id, _JV.c.version, _JV.c.id)
    .select_from(_J.join(_JV, and_(_JV.c.journey_id == _J.c.id, _JV.c.version == _J.c.current_version)))
    .where(_J.c.status == "live")
)
_OPEN_RUNS_OF_CONTACTS = (
    select(_JR.c.id, _JR.c.version_id, _JR.c.step_id, _JR.c.seq, _JR.c.waiting_event, _JR.c.entered_at,
           _JR.c.journey_id, _JR.c.contact_id)
    .where(_JR.c.contact_id.in_(bindparam("contact_ids", expanding=True)),
           _JR.c.state.in_(bindparam("states", expanding=True)))
)


# --------------------------------------------------------------------------- starting runs


def _reentry_blocked(session: Session, journey_id: str, definition: dict, contact_ids: list[str],
                     now: datetime) -> set[str]:
    """Contacts the re-entry rule keeps out of ``journey_id`` now (an open run always does)."""
    rule = definition.get("reentry") or {}
    mode = rule.get("mode") or "never"
    blocked: set[str] = set()
    for i in range(0, len(contact_ids), INSERT_CHUNK):
        part = contact_ids[i:i + INSERT_CHUNK]
        rows = session.execute(select(JourneyRun.contact_id, func.max(JourneyRun.entered_at),
                                      func.max(JourneyRun.active_key)).where(
            JourneyRun.journey_id == journey_id, JourneyRun.contact_id.in_(part)).group_by(JourneyRun.contact_id))
        for cid, last, active in rows:
            if active is not None or mode == "never" or mode == "after" and last is not None and \
                    clock.aware(last) > now - timedelta(days=int(rule.get("days") or 1)):
                blocked.add(cid)
    return blocked


def _insert_ignore(session: Session, rows: list[dict]) -> int:
    """Insert runs, skipping any that a unique constraint refuses (an open run, the same entry)."""
    if not rows:
        return 0
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    n = 0
    for i in range(0, len(rows), INSERT_CHUNK):
        table = JourneyRun.__table__
        result = session.execute(dialect_insert(table).values(rows[i:i + INSERT_CHUNK]).on_conflict_do_nothing()
                                 .returning(table.c.id))
        n += len(result.fetchall())
    return n


def start_runs(session: Session, org_id: str, journey_id: str, version: int, version_id: str, definition: dict,
               entries: list[tuple[str, str, datetime]], now: datetime | None = None) -> int:
    """Start runs for ``[(contact id, entry key, wake at)]`` that the re-entry rules let in; how
    many started. Set-wise (one re-entry query per 1,000 contacts, one INSERT per 1,000 runs)."""
    now = clock.aware(now) if now else clock.now()
    if not entries:
        return 0
    blocked = _reentry_blocked(session, journey_id, definition, sorted({e[0] for e in entries}), now)
    seen: set[str] = set()
    rows = []
    for cid, key, wake in entries:
        if cid in blocked or cid in seen:
            continue
        seen.add(cid)
        rows.append({"id": new_id(), "org_id": org_id, "journey_id": journey_id, "version": version,
                     "version_id": version_id, "contact_id": cid, "state": "active" if wake <= now else "waiting",
                     "step_id": definition.get("start"), "wake_at": wake, "waiting_event": None, "seq": 0,
                     "variants": {}, "active_key": cid, "entry_key": key[:80], "lease_until": None,
                     "entered_at": now, "updated_at": now, "ended_at": None, "exit_reason": None,
                     "converted_at": None})
    return _insert_ignore(session, rows)


# --------------------------------------------------------------------------- events


def _where_matches(session: Session, event, where: dict | None) -> bool:
    if not where:
        return True
    from carepost.tracking.conversions import event_properties

    props = event_properties(session, event) or {}
    return all(props.get(k) == v for k, v in where.items())


def advance_after_commit(session: Session, org_id: str) -> None:
    """Queue the journeys task for ``org_id`` once the session commits (runs started or woken by
    an event go on at once instead of at the next minute's tick)."""
    from sqlalchemy import event as sa_event

    pending = session.info.setdefault(_PENDING, set())
    first = not pending
    pending.add(org_id)
    if first:
        sa_event.listen(session, "after_commit", _queue_pending, once=True)
        sa_event.listen(session, "after_rollback", _forget_pending, once=True)


def _forget_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


def _queue_pending(session: Session) -> None:
    orgs = session.info.pop(_PENDING, set())
    from carepost.journeys.tasks import advance

    for org_id in orgs:
        try:
            advance(org_id)
        except Exception as exc:  # noqa: BLE001 - the periodic tick advances them within a minute anyway
            log.warning("journeys_advance_not_queued", error_type=type(exc).__name__)


def end_runs(session: Session, run_ids: list[str], state: str, reason: str, now: datetime,
             converted: bool = False) -> int:
    if not run_ids:
        return 0
    values = {"state": state, "exit_reason": reason, "active_key": None, "ended_at": now, "wake_at": None,
              "waiting_event": None, "updated_at": now}
    if converted:
        values["converted_at"] = now
    return session.execute(update(JourneyRun).where(JourneyRun.id.in_(run_ids), JourneyRun.state.in_(OPEN_STATES))
                           .values(**values).execution_options(synchronize_session=False)).rowcount or 0


def on_contact_event(session: Session, event) -> dict:
    """``contact.event_recorded``: goals, waits for the event, event entries (module docstring)."""
    from carepost.journeys.engine import definitions

    org_id, cid, name = event.org_id, event.contact_id, event.name
    now = clock.now()
    occurred = clock.aware(event.occurred_at) if event.occurred_at else now
    result = {"goals": 0, "resumed": 0, "started": 0}
    if not cid:
        return result
    open_runs = session.execute(select(
        JourneyRun.id, JourneyRun.version_id, JourneyRun.step_id, JourneyRun.seq, JourneyRun.waiting_event,
        JourneyRun.entered_at, JourneyRun.journey_id).where(
        JourneyRun.org_id == org_id, JourneyRun.contact_id == cid, JourneyRun.state.in_(OPEN_STATES))).all()
    if open_runs:
        defs = definitions(session, [r[1] for r in open_runs])
        goal_ids = []
        for rid, vid, _sid, _seq, _waiting, entered, _jid in open_runs:
            goal = (defs.get(vid) or {}).get("goal") or {}
            entered = clock.aware(entered)
            if goal.get("event") == name and \
                    entered <= occurred + timedelta(minutes=1) and \
                    occurred <= entered + timedelta(days=int(goal.get("within_days") or 30)):
                goal_ids.append(rid)
        result["goals"] = end_runs(session, goal_ids, "completed", "goal", now, converted=True)
        for rid, vid, sid, seq, waiting, _entered, jid in open_runs:
            if rid in goal_ids or waiting != name:
                continue
            result["resumed"] += _resume_waiting(session, org_id, defs, rid, vid, sid, seq, jid, name, now)
    for journey_id, version, version_id, definition in live_journeys(session, org_id):
        entry = definition.get("entry") or {}
        if entry.get("type") != "event" or entry.get("event") != name:
            continue
        if not _where_matches(session, event, entry.get("where")):
            continue
        try:
            with session.begin_nested():
                result["started"] += start_runs(session, org_id, journey_id, version, version_id, definition,
                                                [(cid, f"event:{event.id}", now)], now)
        except IntegrityError:  # a concurrent start for the same contact won
            pass
    if result["resumed"] or result["started"]:
        session.flush()
        advance_after_commit(session, org_id)
    return result


def on_contact_events(session: Session, org_id: str, events: list) -> dict:
    """``contact.events_recorded``: :func:`on_contact_event` for a group of events, set-wise — one
    query for the open runs of all the group's contacts, the live journeys read once, one INSERT
    of the started runs per journey. Events of the same contact are taken in rounds (its first
    event in the first round, its second in the next...), so each sees what the one before it did
    (a run started by the first reaches its goal on the second), as one by one."""
    result = {"goals": 0, "resumed": 0, "started": 0}
    rounds: list[list] = []
    depth: dict[str, int] = {}
    for event in events:
        if not event.contact_id:
            continue
        n = depth.get(event.contact_id, 0)
        depth[event.contact_id] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(event)
    if not rounds:
        return result
    journeys = live_journeys(session, org_id)
    for group in rounds:
        for key, value in _events_round(session, org_id, group, journeys).items():
            result[key] += value
    if result["resumed"] or result["started"]:
        session.flush()
        advance_after_commit(session, org_id)
    return result


def _events_round(session: Session, org_id: str, events: list, journeys) -> dict:
    """One round of :func:`on_contact_events`: at most one event per contact."""
    from carepost.journeys.engine import definitions

    now = clock.now()
    result = {"goals": 0, "resumed": 0, "started": 0}
    by_contact = {e.contact_id: e for e in events}
    open_runs = []
    cids = sorted(by_contact)
    core = session.info.get("org_id") == org_id
    if core and session.autoflush:
        session.flush()  # the runs the round before changed, as an ORM query's autoflush would
    for i in range(0, len(cids), INSERT_CHUNK):
        if core:  # a scoped Core statement (core.scoped_select): the same rows without the ORM's cost
            from carepost.core.scoped_select import org_select

            open_runs += org_select(session, _OPEN_RUNS_OF_CONTACTS, {
                "contact_ids": cids[i:i + INSERT_CHUNK], "states": sorted(OPEN_STATES)}).all()
            continue
        open_runs += session.execute(select(
            JourneyRun.id, JourneyRun.version_id, JourneyRun.step_id, JourneyRun.seq, JourneyRun.waiting_event,
            JourneyRun.entered_at, JourneyRun.journey_id, JourneyRun.contact_id).where(
            JourneyRun.org_id == org_id, JourneyRun.contact_id.in_(cids[i:i + INSERT_CHUNK]),
            JourneyRun.state.in_(OPEN_STATES))).all()
    if open_runs:
        defs = definitions(session, sorted({r[1] for r in open_runs}))
        goal_ids = []
        for rid, vid, _sid, _seq, _waiting, entered, _jid, cid in open_runs:
            event = by_contact[cid]
            occurred = clock.aware(event.occurred_at) if event.occurred_at else now
            goal = (defs.get(vid) or {}).get("goal") or {}
            entered = clock.aware(entered)
            if goal.get("event") == event.name and entered <= occurred + timedelta(minutes=1) and \
                    occurred <= entered + timedelta(days=int(goal.get("within_days") or 30)):
                goal_ids.append(rid)
        result["goals"] = end_runs(session, goal_ids, "completed", "goal", now, converted=True)
        done = set(goal_ids)
        for rid, vid, sid, seq, waiting, _entered, jid, cid in open_runs:
            if rid in done or waiting != by_contact[cid].name:
                continue
            result["resumed"] += _resume_waiting(session, org_id, defs, rid, vid, sid, seq, jid, waiting, now)
    for journey_id, version, version_id, definition in journeys:
        entry = definition.get("entry") or {}
        if entry.get("type") != "event":
            continue
        entries = [(e.contact_id, f"event:{e.id}", now) for e in events
                   if e.name == entry.get("event") and _where_matches(session, e, entry.get("where"))]
        if not entries:
            continue
        try:
            with session.begin_nested():
                result["started"] += start_runs(session, org_id, journey_id, version, version_id, definition,
                                                entries, now)
        except IntegrityError:  # a concurrent start won: one by one, so the others still start
            for one in entries:
                try:
                    with session.begin_nested():
                        result["started"] += start_runs(session, org_id, journey_id, version, version_id,
                                                        definition, [one], now)
                except IntegrityError:
                    pass
    return result



def _resume_waiting(session: Session, org_id: str, defs: dict, rid: str, vid: str, sid: str, seq: int, jid: str,
                    event: str, now: datetime) -> int:
    """A run waiting at a ``wait_event`` step for ``event`` moves on to the step's ``next``
    (compare-and-set on its ``seq``, so a concurrent tick or a duplicate event moves it once).
    1 when it moved, else 0."""
    step = ((defs.get(vid) or {}).get("steps") or {}).get(sid) or {}
    if step.get("type") != "wait_event":
        return 0
    moved = session.execute(update(JourneyRun).where(
        JourneyRun.id == rid, JourneyRun.seq == seq, JourneyRun.waiting_event == event,
        JourneyRun.state == "waiting").values(
        step_id=step["next"], waiting_event=None, wake_at=now, state="active", seq=seq + 1, updated_at=now)
        .execution_options(synchronize_session=False)).rowcount
    if moved:
        session.add(JourneyRunStep(org_id=org_id, run_id=rid, journey_id=jid, version_id=vid, step_id=sid,
                                   step_type="wait_event", seq=seq + 1, status="done", reason="event", at=now))
    return 1 if moved else 0

def _contact_runs_of(session: Session, org_id: str, contact_id: str):
    from carepost.journeys.engine import definitions

    rows = session.execute(select(JourneyRun.id, JourneyRun.version_id).where(
        JourneyRun.org_id == org_id, JourneyRun.contact_id == contact_id, JourneyRun.state.in_(OPEN_STATES))).all()
    defs = definitions(session, [r[1] for r in rows])
    return [(rid, defs.get(vid) or {}) for rid, vid in rows]


def on_unsubscribed(session: Session, org_id: str, data: dict) -> int:
    """``consent.unsubscribed``: exit the contact's runs (module docstring)."""
    cid = (data or {}).get("contact_id")
    if not cid:
        return 0
    topic = data.get("topic_id")
    ids = [rid for rid, d in _contact_runs_of(session, org_id, cid)
           if "unsubscribe" in (d.get("exit_on") or ["unsubscribe", "revocation"])
           and (d.get("topic_id") == topic if topic is not None else _honors_marketing_opt_out(d))]
    return end_runs(session, ids, "exited", "unsubscribe", clock.now())


def _honors_marketing_opt_out(definition: dict) -> bool:
    """Whether an opt-out from all marketing stops this journey's sends — as the send-time
    eligibility check decides it (``opt_out_required`` of the purpose): a marketing journey ends,
    an appointment reminder (treatment) goes on."""
    from carepost.core import purposes
    from carepost.core.errors import ValidationFailed

    try:
        return purposes.requirements(definition.get("purpose") or "treatment").opt_out_required
    except ValidationFailed:  # an unknown purpose in an old version: end the run rather than keep sending
        return True


def on_revoked(session: Session, org_id: str, data: dict) -> int:
    """``authorization.revoked``: exit the contact's runs whose purpose or topic it covered."""
    cid = (data or {}).get("contact_id")
    if not cid:
        return 0
    purpose, topic = data.get("purpose"), data.get("topic_id")
    ids = [rid for rid, d in _contact_runs_of(session, org_id, cid)
           if "revocation" in (d.get("exit_on") or ["unsubscribe", "revocation"])
           and (purpose is None or d.get("purpose") == purpose or (topic and d.get("topic_id") == topic))]
    return end_runs(session, ids, "exited", "revocation", clock.now())


# --------------------------------------------------------------------------- segment and date entries


def _offset(text: str | None) -> tuple[int, str]:
    from carepost.journeys.schemas import parse_offset

    return parse_offset(text or "0d")


def shift(when: datetime, amount: int, unit: str) -> datetime:
    """``when`` moved by a signed offset (months and years by the calendar, the day clamped)."""
    if unit in ("mo", "y"):
        months = amount * (12 if unit == "y" else 1)
        y, m = divmod(when.month - 1 + months, 12)
        year, month = when.year + y, m + 1
        import calendar

        day = min(when.day, calendar.monthrange(year, month)[1])
        return when.replace(year=year, month=month, day=day)
    return when + {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1),
                   "w": timedelta(weeks=1)}[unit] * amount


def _to_datetime(value) -> datetime:
    if isinstance(value, datetime):
        return clock.aware(value)
    return clock.aware(datetime.combine(value, time(0, 0)))


def _fire_at(entry: dict, anchor, zones, cid: str, amount: int, unit: str) -> datetime:
    """The instant a contact's occurrence fires: anchor + offset, at ``at`` local time when given
    (date anchors without ``at``: midnight UTC of the day)."""
    fired = shift(_to_datetime(anchor), amount, unit)
    if entry.get("at"):
        hh, mm = (int(x) for x in entry["at"].split(":"))
        tz = zones.get(cid)
        fired = datetime.combine(fired.date(), time(hh, mm), tzinfo=tz).astimezone(clock.aware(fired).tzinfo)
    return fired


def date_candidates(session: Session, org_id: str, entry: dict, lo: datetime, hi: datetime) -> list[tuple[str, str, object]]:
    """``[(contact id, entry key, anchor)]`` whose anchor + offset falls in ``[lo, hi)`` (the
    local ``at`` may move it within its day: the window is widened by a day at each end and the
    exact instant checked after)."""
    from carepost.patients.models import Appointment, Contact, Encounter, Medication

    amount, unit = _offset(entry.get("offset"))
    a_lo, a_hi = shift(lo - timedelta(days=1), -amount, unit), shift(hi + timedelta(days=1), -amount, unit)
    fld = entry.get("field")
    s = session
    if fld == "appointment.start":
        rows = s.execute(select(Appointment.contact_id, Appointment.id, Appointment.start_at).where(
            Appointment.org_id == org_id, Appointment.status.in_(("booked", "pending", "proposed", "arrived")),
            Appointment.start_at >= a_lo, Appointment.start_at < a_hi))
        return [(cid, f"appt:{aid}:{clock.aware(start):%Y%m%d%H%M}", start) for cid, aid, start in rows]
    if fld == "refill_due":
        rows = s.execute(select(Medication.contact_id, Medication.id, Medication.next_refill_due).where(
            Medication.org_id == org_id, Medication.next_refill_due >= a_lo.date(),
            Medication.next_refill_due < a_hi.date() + timedelta(days=1)))
        return [(cid, f"refill:{mid}:{due:%Y%m%d}", due) for cid, mid, due in rows]
    if fld == "last_visit":
        last = func.max(Encounter.start_at)
        rows = s.execute(select(Encounter.contact_id, last).where(Encounter.org_id == org_id)
                         .group_by(Encounter.contact_id).having(and_(last >= a_lo, last < a_hi)))
        return [(cid, f"visit:{clock.aware(at):%Y%m%d}", at) for cid, at in rows]
    if fld == "birth_date":
        alive = Contact.deceased.is_(False)
        if not entry.get("anniversary"):
            rows = s.execute(select(Contact.id, Contact.birth_date).where(
                Contact.org_id == org_id, alive, Contact.birth_date >= a_lo.date(),
                Contact.birth_date < a_hi.date() + timedelta(days=1)))
            return [(cid, f"date:{born:%Y%m%d}", born) for cid, born in rows]
        # Each year: the month and day of birth, this year (29 February: 28 February otherwise).
        out = []
        day = a_lo.date()
        days = []
        while day <= a_hi.date():
            days.append(day)
            day += timedelta(days=1)
        pg = s.get_bind().dialect.name == "postgresql"
        md = (func.to_char(Contact.birth_date, "MM-DD") if pg else func.strftime("%m-%d", Contact.birth_date))
        wanted = {f"{d:%m-%d}": d for d in days}
        for d in days:
            if d.month == 2 and d.day == 28 and not _leap(d.year):
                wanted["02-29"] = d
        rows = s.execute(select(Contact.id, md).where(Contact.org_id == org_id, alive, md.in_(sorted(wanted))))
        for cid, mmdd in rows:
            d = wanted[mmdd]
            out.append((cid, f"date:{d:%Y%m%d}", d))
        return out
    if fld and fld.startswith("screening_due:"):
        key = fld.partition(":")[2]
        rows = _last_screenings(s, org_id, key, a_lo, a_hi)
        return [(cid, f"screen:{key[:40]}:{clock.aware(at):%Y%m%d}", at) for cid, at in rows]
    return []


def screening_value_set(key: str) -> dict | None:
    """The shipped value set a ``screening_due:<key>`` entry names (procedures or observations)."""
    from carepost.segments.library import shipped_value_set

    return shipped_value_set(key) if key else None


def _last_screenings(session: Session, org_id: str, key: str, a_lo: datetime, a_hi: datetime) -> list:
    """``[(contact id, when)]``: living contacts whose latest procedure or observation in the value
    set ``key`` (codes verified at import) was in ``[a_lo, a_hi)`` — set-wise, one query. A later
    screening moves the anchor (and so the occurrence); a contact never screened has none."""
    from sqlalchemy import literal_column, or_, union_all

    from carepost.patients.models import Contact, Observation, Procedure
    from carepost.segments.library import sql_terms

    value_set = screening_value_set(key)
    if value_set is None:
        return []
    terms = sql_terms(value_set)

    def coded(model):
        clauses = []
        for system, t in terms.items():
            alts = ([model.code.in_(t["codes"])] if t["codes"] else []) + [model.code.like(p) for p in t["like"]]
            if alts:
                clauses.append(and_(model.code_system == system, or_(*alts)))
        return or_(*clauses) if clauses else literal_column("1") == 0

    procs = select(Procedure.contact_id.label("cid"), Procedure.performed_start.label("at")).where(
        Procedure.org_id == org_id, Procedure.code_verified.is_(True), Procedure.performed_start.is_not(None),
        coded(Procedure))
    obs = select(Observation.contact_id.label("cid"), Observation.effective_at.label("at")).where(
        Observation.org_id == org_id, Observation.code_verified.is_(True), Observation.effective_at.is_not(None),
        coded(Observation))
    both = union_all(procs, obs).subquery()
    last = func.max(both.c.at)
    rows = session.execute(select(both.c.cid, last).join(Contact, Contact.id == both.c.cid).where(
        Contact.org_id == org_id, Contact.deceased.is_(False)).group_by(both.c.cid)
        .having(and_(last >= a_lo, last < a_hi))).all()
    return [(cid, at) for cid, at in rows]


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def evaluate_entry(session: Session, org_id: str, journey_id: str, version: int, version_id: str,
                   definition: dict, lo: datetime, now: datetime) -> int:
    """Start the runs a segment or date entry admits between ``lo`` and now (+ the horizon)."""
    from carepost.journeys import steps

    entry = definition.get("entry") or {}
    kind = entry.get("type")
    if kind == "segment":
        ctx = steps.Context(session, org_id, now)
        joined = _segment_joins(session, org_id, journey_id, set(_segment_ids(ctx, entry["segment_id"])))
        return start_runs(session, org_id, journey_id, version, version_id, definition,
                          [(cid, f"segment:{now:%Y%m%d%H%M%S%f}", now) for cid in sorted(joined)], now)
    if kind != "date":
        return 0
    hi = now + HORIZON
    found = date_candidates(session, org_id, entry, lo, hi)
    if not found:
        return 0
    amount, unit = _offset(entry.get("offset"))
    zones = {}
    if entry.get("at"):
        ctx = steps.Context(session, org_id, now)
        zones = steps.contact_zones(ctx, sorted({c for c, _, _ in found}))
    admitted = []
    for cid, key, anchor in found:
        at = _fire_at(entry, anchor, zones, cid, amount, unit)
        if lo <= at < hi:
            admitted.append((cid, key, max(at, now)))
    return start_runs(session, org_id, journey_id, version, version_id, definition, admitted, now)


def _segment_joins(session: Session, org_id: str, journey_id: str, members: set[str]) -> set[str]:
    """Contacts that joined the segment since the last evaluation (all members at the first);
    the journey's member list is brought up to date (who left removed, who joined added)."""
    from sqlalchemy import delete

    from carepost.campaigns.planning import write_rows
    from carepost.journeys.models import JourneySegmentMember

    m = JourneySegmentMember
    before = set(session.scalars(select(m.contact_id).where(m.org_id == org_id, m.journey_id == journey_id)))
    joined, left = members - before, sorted(before - members)
    for i in range(0, len(left), INSERT_CHUNK):
        session.execute(delete(m).where(m.org_id == org_id, m.journey_id == journey_id,
                                        m.contact_id.in_(left[i:i + INSERT_CHUNK]))
                        .execution_options(synchronize_session=False))
    rows = [{"id": new_id(), "org_id": org_id, "journey_id": journey_id, "contact_id": cid} for cid in sorted(joined)]
    for i in range(0, len(rows), 20_000):
        write_rows(session, m.__table__, rows[i:i + 20_000])
    return joined


def _segment_ids(ctx, segment_id: str) -> list[str]:
    from carepost.patients.models import Contact
    from carepost.segments import compiler
    from carepost.segments import service as segments
    from carepost.segments.models import SegmentMember

    seg = segments.get_segment(ctx.session, ctx.org_id, segment_id)
    if seg.kind == "snapshot":
        return list(ctx.session.scalars(select(SegmentMember.contact_id).where(SegmentMember.segment_id == seg.id)))
    stmt = compiler.compile_query(ctx.session, ctx.org_id, segments.read_query(seg.query), ctx.now,
                                  segment_id=seg.id).statement
    return list(ctx.session.scalars(stmt.where(Contact.org_id == ctx.org_id)))


def evaluate_due(org_id: str | None = None, now: datetime | None = None, *, force: bool = False) -> int:
    """Evaluate every live journey's segment or date entry not evaluated in the last
    :data:`ENTRY_INTERVAL` (``force``: all of them); how many runs started."""
    now = clock.aware(now) if now else clock.now()
    with system_session() as session:
        q = select(Journey.org_id, Journey.id, JourneyVersion.version, JourneyVersion.id, JourneyVersion.published_at,
                   JourneyVersion.entry_evaluated_at).join(
            JourneyVersion, and_(JourneyVersion.journey_id == Journey.id, JourneyVersion.version == Journey.current_version)
        ).where(Journey.status == "live")
        if org_id:
            q = q.where(Journey.org_id == org_id)
        rows = session.execute(q).all()
        session.commit()
    started = 0
    for oid, jid, ver, vid, published, evaluated in rows:
        if not force and evaluated is not None and clock.aware(evaluated) > now - ENTRY_INTERVAL:
            continue
        with org_session(oid) as session:
            from carepost.journeys.engine import definitions

            definition = definitions(session, [vid]).get(vid) or {}
            if (definition.get("entry") or {}).get("type") not in ("segment", "date"):
                session.rollback()
                continue
            # Compare-and-set on the evaluation time: two ticks never evaluate one window twice.
            cur = session.execute(select(JourneyVersion.entry_evaluated_at).where(JourneyVersion.id == vid)).scalar()
            if cur != evaluated:
                session.rollback()
                continue
            lo = clock.aware(evaluated or published or now)
            n = evaluate_entry(session, oid, jid, ver, vid, definition, lo, now)
            session.execute(update(JourneyVersion).where(JourneyVersion.id == vid).values(
                entry_evaluated_at=now, entry_state={"last_started": n})
                .execution_options(synchronize_session=False))
            session.commit()
            started += n
    return started
