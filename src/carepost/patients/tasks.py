"""Queue tasks of the patients capability. Tasks take ids only; state lives in the database.

* ``run_import(import_id, org_id)`` runs an uploaded import to its end. Idempotent: a finished
  job is left alone; a job interrupted half-way (a worker that stopped) starts over, and since
  records are upserted by source id, running it again never duplicates.
* ``refresh_care_stages_nightly`` re-derives every contact's care-journey stage once a day, so
  "overdue" follows the calendar without any new data arriving; it also gives name-search tokens
  to contacts stored before name search existed (``reindex_name_tokens`` does it on demand).
"""

from __future__ import annotations

from huey import crontab
from sqlalchemy import select

from carepost.core.database import org_session, system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.patients.tasks")


@huey.task(retries=2, retry_delay=30)
def run_import(import_id: str, org_id: str) -> None:
    from carepost.patients.imports import run_job

    with org_session(org_id) as session:
        job = run_job(session, import_id)
        log.info("import_finished", import_id=import_id, import_status=job.status, processed_count=job.processed)


@huey.periodic_task(crontab(minute="17", hour="3"))
def refresh_care_stages_nightly() -> None:
    from carepost.accounts.models import Organization
    from carepost.patients.service import refresh_care_stages

    with system_session() as session:
        org_ids = list(session.scalars(select(Organization.id)))
    for org_id in org_ids:
        with org_session(org_id) as session:
            changed = refresh_care_stages(session, org_id, None)
            session.commit()
        log.info("care_stages_refreshed", org_id=org_id, changed_count=changed)
        reindex_name_tokens.call_local(org_id)


@huey.task(retries=2, retry_delay=30)
def reindex_name_tokens(org_id: str, all_contacts: bool = False) -> None:
    """Write the name-search tokens of an organization's contacts that have none (every contact
    with ``all_contacts``). Idempotent; commits per chunk."""
    from carepost.patients.service import reindex_names

    with org_session(org_id) as session:
        done = reindex_names(session, org_id, only_missing=not all_contacts)
    log.info("name_tokens_reindexed", org_id=org_id, contacts_count=done)


def start_import(import_id: str, org_id: str) -> None:
    """Enqueue an import (the worker runs it; in immediate mode it runs now)."""
    run_import(import_id, org_id)
