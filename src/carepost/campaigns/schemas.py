"""Request bodies of the campaigns API (``extra="forbid"``: an unknown field is a 422 naming it).

Field types are kept loose where the service gives the clearer answer (a throttle of zero, a
schedule in the past, an unknown time zone): :mod:`carepost.campaigns.service` validates every
field and names it, for API, UI and CLI callers alike.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from carepost.content.schemas import ONE_LINE
from carepost.core.ids import ID_PATTERN

IdList = list[Annotated[str, Field(pattern=ID_PATTERN)]]


class CampaignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=ONE_LINE)
    purpose: str = Field(min_length=1, max_length=64, pattern=ONE_LINE, description="A purpose of consent (docs/consent.md): "
                         "treatment, refill_reminder, marketing, ...")
    topic_id: str | None = Field(None, pattern=ID_PATTERN, description="The consent topic; its opt-outs apply.")
    segment_id: str = Field(pattern=ID_PATTERN, description="The audience.")
    exclusion_segment_ids: IdList = Field(default_factory=list, max_length=20,
                                             description="Members of these segments are left out.")
    template_version_id: str = Field(pattern=ID_PATTERN, description="The immutable template version sent.")
    sending_domain_id: str | None = Field(None, pattern=ID_PATTERN)
    from_address: str | None = Field(None, max_length=320, pattern=ONE_LINE)
    from_name: str | None = Field(None, max_length=200, pattern=ONE_LINE, description="Sender name; never PHI.")
    security: Literal["opportunistic", "tls_required", "tls_exclusive", "secure"] | None = Field(
        None, description="Raises the organization's secure-delivery mode; None keeps it.")
    remuneration: Literal["none", "cost", "other"] = Field(
        "none", description="Financial remuneration from a third party: none, reasonably related to the cost of "
        "the communication, or other.")
    refill_drug: str | None = Field(None, max_length=64, pattern=ONE_LINE,
                               description="For a refill reminder: the drug, e.g. rxnorm:197361.")
    schedule_kind: Literal["now", "at", "local"] = "now"
    send_at: datetime | None = Field(None, description="For 'at': when (UTC, or wall-clock in time_zone).")
    local_time: str | None = Field(None, max_length=5, pattern=ONE_LINE,
                                   description="For 'local': HH:MM in each recipient's time zone.")
    local_date: date | None = Field(None, description="For 'local': the day.")
    time_zone: str | None = Field(None, max_length=64, pattern=ONE_LINE,
                                  description="IANA zone of a wall-clock send_at; for 'local', "
                                  "the zone of contacts without one (default: the organization's).")
    throttle_per_hour: int | None = Field(None, description="Messages per hour (none: no limit).")
    throttle_per_domain_per_hour: int | None = Field(None, description="Messages per hour per receiving domain.")
    track_opens: bool = True
    track_clicks: bool = True
    ab_test: dict | None = Field(None, description="A/B/n test settings (docs/campaigns.md).")


class CampaignPatch(BaseModel):
    """Any subset of :class:`CampaignIn`; an edit of an approved field returns the campaign to draft."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200, pattern=ONE_LINE)
    purpose: str | None = Field(None, min_length=1, max_length=64, pattern=ONE_LINE)
    topic_id: str | None = Field(None, pattern=ID_PATTERN)
    segment_id: str | None = Field(None, pattern=ID_PATTERN)
    exclusion_segment_ids: IdList | None = Field(None, max_length=20)
    template_version_id: str | None = Field(None, pattern=ID_PATTERN)
    sending_domain_id: str | None = Field(None, pattern=ID_PATTERN)
    from_address: str | None = Field(None, max_length=320, pattern=ONE_LINE)
    from_name: str | None = Field(None, max_length=200, pattern=ONE_LINE)
    security: Literal["opportunistic", "tls_required", "tls_exclusive", "secure"] | None = None
    remuneration: Literal["none", "cost", "other"] | None = None
    refill_drug: str | None = Field(None, max_length=64, pattern=ONE_LINE)
    schedule_kind: Literal["now", "at", "local"] | None = None
    send_at: datetime | None = None
    local_time: str | None = Field(None, max_length=5, pattern=ONE_LINE)
    local_date: date | None = None
    time_zone: str | None = Field(None, max_length=64, pattern=ONE_LINE)
    throttle_per_hour: int | None = None
    throttle_per_domain_per_hour: int | None = None
    track_opens: bool | None = None
    track_clicks: bool | None = None
    ab_test: dict | None = None


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedule_kind: Literal["now", "at", "local"] | None = None
    send_at: datetime | None = None
    local_time: str | None = Field(None, max_length=5, pattern=ONE_LINE)
    local_date: date | None = None
    time_zone: str | None = Field(None, max_length=64, pattern=ONE_LINE)


class CommentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field("", max_length=4000, description="Why (kept encrypted; may be required).")


class ReportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_contact_id: str | None = Field(None, pattern=ID_PATTERN)


class CampaignSettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approval_required_purposes: list[Annotated[str, Field(max_length=64, pattern=ONE_LINE)]] | None = Field(None, max_length=20)
    approval_required_for_sensitive_segments: bool | None = None
    approval_required_for_all: bool | None = None
    overlap_days: int | None = None
