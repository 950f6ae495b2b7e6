"""Tables of the compliance center (issue 16): de-identified export jobs and requests for an
accounting of disclosures. The disclosures themselves live in ``audit`` (``audit.models.Disclosure``)."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Date, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id


class DeidentifiedExport(OrgScoped, Base):
    """One Safe Harbor export (164.514(b)(2)) of a segment's contacts and clinical facts.

    The file is kept encrypted (``content_enc``) until downloaded or deleted. It holds no
    CarePost id: subjects carry random pseudonyms made for this export only, and no mapping from
    pseudonym to contact is kept anywhere (see docs/compliance.md)."""

    __tablename__ = "deidentified_exports"
    __table_args__ = (Index("ix_deidentified_exports_org_created", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    segment_id: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(8))  # csv (a ZIP of subjects.csv and facts.csv) | jsonl
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued | running | succeeded | failed
    subject_count: Mapped[int] = mapped_column(Integer, default=0)
    fact_count: Mapped[int] = mapped_column(Integer, default=0)
    suppressed_values: Mapped[int] = mapped_column(Integer, default=0)  # values dropped by the identifier guard
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))
    content_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    failure: Mapped[str | None] = mapped_column(Text)  # why it failed (no PHI)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class AccountingRequest(OrgScoped, Base):
    """An individual's request for an accounting of disclosures (164.528(c)): acted on within 60
    days of receipt, or once extended by at most 30 days with a written statement of the reason
    given to the individual within the first 60 days."""

    __tablename__ = "accounting_requests"
    __table_args__ = (Index("ix_accounting_requests_org_status", "org_id", "status", "due_on"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contact_id: Mapped[str] = mapped_column(String(32), index=True)
    received_on: Mapped[date] = mapped_column(Date)
    due_on: Mapped[date] = mapped_column(Date)  # received_on + 60 days
    period_start: Mapped[date] = mapped_column(Date)
    period_end: Mapped[date] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | extended | fulfilled
    extended_due_on: Mapped[date | None] = mapped_column(Date)
    extension_reason_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    extended_on: Mapped[date | None] = mapped_column(Date)
    extended_by: Mapped[str | None] = mapped_column(String(64))
    fulfilled_on: Mapped[date | None] = mapped_column(Date)
    fulfilled_by: Mapped[str | None] = mapped_column(String(64))
    delivery_method: Mapped[str | None] = mapped_column(String(16))  # mail | email | portal | in_person
    entry_count: Mapped[int | None] = mapped_column(Integer)
    document_sha256: Mapped[str | None] = mapped_column(String(64))  # of the text given to the individual
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)
