"""Request bodies of the retention API (``/api/v1/retention``)."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_days: int = Field(description="Keep at least this many days (HIPAA documentation: at least 2192, six years).")
    max_days: int = Field(description="Purge after this many days.")
    inactive_months: int | None = Field(None, description="Contacts class only: months without activity.")
    enabled: bool = True


class HoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["patient", "campaign", "message", "date_range", "organization"]
    matter: str = Field(description="The matter's name (no PHI).", max_length=200)
    reason: str = Field(description="Why the records must be kept (no PHI).", max_length=2000)
    contact_id: str | None = None
    campaign_id: str | None = None
    message_id: str | None = None
    starts_on: date | None = None
    ends_on: date | None = None


class ReleaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(description="Why the hold may end (no PHI).", max_length=2000)


class PurgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(True, description="Show what would go; delete nothing (the default).")
