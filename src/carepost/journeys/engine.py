"""The journeys engine: the tick that advances due runs, set-wise, in chunks (issue 15 item 2).

A run (``models.JourneyRun``) is due when it is open (active | waiting), its ``wake_at`` has
passed and its journey is ``live`` (a paused journey neither admits nor advances runs).
:func:`run_tick` takes the organizations with due runs and, per organization, chunks of at most
``chunk`` due runs, each chunk in **one transaction**:

1. **claim** — ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL (two workers never take the
   same run; a second tick skips what the first holds), SQLite's single writer elsewhere (every
   transaction begins IMMEDIATE, so two ticks run one after the other and the second no longer
   finds the runs the first moved);
2. **waves** — the chunk's runs are grouped by (version, step) and each group's step runs once
   for the whole group (one eligibility check, one render and one message store for a send
   group; one query for a branch condition...), :mod:`carepost.journeys.steps`. Runs that moved
   to a step that needs no waiting go round again, up to :data:`MAX_WAVES` steps per run per tick;
3. **write** — one INSERT of the ``journey_run_steps`` rows (unique per run, step and ``seq``)
   and one UPDATE of the runs (by primary key, executemany), then COMMIT; the messages of the
   send steps were stored in the same transaction and are handed to delivery after it.

Why a kill -9 anywhere neither skips nor repeats a send: the send step's message, its step row
and the run's move to the next step commit together or not at all. Killed before the commit,
nothing of the chunk happened and the next tick claims the same runs again (the locks of a dead
connection are released by the database). Killed after the commit but before the messages were
queued for delivery, delivery's own sweep queues stored messages that have no task
(``delivery.tasks.deliver_due``). A send's message also carries the idempotency key
``journey:<run>:<step>:<seq>``, a second guard by the messages' unique (organization, key).

Publishing a new version (``service.publish``) moves open runs to the new version when its
``migration_mode`` is ``migrate`` and their current step exists there; otherwise they drain on
the version they entered: the engine always executes a run's step from the run's own
``version_id``.

Time: every stored time is UTC; ``wait_until`` computes the next allowed local time in the
contact's own time zone (``contacts.time_zone``, else the organization's default time zone of
the consent settings, else UTC) — as campaigns' local-time schedules do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.database import org_session, system_session
from carepost.core.logging import get_logger
from carepost.journeys.models import (
    OPEN_STATES,
    Journey,
    JourneyRun,
    JourneyRunStep,
    JourneyVersion,
)

log = get_logger("carepost.journeys.engine")

CHUNK = 500
MAX_WAVES = 50  # steps one run may take in one tick (a validated cycle always holds a wait)


@dataclass
class TickReport:
    organizations: int = 0
    chunks: int = 0
    runs: int = 0  # runs advanced
    steps: int = 0  # steps executed
    sent: int = 0  # messages stored
    excluded: int = 0  # sends refused by eligibility
    ended: int = 0  # runs that ended (completed, exited, failed)
    entered: int = 0  # runs started by segment and date entries
    seconds: float = 0.0
    message_ids: list[str] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return (f"{self.runs} runs advanced, {self.steps} steps, {self.sent} sent, {self.excluded} excluded, "
                f"{self.ended} ended, {self.entered} entered in {self.seconds:.2f} s")


@dataclass
class Run:
    """A claimed run, in memory while its chunk is advanced."""

    id: str
    org_id: str
    journey_id: str
    version: int
    version_id: str
    contact_id: str
    state: str
    step_id: str | None
    seq: int
    variants: dict
    waiting_event: str | None
    entered_at: datetime
    # set by the steps
    wake_at: datetime | None = None
    ended: str | None = None  # completed | exited | failed
    exit_reason: str | None = None
    parked: bool = False


# --------------------------------------------------------------------------- definitions

_definitions: dict[str, dict] = {}  # version id -> definition (published versions never change)


def definitions(session: Session, version_ids) -> dict[str, dict]:
    wanted = set(version_ids)
    out = {v: _definitions[v] for v in wanted if v in _definitions}
    missing = [v for v in wanted if v not in out]
    if missing:
        for vid, definition, published in session.execute(select(
                JourneyVersion.id, JourneyVersion.definition, JourneyVersion.published_at)
                .where(JourneyVersion.id.in_(missing))):
            out[vid] = definition or {}
            if published is not None:  # a draft (never run by the tick) may still change: not kept
                _definitions[vid] = out[vid]
    return out


def forget_definitions() -> None:
    _definitions.clear()


# --------------------------------------------------------------------------- the tick


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def due_organizations(now: datetime | None = None) -> list[str]:
    now = clock.aware(now) if now else clock.now()
    with system_session() as session:
        orgs = list(session.scalars(select(JourneyRun.org_id).where(
            JourneyRun.state.in_(OPEN_STATES), JourneyRun.wake_at <= now).distinct()))
        session.commit()
    return orgs


def run_tick(org_id: str | None = None, *, now: datetime | None = None, chunk: int = CHUNK,
             max_seconds: float | None = None, entries: bool = True, enqueue: bool = True) -> TickReport:
    """Evaluate segment and date entries that are due (``entries``), then advance every due run
    of ``org_id`` (all organizations when None), chunk by chunk, for at most ``max_seconds``.
    The messages stored are handed to delivery (``enqueue``)."""
    started = time.monotonic()
    report = TickReport()
    if entries:
        from carepost.journeys import entries as journey_entries

        report.entered = journey_entries.evaluate_due(org_id=org_id, now=now)
        requeue_lost(now)
    orgs = [org_id] if org_id else due_organizations(now)
    for oid in orgs:
        report.organizations += 1
        while True:
            n = advance_chunk(oid, now=now, limit=chunk, report=report, enqueue=enqueue)
            if n < chunk or (max_seconds is not None and time.monotonic() - started >= max_seconds):
                break
        if max_seconds is not None and time.monotonic() - started >= max_seconds:
            break
    report.seconds = time.monotonic() - started
    if report.runs or report.entered:
        log.info("journeys_tick", runs_count=report.runs, steps_count=report.steps, sent_count=report.sent,
                 excluded_count=report.excluded, ended_count=report.ended, entered_count=report.entered,
                 seconds=round(report.seconds, 3))
    return report


HANDOFF_GRACE = timedelta(seconds=60)


def requeue_lost(now: datetime | None = None) -> int:
    """Hand to delivery again the journey messages still ``queued`` a minute after they were
    stored: a worker killed between a chunk's commit and its hand-off to delivery left them
    without a task. Delivery's own sweep would find them after ``pipeline.REQUEUE_AFTER`` (ten
    minutes); the minute tick does it sooner. Queuing a message twice is harmless: delivery claims
    each recipient before sending (a lease), so a second task finds nothing to do."""
    from carepost.delivery import pipeline
    from carepost.delivery.models import Message, MessageRecipient

    now = clock.aware(now) if now else clock.now()
    with system_session() as session:
        ids = list(session.scalars(select(Message.id).join(MessageRecipient, MessageRecipient.message_id == Message.id)
                                   .where(Message.source == "journey", MessageRecipient.status == "queued",
                                          MessageRecipient.enqueued_at < now - HANDOFF_GRACE,
                                          MessageRecipient.enqueued_at > now - pipeline.REQUEUE_AFTER)
                                   .distinct().limit(10_000)))
        session.commit()
    if ids:
        from carepost.delivery.tasks import enqueue_delivery

        log.info("journeys_messages_requeued", messages_count=len(ids))
        enqueue_delivery(ids)
    return len(ids)


def _claim(session: Session, org_id: str, now: datetime, limit: int) -> list[Run]:
    j = JourneyRun
    stmt = (select(j.id, j.org_id, j.journey_id, j.version, j.version_id, j.contact_id, j.state, j.step_id, j.seq,
                   j.variants, j.waiting_event, j.entered_at)
            .join(Journey, Journey.id == j.journey_id)
            .where(j.org_id == org_id, j.wake_at <= now, j.state.in_(OPEN_STATES), Journey.status == "live")
            .order_by(j.wake_at).limit(limit))
    if is_postgres(session):
        stmt = stmt.with_for_update(of=j, skip_locked=True)
    return [Run(*row[:9], dict(row[9] or {}), row[10], row[11]) for row in session.execute(stmt)]


_RUN_COLUMNS = ("step_id", "seq", "variants", "state", "waiting_event", "wake_at", "updated_at", "lease_until",
                "active_key", "ended_at", "exit_reason")


def _write(session: Session, org_id: str, step_rows: list[dict], changes: list[dict]) -> None:
    """The chunk's step rows (COPY on PostgreSQL, one executemany on SQLite) and the runs' moves
    (one executemany UPDATE by id, within the organization), Core statements: no ORM unit of work."""
    from sqlalchemy import bindparam

    from carepost.campaigns.planning import write_rows

    write_rows(session, JourneyRunStep.__table__, step_rows)
    t = JourneyRun.__table__
    ended = [c for c in changes if "ended_at" in c]
    going = [c for c in changes if "ended_at" not in c]
    for rows, columns in ((going, _RUN_COLUMNS[:8]), (ended, _RUN_COLUMNS)):
        if not rows:
            continue
        stmt = (update(t).where(t.c.id == bindparam("b_id"), t.c.org_id == org_id)
                .values({c: bindparam(f"b_{c}") for c in columns}))
        session.connection().execute(stmt, [{"b_id": r["id"], **{f"b_{c}": r.get(c) for c in columns}} for r in rows])


def advance_chunk(org_id: str, *, now: datetime | None = None, limit: int = CHUNK, report: TickReport | None = None,
                  enqueue: bool = True) -> int:
    """Claim and advance one chunk of ``org_id``'s due runs in one transaction; how many runs."""
    from carepost.journeys import steps

    now = clock.aware(now) if now else clock.now()
    report = report if report is not None else TickReport()
    with org_session(org_id) as session:
        runs = _claim(session, org_id, now, limit)
        if not runs:
            session.rollback()
            return 0
        ctx = steps.Context(session, org_id, now)
        defs = definitions(session, [r.version_id for r in runs])
        step_rows: list[dict] = []
        pending = runs
        for _wave in range(MAX_WAVES):
            if not pending:
                break
            groups: dict[tuple[str, str | None], list[Run]] = {}
            for r in pending:
                groups.setdefault((r.version_id, r.step_id), []).append(r)
            pending = []
            for (vid, sid), group in groups.items():
                definition = defs.get(vid) or {}
                step = (definition.get("steps") or {}).get(sid) if sid else None
                if step is None:
                    outcomes = {r.id: steps.Outcome.end("failed", "failed:unknown_step") for r in group}
                    stype = "unknown"
                else:
                    stype = step.get("type", "unknown")
                    outcomes = steps.execute(ctx, definition, vid, sid, step, group)
                for r in group:
                    out = outcomes[r.id]
                    r.seq += 1
                    step_rows.append({"id": steps.new_id(), "org_id": org_id, "run_id": r.id,
                                      "journey_id": r.journey_id, "version_id": vid, "step_id": (sid or "")[:64],
                                      "step_type": stype[:16], "seq": r.seq, "status": out.status,
                                      "reason": (out.reason or None) and out.reason[:64], "message_id": out.message_id,
                                      "at": now})
                    if out.kind == "next":
                        r.step_id = out.next_step
                        r.waiting_event = None
                        pending.append(r)
                    elif out.kind == "wait":
                        r.step_id = out.next_step
                        r.wake_at = out.wake_at
                        r.waiting_event = out.waiting_event
                        r.state = "waiting"
                        r.parked = True
                    else:
                        r.ended, r.exit_reason = out.state, out.exit_reason
                        r.state = out.state
                        r.parked = True
        for r in pending:  # more steps than one tick takes: go on at the next one
            r.wake_at, r.state = now, "active"
        changes = []
        for r in runs:
            row = {"id": r.id, "step_id": r.step_id, "seq": r.seq, "variants": r.variants, "state": r.state,
                   "waiting_event": r.waiting_event, "wake_at": r.wake_at, "updated_at": now, "lease_until": None}
            if r.ended:
                row.update(active_key=None, ended_at=now, exit_reason=r.exit_reason, wake_at=None,
                           waiting_event=None)
            changes.append(row)
        _write(session, org_id, step_rows, changes)
        session.commit()
        message_ids = list(ctx.message_ids)
    if message_ids and enqueue:
        from carepost.delivery.tasks import enqueue_delivery

        enqueue_delivery(message_ids)
    report.chunks += 1
    report.runs += len(runs)
    report.steps += len(step_rows)
    report.sent += len(message_ids)
    report.excluded += ctx.excluded
    report.ended += sum(1 for r in runs if r.ended)
    report.message_ids.extend(message_ids)
    return len(runs)
