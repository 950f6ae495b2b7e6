"""The append-only audit log: one HMAC hash chain per organization (plus a system chain)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
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


class Disclosure(OrgScoped, Base):
    """A disclosure of one patient's PHI outside treatment, payment and operations, for the
    accounting of disclosures (45 CFR 164.528): when, to whom (name and address, if known), what
    was disclosed and why. Recipient, description and purpose are free text that may hold PHI,
    so they are encrypted (AES-GCM bound to organization, table, column and row); ``source`` says
    how CarePost knows of it (``manual``: recorded by staff; others are recorded by the capability
    that made the disclosure). ``contact_id`` has no foreign key: the record is kept for the six
    years of the accounting even if the contact is deleted (164.528(a), 164.530(j)).
    """

    __tablename__ = "disclosures"
    __table_args__ = (Index("ix_disclosures_org_contact_date", "org_id", "contact_id", "disclosed_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contact_id: Mapped[str] = mapped_column(String(32))
    disclosed_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(20), default="manual")  # manual | webhook | export | portal
    source_ref: Mapped[str | None] = mapped_column(String(64))
    recipient_name_enc: Mapped[bytes] = mapped_column(LargeBinary)
    recipient_address_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    description_enc: Mapped[bytes] = mapped_column(LargeBinary)
    purpose_enc: Mapped[bytes] = mapped_column(LargeBinary)
    recorded_by: Mapped[str | None] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(default=clock.now)


class AuditChainAnchor(Base):
    """Where a chain starts after its oldest events were removed under a retention schedule
    (issue 16 item 1; 45 CFR 164.316(b)(2) keeps audit documentation six years, not forever).

    A hash chain can only lose events from its start without breaking: ``seq``/``hash`` name the
    last removed event, so the first remaining event must be ``seq + 1`` and link to ``hash``.
    ``mac`` is an HMAC under a key derived from the chain's audit key for this one purpose (not
    the checkpoint key: a checkpoint of the head must never pass for an anchor), so without the
    master key an anchor can be neither forged nor moved forward over events deleted by hand.
    Updated in the same transaction as the deletes it covers; only ever moves forward."""

    __tablename__ = "audit_chain_anchors"

    chain: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[str] = mapped_column(String(32))  # the removed event's time, as the hash covers it
    removed: Mapped[int] = mapped_column(Integer, default=0)  # events removed from this chain so far
    written_at: Mapped[str] = mapped_column(String(32))
    key_version: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(64))
