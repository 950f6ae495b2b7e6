"""Tables of consent: suppressions, topics, subscriptions, authorization texts, authorizations.

Encryption follows ARCHITECTURE.md section 2. Addresses are direct identifiers: a suppression is
keyed by the keyed blind index of the address (kind ``email``), so it keeps working when the
patient is deleted, re-imported or never was a contact. When the UI must show the address an
encrypted copy is kept in ``address_enc``, bound to the row.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Index, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id

SUPPRESSION_REASONS = ("bounce_hard", "bounce_soft", "complaint", "unsubscribe", "manual", "legal_hold")
SUPPRESSION_SCOPES = ("all", "marketing", "topic")


class Suppression(OrgScoped, Base):
    """An address CarePost must not send to (everything, all marketing, or one topic).

    ``scope_key`` is ``"<scope>:<topic id or ''>"``: one row per (organization, address, scope,
    topic) — adding the same suppression twice is a no-op. ``details`` holds codes only (SMTP
    status, feedback type, import id), never PHI.
    """

    __tablename__ = "suppressions"
    __table_args__ = (
        UniqueConstraint("org_id", "address_index", "scope_key", name="uq_suppressions_address_scope"),
        Index("ix_suppressions_org_created", "org_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    address_index: Mapped[str] = mapped_column(String(64))
    address_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(12), default="all")
    topic_id: Mapped[str | None] = mapped_column(String(32))
    scope_key: Mapped[str] = mapped_column(String(48))
    source: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)
    expires_at: Mapped[datetime | None]


# Loading the tables loads the service too, which registers the patient-deletion hook: every
# process that can delete a patient (app, worker, CLI) keeps the opt-outs.
from carepost.consent import service as _service  # noqa: E402,F401
