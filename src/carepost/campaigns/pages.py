"""Web UI of campaigns (issue 14 item 7): the list and calendar, the wizard, the approval inbox,
the campaign page with its report.

* **List and calendar** (``campaigns:read``): the organization's campaigns and a month of weeks by
  days in the organization's time zone — campaigns and (through :func:`register_calendar_source`,
  filled by the composition root) the journeys' scheduled sends on their days —, with the
  calendar's overlap warnings (``service.calendar``: set-wise, small counts shown as "fewer than
  11" without ``phi:read_unmasked``); a list of the days on narrow screens.
* **Wizard** (``campaigns:manage``): audience (segment and exclusion segments, a live recipient
  count from the segments service) -> content (template version, sender, an A/B/n test of 2-10
  variant rows — subject, template version, send delay —; a preview as a
  chosen contact of the audience in desktop and phone widths through content's ``preview``,
  audited and masked per permission) -> schedule (now, at a time, at a local time in each
  recipient's zone; throttles; the quiet-hours note) -> review (the draft is saved; the pre-launch
  compliance report) -> submit. The wizard keeps what was typed in the form itself; every step is
  checked by the service (``service.create_campaign`` on a rolled-back transaction) and an error
  naming a field of this or an earlier step sends the user to that step with the error at the
  field (422).
* **Approval inbox** (``campaigns:approve``): submitted campaigns; the campaign page shows the
  report and the approve/reject form (a comment; never one's own campaign: the service refuses).
* **Campaign page**: status, progress while planning and sending (htmx polling), the actions the
  viewer's permissions and the state allow, the workflow history (audited read: it holds
  comments) and the tracking figures of the campaign's messages (``tracking.analytics`` with the
  campaign filter; small cells suppressed as on the analytics page).

Message previews and the sample render are shown in sandboxed ``<iframe srcdoc>`` frames; pages
that hold one carry content's preview CSP (inline styles, nothing from another host).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime, timedelta
from types import SimpleNamespace

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from carepost.accounts.access import Principal, request_context, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.campaigns import report, service
from carepost.campaigns.schemas import CampaignIn
from carepost.core import clock
from carepost.core.errors import CarePostError, NotFound, PermissionDenied
from carepost.core.purposes import PURPOSES
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

PREVIEW_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "font-src 'self'; connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'none'; "
               "base-uri 'none'; object-src 'none'")

STEPS = {1: "Audience", 2: "Content", 3: "Schedule", 4: "Review"}
STEP_FIELDS = {
    1: ("name", "purpose", "topic_id", "segment_id", "exclusion_segment_ids", "remuneration", "refill_drug"),
    2: ("template_version_id", "sending_domain_id", "from_address", "from_name", "security", "track_opens",
        "track_clicks", "ab_test", "ab_enabled", "ab_variants", "ab_holdout", "ab_test_fraction", "ab_metric",
        "ab_winner_after_hours"),
    3: ("schedule_kind", "send_at", "local_time", "local_date", "time_zone", "throttle_per_hour",
        "throttle_per_domain_per_hour"),
}
FIELD_STEP = {f: step for step, fields in STEP_FIELDS.items() for f in fields}
# One row per A/B/n variant, posted as ab_v<i>_<setting> (i = 0..9; the variant's key is its letter).
AB_ROW = re.compile(r"^ab_v(\d)_(subject|template_version_id|send_offset_minutes)$")
AB_SETTINGS = ("subject", "template_version_id", "send_offset_minutes")
AB_KEYS = "ABCDEFGHIJ"
AB_MIN_ROWS = 2


def _step_of(field: str, default: int = 1) -> int:
    """The wizard step that owns a form field (a variant row's fields are on the content step)."""
    if field in FIELD_STEP:
        return FIELD_STEP[field]
    return 2 if AB_ROW.match(field) else default
FORM_FIELDS = [f for fields in STEP_FIELDS.values() for f in fields]
AB_METRICS = {"human_opens": "Human opens", "human_clicks": "Human clicks", "conversions": "Conversions"}
SECURITY_MODES = {"": "The organization's mode", "opportunistic": "Opportunistic TLS",
                  "tls_required": "Verified TLS required", "tls_exclusive": "Verified TLS only (else nothing)",
                  "secure": "Secure method always (PGP, S/MIME or portal)"}
REMUNERATION = {"none": "None", "cost": "Reasonably related to the cost of the communication", "other": "Other"}
REASON_LABELS = {
    "no_authorization": "No authorization for this purpose", "authorization_revoked": "Authorization revoked",
    "authorization_expired": "Authorization expired", "unsubscribed_all": "Unsubscribed from everything",
    "unsubscribed_topic": "Unsubscribed from the topic", "frequency_cap": "Frequency cap reached",
    "no_address": "No email address", "invalid_address": "Invalid address", "deceased": "Deceased",
    "exclusion_segment": "In an exclusion segment",
}
CHART_METRICS = ["sent", "delivered", "opened_human", "clicked_human", "bounced", "unsubscribed"]
CHART_LABELS = {"sent": "Sent", "delivered": "Delivered", "opened_human": "Human opens",
                "clicked_human": "Human clicks", "bounced": "Bounces", "unsubscribed": "Unsubscribes"}
LIVE = ("planning", "sending")


def _actor(principal: Principal, request: Request | None = None):
    from carepost.segments.service import Actor

    return Actor.of(principal, request)


def _preview_csp(response):
    response.headers["Content-Security-Policy"] = PREVIEW_CSP
    return response


def _reason(code: str) -> str:
    if code.startswith("suppressed_"):
        return "Suppressed (" + code.removeprefix("suppressed_").replace("_", " ") + ")"
    return REASON_LABELS.get(code, code.replace("_", " ").capitalize())


# --------------------------------------------------------------------------- list and calendar

# Scheduled sends of other capabilities on the calendar (journeys): the composition root registers
# fn(session, principal, start, end, time_zone) -> [{"day", "kind", "label", "count", "link"}].
CalendarSource = Callable[..., list[dict]]
_CALENDAR_SOURCES: dict[str, CalendarSource] = {}
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def register_calendar_source(name: str, source: CalendarSource) -> None:
    """Show another capability's scheduled sends on the campaign calendar (composition root only;
    registering twice under one name replaces)."""
    _CALENDAR_SOURCES[name] = source


def _month(value: str | None, today: date, errors: dict) -> date:
    if value:
        try:
            first = datetime.strptime(value, "%Y-%m").date()
            if service.CALENDAR_FIRST <= first <= service.CALENDAR_LAST:
                return first
            errors["month"] = f"Enter a month from {service.CALENDAR_FIRST.year} to {service.CALENDAR_LAST.year}."
        except ValueError:
            errors["month"] = "Enter a month as YYYY-MM."
    return today.replace(day=1)


def _add_months(first: date, n: int) -> date:
    index = first.year * 12 + first.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def _org_zone(session, org_id: str) -> str:
    from zoneinfo import ZoneInfo

    from carepost.consent import service as consent

    name = consent.consent_settings(session, org_id).get("default_time_zone") or "UTC"
    try:
        ZoneInfo(name)
    except (KeyError, ValueError):
        return "UTC"
    return name


@router.get("/campaigns")
def campaign_list(request: Request, month: str | None = Query(None, max_length=7),
                  overlap_days: str | None = Query(None, max_length=3), status: str | None = Query(None, max_length=12),
                  principal: Principal = Depends(require(P.CAMPAIGNS_READ))):
    """The campaigns and the organization's calendar: a month (weeks by days, in the
    organization's time zone) with every campaign and scheduled journey send on its day, and the
    overlap warnings; on a narrow screen the same month as a list of days (CSS)."""
    from zoneinfo import ZoneInfo

    from carepost.segments.service import present_count

    session = request.state.db
    errors: dict[str, str] = {}
    zone = _org_zone(session, principal.org_id)
    today = clock.now().astimezone(ZoneInfo(zone)).date()
    first = _month(month, today, errors)
    last = _add_months(first, 1) - timedelta(days=1)
    days_n = None
    if overlap_days:
        try:
            days_n = int(overlap_days)
        except ValueError:
            errors["overlap_days"] = "Enter a number of days from 0 to 90."
    try:
        rows = service.list_campaigns(session, principal.org_id, status=status or None)
    except CarePostError as exc:
        errors[exc.field or "status"] = exc.message
        rows = service.list_campaigns(session, principal.org_id)
    try:
        cal = service.calendar(session, principal.org_id, first, last, principal, overlap_days=days_n, time_zone=zone)
    except CarePostError as exc:
        errors[exc.field or "month"] = exc.message
        session.rollback()
        cal = service.calendar(session, principal.org_id, first, last, principal, time_zone=zone)
    actor = _actor(principal)
    sends = []
    for source in _CALENDAR_SOURCES.values():
        for entry in source(session, principal, first, last, zone):
            sends.append({**entry, "shown": present_count(entry["count"], actor)})
    session.commit()  # the calendar may audit sensitive counts
    overlapping = {cid for w in cal["overlaps"] for cid in w["campaigns"]}
    by_day: dict[str, dict] = {}
    for c in cal["campaigns"]:
        by_day.setdefault(c["day"], {"campaigns": [], "sends": []})["campaigns"].append(
            {**c, "overlap": c["id"] in overlapping})
    for e in sends:
        by_day.setdefault(e["day"], {"campaigns": [], "sends": []})["sends"].append(e)
    grid_start = first - timedelta(days=first.weekday())
    grid_end = last + timedelta(days=6 - last.weekday())
    weeks, d = [], grid_start
    while d <= grid_end:
        week = []
        for _ in range(7):
            week.append({"date": d, "iso": d.isoformat(), "in_month": d.month == first.month, "today": d == today,
                         **by_day.get(d.isoformat(), {"campaigns": [], "sends": []})})
            d += timedelta(days=1)
        weeks.append(week)
    listed = [cell for week in weeks for cell in week if cell["in_month"] and (cell["campaigns"] or cell["sends"])]
    prev, nxt = _add_months(first, -1), _add_months(first, 1)
    return render(request, "campaigns/list.html", {
        "campaigns": [service.campaign_dict(session, r) for r in rows], "calendar": cal, "weeks": weeks,
        "listed": listed, "weekdays": WEEKDAYS, "time_zone": zone,
        "month": {"value": first.strftime("%Y-%m"), "label": first.strftime("%B %Y"),
                  "prev": prev.strftime("%Y-%m"), "prev_label": prev.strftime("%B %Y"),
                  "next": nxt.strftime("%Y-%m"), "next_label": nxt.strftime("%B %Y"),
                  "this": today.strftime("%Y-%m")},
        "form": {"month": first.strftime("%Y-%m"), "overlap_days": overlap_days or "", "status": status or ""},
        "errors": errors, "statuses": service.CAMPAIGN_STATUSES, "can_manage": principal.can(P.CAMPAIGNS_MANAGE),
        "can_approve": principal.can(P.CAMPAIGNS_APPROVE),
    }, status_code=422 if errors else 200)


@router.get("/campaigns/approvals")
def approval_inbox(request: Request, principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))):
    session = request.state.db
    me = service.actor_of(principal)
    rows = [{**service.campaign_dict(session, r), "own": r.submitted_by == me}
            for r in service.list_campaigns(session, principal.org_id, status="submitted")]
    rows.sort(key=lambda r: r["submitted_at"] or "")
    return render(request, "campaigns/approvals.html", {"campaigns": rows})


# --------------------------------------------------------------------------- the wizard

def _choices(session, principal: Principal, request: Request) -> dict:
    from carepost.consent import service as consent
    from carepost.content import service as content
    from carepost.delivery import service as delivery
    from carepost.segments import service as segments

    templates = []
    for t in content.list_templates(session, principal.org_id):
        versions = content.list_versions(session, t)
        templates.append({"name": t.name, "versions": [
            {"id": v.id, "version": v.version, "purpose": v.purpose, "current": v.id == t.current_version_id,
             "languages": [v.language, *sorted(v.variants or {})]} for v in versions]})
    cfg = consent.consent_settings(session, principal.org_id)
    return {
        "purposes": PURPOSES, "remunerations": REMUNERATION, "security_modes": SECURITY_MODES,
        "ab_metrics": AB_METRICS,
        "topics": [(t.id, t.name) for t in consent.list_topics(session, principal.org_id)],
        "segments": [{"id": s.id, "name": s.name, "sensitive": bool(s.sensitive)}
                     for s in segments.list_segments(session, principal.org_id, _actor(principal, request))],
        "templates": templates,
        "domains": [(d.id, d.domain) for d in delivery.list_sending_domains(session)],
        "quiet_hours": (cfg.get("quiet_hours_start"), cfg.get("quiet_hours_end")),
        "org_time_zone": cfg.get("default_time_zone") or "UTC",
    }


def _form_of(row, session) -> dict:
    """The wizard's form values of a stored campaign."""
    d = service.campaign_dict(session, row)
    form = {k: ("" if d.get(k) is None else d[k]) for k in FORM_FIELDS if k in d}
    form["exclusion_segment_ids"] = list(d["exclusion_segment_ids"])
    form["track_opens"] = "true" if d["track_opens"] else "false"
    form["track_clicks"] = "true" if d["track_clicks"] else "false"
    if row.send_at and row.schedule_kind == "at":
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(row.time_zone) if row.time_zone else ZoneInfo("UTC")
        form["send_at"] = clock.aware(row.send_at).astimezone(zone).strftime("%Y-%m-%dT%H:%M")
    form["local_date"] = row.local_date.isoformat() if row.local_date else ""
    ab = row.ab_test or {}
    variants = [v if isinstance(v, dict) else {"key": str(v)} for v in ab.get("variants") or []]
    form["ab_enabled"] = "true" if variants else ""
    for i, v in enumerate(variants[:len(AB_KEYS)]):
        for name in AB_SETTINGS:
            form[f"ab_v{i}_{name}"] = "" if v.get(name) is None else str(v[name])
    form["ab_holdout"] = _pct(ab.get("holdout"))
    form["ab_test_fraction"] = _pct(ab.get("test_fraction"))
    form["ab_metric"] = ab.get("metric") or "human_opens"
    form["ab_winner_after_hours"] = str(ab.get("winner_after_hours") or "")
    return form


def _pct(value) -> str:
    return "" if value in (None, "") else f"{float(value) * 100:g}"


DEFAULT_FORM = {"purpose": "marketing", "remuneration": "none", "schedule_kind": "now", "track_opens": "true",
                "track_clicks": "true", "security": "", "ab_metric": "human_opens", "exclusion_segment_ids": []}


async def _read_form(request: Request) -> dict:
    raw = await request.form()
    form = {k: v.strip() if k not in ("name", "from_name") else v
            for k, v in raw.items() if isinstance(v, str) and k != "exclusion_segment_ids"}
    form["exclusion_segment_ids"] = [v for v in raw.getlist("exclusion_segment_ids") if isinstance(v, str) and v]
    return form


def _values(form: dict, errors: dict) -> dict:
    """Form text -> the service's values; what cannot be read is an error naming the field."""
    def opt(name):
        value = (form.get(name) or "").strip()
        return value or None

    def whole(name):
        value = opt(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            errors[name] = "Enter a whole number."
            return None

    def fraction(name):
        value = opt(name)
        if value is None:
            return None
        try:
            f = float(value)
        except ValueError:
            errors[name] = "Enter a percentage from 0 to 100."
            return None
        if not 0 <= f <= 100:
            errors[name] = "Enter a percentage from 0 to 100."
            return None
        return round(f / 100, 4)

    out = {
        "name": (form.get("name") or "").strip(), "purpose": opt("purpose") or "", "topic_id": opt("topic_id"),
        "segment_id": opt("segment_id") or "", "exclusion_segment_ids": list(form.get("exclusion_segment_ids") or []),
        "template_version_id": opt("template_version_id") or "", "sending_domain_id": opt("sending_domain_id"),
        "from_address": opt("from_address"), "from_name": opt("from_name"), "security": opt("security"),
        "remuneration": opt("remuneration") or "none", "refill_drug": opt("refill_drug"),
        "schedule_kind": opt("schedule_kind") or "now", "time_zone": opt("time_zone"),
        "local_time": opt("local_time"), "throttle_per_hour": whole("throttle_per_hour"),
        "throttle_per_domain_per_hour": whole("throttle_per_domain_per_hour"),
        "track_opens": form.get("track_opens", "true") != "false",
        "track_clicks": form.get("track_clicks", "true") != "false",
        "send_at": None, "local_date": None, "ab_test": None,
    }
    kind = out["schedule_kind"]
    if kind == "at":
        if opt("send_at"):
            try:
                out["send_at"] = datetime.fromisoformat(opt("send_at"))
            except ValueError:
                errors["send_at"] = "Enter a date and time."
    else:
        out["time_zone"] = out["time_zone"] if kind == "local" else None
    if kind == "local" and opt("local_date"):
        try:
            out["local_date"] = date.fromisoformat(opt("local_date"))
        except ValueError:
            errors["local_date"] = "Enter a date as YYYY-MM-DD."
    if kind != "local":
        out["local_time"] = None
    holdout, test_fraction = fraction("ab_holdout"), fraction("ab_test_fraction")
    hours = whole("ab_winner_after_hours")
    if form.get("ab_enabled") == "true":
        variants = []
        for i, row in enumerate(ab_rows(form)):
            v: dict = {"key": AB_KEYS[i]}
            if row["subject"].strip():
                v["subject"] = row["subject"].strip()
            if row["template_version_id"]:
                v["template_version_id"] = row["template_version_id"]
            if row["send_offset_minutes"]:
                try:
                    v["send_offset_minutes"] = int(row["send_offset_minutes"])
                except ValueError:
                    errors[f"ab_v{i}_send_offset_minutes"] = "Enter a whole number of minutes from 0 to 10080."
            variants.append(v)
        if len(variants) < AB_MIN_ROWS:
            errors["ab_variants"] = "An A/B/n test has at least two variants."
        elif len({tuple((k, v.get(k)) for k in AB_SETTINGS) for v in variants}) < len(variants):
            errors["ab_variants"] = ("Two variants are the same: give each its own subject, template version or "
                                     "send time.")
        ab = {"variants": variants, "metric": opt("ab_metric") if opt("ab_metric") in AB_METRICS else "human_opens"}
        if holdout:
            ab["holdout"] = holdout
        if test_fraction:
            ab["test_fraction"] = test_fraction
        if hours is not None:
            ab["winner_after_hours"] = hours
        out["ab_test"] = ab
    return out


def ab_rows(form: dict, *, minimum: int = 0) -> list[dict]:
    """The variant rows of the form, in order (rows 0..highest posted; a gap is an empty row)."""
    found = {int(m.group(1)) for k in form if (m := AB_ROW.match(k))}
    count = max(minimum, max(found) + 1 if found else 0)
    return [{"key": AB_KEYS[i], **{name: (form.get(f"ab_v{i}_{name}") or "") for name in AB_SETTINGS}}
            for i in range(min(count, len(AB_KEYS)))]


AB_FIELDS = {"ab_test.holdout": "ab_holdout", "ab_test.test_fraction": "ab_test_fraction",
             "ab_test.metric": "ab_metric", "ab_test.winner_after_hours": "ab_winner_after_hours"}


AB_VARIANT_ERROR = re.compile(r"^ab_test\.variants\[(\d)\]\.(subject|template_version_id|send_offset_minutes)$")


def _field_of(loc) -> str:
    """The wizard's form field of a service or schema error (``exclusion_segment_ids[1]`` ->
    ``exclusion_segment_ids``; ``ab_test.holdout`` -> ``ab_holdout``;
    ``ab_test.variants[2].template_version_id`` -> ``ab_v2_template_version_id``)."""
    field = str(loc[0]) if loc else "campaign"
    if field.startswith("ab_test."):
        m = AB_VARIANT_ERROR.match(field)
        if m:
            return f"ab_v{m.group(1)}_{m.group(2)}"
        return AB_FIELDS.get(field, "ab_variants" if field.startswith("ab_test.variants") else "ab_test")
    return field.split("[", 1)[0]


def _check(session, principal: Principal, values: dict, upto: int, errors: dict) -> None:
    """Errors of the fields of steps 1..``upto`` (the service's checks, nothing kept)."""
    if errors:
        errors_now = {f: m for f, m in errors.items() if _step_of(f, 99) <= upto}
        errors.clear()
        errors.update(errors_now)
        if errors:
            return
    try:
        CampaignIn(**{k: v for k, v in values.items() if v is not None or k in ("segment_id",)})
    except ValidationError as exc:
        for e in exc.errors():
            field = _field_of(e["loc"])
            if _step_of(field, 99) <= upto:
                empty = values.get(field) in (None, "", [])
                errors.setdefault(field, ("Choose one from the list." if field.endswith("_id") else "Enter a value.")
                                  if empty else e["msg"])
        if errors:
            return
    if upto < 2 and not values.get("template_version_id"):
        values = {**values, "template_version_id": None}
    dry = {**values, "from_name": None}  # the sender name is checked above; nothing is encrypted here
    try:
        service.create_campaign(session, principal.org_id, dry, principal)
    except CarePostError as exc:
        field = _field_of([exc.field or "campaign"])
        if _step_of(field, 1) <= upto:
            errors[field] = exc.message
    finally:
        session.rollback()


def _wizard(request: Request, principal: Principal, form: dict, step: int, errors: dict | None = None,
            campaign=None, status: int = 200):
    session = request.state.db
    ctx = {"form": form, "step": step, "steps": STEPS, "errors": errors or {}, "campaign": campaign,
           "action": f"/app/campaigns/{campaign.id}/edit" if campaign is not None else "/app/campaigns/new",
           "carry": [f for f in FORM_FIELDS if FIELD_STEP[f] != step and f != "exclusion_segment_ids"]
           + ([f"ab_v{i}_{name}" for i in range(len(ab_rows(form))) for name in AB_SETTINGS] if step != 2 else []),
           "ab_rows": ab_rows(form, minimum=AB_MIN_ROWS), "ab_max": len(AB_KEYS),
           "ab_open": form.get("ab_enabled") == "true" or any(f.startswith("ab_") for f in errors or {}),
           **_choices(session, principal, request)}
    if step == 2:
        ctx["preview_contacts"] = _preview_contacts(request, principal, form)
    response = render(request, "campaigns/wizard.html", ctx, status_code=status)
    return _preview_csp(response)


def _preview_contacts(request: Request, principal: Principal, form: dict) -> list[dict]:
    """Up to ten contacts of the audience to preview as (masked per permission; audited by the
    segments service)."""
    from carepost.segments import service as segments

    if not form.get("segment_id") or not (principal.can(P.PHI_READ_MASKED) or principal.can(P.PHI_READ_UNMASKED)):
        return []
    tree = report.audience_tree(SimpleNamespace(segment_id=form["segment_id"],
                                                exclusion_segment_ids=form.get("exclusion_segment_ids") or []))
    session = request.state.db
    try:
        found = segments.preview(session, principal.org_id, tree, _actor(principal, request), limit=10)
    except (CarePostError, ValueError):
        session.rollback()
        return []
    session.commit()
    out = []
    for c in found["contacts"]:
        name = " ".join(x for x in (c.get("given_name"), c.get("family_name")) if x) or c.get("id")
        out.append({"id": c["id"], "label": f"{name} ({c.get('preferred_language') or 'default language'})"})
    return out


def _variant_rows_changed(form: dict, go: str) -> dict:
    """The form with a variant row added or removed (the wizard without its script: a round trip)."""
    rows = ab_rows(form, minimum=AB_MIN_ROWS)
    if go == "add_variant" and len(rows) < len(AB_KEYS):
        rows.append({name: "" for name in AB_SETTINGS})
    elif go.startswith("remove_variant:") and len(rows) > AB_MIN_ROWS:
        try:
            del rows[int(go.split(":", 1)[1])]
        except (ValueError, IndexError):
            pass
    out = {k: v for k, v in form.items() if not AB_ROW.match(k)}
    for i, row in enumerate(rows):
        for name in AB_SETTINGS:
            out[f"ab_v{i}_{name}"] = row[name]
    out["ab_enabled"] = "true"
    return out


@router.get("/campaigns/new")
def wizard_new(request: Request, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))):
    return _wizard(request, principal, dict(DEFAULT_FORM), 1)


@router.get("/campaigns/{campaign_id}/edit")
def wizard_edit(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))):
    session = request.state.db
    row = service.get_campaign(session, principal.org_id, campaign_id)
    return _wizard(request, principal, _form_of(row, session), 1, campaign=row)


async def _wizard_post(request: Request, principal: Principal, campaign_id: str | None):
    form = await _read_form(request)

    def work():
        session = request.state.db
        row = service.get_campaign(session, principal.org_id, campaign_id) if campaign_id else None
        try:
            step = max(1, min(3, int(form.get("step") or 1)))
        except ValueError:
            step = 1
        if form.get("go") == "back":
            return _wizard(request, principal, form, max(1, step - 1), campaign=row)
        if step == 2 and (form.get("go") or "").startswith(("add_variant", "remove_variant:")):
            return _wizard(request, principal, _variant_rows_changed(form, form["go"]), 2, campaign=row)
        errors: dict[str, str] = {}
        values = _values(form, errors)
        _check(session, principal, values, step, errors)
        if row is not None:
            row = service.get_campaign(session, principal.org_id, campaign_id)
        if errors:
            first = min(_step_of(f) for f in errors)
            return _wizard(request, principal, form, first, errors, campaign=row, status=422)
        if step < 3:
            return _wizard(request, principal, form, step + 1, campaign=row)
        # The last step: keep the draft, then review it.
        try:
            if row is None:
                row = service.create_campaign(session, principal.org_id, values, principal)
                record_for(session, principal, request, "campaign.created", target_type="campaign", target_id=row.id,
                           details={"status": row.status})
            else:
                service.update_campaign(session, row, values, principal)
                record_for(session, principal, request, "campaign.updated", target_type="campaign", target_id=row.id,
                           details={"status": row.status})
        except CarePostError as exc:
            session.rollback()
            field = _field_of([exc.field or "name"])
            row = service.get_campaign(session, principal.org_id, campaign_id) if campaign_id else None
            return _wizard(request, principal, form, _step_of(field), {field: exc.message}, campaign=row,
                           status=409 if exc.status_code == 409 else 422)
        session.commit()
        return RedirectResponse(f"/app/campaigns/{row.id}/review", status_code=303)

    return await run_in_threadpool(work)


@router.post("/campaigns/new")
async def wizard_post(request: Request, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))):
    return await _wizard_post(request, principal, None)


@router.post("/campaigns/{campaign_id}/edit")
async def wizard_edit_post(request: Request, campaign_id: str,
                           principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))):
    return await _wizard_post(request, principal, campaign_id)


@router.post("/campaigns/audience-count")
async def audience_count(request: Request, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))):
    """The live recipient count of the wizard's audience (segments service; small cells and
    sensitive categories as the segments API shows them)."""
    form = await _read_form(request)

    def work():
        from carepost.segments import service as segments

        session = request.state.db
        ctx: dict = {"count": None, "error": None}
        if form.get("segment_id"):
            tree = report.audience_tree(SimpleNamespace(segment_id=form["segment_id"],
                                                        exclusion_segment_ids=form["exclusion_segment_ids"]))
            try:
                ctx.update(segments.count(session, principal.org_id, tree, _actor(principal, request)))
                session.commit()
            except PermissionDenied as exc:
                session.rollback()
                ctx["error"] = exc.message
            except (CarePostError, ValueError) as exc:
                session.rollback()
                ctx["error"] = getattr(exc, "message", None) or "Choose a segment from the list."
        return render(request, "campaigns/_audience_count.html", ctx)

    return await run_in_threadpool(work)


@router.post("/campaigns/preview")
async def content_preview(request: Request, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))):
    """The chosen version rendered as the chosen contact (content's ``preview``: audited, masked
    unless the viewer holds ``phi:read_unmasked``), or with every merge field shown by name."""
    form = await _read_form(request)

    def work():
        from carepost.content import helpers
        from carepost.content import service as content
        from carepost.content.schemas import PreviewIn

        session = request.state.db
        ctx: dict = {"rendered": None, "error": None}
        version_id, contact_id = form.get("template_version_id"), form.get("preview_contact_id")
        if version_id:
            try:
                version = content.get_version_by_id(session, principal.org_id, version_id)
                if contact_id:
                    ctx["rendered"] = content.preview(session, principal, version.template_id,
                                                      PreviewIn(contact_id=contact_id, version=version.version),
                                                      context=request_context(request))
                    session.commit()
                else:
                    ctx["rendered"] = content.render_version(
                        version, helpers.placeholders(content.needs_of(version)),
                        visible_blocks=content.version_blocks(version).keys()).as_dict()
            except (CarePostError, ValidationError) as exc:
                session.rollback()
                ctx["error"] = {"field": getattr(exc, "field", None) or "template_version_id",
                                "message": getattr(exc, "message", None) or "Cannot preview this version."}
        return _preview_csp(render(request, "campaigns/_preview.html", ctx))

    return await run_in_threadpool(work)


# --------------------------------------------------------------------------- one campaign

def _actions(principal: Principal, row) -> dict:
    me = service.actor_of(principal)
    s = row.status
    return {
        "edit": principal.can(P.CAMPAIGNS_MANAGE) and s in service.EDITABLE_STATES,
        "submit": principal.can(P.CAMPAIGNS_MANAGE) and s in ("draft", "rejected"),
        "review": principal.can(P.CAMPAIGNS_APPROVE) and s == "submitted" and row.submitted_by != me,
        "own_submission": s == "submitted" and row.submitted_by == me,
        "launch": principal.can(P.CAMPAIGNS_SEND) and s in service.LAUNCHABLE_STATES
        and (not row.approval_required or bool(row.approved_at)),
        "pause": principal.can(P.CAMPAIGNS_SEND) and s in LIVE,
        "resume": principal.can(P.CAMPAIGNS_SEND) and s == "paused",
        "cancel": principal.can(P.CAMPAIGNS_SEND) and s not in service.FINAL_STATES,
        "delete": principal.can(P.CAMPAIGNS_MANAGE) and s in ("draft", "rejected"),
    }


def _progress_ctx(session, principal: Principal, row) -> dict:
    from carepost.segments.service import present_count

    prog = service.progress(session, row)
    actor = _actor(principal)
    prog["exclusions"] = sorted((_reason(k), present_count(v, actor)) for k, v in prog["exclusions"].items())
    pending = sum(v for k, v in prog["messages"].items() if k in service.PENDING_STATUSES)
    # Keep polling while planning or sending, and while messages handed to delivery await their outcome.
    return {"campaign": row, "progress": prog, "live": row.status in LIVE or bool(pending and row.status != "cancelled")}


def _tracking(session, principal: Principal, row) -> dict | None:
    """The campaign's figures from the analytics rollups (the campaign filter), suppressed for
    viewers without ``phi:read_unmasked`` exactly as the analytics page does."""
    from carepost.tracking import analytics

    if row.launched_at is None:
        return None
    end = clock.now().date()
    start = max(clock.aware(row.launched_at).date(), end - timedelta(days=analytics.MAX_DAYS - 1))
    start = min(start, end)
    f = analytics.Filters(start=start, end=end, campaign_id=row.id)
    totals = analytics.summary(session, principal.org_id, f)
    totals["bounced"] = totals.get("bounced_hard", 0) + totals.get("bounced_soft", 0)
    interval = "hour" if (end - start).days < 3 else "day"
    raw = [m for m in CHART_METRICS if m != "bounced"] + ["bounced_hard", "bounced_soft"]
    periods, values = analytics.series(session, principal.org_id, f, interval, raw)
    values["bounced"] = [a + b for a, b in zip(values["bounced_hard"], values["bounced_soft"])]
    unmasked = principal.can(P.PHI_READ_UNMASKED)

    def show(n, metric):
        return n if unmasked else analytics.suppress(n, metric if metric != "bounced" else "bounced_hard")

    def text(v):
        return f"{v:,}" if isinstance(v, int) else str(v)

    chart = {"interval": interval, "x": [int(p.timestamp()) for p in periods],
             "series": [{"metric": m, "label": CHART_LABELS[m],
                         "values": values[m] if unmasked else analytics.suppress_list(
                             values[m], m if m != "bounced" else "bounced_hard")} for m in CHART_METRICS]}
    return {"totals": [(m, CHART_LABELS[m], text(show(totals.get(m, 0), m))) for m in CHART_METRICS],
            "chart": chart, "masked": not unmasked, "small_cell": analytics.SMALL_CELL,
            "analytics_link": f"/app/analytics?campaign_id={row.id}&start={start.isoformat()}&end={end.isoformat()}"}


def _ab_results(session, principal: Principal, row) -> dict | None:
    """The A/B test's results after launch (``ab_tests.results``: rates with 95 % intervals,
    chi-square, leader against runner-up, the winner, the holdout's lift). Counts of 1-10 are
    shown as "fewer than 11", and their rates left out, to a viewer without ``phi:read_unmasked``."""
    from carepost.campaigns import ab_tests
    from carepost.segments.service import SMALL_CELL, present_count

    if row.launched_at is None or not row.ab_test:
        return None
    out = ab_tests.results(session, row)
    if out is None:
        return None
    actor = _actor(principal)
    metric = out["metric"]
    settings = {v.get("key"): v for v in row.ab_test.get("variants") or [] if isinstance(v, dict)}
    versions: dict[str, str] = {}
    rows = []
    for v in out["variants"]:
        hidden = not actor.unmasked and 0 < v[metric] < SMALL_CELL
        ci = v.get(f"{metric}_ci95")
        rows.append({"key": v["key"], "recipients": present_count(v["recipients"], actor),
                     "sent": present_count(v["sent"], actor), "count": present_count(v[metric], actor),
                     "rate": None if hidden else v.get(f"{metric}_rate"), "ci": None if hidden else ci,
                     "differs": _variant_differs(session, principal, settings.get(v["key"]) or {}, versions)})
    return {**out, "rows": rows, "metric_label": AB_METRICS.get(metric, metric),
            "awaiting": present_count(out["awaiting"], actor),
            "holdout_recipients": present_count(out.get("holdout_recipients", 0), actor)}


def _variant_differs(session, principal: Principal, v: dict, versions: dict) -> str:
    """What a variant changes, in words: its subject, template version and send delay."""
    from carepost.content import service as content

    parts = []
    if v.get("subject"):
        parts.append(f"subject “{v['subject']}”")
    vid = v.get("template_version_id")
    if vid:
        if vid not in versions:
            try:
                versions[vid] = f"version {content.get_version_by_id(session, principal.org_id, vid).version}"
            except (NotFound, CarePostError):
                versions[vid] = "(missing version)"
        parts.append(versions[vid])
    if v.get("send_offset_minutes"):
        parts.append(f"sent {v['send_offset_minutes']} min later")
    return ", ".join(parts) or "the campaign's subject, version and time"


def _campaign_page(request: Request, principal: Principal, row, error: dict | None = None, status: int = 200,
                   notice: str | None = None):
    session = request.state.db
    d = service.campaign_dict(session, row)
    names = _names(session, principal, request, row)
    ctx = {"c": d, "campaign": row, "history": service.events_of(session, row), "actions": _actions(principal, row),
           "error": error, "notice": notice, "names": names, "tracking": _tracking(session, principal, row),
           "ab": _ab_results(session, principal, row),
           **_progress_ctx(session, principal, row)}
    record_for(session, principal, request, "campaign.read", target_type="campaign", target_id=row.id,
               details={"status": row.status})
    session.commit()
    return _preview_csp(render(request, "campaigns/campaign.html", ctx, status_code=status))


def _names(session, principal: Principal, request: Request, row) -> dict:
    """Display names of what the campaign points at (segments, template, topic)."""
    from carepost.content import service as content
    from carepost.segments import service as segments

    out: dict = {"segments": {}}
    for seg_id in [row.segment_id, *(row.exclusion_segment_ids or [])]:
        if not seg_id:
            continue
        try:
            out["segments"][seg_id] = segments.get_segment(session, principal.org_id, seg_id).name
        except NotFound:
            out["segments"][seg_id] = "(deleted segment)"
    try:
        version = content.get_version_by_id(session, principal.org_id, row.template_version_id)
        template = content.get_template(session, principal.org_id, version.template_id)
        out["template"] = f"{template.name} — version {version.version}"
    except (NotFound, CarePostError):
        out["template"] = "(missing template version)"
    return out


@router.get("/campaigns/{campaign_id}")
def campaign_page(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_READ))):
    row = service.get_campaign(request.state.db, principal.org_id, campaign_id)
    return _campaign_page(request, principal, row, notice=request.query_params.get("done"))


@router.get("/campaigns/{campaign_id}/review")
def campaign_review(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))):
    """The wizard's last step: the saved draft and its pre-launch compliance report; submit."""
    session = request.state.db
    row = service.get_campaign(session, principal.org_id, campaign_id)
    ctx = {"c": service.campaign_dict(session, row), "campaign": row, "steps": STEPS, "step": 4,
           "names": _names(session, principal, request, row), "actions": _actions(principal, row)}
    return _preview_csp(render(request, "campaigns/review.html", ctx))


@router.get("/campaigns/{campaign_id}/compliance")
def compliance_fragment(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_READ))):
    """The pre-launch compliance report as a fragment (``report.compliance_report``: audited, counts
    shown with small-cell suppression, a masked sample render without ``phi:read_unmasked``)."""
    session = request.state.db
    row = service.get_campaign(session, principal.org_id, campaign_id)
    ctx: dict = {"report": None, "error": None, "campaign": row}
    try:
        out = report.compliance_report(session, principal, row, context=request_context(request))
        session.commit()
        out["excluded_rows"] = [(_reason(k), v) for k, v in out["excluded"].items()]
        ctx["report"] = out
    except PermissionDenied as exc:
        session.rollback()
        record_for(session, principal, request, "campaign.report", target_type="campaign", target_id=row.id,
                   outcome="denied", details={"reason": "sensitive_category"})
        session.commit()
        ctx["error"] = {"field": exc.field or "segment_id", "message": exc.message}
    except CarePostError as exc:
        session.rollback()
        ctx["error"] = {"field": exc.field or "campaign", "message": exc.message}
    return _preview_csp(render(request, "campaigns/_report.html", ctx))


@router.get("/campaigns/{campaign_id}/progress")
def progress_fragment(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_READ))):
    session = request.state.db
    row = service.get_campaign(session, principal.org_id, campaign_id)
    return render(request, "campaigns/_progress.html", _progress_ctx(session, principal, row))


async def _act(request: Request, principal: Principal, campaign_id: str, action: str):
    form = await request.form()
    comment = form.get("comment") if isinstance(form.get("comment"), str) else ""

    def work():
        session = request.state.db
        row = service.get_campaign(session, principal.org_id, campaign_id)
        fns = {"submit": lambda: service.submit(session, row, principal, comment or ""),
               "approve": lambda: service.approve(session, row, principal, comment or ""),
               "reject": lambda: service.reject(session, row, principal, comment or ""),
               "launch": lambda: service.launch(session, row, principal),
               "pause": lambda: service.pause(session, row, principal),
               "resume": lambda: service.resume(session, row, principal),
               "cancel": lambda: service.cancel(session, row, principal, comment or "")}
        past = {"submit": "submitted", "approve": "approved", "reject": "rejected", "launch": "launched",
                "pause": "paused", "resume": "resumed", "cancel": "cancelled"}[action]
        try:
            fns[action]()
        except CarePostError as exc:
            session.rollback()
            if isinstance(exc, PermissionDenied):
                record_for(session, principal, request, f"campaign.{past}", target_type="campaign", target_id=row.id,
                           outcome="denied", details={"reason": exc.code})
                session.commit()
            row = service.get_campaign(session, principal.org_id, campaign_id)
            return _campaign_page(request, principal, row, {"field": exc.field or "status", "message": exc.message,
                                                            "action": action}, status=exc.status_code)
        record_for(session, principal, request, f"campaign.{past}", target_type="campaign", target_id=row.id,
                   details={"status": row.status})
        session.commit()
        if row.status in LIVE and action in ("launch", "resume"):
            service.start_work(principal.org_id, row.id, row.status)
        return RedirectResponse(f"/app/campaigns/{row.id}?done={past}", status_code=303)

    return await run_in_threadpool(work)


@router.post("/campaigns/{campaign_id}/submit")
async def submit(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_MANAGE))):
    return await _act(request, principal, campaign_id, "submit")


@router.post("/campaigns/{campaign_id}/approve")
async def approve(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))):
    return await _act(request, principal, campaign_id, "approve")


@router.post("/campaigns/{campaign_id}/reject")
async def reject(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))):
    return await _act(request, principal, campaign_id, "reject")


@router.post("/campaigns/{campaign_id}/launch")
async def launch(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_SEND))):
    return await _act(request, principal, campaign_id, "launch")


@router.post("/campaigns/{campaign_id}/pause")
async def pause(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_SEND))):
    return await _act(request, principal, campaign_id, "pause")


@router.post("/campaigns/{campaign_id}/resume")
async def resume(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_SEND))):
    return await _act(request, principal, campaign_id, "resume")


@router.post("/campaigns/{campaign_id}/cancel")
async def cancel(request: Request, campaign_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_SEND))):
    return await _act(request, principal, campaign_id, "cancel")
