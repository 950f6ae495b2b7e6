"""The analytics page (issue 13 item 6): ``/app/analytics`` (``analytics:read``).

Server-rendered from the rollups only (:mod:`carepost.tracking.analytics`): totals, a chart over
time (hour or day) drawn by the vendored uPlot (``/static/vendor/uPlot-*``, MIT) from
``/static/analytics-chart.js`` — the data travel in a ``<script type="application/json">`` block,
which the strict CSP (``script-src 'self'``) leaves alone because it is not run —, the figures
per message source and per receiving provider, clicks per link of a campaign (position, part,
target host), filters (date range, source, purpose, topic) and
links to the CSV export. For viewers without ``phi:read_unmasked`` small cells are suppressed
exactly as in the API (same functions).
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from urllib.parse import urlencode

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.core.errors import CarePostError
from carepost.core.purposes import PURPOSES
from carepost.tracking import analytics
from carepost.tracking.analytics_api import _rates, make_filters, shown, shown_rows
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

CHART_METRICS = ["accepted", "delivered", "opened_human", "clicked_human", "converted", "bounced_hard"]
SOURCE_LABELS = {"api": "Transactional API", "smtp": "SMTP submission", "ui": "Compose page", "campaign": "Campaigns",
                 "journey": "Journeys", "": "Not tied to a message"}
TABLE_METRICS = ["accepted", "sent", "delivered", "deferred", "bounced_hard", "bounced_soft", "complained",
                 "opened", "opened_unique", "opened_human", "clicked", "clicked_unique", "clicked_human",
                 "unsubscribed", "converted"]
METRIC_LABELS = {
    "accepted": "Accepted", "sent": "Sent", "delivered": "Delivered", "deferred": "Deferred",
    "bounced_hard": "Hard bounces", "bounced_soft": "Soft bounces", "complained": "Complaints",
    "opened": "Opens", "opened_unique": "Unique opens", "opened_human": "Human opens", "clicked": "Clicks",
    "clicked_unique": "Unique clicks", "clicked_human": "Human clicks", "unsubscribed": "Unsubscribes",
    "converted": "Conversions", "failed": "Failed", "portal_viewed": "Portal views",
}


def _text(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


@router.get("/analytics")
def analytics_page(request: Request, start: str | None = Query(None, max_length=10),
                   end: str | None = Query(None, max_length=10), source: str | None = Query(None, max_length=16),
                   purpose: str | None = Query(None, max_length=64), topic_id: str | None = Query(None, max_length=32),
                   campaign_id: str | None = Query(None, max_length=32),
                   journey_step_id: str | None = Query(None, max_length=32),
                   interval: Literal["hour", "day"] = "day",
                   principal: Principal = Depends(require(P.ANALYTICS_READ))):
    from carepost.consent import service as consent

    session = request.state.db
    errors: dict[str, str] = {}
    form = {"start": start or "", "end": end or "", "source": source or "", "purpose": purpose or "",
            "topic_id": topic_id or "", "interval": interval}

    def parse(name: str, value: str | None) -> date | None:
        if not value:
            return None
        try:
            return date.fromisoformat(value)
        except ValueError:
            errors[name] = "Enter a date as YYYY-MM-DD."
            return None

    d_start, d_end = parse("start", start), parse("end", end)
    topics = consent.list_topics(session, principal.org_id, include_archived=True)
    topic_ids = {t.id for t in topics}
    if source and source not in analytics.SOURCES:
        errors["source"] = "Choose a source from the list."
    if purpose and purpose not in PURPOSES:
        errors["purpose"] = "Choose a purpose from the list."
    if topic_id and topic_id not in topic_ids:
        errors["topic_id"] = "Choose a topic from the list."
    from carepost.core.ids import is_id

    for name, value in (("campaign_id", campaign_id), ("journey_step_id", journey_step_id)):
        if value and not is_id(value):
            errors[name] = "Not a CarePost id."
    try:
        f = make_filters(d_start, d_end, source=None if errors.get("source") else source or None,
                         purpose=None if errors.get("purpose") else purpose or None,
                         topic_id=None if errors.get("topic_id") else topic_id or None,
                         campaign_id=None if errors.get("campaign_id") else campaign_id or None,
                         journey_step_id=None if errors.get("journey_step_id") else journey_step_id or None)
    except CarePostError as exc:
        errors[exc.field or "start"] = exc.message
        f = make_filters(None, None)
    if interval == "hour" and (f.end - f.start).days + 1 > analytics.MAX_HOURS_DAYS:
        errors["interval"] = f"By hour, choose at most {analytics.MAX_HOURS_DAYS} days."
        interval = "day"
    unmasked = principal.can(P.PHI_READ_UNMASKED)
    totals = analytics.summary(session, principal.org_id, f)
    periods, values = analytics.series(session, principal.org_id, f, interval, CHART_METRICS)
    chart = {
        "interval": interval,
        "x": [int(p.timestamp()) for p in periods],
        "series": [{"metric": m, "label": METRIC_LABELS.get(m, m),
                    "values": values[m] if unmasked else analytics.suppress_list(values[m], m)} for m in CHART_METRICS],
    }
    by_source = shown_rows(analytics.breakdown(session, principal.org_id, f, "source"), unmasked)
    by_domain = shown_rows(analytics.breakdown(session, principal.org_id, f, "receiving_domain"), unmasked)
    shown_totals = shown(totals, unmasked)
    families = {fam: sorted((m.split(":", 1)[1], _text(v)) for m, v in shown_totals.items() if m.startswith(fam + ":"))
                for fam in ("excluded", "secured")}
    query = {k: v for k, v in (("start", f.start.isoformat()), ("end", f.end.isoformat()), ("source", f.source),
                                ("purpose", f.purpose), ("topic_id", f.topic_id), ("campaign_id", f.campaign_id),
                                ("journey_step_id", f.journey_step_id)) if v}
    link_rows, links_private = None, False
    if f.campaign_id:
        from carepost.tracking import link_clicks

        found = link_clicks.link_clicks(session, principal.org_id, campaign_id=f.campaign_id)
        links_private = found["privacy_mode"]
        link_rows = [{**row, **{m: _text(row[m]) if row[m] is not None else "–" for m in link_clicks.METRICS}}
                     for row in link_clicks.shown(found["links"], unmasked)]
    return render(request, "tracking/analytics.html", {
        "link_rows": link_rows, "links_private": links_private,
        "form": form, "errors": errors, "filters": f, "masked": not unmasked,
        "totals": {m: _text(shown_totals.get(m, 0)) for m in TABLE_METRICS},
        "rates": _rates(totals, not unmasked) if unmasked or totals.get("sent", 0) >= analytics.SMALL_CELL else {},
        "families": families, "chart": chart, "metric_labels": METRIC_LABELS, "table_metrics": TABLE_METRICS,
        "by_source": [(SOURCE_LABELS.get(k, k), {m: _text(v.get(m, 0)) for m in TABLE_METRICS})
                      for k, v in sorted(by_source.items(), key=lambda kv: (kv[0] == "", kv[0]))],
        "by_domain": [(k or "unknown", {m: _text(v.get(m, 0)) for m in TABLE_METRICS})
                      for k, v in sorted(by_domain.items(), key=lambda kv: (kv[0] in ("", "other"), kv[0]))],
        "sources": [(s, SOURCE_LABELS[s]) for s in analytics.SOURCES], "purposes": sorted(PURPOSES),
        "topics": [(t.id, t.name) for t in topics],
        "csv_source": "/api/v1/analytics/export.csv?" + urlencode({**query, "by": "source"}),
        "csv_domain": "/api/v1/analytics/export.csv?" + urlencode({**query, "by": "receiving_domain"}),
        "csv_series": "/api/v1/analytics/export.csv?" + urlencode({**query, "interval": interval}),
        "small_cell": analytics.SMALL_CELL,
    }, status_code=422 if errors else 200)
