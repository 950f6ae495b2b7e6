"""Pydantic shapes of the segments API. A query is text (the segment language) or its JSON tree."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Query = str | dict[str, Any]


class QueryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Query = Field(description='Segment language text (`age >= 65 and has condition icd10:E11.*`) or its JSON tree')
    at: datetime | None = Field(None, description="Evaluate as of this instant (default: now)")


class CountIn(QueryIn):
    breakdown: Literal["age_band", "sex", "stage", "zip3"] | None = Field(
        None, description="Also split the count by one field")


class PreviewIn(QueryIn):
    limit: int = Field(10, ge=1, le=50)


class ParseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=20_000, description="Text to turn into a JSON tree")
    tree: dict[str, Any] | None = Field(None, description="A JSON tree to check and print as text")


class SegmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=2000)
    kind: Literal["dynamic", "snapshot"] = "dynamic"
    query: Query


class SegmentPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)
    kind: Literal["dynamic", "snapshot"] | None = None
    query: Query | None = None
    refresh_snapshot: bool = Field(False, description="Take the snapshot again now")


class ValueSetCode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: str = Field(max_length=20)
    code: str | None = Field(None, max_length=64)
    prefix: str | None = Field(None, max_length=64)
    display: str | None = Field(None, max_length=300)


class ValueSetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]{0,63}$")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=2000)
    source: str = Field("", max_length=1000)
    sensitive_category: str | None = None
    codes: list[ValueSetCode] = Field(min_length=1, max_length=5000)


class ValueSetPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=2000)
    source: str = Field("", max_length=1000)
    sensitive_category: str | None = None
    codes: list[ValueSetCode] = Field(min_length=1, max_length=5000)


class LocationIn(BaseModel):
    """A location of the organization (a clinic, a pharmacy) that distance criteria measure from."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=120, description="Unique within the organization (case-insensitive)")
    postal_code: str = Field(pattern=r"^\d{5}(-?\d{4})?$", description="A US ZIP code (ZIP+4 is cut to five digits)")
