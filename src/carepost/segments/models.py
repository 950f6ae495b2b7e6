"""Saved segments, their snapshots, daily counts and uses, and user-created value sets.

A segment stores its query as the JSON tree of :mod:`carepost.segments.language` (never SQL):
the compiler turns it into one statement each time it is evaluated. A *snapshot* segment also
keeps its frozen member list (:class:`SegmentMember`) with the date it was taken. None of these
tables hold PHI values: ids, counts, codes and the query (which holds criteria, not patients).
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import JSON, Boolean, Date, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id

SEGMENT_KINDS = ("dynamic", "snapshot")


class Segment(OrgScoped, Base):
    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(2000), default="")
    owner_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(10), default="dynamic")  # dynamic | snapshot
    query: Mapped[dict] = mapped_column(JSON)
    query_text: Mapped[str] = mapped_column(Text)
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    sensitive_categories: Mapped[list] = mapped_column(JSON, default=list)
    references: Mapped[list] = mapped_column(JSON, default=list)  # ids of segments it uses
    snapshot_at: Mapped[datetime | None]
    last_count: Mapped[int | None] = mapped_column(Integer)
    last_evaluated_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class SegmentMember(OrgScoped, Base):
    """One contact of a snapshot segment, frozen when the snapshot was taken."""

    __tablename__ = "segment_members"
    __table_args__ = (Index("ix_segment_members_contact", "org_id", "contact_id"),)

    segment_id: Mapped[str] = mapped_column(String(32), ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True)
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)


class SegmentDailyCount(OrgScoped, Base):
    """The member count of a segment on one day (the last evaluation of that day wins)."""

    __tablename__ = "segment_daily_counts"
    __table_args__ = (UniqueConstraint("segment_id", "day"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    segment_id: Mapped[str] = mapped_column(String(32), ForeignKey("segments.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    count: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class SegmentUse(OrgScoped, Base):
    """Who used a segment, for what (count, preview, members, a campaign...), when."""

    __tablename__ = "segment_uses"
    __table_args__ = (Index("ix_segment_uses_segment", "segment_id", "used_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    segment_id: Mapped[str] = mapped_column(String(32), ForeignKey("segments.id", ondelete="CASCADE"))
    actor_type: Mapped[str] = mapped_column(String(20))
    actor_id: Mapped[str | None] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(64))  # count | preview | members | snapshot | campaign:<id> ...
    used_at: Mapped[datetime] = mapped_column(default=clock.now)


class ValueSet(OrgScoped, Base):
    """A user-created value set; every change is a new version (the highest one is current).
    A user set with the key of a shipped one overrides it for the organization."""

    __tablename__ = "value_sets"
    __table_args__ = (UniqueConstraint("org_id", "key", "version"), Index("ix_value_sets_key", "org_id", "key"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    key: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(2000), default="")
    source: Mapped[str] = mapped_column(String(1000), default="")
    sensitive_category: Mapped[str | None] = mapped_column(String(40))
    codes: Mapped[list] = mapped_column(JSON, default=list)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class Location(OrgScoped, Base):
    """A place of the organization (a clinic, a pharmacy) that distance criteria measure from:
    ``within 25 miles of location "Main Street Clinic"``. Not PHI: the organization's own sites."""

    __tablename__ = "organization_locations"
    __table_args__ = (UniqueConstraint("org_id", "name_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(120))
    name_key: Mapped[str] = mapped_column(String(480))  # the name case-folded (up to 3x longer: "ß" -> "ss")
    postal_code: Mapped[str] = mapped_column(String(5))
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
