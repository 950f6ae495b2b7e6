"""Pydantic shapes of contacts, clinical facts and imports as the API speaks them."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEXES = ("female", "male", "other", "unknown")
NAME_MAX = 200


class IdentifierIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: str = Field(min_length=1, max_length=255)
    value: str = Field(min_length=1, max_length=200)
    type: str | None = Field(None, max_length=20, description="MR (medical record number), MB (member id), PT, ...")


class PhoneIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str = Field(min_length=1, max_length=40)
    use: str | None = Field(None, max_length=12)


class ContactIn(BaseModel):
    """Create or update a contact. With ``external_id`` the call is an upsert: the contact holding
    that external id (in ``external_id_system``) is updated, else a new one is created."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    external_id: str | None = Field(None, min_length=1, max_length=200)
    external_id_system: str = Field("urn:carepost:external", min_length=1, max_length=255)
    mrn: str | None = Field(None, min_length=1, max_length=200)
    mrn_system: str = Field("urn:carepost:mrn", min_length=1, max_length=255)
    identifiers: list[IdentifierIn] | None = Field(None, max_length=20)
    name_prefix: str | None = Field(None, max_length=40)
    given_name: str | None = Field(None, max_length=NAME_MAX)
    middle_name: str | None = Field(None, max_length=NAME_MAX)
    family_name: str | None = Field(None, max_length=NAME_MAX)
    name_suffix: str | None = Field(None, max_length=40)
    email: str | None = Field(None, max_length=320)
    emails: list[str] | None = Field(None, max_length=10)
    phone: str | None = Field(None, max_length=40)
    phones: list[PhoneIn] | None = Field(None, max_length=10)
    address_line1: str | None = Field(None, max_length=200)
    address_line2: str | None = Field(None, max_length=200)
    city: str | None = Field(None, max_length=100)
    state: str | None = Field(None, max_length=50)
    postal_code: str | None = Field(None, max_length=16)
    country: str | None = Field(None, min_length=2, max_length=2)
    birth_date: date | None = None
    sex: Literal["female", "male", "other", "unknown"] | None = None
    gender_identity: str | None = Field(None, max_length=64)
    preferred_language: str | None = Field(None, max_length=35)
    time_zone: str | None = Field(None, max_length=64)
    ethnicity: str | None = Field(None, max_length=64)
    race: str | None = Field(None, max_length=64)
    marital_status: str | None = Field(None, max_length=32)
    education: str | None = Field(None, max_length=64)
    employment_status: str | None = Field(None, max_length=64)
    household_status: str | None = Field(None, max_length=64)
    income_band: str | None = Field(None, max_length=32)
    coverage_type: str | None = Field(None, max_length=64)
    coverage_plan: str | None = Field(None, max_length=200)
    religion: str | None = Field(None, max_length=64)
    deceased: bool | None = None
    care_stage: str | None = Field(None, max_length=40, description="An organization-defined stage set by hand; null returns to the derived stage.")
    attributes: dict[str, Any] | None = Field(None, description="Custom attributes by key.")

    @field_validator("birth_date")
    @classmethod
    def _birth_date_in_past(cls, v: date | None) -> date | None:
        if v is not None and (v.year < 1880 or v > date.today()):
            raise ValueError("birth date must be between 1880 and today")
        return v

    @field_validator("time_zone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError("unknown IANA time zone") from None
        return v


class FactIn(BaseModel):
    """A clinical fact written through the API. Fields that do not apply to a kind are refused."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    code_system: str | None = Field(None, max_length=255, description="Short name (icd10cm, snomed, rxnorm, loinc, cvx) or FHIR system URI")
    code: str | None = Field(None, max_length=64)
    display: str | None = Field(None, max_length=300)
    status: str | None = Field(None, max_length=32)
    # kind-specific (see FACT_FIELDS)
    verification_status: str | None = Field(None, max_length=32)
    category: str | None = Field(None, max_length=64)
    onset_date: date | None = None
    abatement_date: date | None = None
    recorded_date: date | None = None
    intent: str | None = Field(None, max_length=20)
    authored_on: date | None = None
    start_date: date | None = None
    end_date: date | None = None
    last_fill_date: date | None = None
    days_supply: int | None = Field(None, ge=0, le=3650)
    refills_allowed: int | None = Field(None, ge=0, le=100)
    next_refill_due: date | None = None
    performed_start: datetime | None = None
    performed_end: datetime | None = None
    effective_at: datetime | None = None
    value_quantity: float | None = None
    value_unit: str | None = Field(None, max_length=40)
    value_code: str | None = Field(None, max_length=64)
    value_display: str | None = Field(None, max_length=200)
    interpretation: str | None = Field(None, max_length=20)
    occurrence_date: date | None = None
    class_code: str | None = Field(None, max_length=20)
    start_at: datetime | None = None
    end_at: datetime | None = None
    is_hospitalization: bool | None = None
    discharge_disposition: str | None = Field(None, max_length=40)
    minutes_duration: int | None = Field(None, ge=0, le=100000)
    period_start: date | None = None
    period_end: date | None = None
    plan_name: str | None = Field(None, max_length=200)
    payor_name: str | None = Field(None, max_length=200)


class AttributeDefinitionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    key: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    label: str = Field(min_length=1, max_length=200)
    type: Literal["text", "number", "date", "boolean", "list"]
    options: list[str] = Field(default_factory=list, max_length=200)


class CsvMappingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=200)
    columns: dict[str, str] = Field(description="CSV header -> CarePost field (see GET /api/v1/imports/fields).")
    delimiter: str | None = Field(None, min_length=1, max_length=1)
    encoding: Literal["utf-8", "utf-8-sig", "latin-1", "cp1252"] | None = None
    date_format: str | None = Field(None, max_length=20, description="strftime format such as %m/%d/%Y; empty tries common formats")
    identifier_system: str | None = Field(None, max_length=255, description="System of the external id column")
    mrn_system: str | None = Field(None, max_length=255)
    has_header: bool = True
