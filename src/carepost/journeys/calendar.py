"""Scheduled journey sends for the organization's campaign calendar (issue 14 item 2).

A run waiting on a ``wait`` or ``wait_until`` step already points at its next step and holds the
instant it wakes (``JourneyRun.wake_at``, see ``models``); when that next step is a ``send``, the
run will send on that day. :func:`scheduled_sends` counts such runs per live journey, send step
and calendar day of the given time zone, set-wise (one grouped statement; the day is a CASE over
the day boundaries, the same on both databases), so a million waiting runs are never loaded.
The campaigns page shows the counts through the registry the composition root fills (campaigns
never imports journeys).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from carepost.journeys.models import Journey, JourneyRun, JourneyVersion

MAX_DAYS = 62


def scheduled_sends(session: Session, org_id: str, start: date, end: date, time_zone: str) -> list[dict]:
    """``[{"day", "journey_id", "journey", "step_id", "count"}]``: waiting runs of live journeys
    whose next step is a send and whose wake time falls on a day in [start, end] of ``time_zone``."""
    zone = ZoneInfo(time_zone)
    n = min((end - start).days + 1, MAX_DAYS)
    if n <= 0:
        return []
    # In UTC: SQLite compares the wall time of what it is given.
    bounds = [datetime.combine(start + timedelta(days=i), time.min).replace(tzinfo=zone).astimezone(UTC)
              for i in range(n + 1)]
    day = case(*[(JourneyRun.wake_at < bounds[i + 1], i) for i in range(n)], else_=None)
    groups = session.execute(
        select(JourneyRun.journey_id, JourneyRun.version_id, JourneyRun.step_id, day.label("day"), func.count())
        .join(Journey, Journey.id == JourneyRun.journey_id)
        .where(JourneyRun.org_id == org_id, Journey.org_id == org_id, Journey.status == "live",
               JourneyRun.state == "waiting", JourneyRun.waiting_event.is_(None),
               JourneyRun.wake_at >= bounds[0], JourneyRun.wake_at < bounds[-1])
        .group_by(JourneyRun.journey_id, JourneyRun.version_id, JourneyRun.step_id, day)).all()
    if not groups:
        return []
    versions = {v.id: v for v in session.scalars(select(JourneyVersion).where(
        JourneyVersion.org_id == org_id, JourneyVersion.id.in_({g[1] for g in groups})))}
    names = dict(session.execute(select(Journey.id, Journey.name).where(
        Journey.org_id == org_id, Journey.id.in_({g[0] for g in groups}))).all())
    out: dict[tuple, dict] = {}
    for journey_id, version_id, step_id, index, count in groups:
        version = versions.get(version_id)
        step = ((version.definition or {}).get("steps") or {}).get(step_id) if version else None
        if index is None or not isinstance(step, dict) or step.get("type") != "send":
            continue
        key = (journey_id, step_id, int(index))
        entry = out.setdefault(key, {"day": (start + timedelta(days=int(index))).isoformat(),
                                     "journey_id": journey_id, "journey": names.get(journey_id, ""),
                                     "step_id": step_id, "count": 0})
        entry["count"] += int(count)
    return sorted(out.values(), key=lambda e: (e["day"], e["journey"], e["step_id"]))


def calendar_entries(session: Session, principal, start: date, end: date, time_zone: str) -> list[dict]:
    """The campaign calendar's journey entries (``campaigns.pages.register_calendar_source``):
    one per journey, send step and day, for a viewer who may read journeys."""
    from carepost.accounts.permissions import Permission

    if not principal.can(Permission.JOURNEYS_READ):
        return []
    return [{"day": e["day"], "kind": "journey", "label": f"{e['journey']} — {e['step_id']}", "count": e["count"],
             "link": f"/app/journeys/{e['journey_id']}"}
            for e in scheduled_sends(session, principal.org_id, start, end, time_zone)]
