"""Pydantic shapes of the consent API (extra fields are refused, errors name the field)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carepost.consent.models import (
    BACKDATE_WINDOW_DAYS,
    EXPIRATION_EVENTS,
    FREQUENCIES,
    RECORDED_METHODS,
    SCAN_MAX_BYTES,
    SCAN_TYPES,
    SUPPRESSION_REASONS,
    SUPPRESSION_SCOPES,
)
from carepost.core.ids import ID_PATTERN, TOPIC_REF_PATTERN
from carepost.core.purposes import PURPOSES, REMUNERATION
from carepost.delivery.schemas import decode_base64

PurposeName = Literal[tuple(PURPOSES)]  # type: ignore[valid-type]
RemunerationName = Literal[tuple(REMUNERATION)]  # type: ignore[valid-type]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class RequirementsIn(_In):
    purpose: PurposeName
    remuneration: RemunerationName = "none"
    prescription_lapsed_days: int | None = Field(None, ge=0, le=36500)


class TextIn(_In):
    purpose: Literal["marketing", "marketing_remunerated"]
    elements: dict[str, dict[str, str | None]] = Field(
        description="Per language (en, es), each element's text: title, phi_description, disclosers, recipients, "
        "purpose_description, remuneration, expiration, right_to_revoke, conditioning, redisclosure, "
        "copy_statement, signature_statement."
    )


class TextUpdate(_In):
    elements: dict[str, dict[str, str | None]]


class SignatureIn(_In):
    name: str | None = Field(None, min_length=1, max_length=200, description="Typed name of the signer.")
    image: str | None = Field(None, max_length=300_000, description="Drawn signature: data:image/png;base64,...")
    signed_at: datetime | None = Field(None, description=f"When it was signed (default: now). Not in the future; more "
                                                         f"than {BACKDATE_WINDOW_DAYS} days back needs backdate_reason "
                                                         "and flags the authorization backdated.")

    @model_validator(mode="after")
    def _one(self):
        if (self.name is None) == (self.image is None):
            raise ValueError("give either name or image")
        return self


class RepresentativeIn(_In):
    name: str = Field(min_length=1, max_length=200)
    authority: str = Field(min_length=1, max_length=200, description="e.g. parent, legal guardian, health care power of attorney")


class ScanIn(_In):
    content_type: Literal[tuple(SCAN_TYPES)] | None = Field(  # type: ignore[valid-type]
        None, description="Optional; the content's first bytes decide (PDF, PNG or JPEG) and must agree.")
    content: bytes = Field(description=f"Base64 of the scanned signed page, at most {SCAN_MAX_BYTES} bytes.")

    @field_validator("content", mode="before")
    @classmethod
    def _decode(cls, value):
        return decode_base64(value, SCAN_MAX_BYTES)


class ExpirationEventIn(_In):
    occurred_at: datetime | None = Field(None, description="When the event happened (default: now); not before the "
                                                           "signing date, not in the future.")


class AuthorizationIn(_In):
    contact_id: str | None = Field(None, min_length=32, max_length=32, pattern=ID_PATTERN)
    email: str | None = Field(None, max_length=320, description="Find the contact by email instead of contact_id.")
    purpose: Literal["marketing", "marketing_remunerated"]
    text_id: str | None = Field(None, min_length=32, max_length=32, pattern=ID_PATTERN,
                                description="Default: the current published text.")
    topic_id: str | None = Field(None, max_length=64, pattern=TOPIC_REF_PATTERN,
                                 description="Limit the authorization to one topic (id or key).")
    signature: SignatureIn
    expires_at: datetime | None = Field(None, description="The expiry date (after signing); or give expiration_event.")
    expiration_event: Literal[tuple(EXPIRATION_EVENTS)] | None = Field(  # type: ignore[valid-type]
        None, description="An event relating to the patient or the purpose (45 CFR 164.508(c)(1)(v)): "
        + "; ".join(f"{k}: {v}" for k, v in EXPIRATION_EVENTS.items())
        + ". Record when it happened with POST /authorizations/{id}/expiration-event.")
    representative: RepresentativeIn | None = None
    language: Literal["en", "es"] | None = None
    method: Literal[tuple(RECORDED_METHODS)] = Field(  # type: ignore[valid-type]
        "api", description="How the authorization was obtained: api, paper (needs scan) or verbal. form, portal and "
        "email_link are set only by CarePost's own flows, which witness the signing.")
    scan: ScanIn | None = Field(None, description="The scan of the signed paper (required with method paper).")
    backdate_reason: str | None = Field(None, min_length=3, max_length=500, description=(
        f"Why an authorization signed more than {BACKDATE_WINDOW_DAYS} days ago is recorded only now (required then; "
        "the authorization is flagged backdated)."))

    @model_validator(mode="after")
    def _who(self):
        if (self.contact_id is None) == (self.email is None):
            raise ValueError("give either contact_id or email")
        return self


class TopicIn(_In):
    key: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=1000)
    opt_in_required: bool = False
    double_opt_in: bool = Field(True, description="Ask for confirmation by email; applies to opt-in topics only "
                                                  "(ignored, stored false, for an opt-out topic).")


class TopicUpdate(_In):
    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=1000)
    opt_in_required: bool | None = None
    double_opt_in: bool | None = None
    archived: bool | None = None


class SubscriptionIn(_In):
    contact_id: str = Field(min_length=32, max_length=32)
    topic_id: str | None = Field(None, max_length=64, description="Topic id or key; null = all marketing.")
    status: Literal["subscribed", "unsubscribed"]
    frequency: Literal[tuple(FREQUENCIES)] | None = None  # type: ignore[valid-type]
    confirmed: bool = Field(False, description="The patient already confirmed (skip double opt-in).")


class SuppressionIn(_In):
    address: str = Field(min_length=3, max_length=320)
    reason: Literal[tuple(SUPPRESSION_REASONS)] = "manual"  # type: ignore[valid-type]
    scope: Literal[tuple(SUPPRESSION_SCOPES)] = "all"  # type: ignore[valid-type]
    topic_id: str | None = Field(None, max_length=64)
    expires_at: datetime | None = None


class EligibilityIn(_In):
    contact_ids: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(min_length=1, max_length=10_000)
    purpose: PurposeName
    topic: str | None = Field(None, max_length=64, pattern=TOPIC_REF_PATTERN, description="Topic id or key.")
    channel: Literal["email"] = "email"
    at: datetime | None = None
    remuneration: RemunerationName = "none"
    prescription_lapsed_days: int | None = Field(None, ge=0, le=36500)


class SettingsIn(_In):
    frequency_cap_daily: int | None = Field(None, ge=1, le=1000)
    frequency_cap_weekly: int | None = Field(None, ge=1, le=1000)
    quiet_hours_start: str | None = Field(None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    quiet_hours_end: str | None = Field(None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    default_time_zone: str | None = Field(None, max_length=64)
    authorization_default_months: int | None = Field(None, ge=1, le=120)
    confirmation_link_hours: int | None = Field(None, ge=1, le=720)
    postal_address: str | None = Field(None, max_length=300,
                                       description="The organization's postal address (CAN-SPAM), shown in the "
                                                   "footer of every commercial message; required before marketing is sent.")
