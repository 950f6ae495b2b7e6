"""Queue tasks of tracking. Tasks take ids only; state lives in the database.

* ``deliver_webhook(delivery_id)`` makes one attempt of a webhook delivery when it is due
  (idempotent: a delivery that is not pending, not due or leased by another worker is left alone;
  a failed attempt schedules the next one on the backoff schedule).
* ``sweep_webhook_deliveries`` (every minute) queues due deliveries nobody is working on — after a
  queue outage, a worker that died mid-attempt, or a lost schedule.
* ``purge_webhook_log`` (daily) deletes finished deliveries, their attempts and events past
  ``CAREPOST_WEBHOOK_LOG_RETENTION_DAYS``.
* ``evaluate_deliverability`` (hourly) judges each organization's rates per receiving provider
  and raises or clears deliverability alerts (:mod:`carepost.tracking.deliverability`).
* ``fold_rollups`` (every minute) folds the appended analytics increments of every organization
  into the rollups (:func:`carepost.tracking.rollups.fold_all`; readers fold their own
  organization's before they read, so this bounds the backlog, not what dashboards show).
"""

from __future__ import annotations

from huey import crontab

from carepost.core.database import system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.tracking.tasks")


@huey.task()
def deliver_webhook(delivery_id: str) -> None:
    from carepost.tracking.service import attempt_delivery

    attempt_delivery(delivery_id)


@huey.periodic_task(crontab(minute="*"))
def sweep_webhook_deliveries() -> None:
    from carepost.tracking.service import due_deliveries

    with system_session() as session:
        ids = due_deliveries(session)
    for delivery_id in ids:
        deliver_webhook(delivery_id)
    if ids:
        log.info("webhook_sweep", queued_count=len(ids))


@huey.periodic_task(crontab(minute="47", hour="4"))
def purge_webhook_log() -> None:
    from carepost.tracking.service import purge_log

    with system_session() as session:
        counts = purge_log(session)
        session.commit()
    log.info("webhook_log_purged", **{f"{k}_count": v for k, v in counts.items()})


@huey.periodic_task(crontab(minute="23"))
def evaluate_deliverability() -> None:
    from carepost.tracking.deliverability import evaluate_all

    counts = evaluate_all()
    log.info("deliverability_alerts_evaluated", **{f"{k}_count": v for k, v in counts.items()})


@huey.periodic_task(crontab(minute="*"), name="tracking.fold_rollups")
def fold_rollups() -> None:
    from carepost.tracking.rollups import fold_all

    chunks = fold_all(system_session)
    if chunks:
        log.info("analytics_increments_folded", chunk_count=chunks)
