"""Queue tasks of retention: the nightly purge of every organization with a schedule, and a purge
asked for from the API or the page. Ids only."""

from __future__ import annotations

from huey import crontab

from carepost.core.errors import Conflict
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.retention.tasks")


@huey.task(retries=0)
def purge_organization(org_id: str, actor_id: str = "worker") -> None:
    """Run (or resume) one organization's purge. A purge already running is left to finish."""
    from carepost.retention import purge
    from carepost.retention.service import Actor

    try:
        run = purge.run_purge(org_id, Actor("system", actor_id))
    except Conflict:
        log.info("retention_purge_skipped", org_id=org_id, reason="another purge is running")
        return
    log.info("retention_purge_finished", org_id=org_id, run_id=run["id"])


@huey.periodic_task(crontab(minute="41", hour="2"), name="retention.nightly")
def nightly_purge() -> None:
    """Queue a purge for every organization with an enabled schedule (resumes stopped runs too)."""
    from sqlalchemy import select

    from carepost.core.database import system_session
    from carepost.retention.models import PurgeRun, RetentionSchedule

    with system_session() as s:
        orgs = set(s.scalars(select(RetentionSchedule.org_id).where(RetentionSchedule.enabled.is_(True))))
        orgs |= set(s.scalars(select(PurgeRun.org_id).where(PurgeRun.status == "running")))
    for org_id in sorted(orgs):
        purge_organization(org_id)
