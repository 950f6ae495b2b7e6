"""Queue tasks of the ``ehr`` capability. Tasks take ids only; state lives in the database.

* ``fetch_id_only(org_id, message_id)``: read back from the organization's FHIR server the
  resource an id-only Subscription notification named (the row of ``ehr_messages`` in status
  ``queued``) and record it as a full-resource notification would
  (:func:`carepost.ehr.fhir_fetch.run_fetch`). Queued when the notification's transaction
  commits, never run in the request; idempotent (a row no longer ``queued``, or not due, is left
  alone). A transient failure schedules it again with backoff.
* ``fetch_due`` (every minute): queues the fetches whose task was lost (overdue by two minutes).

The MLLP listener stores and answers each message itself (an ACK must mean the message is
stored), FHIR resources posted in full are recorded in their request, and retrying the error
queue is an API or CLI action.
"""

from __future__ import annotations

from huey import crontab

from carepost.core.database import system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.ehr.tasks")


@huey.task()
def fetch_id_only(org_id: str, message_id: str) -> None:
    from carepost.ehr.fhir_fetch import run_fetch

    status = run_fetch(org_id, message_id)
    log.info("ehr_id_only_fetched", message_id=message_id, status=status)


@huey.periodic_task(crontab(minute="*"), name="ehr.fetch_due")
def fetch_due() -> None:
    from sqlalchemy import update

    from carepost.core import clock
    from carepost.ehr.fhir_fetch import due_fetches
    from carepost.ehr.models import EhrMessage

    with system_session() as session:
        due = due_fetches(session)
        if due:  # due again from now: the task that runs each claims (and so leases) it
            t = EhrMessage.__table__
            session.execute(update(t).where(t.c.id.in_([m for _, m in due]), t.c.status == "queued")
                            .values(next_attempt_at=clock.now()))
            session.commit()
    for org_id, message_id in due:
        fetch_id_only(org_id, message_id)
    if due:
        log.info("ehr_fetch_sweep", queued_count=len(due))
