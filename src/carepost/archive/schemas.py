"""Pydantic shapes of the archive's API. Field-level checks that need the database (a patient,
campaign or journey of the organization, the words) are in ``service.check_criteria``, which
names the field it refuses."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from carepost.core.ids import ID_PATTERN

METHODS = Literal["tls", "pgp", "smime", "portal", "none"]


class ArchiveSearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    contact_id: str | None = Field(None, max_length=64, pattern=ID_PATTERN, description="Messages to this patient (contact id)")
    address: str | None = Field(None, max_length=320, description="Messages to this email address (any recipient kind)")
    date_from: date | None = Field(None, description="Sent on or after this day (UTC)")
    date_to: date | None = Field(None, description="Sent on or before this day (UTC)")
    sender: str | None = Field(None, max_length=320, description="The From address")
    campaign_id: str | None = Field(None, max_length=64, pattern=ID_PATTERN)
    journey_id: str | None = Field(None, max_length=64, pattern=ID_PATTERN)
    purpose: str | None = Field(None, max_length=64)
    method: METHODS | None = Field(None, description="The secure method a recipient's copy went by")
    words: str | None = Field(None, max_length=500, description="Whole words of the subject or body (all must occur)")
    limit: int = Field(50, ge=1, le=500, description="At most this many messages, newest first")


class ArchiveSearchRequestIn(ArchiveSearchIn):
    reason: str | None = Field(None, max_length=1000, description="Why (the matter); required when the search "
                               "needs a second approver")


class ArchiveExportIn(ArchiveSearchIn):
    purpose_of_export: Literal["legal_discovery", "patient_request", "audit", "other"] = Field(
        ..., description="What the production is for")
    reason: str = Field(..., min_length=3, max_length=1000, description="The matter or request it answers")
    limit: int = Field(10000, ge=1, le=50000, description="At most this many messages")


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    note: str | None = Field(None, max_length=500, description="A short remark (no PHI)")
