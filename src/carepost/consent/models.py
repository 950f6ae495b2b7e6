"""Tables of consent: topics, subscriptions, authorization texts, authorizations (the suppression
list is delivery's: `delivery.models.Suppression`).

Encryption follows ARCHITECTURE.md section 2. Addresses are direct identifiers: a suppression is
keyed by the keyed blind index of the address (kind ``email``), so it keeps working when the
patient is deleted, re-imported or never was a contact. When the UI must show the address an
encrypted copy is kept in ``address_enc``, bound to the row.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id

# The suppression list is delivery's (both bounces and unsubscribes reach it downward).
from carepost.delivery.models import SUPPRESSION_REASONS, SUPPRESSION_SCOPES, Suppression  # noqa: E402,F401


class Topic(OrgScoped, Base):
    """A subject patients subscribe to (newsletters, screenings, product offers).

    Topics are opt-out by default: a contact receives a topic's messages until they unsubscribe.
    ``opt_in_required`` topics reach only contacts with a confirmed subscription (double opt-in
    when ``double_opt_in``)."""

    __tablename__ = "consent_topics"
    __table_args__ = (UniqueConstraint("org_id", "key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    key: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(1000), default="")
    opt_in_required: Mapped[bool] = mapped_column(Boolean, default=False)
    double_opt_in: Mapped[bool] = mapped_column(Boolean, default=True)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


SUBSCRIPTION_STATUSES = ("pending", "subscribed", "unsubscribed")
FREQUENCIES = ("immediate", "daily", "weekly", "monthly")
CHANNELS = ("email",)
ALL_MARKETING = "*"


class Subscription(OrgScoped, Base):
    """A contact's choice for one topic (``topic_key`` = topic id) or for all marketing
    (``topic_key`` = ``*``, ``topic_id`` NULL). Unsubscribes are also written as address-level
    suppressions, so they hold for every address and outlive the contact."""

    __tablename__ = "consent_subscriptions"
    __table_args__ = (
        UniqueConstraint("org_id", "contact_id", "topic_key", name="uq_consent_subscriptions_contact_topic"),
        Index("ix_consent_subscriptions_topic", "org_id", "topic_key", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    topic_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("consent_topics.id", ondelete="CASCADE"))
    topic_key: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    frequency: Mapped[str] = mapped_column(String(12), default="immediate")
    channel: Mapped[str] = mapped_column(String(12), default="email")
    source: Mapped[str] = mapped_column(String(32), default="")
    confirmation_sent_at: Mapped[datetime | None]
    confirmed_at: Mapped[datetime | None]
    unsubscribed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


TEXT_STATUSES = ("draft", "published", "retired")


class AuthorizationText(OrgScoped, Base):
    """One version of an organization's authorization text for a purpose (45 CFR 164.508(c)).

    ``elements`` = {language: {element: text}} — every core element and required statement as a
    structured field; ``rendered`` = {language: plain text}; ``content_hash`` = SHA-256 of both,
    recorded on every authorization signed with this version. A published version never
    changes: editing makes a new draft version."""

    __tablename__ = "authorization_texts"
    __table_args__ = (UniqueConstraint("org_id", "purpose", "version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    purpose: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12), default="draft")
    title: Mapped[str] = mapped_column(String(200))
    elements: Mapped[dict] = mapped_column(JSON, default=dict)
    rendered: Mapped[dict] = mapped_column(JSON, default=dict)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)
    published_at: Mapped[datetime | None]
    published_by: Mapped[str | None] = mapped_column(String(64))


# How an authorization was obtained (issue 9 item 12, forgeable evidence).
# * Witnessed by CarePost itself: set only by CarePost's own flows (hosted forms, the portal, an
#   email confirmation link), which also record the patient's own IP address and user agent.
WITNESSED_METHODS = ("form", "portal", "email_link")
# * Recorded by an API client (``api``) or by staff (``paper`` with an uploaded scan, ``verbal``):
#   the evidence kept is the recording actor's own request facts, never caller-supplied "patient"
#   ones. Staff pages offer ``paper`` and ``verbal``.
RECORDED_METHODS = ("api", "paper", "verbal")
STAFF_METHODS = ("paper", "verbal")
AUTHORIZATION_METHODS = WITNESSED_METHODS + RECORDED_METHODS
# Rows recorded before this rule may say ``staff``; nothing new is recorded with it.
LEGACY_METHODS = ("staff",)

# A recorded authorization signed more than this many days before it is recorded needs a
# ``backdate_reason`` and is flagged ``backdated``.
BACKDATE_WINDOW_DAYS = 7

# 164.508(c)(1)(v): "an expiration date or an expiration event that relates to the individual or
# the purpose of the use or disclosure". The events an authorization may name instead of a date
# (free text was refused: it let authorizations never end). Staff or the API record when the
# event happened (``POST /api/v1/authorizations/{id}/expiration-event``); it ends then.
EXPIRATION_EVENTS: dict[str, str] = {
    "end_of_treatment": "the end of the individual's course of treatment with the organization",
    "end_of_enrollment": "the end of the individual's enrollment in the health plan or program",
    "end_of_program": "the end of the marketing program or offer that the authorization describes",
    "age_of_majority": "the individual (a minor, signed for by a personal representative) reaching the age of majority",
}


SCAN_TYPES = {"application/pdf": b"%PDF-", "image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
SCAN_MAX_BYTES = 10 * 1024 * 1024


class AuthorizationScan(OrgScoped, Base):
    """The uploaded scan of a paper authorization (PDF, PNG or JPEG, told by its magic bytes),
    encrypted like every other stored file (bound to organization, table, column and row)."""

    __tablename__ = "authorization_scans"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    content_type: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    content_enc: Mapped[bytes] = mapped_column(LargeBinary)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class Authorization(OrgScoped, Base):
    """A signed authorization of one patient for one purpose (and optionally one topic).

    Evidence kept (164.508(b)(6), 164.530(j): six years): the text version and its hash, the
    signature (typed name or drawn image, encrypted), the signing date, method, IP address and
    user agent (encrypted: an IP address is an identifier, 164.514(b)(2)(i)(O)), a personal
    representative and their authority (encrypted), the expiry. ``contact_id`` is cleared when
    the patient is deleted; ``subject_index`` (the email blind index at signing) keeps the
    evidence findable."""

    __tablename__ = "authorizations"
    __table_args__ = (
        Index("ix_authorizations_contact", "org_id", "contact_id", "purpose"),
        Index("ix_authorizations_purpose", "org_id", "purpose", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contact_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="SET NULL"))
    subject_index: Mapped[str | None] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))
    topic_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("consent_topics.id", ondelete="SET NULL"))
    text_id: Mapped[str] = mapped_column(String(32), ForeignKey("authorization_texts.id"))
    text_version: Mapped[int] = mapped_column(Integer)
    text_hash: Mapped[str] = mapped_column(String(64))
    language: Mapped[str] = mapped_column(String(8), default="en")
    signature_kind: Mapped[str] = mapped_column(String(8))  # typed | drawn
    signature_enc: Mapped[bytes] = mapped_column(LargeBinary)
    signed_at: Mapped[datetime]
    method: Mapped[str] = mapped_column(String(12))
    evidence_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # {"ip", "user_agent", "of": "patient" | "recorder"}
    representative_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # {"name", "authority"}
    expires_at: Mapped[datetime | None]
    expiration_event: Mapped[str | None] = mapped_column(String(300))
    expiration_event_at: Mapped[datetime | None]  # when staff or the API recorded that the event happened
    backdated: Mapped[bool] = mapped_column(Boolean, default=False)
    backdate_reason_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    scan_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("authorization_scans.id"))
    status: Mapped[str] = mapped_column(String(12), default="active")  # active | revoked
    revoked_at: Mapped[datetime | None]
    revoked_by_type: Mapped[str | None] = mapped_column(String(12))  # patient | staff | api
    revoked_by: Mapped[str | None] = mapped_column(String(64))
    revocation_method: Mapped[str | None] = mapped_column(String(12))  # link | form | api | staff
    copy_delivered: Mapped[str | None] = mapped_column(String(12))  # email | link
    copy_message_id: Mapped[str | None] = mapped_column(String(32))
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


# Loading the tables loads the service too, which registers the patient-deletion hook: every
# process that can delete a patient (app, worker, CLI) keeps the opt-outs.
from carepost.consent import service as _service  # noqa: E402,F401
