"""Pydantic shapes of message templates as the API speaks them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_HTML = 512 * 1024
MAX_TEXT = 256 * 1024
# One line: no line breaks or other control characters (refused here, at acceptance, not at send).
ONE_LINE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"


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


class RenderedOut(BaseModel):
    template_id: str
    version: int
    subject: str
    preheader: str
    html: str
    text: str
    contains_phi: bool
    purpose: str | None
