"""Web UI of journeys (issue 15 item 6): the list with status and counts, the "new from starter"
picker, the visual editor, the read-only view of a running journey with live counts, and the
patient's journey timeline on the contact page.

* **List** (``journeys:manage``): every journey of the organization, its status, live version and
  counts (in the journey now, entered, goal reached; 1-10 shown as "<11" without
  ``phi:read_unmasked``), and the starters (``starters.py``).
* **Editor** (``journeys:manage``): a graph of steps drawn by the vendored Drawflow
  (``static/journeys-editor.js``); the definition JSON is the one source of truth. Every change
  is checked by ``POST /app/journeys/validate`` (``validation.validate_definition``: every
  problem with its path, shown next to its step). "Save draft" posts the definition as JSON
  (``service.create_journey`` / ``service.save_definition``: both validate in full, a 422 lists
  every path); "Publish" is a form (``service.publish``; with a live version the migrate/drain
  choice is asked). A starter opens unsaved: its send steps have no template yet.
* **Running view**: the shown version's graph, read-only, with the counts per step
  (``analytics.journey_analytics``: now at the step, executed, sent/excluded, human opens and
  clicks per send step; exited by reason; goal reached), fetched again every few seconds from
  ``GET /app/journeys/{id}/counts`` without reloading the page.
* **Contact page**: :func:`contact_journey_rows` lists a patient's runs and the steps each
  executed; the composition root registers it as a contact page section (patients does not
  import journeys).

Journey pages hold no PHI (ids, step ids, counts); every change is audited with the journey id.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core import clock
from carepost.core.errors import CarePostError, ValidationFailed
from carepost.core.purposes import PURPOSES
from carepost.journeys import analytics, service, starters, validation
from carepost.journeys import schemas as S
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)

STEP_TYPES = {"send": "Send email", "wait": "Wait", "wait_until": "Wait until", "wait_event": "Wait for event",
              "branch": "Branch", "split": "A/B split", "update": "Update contact", "notify": "Notify staff",
              "webhook": "Webhook", "exit": "Exit"}
DONE = {"published": "Published.", "paused": "Paused: no run enters or moves until it is resumed.",
        "resumed": "Resumed.", "created": "Draft saved.", "approved": "Approved: the author may publish this version.",
        "rejected": "Approval withdrawn."}
POLL_MS = 4000
EMPTY_DEFINITION = {"purpose": "treatment", "topic_id": None, "entry": {"type": "event", "event": "appointment.booked"},
                    "reentry": {"mode": "never"}, "exit_on": ["unsubscribe", "revocation"], "start": None,
                    "steps": {}, "layout": {}}


def _step_of(path: str | None) -> str | None:
    parts = (path or "").split(".")
    if parts and parts[0] == "definition":
        parts = parts[1:]
    if len(parts) >= 2 and parts[0] == "steps":
        return parts[1].split("[")[0]
    return None


def _problems(items: list[dict]) -> list[dict]:
    """Validation problems for the editor: path (without the ``definition.`` prefix), step, message."""
    out = []
    for e in items:
        path = e.get("path") if "path" in e else e.get("field")
        if path and path.startswith("definition."):
            path = path[len("definition."):]
        elif path == "definition":
            path = ""
        out.append({"path": path or "", "step": _step_of(path), "message": e.get("message") or e.get("reason") or "invalid"})
    return out


# --------------------------------------------------------------------------- list

def _totals(session, rows) -> dict[str, dict]:
    """Per journey: runs open now, entered, goal reached (three grouped counts)."""
    from sqlalchemy import case, func, select

    from carepost.journeys.models import JourneyRun

    if not rows:
        return {}
    org_id = rows[0].org_id
    q = (select(JourneyRun.journey_id, func.count(),
                func.sum(case((JourneyRun.state.in_(("active", "waiting")), 1), else_=0)),
                func.sum(case((JourneyRun.converted_at.is_not(None), 1), else_=0)))
         .where(JourneyRun.org_id == org_id, JourneyRun.journey_id.in_([r.id for r in rows]))
         .group_by(JourneyRun.journey_id))
    return {jid: {"entered": int(n or 0), "active": int(a or 0), "goal": int(g or 0)} for jid, n, a, g in session.execute(q)}


def _show(n, principal: Principal):
    from carepost.tracking.analytics import suppress

    return n if principal.can(P.PHI_READ_UNMASKED) or not isinstance(n, int) else suppress(n)


@router.get("/journeys")
def journey_list(request: Request, principal: Principal = Depends(require(P.JOURNEYS_READ))):
    session = request.state.db
    rows = service.list_journeys(session, principal.org_id)
    totals = _totals(session, rows)
    out = []
    for r in rows:
        d = service.journey_dict(session, r, with_definition=False)
        t = totals.get(r.id, {"entered": 0, "active": 0, "goal": 0})
        out.append({**d, **{k: _show(v, principal) for k, v in t.items()}})
    return render(request, "journeys/list.html", {
        "journeys": out, "starters": starters.list_starters(), "purposes": PURPOSES,
        "notice": DONE.get(request.query_params.get("done") or ""), "can_manage": principal.can(P.JOURNEYS_MANAGE),
    })


# --------------------------------------------------------------------------- the editor

def _choices(session, principal: Principal, request: Request) -> dict:
    from carepost.consent import service as consent
    from carepost.content import service as content
    from carepost.patients.service import list_attribute_definitions
    from carepost.segments import service as segments
    from carepost.segments.language import CONTACT_FIELDS

    templates = []
    for t in content.list_templates(session, principal.org_id):
        versions = content.list_versions(session, t)
        current = content.current_version(session, t)
        templates.append({"id": t.id, "name": t.name, "purpose": current.purpose if current else None,
                          "versions": [v.version for v in versions]})
    attrs = [f"attr.{d.key}" for d in list_attribute_definitions(session, principal.org_id)]
    return {
        "templates": templates,
        "segments": [{"id": s.id, "name": s.name} for s in segments.list_segments(
            session, principal.org_id, segments.Actor.of(principal, request))],
        "topics": [{"id": t.id, "name": t.name} for t in consent.list_topics(session, principal.org_id)],
        "events": sorted(validation.known_events(session, principal.org_id)),
        "date_fields": list(S.DATE_FIELDS),
        "attribute_fields": sorted(CONTACT_FIELDS) + attrs,
        "update_fields": list(validation.SETTABLE_FIELDS) + attrs,
        "ops": list(S.ATTRIBUTE_OPS),
        "roles": list(S.NOTIFY_ROLES),
        "purposes": PURPOSES,
    }


def _editor(request: Request, principal: Principal, *, row=None, definition: dict, name: str, starter=None,
            error: dict | None = None, status: int = 200):
    session = request.state.db
    has_live = bool(row is not None and row.current_version and row.status in ("live", "paused"))
    data = {
        "journey": {"id": row.id, "status": row.status} if row is not None else None,
        "definition": definition, "readonly": False, "choices": _choices(session, principal, request),
        "hints": dict(starter.template_hints) if starter else {},
        "segment_hint": starter.segment_hint if starter else None,
        "urls": {"validate": "/app/journeys/validate",
                 "save": f"/app/journeys/{row.id}/draft" if row is not None else "/app/journeys"},
    }
    return render(request, "journeys/editor.html", {
        "journey": row, "data": data, "name": name, "starter": starter, "step_types": STEP_TYPES,
        "has_live": has_live, "error": error, "saved": request.query_params.get("saved") == "1",
        "approval": _approval(session, principal, row, service.list_versions(session, row)) if row is not None else None,
        "notice": None,
    }, status_code=status)


@router.get("/journeys/new")
def journey_new(request: Request, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))):
    key = request.query_params.get("starter") or ""
    if key:
        starter = starters.get_starter(key)
        if starter is None:
            raise ValidationFailed("No such starter.", field="starter")
        return _editor(request, principal, definition=starters.starter_definition(key), name=starter.name,
                       starter=starter)
    return _editor(request, principal, definition=dict(EMPTY_DEFINITION, steps={}, layout={}), name="")


@router.get("/journeys/{journey_id}/edit")
def journey_edit(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))):
    session = request.state.db
    row = service.get_journey(session, principal.org_id, journey_id)
    newest = service.get_version(session, row)
    return _editor(request, principal, row=row, definition=newest.definition, name=row.name)


@router.post("/journeys/validate")
async def journey_validate(request: Request, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))):
    """Every problem of a definition, with its path and step (the editor shows each at its step)."""
    body = await _json(request)

    def work():
        definition = body.get("definition")
        problems = validation.validate_definition(request.state.db, principal.org_id, definition)
        request.state.db.rollback()
        return JSONResponse({"valid": not problems, "errors": _problems(problems)})

    return await run_in_threadpool(work)


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise ValidationFailed("The body is not JSON.", field="body") from None
    if not isinstance(body, dict):
        raise ValidationFailed("The body must be a JSON object.", field="body")
    return body


def _name(body: dict) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValidationFailed("A journey needs a name.", field="name")
    if len(name) > 200:
        raise ValidationFailed("A name is at most 200 characters.", field="name")
    return name.strip()


def _refusal(session, exc: CarePostError) -> JSONResponse:
    session.rollback()
    body = exc.to_dict()
    if getattr(exc, "errors", None):
        body["problems"] = _problems(exc.errors)
    return JSONResponse({"error": body}, status_code=exc.status_code)


@router.post("/journeys")
async def journey_create(request: Request, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))):
    """Save a new journey (its version 1, a draft) from the editor."""
    body = await _json(request)

    def work():
        session = request.state.db
        try:
            row = service.create_journey(session, principal.org_id,
                                         {"name": _name(body), "definition": body.get("definition")}, principal)
        except CarePostError as exc:
            return _refusal(session, exc)
        record_for(session, principal, request, "journey.created", target_type="journey", target_id=row.id,
                   details={"version": 1, "source": "editor"})
        session.commit()
        return JSONResponse({"id": row.id, "version": 1, "edit_url": f"/app/journeys/{row.id}/edit",
                             "view_url": f"/app/journeys/{row.id}"}, status_code=201)

    return await run_in_threadpool(work)


@router.post("/journeys/{journey_id}/draft")
async def journey_save(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))):
    """Save the editor's definition as the draft (a new draft version when the newest is published)."""
    body = await _json(request)

    def work():
        session = request.state.db
        row = service.get_journey(session, principal.org_id, journey_id)
        try:
            name = _name(body)
            renamed = name != row.name
            if renamed:
                service.update_journey(session, row, {"name": name})
            ver = service.save_definition(session, row, body.get("definition"), principal)
        except CarePostError as exc:
            return _refusal(session, exc)
        if renamed:
            record_for(session, principal, request, "journey.updated", target_type="journey", target_id=row.id,
                       details={"fields": ["name"], "source": "editor"})
        record_for(session, principal, request, "journey.version_saved", target_type="journey", target_id=row.id,
                   details={"version": ver.version, "source": "editor"})
        session.commit()
        return JSONResponse({"id": row.id, "version": ver.version, "edit_url": f"/app/journeys/{row.id}/edit",
                             "view_url": f"/app/journeys/{row.id}"})

    return await run_in_threadpool(work)


async def _act(request: Request, principal: Principal, journey_id: str, action: str):
    form = await request.form()
    mode = form.get("mode") if isinstance(form.get("mode"), str) else None

    def work():
        session = request.state.db
        row = service.get_journey(session, principal.org_id, journey_id)
        details: dict = {}
        try:
            if action == "publish":
                ver, migrated = service.publish(session, row, principal, mode=mode or None)
                details = {"version": ver.version, "mode": ver.migration_mode, "migrated": migrated}
            elif action == "pause":
                service.pause(session, row)
            else:
                service.resume(session, row)
        except CarePostError as exc:
            session.rollback()
            row = service.get_journey(session, principal.org_id, journey_id)
            error = {"field": exc.field, "message": exc.message}
            if getattr(exc, "errors", None):
                problems = _problems(exc.errors)
                error["message"] = "; ".join(f"{p['path'] or 'definition'}: {p['message']}" for p in problems[:5])
            if action == "publish":
                newest = service.get_version(session, row)
                return _editor(request, principal, row=row, definition=newest.definition, name=row.name,
                               error=error, status=exc.status_code)
            return _journey_page(request, principal, row, error=error, status=exc.status_code)
        past = {"publish": "published", "pause": "paused", "resume": "resumed"}[action]
        record_for(session, principal, request, f"journey.{past}", target_type="journey", target_id=row.id,
                   details={"status": row.status, **details})
        session.commit()
        return RedirectResponse(f"/app/journeys/{row.id}?done={past}", status_code=303)

    return await run_in_threadpool(work)


@router.post("/journeys/{journey_id}/publish")
async def journey_publish(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))):
    return await _act(request, principal, journey_id, "publish")


@router.post("/journeys/{journey_id}/pause")
async def journey_pause(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))):
    return await _act(request, principal, journey_id, "pause")


@router.post("/journeys/{journey_id}/resume")
async def journey_resume(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_MANAGE))):
    return await _act(request, principal, journey_id, "resume")


async def _review(request: Request, principal: Principal, journey_id: str, action: str):
    """Compliance approves the draft version, or withdraws its approval (never the author's own:
    the service refuses, and the refusal is audited)."""
    await request.form()

    def work():
        session = request.state.db
        row = service.get_journey(session, principal.org_id, journey_id)
        fn = service.approve if action == "approved" else service.revoke_approval
        try:
            ver = fn(session, row, principal)
        except CarePostError as exc:
            session.rollback()
            if exc.status_code == 403:
                record_for(session, principal, request, f"journey.{action}", target_type="journey", target_id=row.id,
                           outcome="denied", details={"reason": exc.code})
                session.commit()
            row = service.get_journey(session, principal.org_id, journey_id)
            return _journey_page(request, principal, row, error={"field": exc.field, "message": exc.message},
                                 status=exc.status_code)
        record_for(session, principal, request, f"journey.{action}", target_type="journey", target_id=row.id,
                   details={"version": ver.version, "source": "page"})
        session.commit()
        return RedirectResponse(f"/app/journeys/{row.id}?version={ver.version}&done={action}", status_code=303)

    return await run_in_threadpool(work)


@router.post("/journeys/{journey_id}/approve")
async def journey_approve(request: Request, journey_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))):
    return await _review(request, principal, journey_id, "approved")


@router.post("/journeys/{journey_id}/reject")
async def journey_reject(request: Request, journey_id: str, principal: Principal = Depends(require(P.CAMPAIGNS_APPROVE))):
    return await _review(request, principal, journey_id, "rejected")


# --------------------------------------------------------------------------- the running view

def live_counts(session, principal: Principal, row, out: dict | None = None) -> dict:
    """The running view's figures (``analytics.journey_analytics`` of every version, the shown
    version's steps), people counts 1-10 shown as "<11" without ``phi:read_unmasked``."""
    out = out if out is not None else analytics.journey_analytics(session, row)
    unmasked = principal.can(P.PHI_READ_UNMASKED)

    def show(n):
        return _show(n, principal)

    exited_total = sum(out["exited"].values())
    steps = {}
    for s in out["steps"]:
        outcomes = s.get("outcomes") or {}
        msgs = s.get("messages") or {}
        sent = sum(n for k, n in outcomes.items() if k == "sent" or k.startswith("sent:"))
        excluded = sum(n for k, n in outcomes.items() if k.startswith("excluded"))
        steps[s["id"]] = {"now": show(s["now"]), "executed": show(s["reached"]), "drop_off": show(s["drop_off"]),
                          "left_here": {k: show(v) for k, v in s["left_here"].items()}}
        if s.get("type") == "send" or msgs:
            steps[s["id"]]["messages"] = {"sent": show(sent), "excluded": show(excluded),
                                          **{k: show(msgs.get(k, 0)) for k in ("delivered", "opened_human",
                                                                                "clicked_human", "bounced_hard",
                                                                                "unsubscribed", "converted")}}
    return {"totals": {"entered": show(out["entered"]), "active": show(out["active"]), "exited": show(exited_total),
                       "goal": show(out["reached_goal"]),
                       "exited_by_reason": {k: show(v) for k, v in sorted(out["exited"].items())}},
            "steps": steps, "edges": [{**e, "runs": show(e["runs"])} for e in out["edges"]],
            "shown_version": out["shown_version"],
            "masked": not unmasked, "at": clock.now().strftime("%Y-%m-%d %H:%M:%S")}


def _approval(session, principal: Principal, row, versions) -> dict | None:
    """The newest version when it is a draft that needs compliance approval (marketing purpose,
    sensitive segment): the reasons, whether it is approved, what the viewer may do."""
    if not versions or versions[-1].published_at is not None:
        return None
    newest = versions[-1]
    reasons = service.approval_reasons(session, row.org_id, newest.definition)
    if not reasons:
        return None
    me = service.actor_of(principal)
    may_review = principal.can(P.CAMPAIGNS_APPROVE) and newest.created_by != me
    return {"version": newest.version, "reasons": [r.replace("_", " ") for r in reasons],
            "approved": newest.approved_at is not None, "approved_at": newest.approved_at,
            "own": newest.created_by == me, "may_review": may_review}


def _journey_page(request: Request, principal: Principal, row, error: dict | None = None, status: int = 200,
                  number: int | None = None):
    session = request.state.db
    versions = service.list_versions(session, row)
    if number is not None:
        shown = service.get_version(session, row, number)
    else:
        shown = service.live_version(session, row) or (versions[-1] if versions else None)
    figures = analytics.journey_analytics(session, row)
    counts = live_counts(session, principal, row, figures)
    from carepost.journeys.flow import flow_svg

    diagram = flow_svg(figures, (shown.definition if shown else None) or {}, lambda n: _show(n, principal))
    data = {"journey": {"id": row.id, "status": row.status}, "definition": (shown.definition if shown else None) or
            {"steps": {}, "layout": {}}, "readonly": True, "counts": counts, "choices": _choices(session, principal, request),
            "urls": {"counts": f"/app/journeys/{row.id}/counts"}, "poll_ms": POLL_MS}
    return render(request, "journeys/journey.html", {
        "journey": row, "shown": shown, "versions": versions, "data": data, "purposes": PURPOSES,
        "has_draft": bool(versions and versions[-1].published_at is None), "can_manage": principal.can(P.JOURNEYS_MANAGE),
        "approval": _approval(session, principal, row, versions), "flow_svg": diagram,
        "error": error, "notice": DONE.get(request.query_params.get("done") or ""),
    }, status_code=status)


@router.get("/journeys/{journey_id}")
def journey_page(request: Request, journey_id: str, version: int | None = Query(None, ge=1, le=100_000),
                 principal: Principal = Depends(require(P.JOURNEYS_READ))):
    row = service.get_journey(request.state.db, principal.org_id, journey_id)
    return _journey_page(request, principal, row, number=version)


@router.get("/journeys/{journey_id}/counts")
def journey_counts(request: Request, journey_id: str, principal: Principal = Depends(require(P.JOURNEYS_READ))):
    """The running view's counts as JSON (the page fetches them again every few seconds)."""
    session = request.state.db
    row = service.get_journey(session, principal.org_id, journey_id)
    return JSONResponse(live_counts(session, principal, row))


# --------------------------------------------------------------------------- the contact page

RUN_STATE_WORDS = {"active": "in progress", "waiting": "waiting", "completed": "completed", "exited": "exited",
                   "failed": "failed"}


def contact_journey_rows(session, org_id: str, contact_id: str) -> list[dict]:
    """The patient's journeys on the contact page: each run (journey, version, state, current step,
    when it entered and why it ended) followed by the steps it executed, newest run first. Ids,
    step ids and dates only; the contact page masks the dates for a masked viewer."""
    runs = service.list_runs(session, org_id, contact_id=contact_id, limit=20)
    if not runs:
        return [{"summary": "Not in any journey."}]
    steps = service.run_steps(session, org_id, [r.id for r in runs])
    names: dict[str, str] = {}
    out = []
    for run in runs:
        if run.journey_id not in names:
            try:
                names[run.journey_id] = service.get_journey(session, org_id, run.journey_id).name
            except CarePostError:
                names[run.journey_id] = "(removed journey)"
        state = RUN_STATE_WORDS.get(run.state, run.state)
        where = ""
        if run.state == "active" and run.step_id:
            where = f" at step {run.step_id}"
        elif run.state == "waiting" and run.waiting_event:
            where = f" for {run.waiting_event} at step {run.step_id}"
        elif run.state == "waiting" and run.step_id:
            # the engine keeps a waiting run at the step it runs when it wakes
            until = f" until {clock.aware(run.wake_at):%Y-%m-%d %H:%M}" if run.wake_at is not None else ""
            where = f"{until}, then step {run.step_id}"
        ended = ""
        if run.ended_at is not None:
            ended = f", ended {clock.aware(run.ended_at):%Y-%m-%d %H:%M}" + (f" ({run.exit_reason})" if run.exit_reason else "")
        goal = ", goal reached" if run.converted_at is not None else ""
        out.append({"summary": f"{names[run.journey_id]} (version {run.version}): {state}{where}; entered "
                               f"{clock.aware(run.entered_at):%Y-%m-%d %H:%M}{ended}{goal}",
                    "href": f"/app/journeys/{run.journey_id}", "kind": "journey_run"})
        for s in steps.get(run.id, []):
            detail = s["status"] + (f": {s['reason']}" if s.get("reason") else "")
            at = s["at"][:16].replace("T", " ") if s.get("at") else ""
            out.append({"summary": f"↳ {at} step {s['step_id']} ({STEP_TYPES.get(s['type'], s['type'])}) — {detail}",
                        "kind": "journey_step"})
    return out


# --------------------------------------------------------------------------- the runs of a journey

RUNS_PAGE = 50


@router.get("/journeys/{journey_id}/runs")
def journey_runs(request: Request, journey_id: str, state: str = Query("", max_length=12),
                 step: str = Query("", max_length=64), before: str = Query("", max_length=32),
                 principal: Principal = Depends(require(P.JOURNEYS_READ))):
    """The runs of a journey, newest first, filtered by state and current step, 50 a page. Ids,
    steps, states and times only; the patient is a link to their contact page (which applies its
    own permission, masking and audit) and only for a viewer who may read contacts."""
    from sqlalchemy import select

    from carepost.journeys.models import RUN_STATES, JourneyRun

    session = request.state.db
    row = service.get_journey(session, principal.org_id, journey_id)
    q = select(JourneyRun).where(JourneyRun.org_id == principal.org_id, JourneyRun.journey_id == row.id)
    if state in RUN_STATES:
        q = q.where(JourneyRun.state == state)
    else:
        state = ""
    if step:
        q = q.where(JourneyRun.step_id == step)
    if before:
        anchor = session.get(JourneyRun, before) if len(before) == 32 and before.isalnum() else None
        if anchor is not None and anchor.journey_id == row.id:
            q = q.where((JourneyRun.entered_at < anchor.entered_at)
                        | ((JourneyRun.entered_at == anchor.entered_at) & (JourneyRun.id < anchor.id)))
    runs = list(session.scalars(q.order_by(JourneyRun.entered_at.desc(), JourneyRun.id.desc()).limit(RUNS_PAGE + 1)))
    more = len(runs) > RUNS_PAGE
    runs = runs[:RUNS_PAGE]
    steps = sorted({sid for v in service.list_versions(session, row) for sid in ((v.definition or {}).get("steps") or {})})
    from urllib.parse import urlencode

    older = (f"/app/journeys/{row.id}/runs?" + urlencode({"state": state, "step": step, "before": runs[-1].id})
             if more and runs else None)
    return render(request, "journeys/runs.html", {
        "journey": row, "runs": runs, "state": state, "step": step, "states": RUN_STATES, "steps": steps,
        "older": older, "first_page": not before, "contacts_link": principal.can(P.PHI_READ_MASKED)})
