"""Tables of the compliance center (issue 16): de-identified export jobs, requests for an
accounting of disclosures, breach incidents, business associates, published policies and their
acknowledgements. The disclosures themselves live in ``audit`` (``audit.models.Disclosure``)."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import JSON, Date, Index, Integer, LargeBinary, String, Text
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


class BreachIncident(OrgScoped, Base):
    """A possible breach of unsecured PHI (164.400-414): what happened, who is affected, the
    four-factor risk assessment (164.402(2)), the 60-day clock and the notifications made.

    Free text (description, assessment notes) may hold PHI and is encrypted; the affected
    patients are kept as contact ids (references), the counts and categories in clear."""

    __tablename__ = "breach_incidents"
    __table_args__ = (Index("ix_breach_incidents_org_status", "org_id", "status", "discovered_on"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(200))  # a label without PHI ("Reminder sent to a wrong address")
    kind: Mapped[str] = mapped_column(String(32))  # misdirected_message | unauthorized_access | lost_device | hacking | other
    description_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    occurred_on: Mapped[date | None] = mapped_column(Date)
    discovered_on: Mapped[date] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | assessed | notifying | closed
    message_ids: Mapped[list] = mapped_column(JSON, default=list)
    # Unauthorized access found in the audit trail: whose reads, over which window.
    audit_actor_id: Mapped[str | None] = mapped_column(String(64))
    audit_from: Mapped[datetime | None]
    audit_to: Mapped[datetime | None]
    notice_contact: Mapped[str] = mapped_column(String(300), default="")  # how patients reach the organization
    extra_contact_ids: Mapped[list] = mapped_column(JSON, default=list)  # added by hand (not from a message)
    affected_contact_ids: Mapped[list] = mapped_column(JSON, default=list)  # computed
    affected_count: Mapped[int] = mapped_column(Integer, default=0)
    categories: Mapped[list] = mapped_column(JSON, default=list)  # kinds of PHI involved
    by_state: Mapped[dict] = mapped_column(JSON, default=dict)  # state -> affected count ("unknown" too)
    computed_at: Mapped[datetime | None]
    assessment_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # the four factors (JSON), notes may be PHI
    assessment_step: Mapped[int] = mapped_column(Integer, default=0)  # factors answered (0-4)
    conclusion: Mapped[str | None] = mapped_column(String(24))  # low_probability | notifiable
    assessed_by: Mapped[str | None] = mapped_column(String(64))
    assessed_at: Mapped[datetime | None]
    individuals_notified_on: Mapped[date | None] = mapped_column(Date)
    hhs_notified_on: Mapped[date | None] = mapped_column(Date)
    media_notified_on: Mapped[date | None] = mapped_column(Date)
    closed_on: Mapped[date | None] = mapped_column(Date)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class BusinessAssociate(OrgScoped, Base):
    """A party PHI may flow to (164.502(e), 164.504(e)): the organization's SMTP relay, a webhook
    endpoint set to receive PHI, a key service, backup storage. ``ref`` ties the row to what
    CarePost sends through (the relay host, the webhook endpoint id)."""

    __tablename__ = "business_associates"
    __table_args__ = (Index("ix_business_associates_org_kind", "org_id", "kind", "ref"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(24))  # smtp_relay | webhook | key_service | backup_storage | other
    ref: Mapped[str | None] = mapped_column(String(300))
    scope: Mapped[str] = mapped_column(Text, default="")  # what PHI and which services the BAA covers
    baa_signed_on: Mapped[date | None] = mapped_column(Date)
    baa_expires_on: Mapped[date | None] = mapped_column(Date)  # renewal due; None: no end date
    contact: Mapped[str] = mapped_column(String(320), default="")  # the associate's privacy contact
    terminated_on: Mapped[date | None] = mapped_column(Date)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class PolicyDocument(OrgScoped, Base):
    """One published version of a policy or a training module (164.308(a)(5), 164.316). A new
    version of the same ``key`` supersedes the earlier ones; everyone must acknowledge it."""

    __tablename__ = "policy_documents"
    __table_args__ = (Index("ix_policy_documents_org_key", "org_id", "key", "version", unique=True),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    key: Mapped[str] = mapped_column(String(64))  # "privacy-policy", "security-training"
    kind: Mapped[str] = mapped_column(String(16))  # policy | training
    title: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)  # the text people read (no PHI)
    sha256: Mapped[str] = mapped_column(String(64))
    published_by: Mapped[str | None] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(default=clock.now)
    retired_at: Mapped[datetime | None]


class PolicyAcknowledgement(OrgScoped, Base):
    """A person's acknowledgement of one version of a policy or training (kept 6 years, 164.316(b)(2))."""

    __tablename__ = "policy_acknowledgements"
    __table_args__ = (Index("ix_policy_acknowledgements_user", "org_id", "user_id", "document_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(32))
    document_id: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # of the text acknowledged
    acknowledged_at: Mapped[datetime] = mapped_column(default=clock.now)
    reminded_at: Mapped[datetime | None]
