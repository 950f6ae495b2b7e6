"""Journeys, their published versions, the runs of patients through them and the steps executed.

* ``Journey`` — the program (name, status draft | live | paused | archived, ``current_version``:
  the version new runs enter). Its name is a label staff give; it is not meant to hold PHI.
* ``JourneyVersion`` — one version's ``definition`` (JSON, the shape of docs/journeys.md: ids,
  field names and codes only, no PHI), immutable once ``published_at`` is set.
  ``migration_mode`` says what publishing this version does to runs of older versions:
  ``migrate`` (a run moves to the step with the same id in this version; a run whose step is gone
  here drains on its old version) or ``drain`` (runs finish on the version they entered).
  ``entry_evaluated_at``/``entry_state`` are the engine's bookkeeping for segment and date entries.
* ``JourneyRun`` — one patient's run: state (active | waiting | completed | exited | failed),
  current ``step_id``, ``wake_at`` (the tick takes runs whose ``wake_at`` is due), the event a
  ``wait_event`` step waits for, the split variants chosen, ``seq`` (steps executed so far, the
  idempotency counter), ``lease_until`` (a tick's claim, on both databases) and the exit reason
  (goal | unsubscribe | revocation | exit_step | timeout | removed | failed:<code>).
  ``active_key`` is the contact id while the run is active or waiting and NULL once it ended:
  unique with the journey, so a contact is never in one journey twice at the same time (NULLs
  are distinct on both databases). ``entry_key`` (unique with journey and contact) names what
  made the contact enter — an event's id, a date occurrence — so a duplicate event or a second
  evaluation of the same date starts nothing twice.
* ``JourneyRunStep`` — one row per step executed: ``(run_id, step_id, seq)`` unique. A send
  step's row and its message are inserted in one transaction, so a crash either left both or
  neither (``message_id`` links them). ``status``: done | sent | excluded | failed;
  ``reason``: the eligibility reason code of an excluded send, the branch case or split variant
  taken, ``timeout`` for a wait_event that timed out.

Messages sent by journeys carry ``source="journey"`` and the rollup dimension
``journey_step_id`` = :func:`step_key` of (version id, step id): a stable 32-hex id (the composite
"<version id>:<step id>" does not fit the rollups' 32 characters).
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id

JOURNEY_STATUSES = ("draft", "live", "paused", "archived")
MIGRATION_MODES = ("drain", "migrate")
RUN_STATES = ("active", "waiting", "completed", "exited", "failed")
OPEN_STATES = ("active", "waiting")
EXIT_REASONS = ("goal", "unsubscribe", "revocation", "exit_step", "timeout", "removed", "failed")
STEP_STATUSES = ("done", "sent", "excluded", "failed")


def step_key(version_id: str, step_id: str) -> str:
    """The rollup dimension ``journey_step_id`` of one step of one version (32 hex characters)."""
    return hashlib.sha256(f"{version_id}:{step_id}".encode()).hexdigest()[:32]


class Journey(OrgScoped, Base):
    __tablename__ = "journeys"
    __table_args__ = (Index("ix_journeys_org_status", "org_id", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(10), default="draft")
    current_version: Mapped[int | None] = mapped_column(Integer)  # the live version new runs enter
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class JourneyVersion(OrgScoped, Base):
    __tablename__ = "journey_versions"
    __table_args__ = (UniqueConstraint("journey_id", "version", name="uq_journey_versions_version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    journey_id: Mapped[str] = mapped_column(String(32), ForeignKey("journeys.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict] = mapped_column(JSON)
    migration_mode: Mapped[str] = mapped_column(String(8), default="drain")  # drain | migrate
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    published_at: Mapped[datetime | None]
    published_by: Mapped[str | None] = mapped_column(String(32))
    approved_by: Mapped[str | None] = mapped_column(String(32))
    approved_at: Mapped[datetime | None]
    # The engine's bookkeeping for segment and date entries (last evaluation; cursor of a long one).
    entry_evaluated_at: Mapped[datetime | None]
    entry_state: Mapped[dict | None] = mapped_column(JSON)


class JourneyRun(OrgScoped, Base):
    __tablename__ = "journey_runs"
    __table_args__ = (
        # The tick's claim: an open run has a wake_at, an ended one none (every path that ends a
        # run clears it), so "due" is one range per organization on this index.
        Index("ix_journey_runs_due", "org_id", "wake_at"),
        Index("ix_journey_runs_journey_state", "org_id", "journey_id", "state", "step_id"),
        Index("ix_journey_runs_contact", "org_id", "contact_id", "state"),
        UniqueConstraint("journey_id", "active_key", name="uq_journey_runs_active"),
        UniqueConstraint("journey_id", "contact_id", "entry_key", name="uq_journey_runs_entry"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    journey_id: Mapped[str] = mapped_column(String(32), ForeignKey("journeys.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    version_id: Mapped[str] = mapped_column(String(32), ForeignKey("journey_versions.id", ondelete="CASCADE"))
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(10), default="active")
    step_id: Mapped[str | None] = mapped_column(String(64))
    wake_at: Mapped[datetime | None]
    waiting_event: Mapped[str | None] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer, default=0)
    variants: Mapped[dict] = mapped_column(JSON, default=dict)  # split step id -> variant name
    active_key: Mapped[str | None] = mapped_column(String(32))  # contact_id while open, NULL once ended
    entry_key: Mapped[str] = mapped_column(String(80))
    lease_until: Mapped[datetime | None]
    entered_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)
    ended_at: Mapped[datetime | None]
    exit_reason: Mapped[str | None] = mapped_column(String(40))
    converted_at: Mapped[datetime | None]  # the goal was met


class JourneyRunStep(OrgScoped, Base):
    __tablename__ = "journey_run_steps"
    __table_args__ = (
        UniqueConstraint("run_id", "step_id", "seq", name="uq_journey_run_steps_seq"),
        Index("ix_journey_run_steps_version_step", "org_id", "version_id", "step_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("journey_runs.id", ondelete="CASCADE"), index=True)
    journey_id: Mapped[str] = mapped_column(String(32))
    version_id: Mapped[str] = mapped_column(String(32))
    step_id: Mapped[str] = mapped_column(String(64))
    step_type: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(10), default="done")
    reason: Mapped[str | None] = mapped_column(String(64))
    message_id: Mapped[str | None] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(default=clock.now)


class JourneySegmentMember(OrgScoped, Base):
    """Who was in a segment-entry journey's segment at its last evaluation: a contact *joins* when
    it is a member now and was not then (``entries.evaluate_entry``); one who leaves is removed,
    so leaving and joining again is a new join (the re-entry rule then decides)."""

    __tablename__ = "journey_segment_members"
    __table_args__ = (UniqueConstraint("journey_id", "contact_id", name="uq_journey_segment_members_contact"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    journey_id: Mapped[str] = mapped_column(String(32), ForeignKey("journeys.id", ondelete="CASCADE"))
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"))
