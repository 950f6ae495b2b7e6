"""Queue tasks of the compliance center. Ids only (``core.queue``)."""

from __future__ import annotations

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
