"""Tables of the message archive (issue 16 item 8; docs/archive.md).

* ``archive_terms``: the keyed word index of message subjects and bodies. One row per distinct
  word of a message: ``token = HMAC-SHA256(search key, "w" | normalized word)`` truncated to 128
  bits, under the organization's ``search`` secret (``Keyring.named_key``). No word is stored in
  clear; the row is deleted with its message (ON DELETE CASCADE), so a purge leaves no token.
* ``archive_requests``: every search or production export that needed a second approver, and
  every export. The criteria (which may name a patient, an address or words) are encrypted; the
  plain ``scope`` holds only the names of the criteria used and the date range.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id


class ArchiveTerm(OrgScoped, Base):
    __tablename__ = "archive_terms"
    __table_args__ = (Index("ix_archive_terms_org_token", "org_id", "token", "message_id"),)

    message_id: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"),
                                            primary_key=True)
    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_version: Mapped[int] = mapped_column(Integer, default=1)


REQUEST_KINDS = ("search", "export")
REQUEST_STATUSES = ("pending_approval", "approved", "rejected", "completed")


class ArchiveRequest(OrgScoped, Base):
    __tablename__ = "archive_requests"
    __table_args__ = (Index("ix_archive_requests_org_status", "org_id", "status", "requested_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(8))  # search | export
    purpose: Mapped[str] = mapped_column(String(16))  # legal_discovery | patient_request | audit | other
    criteria_enc: Mapped[bytes] = mapped_column(LargeBinary)  # JSON of the search criteria, encrypted
    reason_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # matter / why, encrypted (may name a person)
    scope: Mapped[dict] = mapped_column(JSON, default=dict)  # criteria names and the date range only, no PHI
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    sensitive_why: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="pending_approval")
    requested_by: Mapped[str] = mapped_column(String(64))
    requested_at: Mapped[datetime] = mapped_column(default=clock.now)
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decided_at: Mapped[datetime | None]
    decision_note: Mapped[str | None] = mapped_column(Text)  # no PHI (a code or short remark)
    message_count: Mapped[int | None] = mapped_column(Integer)
    content_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # the production ZIP, encrypted
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    completed_at: Mapped[datetime | None]
    downloads: Mapped[int] = mapped_column(Integer, default=0)
