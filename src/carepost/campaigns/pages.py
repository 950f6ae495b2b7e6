"""Web UI of campaigns (issue 14 item 7): the list and calendar, the wizard, the approval inbox,
the campaign page with its report.

* **List and calendar** (``campaigns:read``): the organization's campaigns and the sends of a date
  range, with the calendar's overlap warnings (``service.calendar``: set-wise, small counts shown
  as "fewer than 11" without ``phi:read_unmasked``).
* **Wizard** (``campaigns:manage``): audience (segment and exclusion segments, a live recipient
  count from the segments service) -> content (template version, sender, A/B test; a preview as a
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
        "track_clicks", "ab_test", "ab_subject_b", "ab_holdout", "ab_test_fraction", "ab_metric", "ab_winner_after_hours"),
    3: ("schedule_kind", "send_at", "local_time", "local_date", "time_zone", "throttle_per_hour",
        "throttle_per_domain_per_hour"),
}
FIELD_STEP = {f: step for step, fields in STEP_FIELDS.items() for f in fields}
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

def _parse_day(value: str | None, name: str, errors: dict) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        errors[name] = "Enter a date as YYYY-MM-DD."
        return None


@router.get("/campaigns")
def campaign_list(request: Request, start: str | None = Query(None, max_length=10),
                  end: str | None = Query(None, max_length=10), status: str | None = Query(None, max_length=12),
                  principal: Principal = Depends(require(P.CAMPAIGNS_READ))):
    session = request.state.db
    errors: dict[str, str] = {}
    today = clock.now().date()
    d_start = _parse_day(start, "start", errors) or today - timedelta(days=7)
    d_end = _parse_day(end, "end", errors) or d_start + timedelta(days=37)
    try:
        rows = service.list_campaigns(session, principal.org_id, status=status or None)
    except CarePostError as exc:
        errors[exc.field or "status"] = exc.message
        rows = service.list_campaigns(session, principal.org_id)
    try:
        cal = service.calendar(session, principal.org_id, d_start, d_end, principal)
    except CarePostError as exc:
        errors[exc.field or "start"] = exc.message
        cal = {"campaigns": [], "overlaps": [], "overlap_days": None}
    session.commit()  # the calendar may audit sensitive counts
    days: dict[str, list[dict]] = {}
    for c in cal["campaigns"]:
        days.setdefault(c["send_at"][:10], []).append(c)
    return render(request, "campaigns/list.html", {
        "campaigns": [service.campaign_dict(session, r) for r in rows], "calendar": cal,
        "days": sorted(days.items()), "form": {"start": d_start.isoformat(), "end": d_end.isoformat(),
                                               "status": status or ""},
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
    variants = [v for v in ab.get("variants") or [] if isinstance(v, dict)]
    form["ab_subject_b"] = next((v.get("subject") or "" for v in variants if v.get("key") == "B"), "")
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
    form = {k: v.strip() if k not in ("name", "from_name", "ab_subject_b") else v
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
    subject_b = (form.get("ab_subject_b") or "").strip()
    holdout, test_fraction = fraction("ab_holdout"), fraction("ab_test_fraction")
    hours = whole("ab_winner_after_hours")
    if subject_b:
        ab = {"variants": [{"key": "A"}, {"key": "B", "subject": subject_b}],
              "metric": opt("ab_metric") if opt("ab_metric") in AB_METRICS else "human_opens"}
        if holdout:
            ab["holdout"] = holdout
        if test_fraction:
            ab["test_fraction"] = test_fraction
        if hours is not None:
            ab["winner_after_hours"] = hours
        out["ab_test"] = ab
    elif holdout or test_fraction:
        errors["ab_subject_b"] = "An A/B test needs the subject of variant B."
    return out


AB_FIELDS = {"ab_test.holdout": "ab_holdout", "ab_test.test_fraction": "ab_test_fraction",
             "ab_test.metric": "ab_metric", "ab_test.winner_after_hours": "ab_winner_after_hours"}


def _field_of(loc) -> str:
    """The wizard's form field of a service or schema error (``exclusion_segment_ids[1]`` ->
    ``exclusion_segment_ids``; ``ab_test.holdout`` -> ``ab_holdout``)."""
    field = str(loc[0]) if loc else "campaign"
    if field.startswith("ab_test."):
        return AB_FIELDS.get(field, "ab_subject_b" if field.startswith("ab_test.variants") else "ab_test")
    return field.split("[", 1)[0]


def _check(session, principal: Principal, values: dict, upto: int, errors: dict) -> None:
    """Errors of the fields of steps 1..``upto`` (the service's checks, nothing kept)."""
    if errors:
        errors_now = {f: m for f, m in errors.items() if FIELD_STEP.get(f, 99) <= upto}
        errors.clear()
        errors.update(errors_now)
        if errors:
            return
    try:
        CampaignIn(**{k: v for k, v in values.items() if v is not None or k in ("segment_id",)})
    except ValidationError as exc:
        for e in exc.errors():
            field = _field_of(e["loc"])
            if FIELD_STEP.get(field, 99) <= upto:
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
        if FIELD_STEP.get(field, 1) <= upto:
            errors[field] = exc.message
    finally:
        session.rollback()


def _wizard(request: Request, principal: Principal, form: dict, step: int, errors: dict | None = None,
            campaign=None, status: int = 200):
    session = request.state.db
    ctx = {"form": form, "step": step, "steps": STEPS, "errors": errors or {}, "campaign": campaign,
           "action": f"/app/campaigns/{campaign.id}/edit" if campaign is not None else "/app/campaigns/new",
           "carry": [f for f in FORM_FIELDS if FIELD_STEP[f] != step and f != "exclusion_segment_ids"],
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
        errors: dict[str, str] = {}
        values = _values(form, errors)
        _check(session, principal, values, step, errors)
        if row is not None:
            row = service.get_campaign(session, principal.org_id, campaign_id)
        if errors:
            first = min(FIELD_STEP.get(f, 1) for f in errors)
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
            return _wizard(request, principal, form, FIELD_STEP.get(field, 1), {field: exc.message}, campaign=row,
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
    rows = []
    for v in out["variants"]:
        hidden = not actor.unmasked and 0 < v[metric] < SMALL_CELL
        ci = v.get(f"{metric}_ci95")
        rows.append({"key": v["key"], "recipients": present_count(v["recipients"], actor),
                     "sent": present_count(v["sent"], actor), "count": present_count(v[metric], actor),
                     "rate": None if hidden else v.get(f"{metric}_rate"), "ci": None if hidden else ci})
    return {**out, "rows": rows, "metric_label": AB_METRICS.get(metric, metric),
            "awaiting": present_count(out["awaiting"], actor)}


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
