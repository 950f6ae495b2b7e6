"""The journey definition as pydantic models, and request bodies of the journeys API.

A definition (docs/journeys.md, /work/notes/JOURNEY_FORMAT.md) is JSON: purpose, entry, re-entry,
exit rules, goal, start and a graph of steps keyed by step id. Every model forbids unknown
fields, so a typo is a 422 naming its path. The graph rules (targets, reachability, cycles
without a wait, references to templates, segments, topics, people) are in
:mod:`carepost.journeys.validation`; these models only check the shape of each part.

Durations and offsets are small strings shared with the engine: :func:`parse_duration`
("30m", "2h", "2d", "1w"; positive) and :func:`parse_offset` ("-48h", "+6mo", "0d").
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from carepost.content.schemas import ONE_LINE
from carepost.core.ids import ID_PATTERN

MAX_STEPS = 200
MAX_DEFINITION_BYTES = 256 * 1024
STEP_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,31}$"
STEP_ID = re.compile(STEP_ID_PATTERN)
HHMM_PATTERN = r"^([01]\d|2[0-3]):[0-5]\d$"
EVENT_PATTERN = r"^[a-z][a-z0-9_]{0,30}(\.[a-z][a-z0-9_]{0,30}){0,3}$"  # tracking.conversions.EVENT_NAME_RE

DURATION_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
_DURATION = re.compile(r"^([+-]?)(\d{1,6})(m|h|d|w)$")
_OFFSET = re.compile(r"^([+-]?)(\d{1,5})(mo|y|m|h|d|w)$")
MAX_WAIT = timedelta(days=3 * 366)


def parse_duration(text: Any) -> timedelta:
    """``"30m"``, ``"2h"``, ``"2d"``, ``"1w"`` -> a timedelta. Raises ValueError for anything else,
    and for a duration of zero or less (a wait that never waits would spin)."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError("Enter a duration as a number and a unit: 30m, 2h, 2d or 1w.")
    value = int(m.group(2)) * DURATION_UNITS[m.group(3)]
    if m.group(1) == "-" or value <= timedelta(0):
        raise ValueError("A wait must be longer than zero.")
    if value > MAX_WAIT:
        raise ValueError("A wait is at most three years.")
    return value


def parse_offset(text: Any) -> tuple[int, str]:
    """``"-48h"``, ``"-7d"``, ``"+6mo"``, ``"1y"``, ``"0d"`` -> (signed amount, unit). Months and
    years are calendar units (the engine adds them to the date); m/h/d/w are fixed lengths."""
    m = _OFFSET.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError("Enter an offset as a signed number and a unit: -48h, -7d, +6mo, 1y or 0d.")
    amount = int(m.group(2)) * (-1 if m.group(1) == "-" else 1)
    return amount, m.group(3)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


StepId = Annotated[str, Field(pattern=STEP_ID_PATTERN)]
EventName = Annotated[str, Field(max_length=64, pattern=EVENT_PATTERN)]
Id = Annotated[str, Field(pattern=ID_PATTERN)]
Scalar = str | StrictInt | float | StrictBool | None


# --------------------------------------------------------------------------- entry

class EventEntry(_Strict):
    type: Literal["event"]
    event: EventName
    where: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")], Scalar] | None = Field(
        None, max_length=20, description="Equality filter on the event's properties (compared in memory).")


class SegmentEntry(_Strict):
    type: Literal["segment"]
    segment_id: Id


DATE_FIELDS = ("appointment.start", "birth_date", "last_visit", "refill_due")
DATE_FIELD_PATTERN = r"^(appointment\.start|birth_date|last_visit|refill_due|screening_due:[A-Za-z0-9][A-Za-z0-9:._-]{0,63})$"


class DateEntry(_Strict):
    type: Literal["date"]
    field: Annotated[str, Field(pattern=DATE_FIELD_PATTERN)]
    offset: str = "0d"
    anniversary: StrictBool = False
    at: Annotated[str, Field(pattern=HHMM_PATTERN)] | None = None


ENTRY_MODELS: dict[str, type[_Strict]] = {"event": EventEntry, "segment": SegmentEntry, "date": DateEntry}


class Reentry(_Strict):
    mode: Literal["never", "after", "always"] = "never"
    days: StrictInt | None = Field(None, ge=1, le=3650)


class Goal(_Strict):
    event: EventName
    within_days: StrictInt = Field(30, ge=1, le=365)


# --------------------------------------------------------------------------- steps

class SendStep(_Strict):
    type: Literal["send"]
    template_id: Id
    template_version: StrictInt = Field(ge=1)
    next: StepId


class WaitStep(_Strict):
    type: Literal["wait"]
    duration: str
    next: StepId


class WaitUntilStep(_Strict):
    type: Literal["wait_until"]
    time: Annotated[str, Field(pattern=HHMM_PATTERN)]
    weekdays: list[Annotated[StrictInt, Field(ge=1, le=7)]] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7],
                                                                     min_length=1, max_length=7)
    next: StepId


class WaitEventStep(_Strict):
    type: Literal["wait_event"]
    event: EventName
    timeout: str
    next: StepId
    timeout_next: StepId


ATTRIBUTE_OPS = ("eq", "ne", "in", "not_in", "lt", "le", "gt", "ge", "is_empty", "is_not_empty")
ENGAGEMENT_IS = ("opened", "clicked", "not_opened", "converted")


class AttributeCondition(_Strict):
    kind: Literal["attribute"]
    field: Annotated[str, Field(max_length=70)]
    op: Literal["eq", "ne", "in", "not_in", "lt", "le", "gt", "ge", "is_empty", "is_not_empty"]
    value: Scalar | list[Scalar] = None


class SegmentCondition(_Strict):
    kind: Literal["segment"]
    segment_id: Id


class EngagementCondition(_Strict):
    kind: Literal["engagement"]
    step: StepId
    is_: Literal["opened", "clicked", "not_opened", "converted"] = Field(alias="is")

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


CONDITION_MODELS: dict[str, type[_Strict]] = {"attribute": AttributeCondition, "segment": SegmentCondition,
                                              "engagement": EngagementCondition}


class BranchCase(_Strict):
    when: dict[str, Any]
    next: StepId


class BranchStep(_Strict):
    type: Literal["branch"]
    cases: list[BranchCase] = Field(max_length=50)
    default: StepId


class SplitVariant(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=40, pattern=ONE_LINE)]
    weight: StrictInt = Field(ge=0, le=100)
    next: StepId


class SplitStep(_Strict):
    type: Literal["split"]
    variants: list[SplitVariant] = Field(min_length=2, max_length=10)


class UpdateStep(_Strict):
    type: Literal["update"]
    action: Literal["set_field", "subscribe_topic", "unsubscribe_topic"]
    field: Annotated[str, Field(max_length=70)] | None = None
    value: Scalar = None
    topic_id: Id | None = None
    next: StepId


NOTIFY_ROLES = ("owner", "admin", "compliance_officer", "marketer", "care_team", "analyst", "developer", "read_only")


class NotifyStep(_Strict):
    type: Literal["notify"]
    role: str | None = None
    user_id: Id | None = None
    text: Annotated[str, Field(min_length=1, max_length=1000)]
    next: StepId


class WebhookStep(_Strict):
    type: Literal["webhook"]
    event: EventName = "journey.step"
    next: StepId


class ExitStep(_Strict):
    type: Literal["exit"]


STEP_MODELS: dict[str, type[_Strict]] = {
    "send": SendStep, "wait": WaitStep, "wait_until": WaitUntilStep, "wait_event": WaitEventStep,
    "branch": BranchStep, "split": SplitStep, "update": UpdateStep, "notify": NotifyStep, "webhook": WebhookStep,
    "exit": ExitStep,
}
WAIT_TYPES = ("wait", "wait_until", "wait_event")
Step = (SendStep | WaitStep | WaitUntilStep | WaitEventStep | BranchStep | SplitStep | UpdateStep | NotifyStep
        | WebhookStep | ExitStep)


class Position(_Strict):
    x: StrictInt | float
    y: StrictInt | float


class DefinitionShape(_Strict):
    """The top level; ``entry`` and each step are checked by their own model (by ``type``) so
    an error names ``steps.<id>.<field>``, not a pydantic union tag."""

    purpose: str
    topic_id: Id | None = None
    entry: dict[str, Any]
    reentry: Reentry = Field(default_factory=Reentry)
    exit_on: list[Literal["unsubscribe", "revocation"]] = Field(default_factory=lambda: ["unsubscribe", "revocation"],
                                                               max_length=2)
    goal: Goal | None = None
    start: StepId
    steps: dict[str, dict[str, Any]]
    layout: dict[str, Position] | None = None


class Definition(BaseModel):
    """A definition that passed :func:`carepost.journeys.validation.validate_definition`'s shape
    checks: typed entry and steps (what the engine reads)."""

    model_config = ConfigDict(extra="forbid")

    purpose: str
    topic_id: str | None = None
    entry: EventEntry | SegmentEntry | DateEntry
    reentry: Reentry
    exit_on: list[str]
    goal: Goal | None = None
    start: str
    steps: dict[str, Step]
    layout: dict[str, Position] | None = None


# --------------------------------------------------------------------------- API bodies

class JourneyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=ONE_LINE)
    description: str | None = Field(None, max_length=2000, description="For staff; never PHI.")
    definition: dict = Field(description="The journey definition (docs/journeys.md); becomes version 1, a draft.")


class JourneyPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200, pattern=ONE_LINE)
    description: str | None = Field(None, max_length=2000)


class VersionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    definition: dict = Field(description="Replaces the draft version's definition, or starts a new draft version "
                             "when the newest is published (published versions never change).")


class DefinitionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    definition: dict


class PublishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1, le=100_000, description="Default: the newest version.")
    mode: Literal["migrate", "drain"] | None = Field(
        None, description="When the journey already has a live version: migrate its runs to the step of the same id "
        "in the new version (runs whose step is gone exit with reason removed), or let them drain on the old "
        "version. Required then; ignored for a first publish.")


class CommentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field("", max_length=4000, description="Why (kept encrypted; required to reject).")
