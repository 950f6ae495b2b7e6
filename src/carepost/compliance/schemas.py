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
