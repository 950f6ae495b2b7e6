"""Campaigns, their workflow history, planned recipients and exclusions.

A campaign holds ids of what it sends (segment, template version, topic, sending domain) and
the facts that decide its legal character (purpose, remuneration, refill drug) — no PHI, except
the from-name (which a user could type a patient's name into) and workflow comments (free text),
both encrypted by the application (``*_enc``, bound to organization, table, column and row).

``CampaignRecipient`` and ``CampaignExclusion`` are written by planning: one row per contact of
the audience, either to be sent (``planned`` -> ``materialized`` with its message id, or
``held_out`` for an A/B holdout) or excluded with the eligibility reason code. Both are unique
per (campaign, contact), so a planning run that restarts after a crash cannot plan anyone twice.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import JSON, Boolean, Date, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id

CAMPAIGN_STATUSES = ("draft", "submitted", "approved", "rejected", "scheduled", "planning", "sending", "paused",
                     "completed", "cancelled")
SCHEDULE_KINDS = ("now", "at", "local")
REMUNERATION_KINDS = ("none", "cost", "other")
EVENT_ACTIONS = ("created", "updated", "submitted", "approved", "rejected", "returned_to_draft", "scheduled",
                 "launched", "paused", "resumed", "cancelled", "completed", "winner_chosen")
# "awaiting": outside an A/B test fraction, waiting for the winner (ab_tests.release makes it planned)
RECIPIENT_STATUSES = ("planned", "materialized", "held_out", "awaiting", "cancelled")


class Campaign(OrgScoped, Base):
    __tablename__ = "campaigns"
    __table_args__ = (Index("ix_campaigns_org_status", "org_id", "status"),
                      Index("ix_campaigns_org_send_at", "org_id", "send_at"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    purpose: Mapped[str] = mapped_column(String(64))
    topic_id: Mapped[str | None] = mapped_column(String(32))
    segment_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("segments.id", ondelete="SET NULL"))
    exclusion_segment_ids: Mapped[list] = mapped_column(JSON, default=list)
    template_id: Mapped[str | None] = mapped_column(String(32))
    template_version_id: Mapped[str | None] = mapped_column(String(32))
    sending_domain_id: Mapped[str | None] = mapped_column(String(32))
    from_address: Mapped[str | None] = mapped_column(String(320))  # the organization's own address
    from_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    security: Mapped[str | None] = mapped_column(String(16))  # secure-delivery mode; None: the organization's
    remuneration: Mapped[str] = mapped_column(String(8), default="none")  # none | cost | other
    refill_drug: Mapped[str | None] = mapped_column(String(64))  # e.g. rxnorm:197361
    schedule_kind: Mapped[str] = mapped_column(String(8), default="now")  # now | at | local
    send_at: Mapped[datetime | None]  # UTC (schedule "at"; for "local", the earliest instant)
    local_time: Mapped[str | None] = mapped_column(String(5))  # HH:MM in each recipient's time zone
    local_date: Mapped[date | None] = mapped_column(Date)
    # "at": the zone a wall-clock send_at was given in; "local": the zone of contacts without one
    # (None: the organization's default time zone, consent settings).
    time_zone: Mapped[str | None] = mapped_column(String(64))
    throttle_per_hour: Mapped[int | None] = mapped_column(Integer)
    throttle_per_domain_per_hour: Mapped[int | None] = mapped_column(Integer)
    track_opens: Mapped[bool] = mapped_column(Boolean, default=True)
    track_clicks: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(12), default="draft")
    approval_required: Mapped[bool] = mapped_column(Boolean, default=False)
    submitted_by: Mapped[str | None] = mapped_column(String(32))
    submitted_at: Mapped[datetime | None]
    approved_by: Mapped[str | None] = mapped_column(String(32))
    approved_at: Mapped[datetime | None]
    # SHA-256 of the fields compliance approved (service.APPROVED_FIELDS); an edit of any of them
    # after approval returns the campaign to draft.
    content_hash: Mapped[str | None] = mapped_column(String(64))
    # A/B/n test (checked by ab_tests.validate): {"variants": [{"key": "A", "subject": ...}, ...],
    # "holdout": 0.05, "test_fraction": 0.2, "metric": "human_opens", "winner_after_hours": 4}
    ab_test: Mapped[dict | None] = mapped_column(JSON)
    planned_count: Mapped[int] = mapped_column(Integer, default=0)
    excluded_count: Mapped[int] = mapped_column(Integer, default=0)
    materialized_count: Mapped[int] = mapped_column(Integer, default=0)
    plan_cursor: Mapped[str | None] = mapped_column(String(32))  # the last contact id planned
    plan_started_at: Mapped[datetime | None]
    plan_finished_at: Mapped[datetime | None]
    # Heartbeat of planning and sending (campaigns.tasks): the periodic sweep re-queues a campaign
    # whose work stopped (a killed worker) once this is older than CAREPOST_CAMPAIGN_STALE_SECONDS.
    worked_at: Mapped[datetime | None]
    launched_by: Mapped[str | None] = mapped_column(String(32))
    launched_at: Mapped[datetime | None]
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


class CampaignEvent(OrgScoped, Base):
    """One step of a campaign's workflow history (who submitted, approved, launched... and why)."""

    __tablename__ = "campaign_events"
    __table_args__ = (Index("ix_campaign_events_campaign", "campaign_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    campaign_id: Mapped[str] = mapped_column(String(32), ForeignKey("campaigns.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(20))
    actor: Mapped[str | None] = mapped_column(String(32))  # user or API credential id
    comment_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # free text: may hold PHI
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class CampaignRecipient(OrgScoped, Base):
    """One contact planned for a campaign (written by planning; materialized into a message)."""

    __tablename__ = "campaign_recipients"
    __table_args__ = (UniqueConstraint("campaign_id", "contact_id", name="uq_campaign_recipients_contact"),
                      # Ends in contact_id: sending reads a batch ordered by (send_after, contact_id), which
                      # this index returns in order (without it, every batch sorted every planned row).
                      Index("ix_campaign_recipients_due", "campaign_id", "status", "send_after", "contact_id"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    campaign_id: Mapped[str] = mapped_column(String(32), ForeignKey("campaigns.id", ondelete="CASCADE"))
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"))
    variant: Mapped[str | None] = mapped_column(String(32))  # A/B variant; "holdout" receives nothing
    blocks: Mapped[list] = mapped_column(JSON, default=list)  # the dynamic blocks shown to this contact
    send_after: Mapped[datetime | None]  # UTC
    receiving_domain_index: Mapped[int | None] = mapped_column(Integer)  # per-domain throttle bucket
    status: Mapped[str] = mapped_column(String(14), default="planned")
    message_id: Mapped[str | None] = mapped_column(String(32))


class CampaignExclusion(OrgScoped, Base):
    """One contact of the audience that planning excluded, with the eligibility reason code."""

    __tablename__ = "campaign_exclusions"
    __table_args__ = (UniqueConstraint("campaign_id", "contact_id", name="uq_campaign_exclusions_contact"),
                      Index("ix_campaign_exclusions_reason", "campaign_id", "reason"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    campaign_id: Mapped[str] = mapped_column(String(32), ForeignKey("campaigns.id", ondelete="CASCADE"))
    contact_id: Mapped[str] = mapped_column(String(32), ForeignKey("contacts.id", ondelete="CASCADE"))
    reason: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
