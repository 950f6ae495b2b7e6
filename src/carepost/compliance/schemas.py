"""Pydantic shapes of the compliance center's API."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DeidentifiedExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    segment_id: str = Field(min_length=1, max_length=64, description="A saved segment of the organization")
    format: Literal["csv", "jsonl"] = Field("jsonl", description="jsonl: one subject per line with its facts; "
                                            "csv: a ZIP of subjects.csv, facts.csv and README.txt")


class DisclosureIn(BaseModel):
    """A disclosure made outside CarePost, recorded by hand (164.528(b)(2))."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    contact_id: str = Field(min_length=1, max_length=64)
    disclosed_at: date = Field(description="The date of the disclosure (within the last six years)")
    recipient_name: str = Field(min_length=1, max_length=200)
    recipient_address: str | None = Field(None, max_length=500)
    description: str = Field(min_length=1, max_length=2000, description="A brief description of the PHI disclosed")
    purpose: str = Field(min_length=1, max_length=1000, description="A brief statement of the purpose")


class AccountingRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    contact_id: str = Field(min_length=1, max_length=64)
    received_on: date = Field(description="When the individual's request was received (the 60 days run from it)")
    period_start: date | None = Field(None, description="Default: six years before received_on")
    period_end: date | None = Field(None, description="Default: received_on")


class ExtensionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    reason: str | None = Field(None, max_length=1000, description="The reason for the delay, as given to the individual in writing")


class FulfilIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    fulfilled_on: date | None = Field(None, description="Default: today")
    delivery_method: Literal["mail", "email", "portal", "in_person"] | None = None


class BusinessAssociateIn(BaseModel):
    """A party PHI may flow to and its BAA (issue 16 item 9). Dates are YYYY-MM-DD; the service
    checks them and names the field it refuses."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=400)
    kind: str | None = Field(None, max_length=40, description="smtp_relay | webhook | key_service | backup_storage | other")
    ref: str | None = Field(None, max_length=600, description="The relay host, or the webhook endpoint id")
    scope: str | None = Field(None, max_length=8000, description="What PHI and which services the BAA covers")
    contact: str | None = Field(None, max_length=640)
    baa_signed_on: str | None = Field(None, max_length=40)
    baa_expires_on: str | None = Field(None, max_length=40, description="Renewal due; empty: no end date")
    terminated_on: str | None = Field(None, max_length=40)


class PolicyIn(BaseModel):
    """A policy or training module to publish (a new version when ``key`` exists)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, max_length=128, description="e.g. privacy-policy; the same key makes a new version")
    kind: str | None = Field(None, max_length=32, description="policy | training")
    title: str | None = Field(None, max_length=400)
    body: str | None = Field(None, max_length=200_000, description="The text people read and acknowledge")


class AcknowledgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document_ids: list[str] | None = Field(None, max_length=100, description="Default: every current version")


class TrainingSettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period_days: int | None = Field(None, description="How long an acknowledgement counts (30-365, default 365)")
    reminder_days: int | None = Field(None, description="Remind this many days before it ends (1-90, default 30)")


class BreachIn(BaseModel):
    """A breach incident to open (issue 16 item 5). Dates are YYYY-MM-DD, the audit window ISO 8601."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=400, description="A short label without patient details")
    kind: str | None = Field(None, max_length=40, description="misdirected_message | unauthorized_access | lost_device | hacking | other")
    discovered_on: str | None = Field(None, max_length=40)
    occurred_on: str | None = Field(None, max_length=40)
    description: str | None = Field(None, max_length=20_000, description="What happened (encrypted; may name patients)")
    message_ids: list[str] | None = Field(None, max_length=10_000, description="The messages involved")
    contact_ids: list[str] | None = Field(None, max_length=10_000, description="Patients added by hand")
    audit_actor_id: str | None = Field(None, max_length=64, description="Whose access to look up in the audit trail")
    audit_from: str | None = Field(None, max_length=40)
    audit_to: str | None = Field(None, max_length=40)
    notice_contact: str | None = Field(None, max_length=600, description="How patients reach the organization (for the notices)")


class FactorIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factor: str | None = Field(None, max_length=40, description="nature_extent | unauthorized_person | acquired_viewed | mitigation")
    rating: str | None = Field(None, max_length=16, description="low | medium | high")
    notes: str | None = Field(None, max_length=8000, description="Why (required for a low rating; encrypted)")


class NotificationsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    individuals_notified_on: str | None = Field(None, max_length=40)
    hhs_notified_on: str | None = Field(None, max_length=40)
    media_notified_on: str | None = Field(None, max_length=40)
    closed_on: str | None = Field(None, max_length=40)
