"""Tables of tracking: received bounce and complaint reports, outbound webhook endpoints, the
events sent to them, and the delivery log.

Encryption (ARCHITECTURE.md section 2; ``*_enc`` columns are AES-GCM under the organization's data
key, bound to organization, table, column and row):

* a received report quotes the original message's headers (the patient's address, sometimes the
  subject), so the raw bytes are encrypted and deleted after
  ``CAREPOST_INBOUND_REPORT_RETENTION_DAYS``;
* an endpoint's signing secret is encrypted (it must be read back to sign, so it cannot be hashed);
* an event's payload is encrypted too, although it carries ids only: PHI extras for endpoints that
  receive PHI live in their own encrypted column, used only for those endpoints.

The delivery log (``WebhookAttempt``) holds status codes, durations and error categories — never a
response body, which could echo anything.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id
from carepost.delivery.models import InboundReport  # noqa: F401 - the return path's table is delivery's


class WebhookEndpoint(OrgScoped, Base):
    """Where an organization wants events delivered (Standard Webhooks signing)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str] = mapped_column(String(200), default="")
    event_types: Mapped[list] = mapped_column(JSON, default=list)
    secret_enc: Mapped[bytes] = mapped_column(LargeBinary)
    secret_hint: Mapped[str] = mapped_column(String(16))  # "whsec_…" + last 4 characters, to tell secrets apart
    include_phi: Mapped[bool] = mapped_column(Boolean, default=False)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(200))
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class WebhookEvent(OrgScoped, Base):
    """One event, as emitted: its id is the ``webhook-id`` every delivery of it carries."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_org_created", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    type: Mapped[str] = mapped_column(String(64))
    payload_enc: Mapped[bytes] = mapped_column(LargeBinary)  # {"type", "timestamp", "data"} as JSON
    phi_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # extra data fields for endpoints with include_phi
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class WebhookDelivery(OrgScoped, Base):
    """One event to one endpoint, retried with backoff until it succeeds or the schedule ends."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    endpoint_id: Mapped[str] = mapped_column(String(32), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(32), ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True)
    replay_of: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | succeeded | failed | cancelled
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    finished_at: Mapped[datetime | None]


class WebhookAttempt(OrgScoped, Base):
    """One HTTP attempt of a delivery: when, how long, what came back (code only)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "attempt"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    delivery_id: Mapped[str] = mapped_column(String(32), ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=clock.now)
    duration_ms: Mapped[int | None]
    status_code: Mapped[int | None]
    outcome: Mapped[str] = mapped_column(String(16))  # succeeded | failed | gone | refused
    error: Mapped[str | None] = mapped_column(Text)  # a category and short reason, never a response body


class DmarcReport(OrgScoped, Base):
    """A DMARC aggregate report (RFC 7489 section 7.2) received at the ``dmarc@`` mailbox of a
    return-path domain, as parsed by parsedmarc. Holds the receiver's view of mail claiming the
    organization's domain: source addresses of sending servers and counts, no patient data."""

    __tablename__ = "dmarc_reports"
    __table_args__ = (UniqueConstraint("org_id", "reporter", "report_id"),
                      Index("ix_dmarc_reports_org_domain_begin", "org_id", "domain", "begin_at"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    inbound_report_id: Mapped[str | None] = mapped_column(String(32))
    reporter: Mapped[str] = mapped_column(String(255))  # org_name of the receiver (google.com)
    reporter_email: Mapped[str | None] = mapped_column(String(255))
    report_id: Mapped[str] = mapped_column(String(255))
    domain: Mapped[str] = mapped_column(String(255))  # policy_published domain
    policy: Mapped[dict] = mapped_column(JSON, default=dict)  # p, sp, pct, adkim, aspf
    begin_at: Mapped[datetime]
    end_at: Mapped[datetime]
    messages: Mapped[int] = mapped_column(Integer, default=0)
    dmarc_pass: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(default=clock.now)


class DmarcReportRecord(OrgScoped, Base):
    """One row of an aggregate report: a sending IP address, how many messages it sent, and how
    they fared (DKIM and SPF alignment, DMARC result, the receiver's disposition)."""

    __tablename__ = "dmarc_report_records"
    __table_args__ = (Index("ix_dmarc_report_records_report", "dmarc_report_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dmarc_report_id: Mapped[str] = mapped_column(ForeignKey("dmarc_reports.id", ondelete="CASCADE"))
    source_ip: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(Integer)
    disposition: Mapped[str] = mapped_column(String(20))  # none | quarantine | reject
    dkim_aligned: Mapped[bool] = mapped_column(Boolean)
    spf_aligned: Mapped[bool] = mapped_column(Boolean)
    dmarc_pass: Mapped[bool] = mapped_column(Boolean)
    header_from: Mapped[str | None] = mapped_column(String(255))
    envelope_from: Mapped[str | None] = mapped_column(String(255))
    auth_results: Mapped[dict] = mapped_column(JSON, default=dict)


class TlsReport(OrgScoped, Base):
    """An SMTP TLS report (RFC 8460) received at the ``tlsrpt@`` mailbox: per policy (MTA-STS,
    DANE or none), how many TLS sessions to the organization's return-path host succeeded and
    failed, and why."""

    __tablename__ = "tls_reports"
    __table_args__ = (UniqueConstraint("org_id", "reporter", "report_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    inbound_report_id: Mapped[str | None] = mapped_column(String(32))
    reporter: Mapped[str] = mapped_column(String(255))
    report_id: Mapped[str] = mapped_column(String(255))
    begin_at: Mapped[datetime]
    end_at: Mapped[datetime]
    policies: Mapped[list] = mapped_column(JSON, default=list)  # per policy: domain, type, counts, failures
    successful_sessions: Mapped[int] = mapped_column(Integer, default=0)
    failed_sessions: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(default=clock.now)


class MessageLink(OrgScoped, Base):
    """A link of a tracked message as it was at send time (issue 13 item 1): the click redirect
    goes to this URL and nowhere else (no open redirect). URLs may carry private (never PHI:
    the link guard refuses that) paths, so the URL is encrypted; recorded once per message and
    position, whatever the number of recipients."""

    __tablename__ = "message_links"
    __table_args__ = (UniqueConstraint("message_id", "link_index"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"))
    link_index: Mapped[int] = mapped_column(Integer)  # html links first (document order), then text links
    part: Mapped[str] = mapped_column(String(8))  # html | text
    url_enc: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class EngagementEvent(OrgScoped, Base):
    """One open or click, append-only (never updated). No IP address and no raw user agent:
    only the user agent's parsed family and the class the request was given (human, proxy,
    scanner) with the rule that decided it. Organizations in privacy mode get no rows at all
    (only aggregate counters)."""

    __tablename__ = "engagement_events"
    __table_args__ = (
        Index("ix_engagement_events_message", "message_id", "recipient_id"),
        Index("ix_engagement_events_org_time", "org_id", "occurred_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(String(32))
    recipient_id: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(8))  # opened | clicked
    link_index: Mapped[int | None] = mapped_column(Integer)
    classification: Mapped[str] = mapped_column(String(8))  # human | proxy | scanner
    rule: Mapped[str] = mapped_column(String(32))  # what decided the class (gmail_image_proxy, fast_click, trap_link...)
    agent_family: Mapped[str | None] = mapped_column(String(64))  # ua-parser's family, no version or raw string
    occurred_at: Mapped[datetime] = mapped_column(default=clock.now)


class EngagementCount(OrgScoped, Base):
    """Aggregate opens and clicks of a message per type and class, kept incrementally as they
    come (the only engagement an organization in privacy mode keeps per message)."""

    __tablename__ = "engagement_counts"
    __table_args__ = (UniqueConstraint("message_id", "type", "classification"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(8))  # opened | clicked
    classification: Mapped[str] = mapped_column(String(8))  # human | proxy | scanner
    count: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now)


class EngagementJournalMark(Base):
    """How far a ``serve`` process's engagement journal (``tracking.engagement_journal``) has been
    moved into the database: written in the same transaction as the events it covers, so an
    event is ingested exactly once whatever stops when. One row per journal (not per
    organization: a journal holds every organization's opens and clicks, as ids)."""

    __tablename__ = "engagement_journal_marks"

    journal_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    segment: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now)
