"""Pydantic shapes of forms as the API speaks them, and the rules a form definition must follow.

A form is a list of fields. Every field has a ``key`` (unique in the form, used in the API and
in the hosted form's input names), a ``type`` and a ``label``. Type-specific settings:

| type | settings |
| --- | --- |
| ``text``, ``long_text`` | ``max_length`` (default 200 / 4000) |
| ``email``, ``phone``, ``date`` | — |
| ``choice`` | ``options`` (1–50), ``multiple`` (check boxes instead of radio buttons) |
| ``rating`` | ``scale`` (3–10; answers 1..scale) |
| ``consent`` | ``topic_id``: a subscription topic the person opts into by ticking the box |
| ``authorization`` | ``purpose``, optional ``text_id`` (default: the current text for the purpose), ``drawn_signature`` |

``phi: true`` flags a field as protected health information: it is masked for people who may
see PHI only masked, left out of staff notifications and never tallied in survey results.
(Every answer is encrypted at rest whatever the flag.) ``contact_field`` copies the answer onto
the contact (text, email, phone and date fields only).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carepost.core.ids import TOPIC_REF_PATTERN

FieldType = Literal["text", "long_text", "email", "phone", "date", "choice", "rating", "consent", "authorization"]
FIELD_TYPES: tuple[str, ...] = FieldType.__args__  # type: ignore[attr-defined]
FIELD_TYPE_LABELS = {
    "text": "Short text",
    "long_text": "Long text",
    "email": "Email address",
    "phone": "Phone number",
    "date": "Date",
    "choice": "Choice",
    "rating": "Rating",
    "consent": "Consent check box (subscription topic)",
    "authorization": "Authorization with signature",
}

# Contact fields a form may fill, and the field types that may fill each.
CONTACT_FIELDS: dict[str, tuple[str, ...]] = {
    "email": ("email",),
    "phone": ("phone",),
    "given_name": ("text",),
    "family_name": ("text",),
    "birth_date": ("date",),
    "address_line1": ("text",),
    "address_line2": ("text",),
    "city": ("text",),
    "state": ("text", "choice"),
    "postal_code": ("text",),
    "preferred_language": ("text", "choice"),
}
# Contact fields that are PHI whatever the form says (direct identifiers, birth date).
PHI_CONTACT_FIELDS = {"email", "phone", "given_name", "family_name", "birth_date", "address_line1", "address_line2"}

KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,78}[a-z0-9])?$")
DEFAULT_MAX = {"text": 200, "long_text": 4000}
LANGUAGES = ("en", "es")
RESERVED_SLUGS = {"confirm", "static", "thanks"}


class FieldDef(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # The pattern is stated in the document; the validator below enforces it with its own words.
    key: str = Field(min_length=1, max_length=40, json_schema_extra={"pattern": r"^[a-z][a-z0-9_]{0,39}$"},
                     description="Lower-case letters, digits and _; unique in the form.")
    type: FieldType
    label: str = Field(min_length=1, max_length=300)
    help: str | None = Field(None, max_length=500)
    required: bool = False
    phi: bool = False
    options: list[str] | None = Field(None, max_length=50)
    multiple: bool = False
    max_length: int | None = Field(None, ge=1, le=20000)
    scale: int | None = Field(None, ge=3, le=10)
    contact_field: str | None = Field(None, max_length=40)
    topic_id: str | None = Field(None, max_length=64, pattern=TOPIC_REF_PATTERN)
    purpose: str | None = Field(None, max_length=64)
    text_id: str | None = Field(None, max_length=64)
    drawn_signature: bool = False

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not KEY_RE.match(v):
            raise ValueError("use lower-case letters, digits and _, starting with a letter (at most 40)")
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        cleaned = [o.strip() for o in v]
        if any(not o or len(o) > 200 for o in cleaned):
            raise ValueError("each option needs 1 to 200 characters")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("options must differ from each other")
        return cleaned

    @model_validator(mode="after")
    def _by_type(self) -> FieldDef:
        t = self.type
        if t == "choice":
            if not self.options:
                raise ValueError("a choice field needs options")
        elif self.options:
            raise ValueError("only choice fields have options")
        if self.multiple and t != "choice":
            raise ValueError("only choice fields may allow several answers")
        if self.max_length is not None and t not in ("text", "long_text"):
            raise ValueError("only text fields have a maximum length")
        if t in ("text", "long_text") and self.max_length is None:
            self.max_length = DEFAULT_MAX[t]
        if t == "rating":
            self.scale = self.scale or 5
        elif self.scale is not None:
            raise ValueError("only rating fields have a scale")
        if t == "consent" and not self.topic_id:
            raise ValueError("a consent check box needs topic_id")
        if t != "consent" and self.topic_id:
            raise ValueError("only consent check boxes have a topic")
        if t == "authorization":
            if not self.purpose:
                raise ValueError("an authorization block needs purpose")
        elif self.purpose or self.text_id or self.drawn_signature:
            raise ValueError("only authorization blocks have purpose, text_id and drawn_signature")
        if self.contact_field is not None:
            allowed = CONTACT_FIELDS.get(self.contact_field)
            if allowed is None:
                raise ValueError(f"contact_field must be one of {', '.join(CONTACT_FIELDS)}")
            if t not in allowed:
                raise ValueError(f"contact_field {self.contact_field} needs a field of type {' or '.join(allowed)}")
            if t == "choice" and self.multiple:
                raise ValueError("a contact field takes one answer")
            if self.contact_field in PHI_CONTACT_FIELDS:
                self.phi = True
        return self


class FormIn(BaseModel):
    """Create a form, or replace its definition (``PUT``). Publishing is a separate call."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=4000)
    kind: Literal["form", "survey"] = Field("form", description="survey: answers are tallied and no contact is created or changed.")
    language: Literal["en", "es"] = "en"
    slug: str | None = Field(None, max_length=80, json_schema_extra={"pattern": r"^([A-Za-z0-9]([A-Za-z0-9-]{0,78}[A-Za-z0-9])?)?$"}, description="Readable public address /f/<slug>; the opaque /f/<public_id> always works.")
    fields: list[FieldDef] = Field(min_length=1, max_length=100)
    notify_emails: list[str] = Field(default_factory=list, max_length=10, description="Staff told of each submission (no PHI in the email).")
    success_message: str = Field("", max_length=1000)

    @field_validator("slug")
    @classmethod
    def _slug(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        v = v.lower()
        if not SLUG_RE.match(v):
            raise ValueError("use lower-case letters, digits and hyphens")
        if v in RESERVED_SLUGS:
            raise ValueError(f"{v!r} is reserved; choose another address")
        return v


class FormOut(BaseModel):
    id: str
    public_id: str
    slug: str | None
    url: str
    name: str
    description: str
    kind: str
    status: str
    language: str
    version: int
    fields: list[dict]
    notify_emails: list[str]
    success_message: str
    published_at: datetime | None
    created_at: datetime
    updated_at: datetime
    submission_count: int = 0


class SubmissionOut(BaseModel):
    id: str
    form_id: str
    form_version: int
    status: str
    contact_id: str | None
    contact_created: bool
    effects: list[str]
    outcome: dict
    created_at: datetime
    confirm_expires_at: datetime | None
    confirmed_at: datetime | None
    answers: dict | None = None
    masked: bool = True
    has_drawn_signature: bool = False


class TallyOption(BaseModel):
    option: str
    count: int


class FieldResult(BaseModel):
    key: str
    label: str
    type: str
    responses: int
    options: list[TallyOption] | None = None
    average: float | None = None
    distribution: list[TallyOption] | None = None


class SurveyResults(BaseModel):
    form_id: str
    submissions: int
    fields: list[FieldResult]
