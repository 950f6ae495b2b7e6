"""The append-only audit log: one HMAC hash chain per organization (plus a system chain)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base
from carepost.core.ids import new_id

SYSTEM_CHAIN = "system"


class AuditEvent(Base):
    """Who (and on whose behalf), what, when, from where, outcome — references, never PHI values.

    ``chain`` is the organization id, or ``system`` for events outside any organization
    (unknown-user logins, CLI administration). Queries filter on it explicitly.
    """

    __tablename__ = "audit_events"
    __table_args__ = (UniqueConstraint("chain", "seq"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    chain: Mapped[str] = mapped_column(String(32), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    org_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("organizations.id", ondelete="RESTRICT"), index=True)
    occurred_at: Mapped[datetime] = mapped_column(default=clock.now, index=True)
    actor_type: Mapped[str] = mapped_column(String(20))  # user | api_credential | system | anonymous | patient
    actor_id: Mapped[str | None] = mapped_column(String(64))
    on_behalf_of: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(80), index=True)
    target_type: Mapped[str | None] = mapped_column(String(60))
    target_id: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(20))  # success | failure | denied
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(300))
    request_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # The version of the chain's audit key that made ``hash``: a rotated key (``carepost keys
    # rotate-secret audit``) signs new events while earlier ones keep verifying under theirs.
    key_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class AuditChainHead(Base):
    """The newest event of each chain; appends lock this row so concurrent writers never fork."""

    __tablename__ = "audit_chain_heads"

    chain: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=clock.now)
