"""Figures of a journey and of each of its steps (issue 15 item 5), and the step diagram.

* **entered** — runs started (one per patient per entry); **active** — runs still open;
  **at each step now** — open runs by their current step; **exited by reason** — ended runs by
  ``exit_reason`` (goal, unsubscribe, revocation, exit_step, timeout, removed, failed:<code>);
  **reached the goal** — runs whose goal was met (``converted_at``);
* per step: **reached** (runs that executed it), **now** (open runs there), **left here** (runs
  that ended at it, by reason) and **drop-off** (those that ended at it without finishing:
  every reason but ``exit_step`` and ``goal``), and for a send step the step's outcomes
  (sent / excluded by reason) from its run-step rows plus the **message metrics** of tracking's
  rollups (dimension ``journey_step_id`` = ``models.step_key(version id, step id)``: accepted,
  delivered, human opens and clicks, bounces, unsubscribes, conversions);
* the **diagram**: nodes (the steps of the shown version, with the figures above) and edges
  ``{from, to, runs}`` counted from consecutive run-step rows of each run (a Sankey-like flow).

Set-based: a handful of grouped counts over the journey's runs and run steps (indexed by
journey/version and state/step), one over the rollups. Counts are of people: a viewer without
``phi:read_unmasked`` sees 1..10 as ``"<11"`` (:func:`mask`), as analytics does elsewhere.
Reads tracking's rollup table directly (a set-based read, which ARCHITECTURE.md section 3 allows).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from carepost.core import clock
from carepost.journeys.models import (
    Journey,
    JourneyRun,
    JourneyRunStep,
    JourneyVersion,
    step_key,
)

FINISHING_REASONS = ("exit_step", "goal")
WAIT_TYPES = ("wait", "wait_until", "wait_event")
MESSAGE_METRICS = ("accepted", "sent", "delivered", "failed", "bounced_hard", "bounced_soft", "complained",
                   "portal_viewed", "opened_unique", "opened_human", "clicked_unique", "clicked_human",
                   "unsubscribed", "converted")


def _versions(session: Session, row: Journey, number: int | None) -> list[JourneyVersion]:
    stmt = select(JourneyVersion).where(JourneyVersion.org_id == row.org_id, JourneyVersion.journey_id == row.id)
    if number is not None:
        stmt = stmt.where(JourneyVersion.version == number)
    return list(session.scalars(stmt.order_by(JourneyVersion.version)))


def _message_metrics(session: Session, row: Journey, keys: dict[str, str]) -> dict[str, dict[str, int]]:
    """step id -> metric -> total over the rollups of every version's step key."""
    from carepost.tracking.rollups import AnalyticsRollup

    if not keys:
        return {}
    start = row.created_at
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    start = datetime(start.year, start.month, start.day, tzinfo=UTC)
    out: dict[str, dict[str, int]] = {}
    q = (select(AnalyticsRollup.journey_step_id, AnalyticsRollup.metric, func.sum(AnalyticsRollup.n))
         .where(AnalyticsRollup.org_id == row.org_id, AnalyticsRollup.grain == "d",
                AnalyticsRollup.period >= start - timedelta(days=1),
                AnalyticsRollup.journey_step_id.in_(list(keys)))
         .group_by(AnalyticsRollup.journey_step_id, AnalyticsRollup.metric))
    for key, metric, n in session.execute(q).all():
        if not n:
            continue
        base = metric.split(":", 1)[0]
        if base not in MESSAGE_METRICS and base != "excluded":
            continue
        cell = out.setdefault(keys[key], {})
        cell[metric] = cell.get(metric, 0) + int(n)
    return out


def journey_analytics(session: Session, row: Journey, *, version: int | None = None) -> dict:
    """Every figure of a journey (all versions, or one), unmasked; see :func:`mask`."""
    org_id = row.org_id
    versions = _versions(session, row, version)
    version_ids = [v.id for v in versions]
    shown = versions[-1] if versions else None
    if version is None and row.current_version:
        shown = next((v for v in versions if v.version == row.current_version), shown)
    runs = [JourneyRun.org_id == org_id, JourneyRun.journey_id == row.id]
    if version is not None:
        runs.append(JourneyRun.version == version)
    by_state = dict(session.execute(select(JourneyRun.state, func.count()).where(*runs)
                                    .group_by(JourneyRun.state)).all())
    entered = sum(by_state.values())
    open_ = by_state.get("active", 0) + by_state.get("waiting", 0)
    # Where a run is: the last step it executed when that step waits (a waiting run counts at
    # the wait, wait_until or wait_event it waits in) or ended it; else the step it will run next.
    last = aliased(JourneyRunStep)
    located = session.execute(
        select(JourneyRun.state, JourneyRun.step_id, JourneyRun.exit_reason, last.step_id, last.step_type,
               func.count())
        .outerjoin(last, and_(last.run_id == JourneyRun.id, last.seq == JourneyRun.seq, last.org_id == org_id))
        .where(*runs)
        .group_by(JourneyRun.state, JourneyRun.step_id, JourneyRun.exit_reason, last.step_id, last.step_type)).all()
    at_step: dict[str, int] = {}
    exited: dict[str, int] = {}
    left: dict[str, dict[str, int]] = {}
    for state, step_id, reason, last_step, last_type, n in located:
        ended = state not in ("active", "waiting")
        where = last_step if last_step is not None and (ended or last_type in WAIT_TYPES) else step_id
        where = where or ""
        if not ended:
            at_step[where] = at_step.get(where, 0) + n
            continue
        reason = reason or state
        exited[reason] = exited.get(reason, 0) + n
        cell = left.setdefault(where, {})
        cell[reason] = cell.get(reason, 0) + n
    goal = session.scalar(select(func.count()).select_from(JourneyRun).where(*runs, JourneyRun.converted_at.is_not(None))) or 0

    steps_where = [JourneyRunStep.org_id == org_id, JourneyRunStep.version_id.in_(version_ids)] if version_ids else None
    reached: dict[str, int] = {}
    outcomes: dict[str, dict[str, int]] = {}
    edges: list[dict] = []
    if steps_where is not None:
        reached = dict(session.execute(select(JourneyRunStep.step_id, func.count(func.distinct(JourneyRunStep.run_id)))
                                       .where(*steps_where).group_by(JourneyRunStep.step_id)).all())
        for step_id, status, reason, n in session.execute(
                select(JourneyRunStep.step_id, JourneyRunStep.status, JourneyRunStep.reason, func.count())
                .where(*steps_where, JourneyRunStep.step_type.in_(("send", "branch", "split", "wait_event")))
                .group_by(JourneyRunStep.step_id, JourneyRunStep.status, JourneyRunStep.reason)).all():
            label = status if not reason else f"{status}:{reason}"
            cell = outcomes.setdefault(step_id, {})
            cell[label] = cell.get(label, 0) + n
        a, b = aliased(JourneyRunStep), aliased(JourneyRunStep)
        for src, dst, n in session.execute(
                select(a.step_id, b.step_id, func.count(func.distinct(a.run_id)))
                .join(b, and_(b.run_id == a.run_id, b.seq == a.seq + 1, b.org_id == org_id))
                .where(a.org_id == org_id, a.version_id.in_(version_ids))
                .group_by(a.step_id, b.step_id)).all():
            edges.append({"from": src, "to": dst, "runs": int(n)})
        edges.sort(key=lambda e: (e["from"], e["to"]))

    definition = (shown.definition if shown is not None else {}) or {}
    step_defs = definition.get("steps") or {}
    keys = {step_key(v.id, sid): sid for v in versions for sid, s in ((v.definition or {}).get("steps") or {}).items()
            if isinstance(s, dict) and s.get("type") == "send"}
    messages = _message_metrics(session, row, keys)
    ids = list(step_defs) + sorted((set(reached) | set(at_step) | set(left)) - set(step_defs) - {""})
    steps = []
    for sid in ids:
        step = step_defs.get(sid) or {}
        left_here = left.get(sid, {})
        node = {"id": sid, "type": step.get("type"), "reached": int(reached.get(sid, 0)), "now": int(at_step.get(sid, 0)),
                "left_here": left_here,
                "drop_off": sum(n for r, n in left_here.items() if r not in FINISHING_REASONS),
                "outcomes": outcomes.get(sid, {})}
        if step.get("type") == "send" or sid in messages:
            node["messages"] = messages.get(sid, {})
        if sid not in step_defs:
            node["in_shown_version"] = False
        steps.append(node)
    return {"journey_id": row.id, "version": version, "shown_version": shown.version if shown is not None else None,
            "entered": entered, "active": open_, "states": {k: int(v) for k, v in by_state.items()},
            "exited": exited, "reached_goal": int(goal),
            "goal_rate": round(goal / entered, 4) if entered else None,
            "steps": steps, "edges": edges, "start": definition.get("start"),
            "as_of": clock.now().isoformat()}


def mask(out: dict) -> dict:
    """Small-cell suppression for a viewer without ``phi:read_unmasked``: 1..10 people -> "<11"."""
    from carepost.tracking.analytics import suppress, suppress_counts

    def m(n):
        return suppress(n) if isinstance(n, int) else n

    masked = dict(out)
    for key in ("entered", "active", "reached_goal"):
        masked[key] = m(out[key])
    masked["states"] = {k: m(v) for k, v in out["states"].items()}
    masked["exited"] = {k: m(v) for k, v in out["exited"].items()}
    if isinstance(masked["reached_goal"], str) or isinstance(masked["entered"], str):
        masked["goal_rate"] = None
    steps = []
    for s in out["steps"]:
        node = dict(s)
        for key in ("reached", "now", "drop_off"):
            node[key] = m(s[key])
        node["left_here"] = {k: m(v) for k, v in s["left_here"].items()}
        node["outcomes"] = {k: m(v) for k, v in s["outcomes"].items()}
        if "messages" in s:
            node["messages"] = suppress_counts(s["messages"])
        steps.append(node)
    masked["steps"] = steps
    masked["edges"] = [{**e, "runs": m(e["runs"])} for e in out["edges"]]
    masked["masked"] = True
    return masked
