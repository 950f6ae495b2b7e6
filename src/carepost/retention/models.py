"""Tables of retention (issue 16 items 1-3): schedules per record class, legal holds, purge runs
(their progress, so a killed purge resumes) and destruction certificates."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id


class RetentionSchedule(OrgScoped, Base):
    """How long one record class is kept: at least ``min_days`` (nothing may purge it earlier),
    at most ``max_days`` (the purge removes it after). ``inactive_months`` is for the contacts
    class only. Who configured it is recorded (it goes on every destruction certificate)."""

    __tablename__ = "retention_schedules"
    __table_args__ = (UniqueConstraint("org_id", "record_class"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    record_class: Mapped[str] = mapped_column(String(32))
    min_days: Mapped[int] = mapped_column(Integer)
    max_days: Mapped[int] = mapped_column(Integer)
    inactive_months: Mapped[int | None] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    configured_by: Mapped[str | None] = mapped_column(String(64))
    configured_at: Mapped[datetime] = mapped_column(default=clock.now)


class LegalHold(OrgScoped, Base):
    """A legal hold: records in its scope are never purged while it is not released.

    ``status``: ``pending`` (placed, waiting for a second person's approval — it already protects),
    ``active`` (approved), ``release_pending`` (release asked, still protecting), ``released``
    (release approved by a second person). Reason and matter name are free text the officer
    writes; they must not hold PHI (the API says so) and are kept in clear for the audit."""

    __tablename__ = "legal_holds"
    __table_args__ = (Index("ix_legal_holds_org_status", "org_id", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    scope: Mapped[str] = mapped_column(String(16))  # patient | campaign | message | date_range | organization
    contact_id: Mapped[str | None] = mapped_column(String(32), index=True)
    campaign_id: Mapped[str | None] = mapped_column(String(32))
    message_id: Mapped[str | None] = mapped_column(String(32))
    starts_on: Mapped[date | None] = mapped_column(Date)
    ends_on: Mapped[date | None] = mapped_column(Date)
    matter: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    placed_by: Mapped[str] = mapped_column(String(64))
    placed_at: Mapped[datetime] = mapped_column(default=clock.now)
    approved_by: Mapped[str | None] = mapped_column(String(64))
    approved_at: Mapped[datetime | None]
    release_requested_by: Mapped[str | None] = mapped_column(String(64))
    release_requested_at: Mapped[datetime | None]
    release_reason: Mapped[str | None] = mapped_column(Text)
    released_by: Mapped[str | None] = mapped_column(String(64))  # who approved the release
    released_at: Mapped[datetime | None]


class PurgeRun(OrgScoped, Base):
    """One purge of an organization. ``status='running'`` is unique per organization (a partial
    unique index): that row is the lock that refuses a second purge. ``progress`` is updated in
    the same transaction as each chunk's deletes, so after a kill -9 the counts are exact and the
    run resumes where it stopped (``heartbeat_at`` older than the stale bound lets a new process
    take it over)."""

    __tablename__ = "retention_purge_runs"
    __table_args__ = (
        Index("ux_retention_purge_running", "org_id", unique=True,
              postgresql_where=text("status = 'running'"), sqlite_where=text("status = 'running'")),
        Index("ix_retention_purge_runs_org_started", "org_id", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | finished | failed
    started_by: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=clock.now)
    heartbeat_at: Mapped[datetime] = mapped_column(default=clock.now)
    owner: Mapped[str | None] = mapped_column(String(64))  # host:pid of the process running it
    resumed: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)  # {class: {count, first, last, cutoff, keys}}
    finished_at: Mapped[datetime | None]
    failure: Mapped[str | None] = mapped_column(Text)


class DestructionCertificate(OrgScoped, Base):
    """The signed record of one finished purge run (JSON, Ed25519; verifiable offline)."""

    __tablename__ = "retention_certificates"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(String(32), unique=True)
    document: Mapped[str] = mapped_column(Text)  # canonical JSON that was signed
    signature: Mapped[str] = mapped_column(String(200))  # base64 Ed25519 signature of ``document``
    public_key: Mapped[str] = mapped_column(String(100))  # base64 raw Ed25519 public key
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
