"""Queue tasks of delivery. They carry message ids only (ARCHITECTURE.md section 2); the state
lives in the database, so running a task twice, or on two workers, sends nothing twice
(``pipeline.claim`` leases each recipient to one run).

* :func:`deliver_messages` — run the pipeline over up to ``CAREPOST_DELIVERY_BATCH_SIZE`` messages;
* :func:`deliver_due` — every minute: retries whose time has come, and queued recipients whose
  task was lost (a queue flushed, a worker killed, an enqueue that failed after the commit) —
  after ``pipeline.REQUEUE_AFTER``, or at once when the queue's store lost its contents (a Redis
  restarted without persistence, or flushed: the mark the previous sweep left there is gone);
* :func:`schedule_lease_expiry` — each claim queues its messages again for the moment its lease
  expires, so a dead worker's recipients are due then (a no-op when the run finished);
* :func:`process_inbound_report` — apply a bounce or complaint report received by ``carepost
  inbound`` (suppression, recipient status, events); :func:`requeue_inbound_reports` (every 15
  minutes) queues reports still pending after 10 minutes; :func:`purge_inbound_reports` (daily)
  deletes received reports past their retention.
"""

from __future__ import annotations

from datetime import timedelta

from huey import crontab

from carepost.core.config import get_settings
from carepost.core.database import system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey
from carepost.delivery import pipeline

log = get_logger("carepost.delivery.tasks")


@huey.task(name="delivery.deliver_messages", retries=2, retry_delay=30)
def deliver_messages(message_ids: list[str]) -> None:
    pipeline.deliver(list(message_ids))


@huey.periodic_task(crontab(minute="*"), name="delivery.deliver_due")
def deliver_due() -> None:
    emptied = queue_store_emptied()
    stale_after = timedelta(0) if emptied else pipeline.REQUEUE_AFTER
    with system_session() as session:
        ids = pipeline.due_message_ids(session, stale_after=stale_after)
        session.commit()
    if ids:
        log.info("delivery_due", messages_count=len(ids), queue_emptied=emptied)
        enqueue_delivery(ids)
    if emptied:
        mark_queue_store()


QUEUE_MARK = "carepost.delivery.queue_mark"


def queue_store_emptied() -> bool:
    """Whether the queue's store lost the mark :func:`deliver_due` leaves in it: then every task it
    held may be gone (a Redis restarted without persistence or failed over to an empty replica,
    a flushed queue), and a queued recipient is due at once rather than after
    ``pipeline.REQUEUE_AFTER``. A new queue has no mark either: its first sweep queues every
    queued recipient again (tasks are idempotent). Unreachable store: False (the sweep after it
    looks again; the mark is set only once the sweep's recipients are queued)."""
    from huey.constants import EmptyData

    try:
        return huey.storage.peek_data(QUEUE_MARK) is EmptyData
    except Exception as exc:  # noqa: BLE001 - the queue is down: nothing can be queued now anyway
        log.warning("delivery_queue_mark_unreadable", error_type=type(exc).__name__)
        return False


def mark_queue_store() -> None:
    try:
        huey.storage.put_data(QUEUE_MARK, b"1")
    except Exception as exc:  # noqa: BLE001 - the next sweep finds the mark missing and queues again
        log.warning("delivery_queue_mark_failed", error_type=type(exc).__name__)


def schedule_lease_expiry(message_ids: list[str], seconds: float) -> None:
    """Queue these messages again for the moment the lease just taken on their recipients expires
    (plus a second): should the worker that holds it die, its recipients are due again then, not
    at the next sweep of :func:`deliver_due` nor after ``pipeline.REQUEUE_AFTER`` (issue 11 item
    4). When the run finished, the task finds nothing due and claims nothing. The queue keeps
    the schedule (SQLite or Redis), so it outlives the worker; a failure to schedule is logged,
    the minute sweep remains."""
    size = max(1, min(get_settings().delivery_batch_size, 1000))
    try:
        for start in range(0, len(message_ids), size):
            deliver_messages.schedule(args=(list(message_ids[start:start + size]),), delay=seconds + 1)
    except Exception as exc:  # noqa: BLE001 - the queue is down: the sweep will pick them up
        log.error("delivery_schedule_failed", error_type=type(exc).__name__, messages_count=len(message_ids))


def enqueue_delivery(message_ids: list[str]) -> None:
    """Queue delivery of these (committed) messages in tasks of at most the batch size. A
    failure to enqueue is logged, not raised: the message is stored, and the sweep
    (:func:`deliver_due`) queues it again within ``pipeline.REQUEUE_AFTER``."""
    size = max(1, min(get_settings().delivery_batch_size, 1000))
    try:
        for start in range(0, len(message_ids), size):
            deliver_messages(list(message_ids[start:start + size]))
    except Exception as exc:  # noqa: BLE001 - the queue is down: the sweep will pick them up
        log.error("delivery_enqueue_failed", error_type=type(exc).__name__, messages_count=len(message_ids))


def enqueue_delivery_each(requests: list[tuple[str, str | None]]) -> None:
    """One delivery task per (committed) message, each carrying the request id of the request
    that stored it — ``[(message id, request id or None), ...]`` — written to the queue in one go
    (``huey.enqueue_many``: one SQLite transaction or one Redis round trip, not one per task). A
    failure is logged, not raised, as by :func:`enqueue_delivery`: the sweep queues them again."""
    try:
        huey.enqueue_many([(deliver_messages.s([message_id]), request_id) for message_id, request_id in requests])
    except Exception as exc:  # noqa: BLE001 - the queue is down: the sweep will pick them up
        log.error("delivery_enqueue_failed", error_type=type(exc).__name__, messages_count=len(requests))


@huey.periodic_task(crontab(minute="*/10"), name="delivery.refresh_statistics")
def refresh_statistics() -> None:
    """SQLite only: refresh the query planner's statistics (``ANALYZE``) once the delivery
    tables have doubled since the last time. Without them SQLite reads ``org_id = ? AND id IN
    (...)`` through the org_id index, every row of the organization, instead of the primary
    key: 80 ms instead of 3 ms for 500 ids in a 40,000-message database, growing with it.
    PostgreSQL's autovacuum keeps its own statistics."""
    from sqlalchemy import text

    if not get_settings().is_sqlite:
        return
    with system_session() as session:
        rows = session.execute(text("SELECT max(rowid) FROM message_recipients")).scalar() or 0
        analyzed = session.execute(text(
            "SELECT stat FROM sqlite_stat1 WHERE tbl = 'message_recipients' LIMIT 1"
        )).scalar() if _has_stat_table(session) else None
        known = int(analyzed.split()[0]) if analyzed else 0
        if rows >= 1000 and rows > 2 * known:
            session.execute(text("PRAGMA analysis_limit = 0"))
            session.execute(text("ANALYZE"))
            log.info("database_statistics_refreshed", rows_count=rows)
        session.commit()


def _has_stat_table(session) -> bool:
    from sqlalchemy import text

    return bool(session.execute(text("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'")).scalar())


@huey.task(name="delivery.process_inbound_report", retries=3, retry_delay=30)
def process_inbound_report(report_id: str) -> None:
    from carepost.delivery.inbound import process_report

    process_report(report_id)


@huey.periodic_task(crontab(minute="*/15"), name="delivery.requeue_inbound_reports")
def requeue_inbound_reports() -> None:
    from datetime import timedelta

    from carepost.delivery.inbound import pending_report_ids

    ids = pending_report_ids(older_than=timedelta(minutes=10))
    for report_id in ids:
        process_inbound_report(report_id)
    if ids:
        log.info("inbound_reports_requeued", queued_count=len(ids))


@huey.periodic_task(crontab(minute="41", hour="4"), name="delivery.purge_inbound_reports")
def purge_inbound_reports() -> None:
    from carepost.delivery.inbound import purge_reports

    with system_session() as session:
        count = purge_reports(session)
        session.commit()
    log.info("inbound_reports_purged", purged_count=count)
