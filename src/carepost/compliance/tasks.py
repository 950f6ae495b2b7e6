"""Queue tasks of the compliance center. Ids only (``core.queue``)."""

from __future__ import annotations

from huey import crontab

from carepost.core.database import org_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.compliance.tasks")


@huey.task(retries=1, retry_delay=60)
def run_deidentified_export(export_id: str, org_id: str) -> None:
    """Run a de-identified export job (idempotent: a finished job is left alone)."""
    from carepost.compliance.service import run_export

    with org_session(org_id) as session:
        job = run_export(session, org_id, export_id)
        log.info("deidentified_export_finished", export_id=export_id, export_status=job.status,
                 subject_count=job.subject_count)


@huey.periodic_task(crontab(hour="9", minute="0"), name="compliance.training_reminders")
def training_reminders() -> None:
    """Daily: remind people whose policy acknowledgement is missing or ends soon (at most weekly
    per person; issue 16 item 10)."""
    from carepost.accounts.service import list_organizations
    from carepost.compliance.training import send_reminders
    from carepost.core.database import system_session

    with system_session() as session:
        org_ids = [o.id for o in list_organizations(session)]
    for org_id in org_ids:
        with org_session(org_id) as session:
            reminded = send_reminders(session, org_id)
            session.commit()
        if reminded:
            log.info("training_reminders_sent", reminded_count=len(reminded))
