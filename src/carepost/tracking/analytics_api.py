"""REST routes of analytics (issue 13 items 4 and 6).

* ``POST /api/v1/events`` (``phi:write``): a contact's event (``appointment.booked``…),
  idempotent by ``Idempotency-Key`` header or ``idempotency_key`` field; conversions attributed to
  goals (:mod:`carepost.tracking.conversions`).
* ``/api/v1/goals`` (read ``analytics:read``, change ``campaigns:manage``).
* ``/api/v1/analytics/...`` (``analytics:read``): totals, per message source and other
  breakdowns, a time series by hour or day, one message, and CSV — all read from the rollups
  only. For callers without ``phi:read_unmasked`` counts of 1 to 10 are ``"<11"`` and a cell
  that would give a suppressed one away by subtraction is ``"suppressed"``.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.tracking import analytics, conversions
from carepost.tracking.rollups import METRICS

router = APIRouter(prefix="/api/v1", tags=["analytics"])


# --------------------------------------------------------------------------- events


class ContactRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str | None = Field(None, max_length=320)
    phone: str | None = Field(None, max_length=64)
    mrn: str | None = Field(None, max_length=128)
    system: str | None = Field(None, max_length=320)


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=conversions.MAX_EVENT_NAME, pattern=conversions.EVENT_NAME_RE.pattern,
                      description="appointment.booked, refill.picked_up, or a name of your own (lowercase, dots).")
    contact_id: str | None = Field(None, max_length=32, pattern=r"^[0-9a-f]{32}$")
    contact: ContactRef | None = Field(None, description="Instead of contact_id: an email, phone or MRN (and system).")
    occurred_at: datetime | None = Field(None, description="When it happened (with a time zone); default now.")
    properties: dict[str, Any] | None = Field(
        None, description=f"Up to {conversions.MAX_PROPERTIES_BYTES} bytes of JSON; stored encrypted, never echoed.")
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


class EventOut(BaseModel):
    id: str
    name: str
    contact_id: str
    occurred_at: str
    conversion: dict | None


@router.post("/events", status_code=201, response_model=EventOut,
             summary="Record a contact's event (idempotent by key); goals attribute conversions")
def create_event(request: Request, body: EventIn,
                 idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
                 principal: Principal = Depends(require(P.PHI_WRITE))) -> JSONResponse:
    session = request.state.db
    if idempotency_key is not None and body.idempotency_key is not None and idempotency_key != body.idempotency_key:
        raise ValidationFailed("The Idempotency-Key header and idempotency_key differ.", field="idempotency_key")
    key = idempotency_key if idempotency_key is not None else body.idempotency_key
    data = body.model_dump(mode="json", exclude_none=True)
    event, created = conversions.record_event(
        session, principal.org_id, name=body.name, contact_id=body.contact_id,
        contact=body.contact.model_dump(exclude_none=True) if body.contact is not None else None,
        occurred_at=body.occurred_at, properties=body.properties, idempotency_key=key,
        request_hash=conversions.request_fingerprint(data) if key else None, created_by=principal.actor_id)
    if created:
        record_for(session, principal, request, "contact_event.create", target_type="contact",
                   target_id=event.contact_id, details={"event_id": event.id, "name": event.name,
                                                        "converted": bool(event.goal_id)})
    session.commit()
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(conversions.event_out(event), status_code=201, headers=headers)


@router.get("/event-names", summary="Event names CarePost knows (any other matching the pattern is accepted)")
def event_names(principal: Principal = Depends(require(P.ANALYTICS_READ))) -> dict:
    return {"names": [{"name": n, "description": d} for n, d in sorted(conversions.KNOWN_EVENTS.items())],
            "pattern": conversions.EVENT_NAME_RE.pattern}


# --------------------------------------------------------------------------- goals


class GoalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=120)
    event_name: str = Field(max_length=conversions.MAX_EVENT_NAME, pattern=conversions.EVENT_NAME_RE.pattern)
    window_days: int = Field(ge=1, le=conversions.MAX_WINDOW_DAYS)


class GoalPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=120)
    window_days: int | None = Field(None, ge=1, le=conversions.MAX_WINDOW_DAYS)


class GoalOut(BaseModel):
    id: str
    name: str
    event_name: str
    window_days: int
    created_at: str | None


@router.get("/goals", response_model=list[GoalOut], summary="Conversion goals")
def list_goals(request: Request, principal: Principal = Depends(require(P.ANALYTICS_READ))) -> list[dict]:
    return [conversions.goal_out(g) for g in conversions.list_goals(request.state.db, principal.org_id)]


@router.post("/goals", status_code=201, response_model=GoalOut, summary="Count an event as a conversion")
def create_goal(request: Request, body: GoalIn, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))) -> dict:
    session = request.state.db
    goal = conversions.create_goal(session, principal.org_id, name=body.name, event_name=body.event_name,
                                   window_days=body.window_days, created_by=principal.actor_id)
    record_for(session, principal, request, "goal.create", target_type="goal", target_id=goal.id,
               details={"event_name": goal.event_name, "window_days": goal.window_days})
    session.commit()
    return conversions.goal_out(goal)


@router.patch("/goals/{goal_id}", response_model=GoalOut, summary="Rename a goal or change its window")
def update_goal(request: Request, goal_id: str, body: GoalPatch,
                principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))) -> dict:
    session = request.state.db
    goal = conversions.get_goal(session, principal.org_id, goal_id)
    changed = conversions.update_goal(session, goal, name=body.name, window_days=body.window_days)
    if changed:
        record_for(session, principal, request, "goal.update", target_type="goal", target_id=goal.id,
                   details={"changed": changed, "window_days": goal.window_days})
    session.commit()
    return conversions.goal_out(goal)


@router.delete("/goals/{goal_id}", status_code=204, summary="Stop counting a goal (counted conversions stay)")
def delete_goal(request: Request, goal_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))) -> Response:
    session = request.state.db
    goal = conversions.get_goal(session, principal.org_id, goal_id)
    record_for(session, principal, request, "goal.delete", target_type="goal", target_id=goal.id,
               details={"event_name": goal.event_name})
    conversions.delete_goal(session, goal)
    session.commit()
    return Response(status_code=204)


# --------------------------------------------------------------------------- analytics

from carepost.core.ids import ID_PATTERN  # noqa: E402
SOURCE_PATTERN = r"^[a-z_]{1,16}$"


def filters(start: date | None = Query(None, description="First day (UTC), default 29 days before end."),
            end: date | None = Query(None, description="Last day (UTC, inclusive), default today."),
            source: str | None = Query(None, pattern=SOURCE_PATTERN, description="api, smtp, ui, campaign, journey"),
            purpose: str | None = Query(None, max_length=64, pattern=r"^[a-z0-9_.:-]{1,64}$"),
            topic_id: str | None = Query(None, pattern=ID_PATTERN),
            campaign_id: str | None = Query(None, pattern=ID_PATTERN),
            journey_step_id: str | None = Query(None, pattern=ID_PATTERN),
            template_id: str | None = Query(None, pattern=ID_PATTERN),
            segment_id: str | None = Query(None, pattern=ID_PATTERN),
            receiving_domain: str | None = Query(None, max_length=64, pattern=r"^[a-z0-9.-]{1,64}$"),
            sending_domain_id: str | None = Query(None, pattern=ID_PATTERN,
                                                  description="One of the organization's sending domains.")
            ) -> analytics.Filters:
    return make_filters(start, end, source=source, purpose=purpose, topic_id=topic_id, campaign_id=campaign_id,
                        journey_step_id=journey_step_id, template_id=template_id, segment_id=segment_id,
                        receiving_domain=receiving_domain, sending_domain_id=sending_domain_id)


def make_filters(start: date | None, end: date | None, **dims) -> analytics.Filters:
    end = end or clock.now().astimezone(UTC).date()
    start = start or end - timedelta(days=29)
    if start > end:
        raise ValidationFailed("start is after end.", field="start")
    if (end - start).days + 1 > analytics.MAX_DAYS:
        raise ValidationFailed(f"The range is at most {analytics.MAX_DAYS} days.", field="start")
    return analytics.Filters(start=start, end=end, **dims)


def _unmasked(principal: Principal) -> bool:
    return principal.can(P.PHI_READ_UNMASKED)


def shown(counts: dict[str, int], unmasked: bool) -> dict:
    return dict(counts) if unmasked else analytics.suppress_counts(counts)


def shown_rows(rows: dict[str, dict[str, int]], unmasked: bool) -> dict[str, dict]:
    """Rows of a breakdown as shown; suppressed also down each column (a row's cell must not be
    derivable from the column total)."""
    if unmasked:
        return {k: dict(v) for k, v in rows.items()}
    out = {k: analytics.suppress_counts(v) for k, v in rows.items()}
    for metric in {m for v in rows.values() for m in v}:
        column = analytics.suppress_column({k: rows[k].get(metric, 0) for k in rows}, metric)
        for key, value in column.items():
            if isinstance(value, str) and metric in out[key] and not isinstance(out[key][metric], str):
                out[key][metric] = value
    return out


def _rates(totals: dict[str, int], masked: bool = False) -> dict[str, float | None]:
    """Rates over what was sent or delivered. For a masked viewer a rate whose numerator is a
    small cell (1..10) is left out: rate × sent would give the count away."""
    sent = totals.get("sent", 0)
    delivered = totals.get("delivered", 0)

    def rate(n, d):
        if masked and 0 < n < analytics.SMALL_CELL:
            return None
        return round(n / d, 4) if d else None

    bounced = totals.get("bounced_hard", 0) + totals.get("bounced_soft", 0)
    return {"delivery_rate": rate(delivered, sent), "bounce_rate": rate(bounced, sent),
            "complaint_rate": rate(totals.get("complained", 0), delivered or sent),
            "open_rate_human": rate(totals.get("opened_human", 0), delivered or sent),
            "click_rate_human": rate(totals.get("clicked_human", 0), delivered or sent),
            "conversion_rate": rate(totals.get("converted", 0), delivered or sent)}


def _filters_out(f: analytics.Filters) -> dict:
    return {k: (v.isoformat() if isinstance(v, date) else v) for k, v in vars(f).items() if v is not None}


@router.get("/analytics/metrics", summary="What each analytics metric counts")
def metrics(principal: Principal = Depends(require(P.ANALYTICS_READ))) -> dict:
    return {"metrics": [{"name": n, "description": d} for n, d in METRICS.items()],
            "small_cell": {"threshold": analytics.SMALL_CELL, "shown_as": analytics.SUPPRESSED,
                           "complement": analytics.SUPPRESSED_COMPLEMENT}}


@router.get("/analytics/summary", summary="Totals over a date range and filters (rollups only)")
def summary(request: Request, f: analytics.Filters = Depends(filters),
            principal: Principal = Depends(require(P.ANALYTICS_READ))) -> dict:
    totals = analytics.summary(request.state.db, principal.org_id, f)
    unmasked = _unmasked(principal)
    return {"filters": _filters_out(f), "masked": not unmasked, "totals": shown(totals, unmasked),
            "rates": _rates(totals, not unmasked) if unmasked or totals.get("sent", 0) >= analytics.SMALL_CELL else {}}


Breakdown = Literal["source", "campaign", "journey_step", "template", "segment", "receiving_domain", "topic", "purpose",
                    "sending_domain"]


@router.get("/analytics/breakdown", summary="Figures per message source, campaign, journey step, template, "
                                              "segment, receiving domain, topic or purpose")
def breakdown(request: Request, by: Breakdown = Query("source"), f: analytics.Filters = Depends(filters),
              principal: Principal = Depends(require(P.ANALYTICS_READ))) -> dict:
    rows = analytics.breakdown(request.state.db, principal.org_id, f, by)
    unmasked = _unmasked(principal)
    shown_ = shown_rows(rows, unmasked)
    return {"filters": _filters_out(f), "by": by, "masked": not unmasked,
            "rows": [{"key": k or None, "counts": shown_[k]} for k in sorted(rows, key=lambda k: (k == "", k))]}


@router.get("/analytics/sources", summary="Figures per message source (api, smtp, ui, campaign, journey)")
def sources(request: Request, f: analytics.Filters = Depends(filters),
            principal: Principal = Depends(require(P.ANALYTICS_READ))) -> dict:
    return breakdown(request, "source", f, principal)


@router.get("/analytics/series", summary="Counts over time, by hour or by day")
def series(request: Request, interval: Literal["hour", "day"] = "day",
           metric: list[str] = Query(["accepted", "delivered", "opened_human", "clicked_human"], max_length=12),
           f: analytics.Filters = Depends(filters),
           principal: Principal = Depends(require(P.ANALYTICS_READ))) -> dict:
    from carepost.tracking.rollups import valid_metric

    for m in metric:
        if not valid_metric(m):
            raise ValidationFailed("Unknown metric; see GET /api/v1/analytics/metrics.", field="metric")
    if interval == "hour" and (f.end - f.start).days + 1 > analytics.MAX_HOURS_DAYS:
        raise ValidationFailed(f"By hour, the range is at most {analytics.MAX_HOURS_DAYS} days.", field="interval")
    periods, values = analytics.series(request.state.db, principal.org_id, f, interval, list(dict.fromkeys(metric)))
    unmasked = _unmasked(principal)
    return {"filters": _filters_out(f), "interval": interval, "masked": not unmasked,
            "periods": [p.isoformat().replace("+00:00", "Z") for p in periods],
            "series": {m: (v if unmasked else analytics.suppress_list(v, m)) for m, v in values.items()}}


@router.get("/analytics/messages/{message_id}", summary="Figures of one message (not part of a campaign or journey)")
def message(request: Request, message_id: str, principal: Principal = Depends(require(P.ANALYTICS_READ))) -> dict:
    from carepost.core.ids import is_id

    if not is_id(message_id):
        raise ValidationFailed("message_id is a CarePost id.", field="message_id")
    from carepost.core.errors import NotFound
    from carepost.delivery.models import Message

    # Another organization's message (or none) is not found, never an empty set of figures:
    # the organization-scoped session sees only this organization's messages.
    if request.state.db.get(Message, message_id) is None:
        raise NotFound("No such message.", field="message_id")
    f = analytics.Filters(start=date(2000, 1, 1), end=date(2000, 1, 1), message_id=message_id)
    totals = analytics.summary(request.state.db, principal.org_id, f)
    unmasked = _unmasked(principal)
    return {"message_id": message_id, "masked": not unmasked, "totals": shown(totals, unmasked)}


@router.get("/analytics/links", summary="Clicks per link of a message or a campaign (position, part, target host)")
def links(request: Request, message_id: str | None = Query(None, max_length=32),
          campaign_id: str | None = Query(None, max_length=32),
          principal: Principal = Depends(require(P.ANALYTICS_READ))) -> dict:
    from carepost.core.errors import NotFound
    from carepost.core.ids import is_id
    from carepost.delivery.models import Message
    from carepost.tracking import link_clicks

    if (message_id is None) == (campaign_id is None):
        raise ValidationFailed("Give a message_id or a campaign_id (one of them).", field="message_id")
    for name, value in (("message_id", message_id), ("campaign_id", campaign_id)):
        if value is not None and not is_id(value):
            raise ValidationFailed(f"{name} is a CarePost id.", field=name)
    if message_id is not None and request.state.db.get(Message, message_id) is None:
        raise NotFound("No such message.", field="message_id")
    found = link_clicks.link_clicks(request.state.db, principal.org_id, message_id=message_id, campaign_id=campaign_id)
    unmasked = _unmasked(principal)
    return {"message_id": message_id, "campaign_id": campaign_id, "masked": not unmasked,
            "privacy_mode": found["privacy_mode"], "links": link_clicks.shown(found["links"], unmasked)}


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@router.get("/analytics/export.csv", summary="The breakdown (or the series) as CSV",
            response_class=Response, responses={200: {"content": {"text/csv": {}}}})
def export_csv(request: Request, by: Breakdown | None = Query(None), interval: Literal["hour", "day"] | None = None,
               f: analytics.Filters = Depends(filters),
               principal: Principal = Depends(require(P.ANALYTICS_READ))) -> Response:
    session = request.state.db
    unmasked = _unmasked(principal)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    if interval is not None:
        if interval == "hour" and (f.end - f.start).days + 1 > analytics.MAX_HOURS_DAYS:
            raise ValidationFailed(f"By hour, the range is at most {analytics.MAX_HOURS_DAYS} days.", field="interval")
        names = sorted(analytics.summary(session, principal.org_id, f)) or ["accepted"]
        periods, values = analytics.series(session, principal.org_id, f, interval, names)
        if not unmasked:
            values = {m: analytics.suppress_list(v, m) for m, v in values.items()}
        writer.writerow([interval, *names])
        for i, p in enumerate(periods):
            writer.writerow([p.isoformat().replace("+00:00", "Z"), *[_cell(values[m][i]) for m in names]])
        kind = interval
    else:
        by = by or "source"
        rows = analytics.breakdown(session, principal.org_id, f, by)
        names = sorted({m for v in rows.values() for m in v})
        shown_ = shown_rows(rows, unmasked)
        writer.writerow([by, *names])
        for key in sorted(rows, key=lambda k: (k == "", k)):
            writer.writerow([_cell(key), *[_cell(shown_[key].get(m, 0)) for m in names]])
        kind = by
    record_for(session, principal, request, "analytics.export", target_type="analytics", target_id=kind,
               details={"masked": not unmasked, **{k: v for k, v in _filters_out(f).items()}})
    session.commit()
    filename = f"carepost-analytics-{kind}-{f.start.isoformat()}-{f.end.isoformat()}.csv"
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})
