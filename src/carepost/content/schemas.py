"""Pydantic shapes of message templates as the API speaks them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_HTML = 512 * 1024
MAX_TEXT = 256 * 1024
# One line: no line breaks or other control characters (refused here, at acceptance, not at send).
ONE_LINE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"


MAX_MJML = 512 * 1024


class VariantIn(BaseModel):
    """The parts of one other language; empty parts fall back to the default language's."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(default="", max_length=998, pattern=ONE_LINE)
    preheader: str = Field(default="", max_length=1000, pattern=ONE_LINE)
    html: str = Field(default="", max_length=MAX_HTML)
    text: str = Field(default="", max_length=MAX_TEXT)
    mjml: str = Field(default="", max_length=MAX_MJML, description="MJML source when the template is authored in MJML.")
    from_name: str = Field(default="", max_length=200, pattern=ONE_LINE)
    portal_notice: str = Field(default="", max_length=4000)


class TemplateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=ONE_LINE, description="Unique in the organization.")
    subject: str = Field(min_length=1, max_length=998, pattern=ONE_LINE, description="One line. With contains_phi, no variables.")
    preheader: str = Field(default="", max_length=1000, pattern=ONE_LINE,
                           description="Inbox preview text. With contains_phi, no variables.")
    html: str = Field(default="", max_length=MAX_HTML, description="Jinja2 (sandboxed), autoescaped.")
    text: str = Field(default="", max_length=MAX_TEXT, description="Jinja2 (sandboxed), not escaped.")
    contains_phi: bool = Field(default=True, description="Messages from this template carry PHI (the default).")
    purpose: str | None = Field(default=None, description="Default purpose of messages from this template.")
    source_format: Literal["html", "mjml"] = Field(default="html", description="html, or mjml (compiled to html).")
    mjml: str = Field(default="", max_length=MAX_MJML, description="The MJML source when source_format is mjml.")
    from_name: str = Field(default="", max_length=200, pattern=ONE_LINE, description="Sender name; never PHI.")
    portal_notice: str = Field(default="", max_length=4000, description="Text of the portal notification; never PHI.")
    language: str = Field(default="en", max_length=35, description="The default language (BCP 47: en, es).")
    variants: dict[str, VariantIn] = Field(default_factory=dict, description="Other languages, by language tag.")
    data_uses: list[str] | None = Field(default=None, description="The merge-field helpers the template may use; "
                                        "when given, using any other is refused.")


class TemplateOut(BaseModel):
    id: str
    name: str
    subject: str
    preheader: str
    html: str
    text: str
    contains_phi: bool
    purpose: str | None
    version: int
    version_id: str | None = None
    source_format: str = "html"
    mjml: str = ""
    from_name: str = ""
    portal_notice: str = ""
    language: str = "en"
    variants: dict[str, dict] = Field(default_factory=dict)
    data_uses: list[str] | None = None
    helpers: list[dict] = Field(default_factory=list, description="Merge-field helpers used, with PHI categories.")
    blocks: list[dict] = Field(default_factory=list, description="Dynamic content blocks: key and condition.")
    lint: list[dict] = Field(default_factory=list, description="Spam and size warnings.")
    variables: list[str] = Field(description="Top-level data names the template uses.")
    created_at: datetime
    updated_at: datetime

    @field_validator("created_at", "updated_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # SQLite gives timestamps back without their zone; every CarePost timestamp is UTC.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any] = Field(default_factory=dict, description="Render data: a JSON object (at most 64 KiB).")
    contact_id: str | None = Field(default=None, description="Render as this contact (helpers bound to their data; "
                                   "audited; masked without phi:read_unmasked). Replaces data.")
    version: int | None = Field(default=None, ge=1, le=1_000_000, description="A version number; the current one by default.")
    language: str | None = Field(default=None, description="Force a language variant (else the contact's).")


class VersionSummary(BaseModel):
    id: str
    version: int
    name: str
    purpose: str | None
    contains_phi: bool
    source_format: str
    language: str
    languages: list[str]
    created_by: str | None
    created_at: datetime

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class RenderedOut(BaseModel):
    template_id: str
    version: int
    version_id: str | None = None
    language: str | None = None
    masked: bool = False
    subject: str
    preheader: str
    html: str
    text: str
    contains_phi: bool
    purpose: str | None
