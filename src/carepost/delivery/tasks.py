"""Queue tasks of delivery. They carry message ids only (ARCHITECTURE.md section 2); the state
lives in the database, so running a task twice, or on two workers, sends nothing twice
(``pipeline.claim`` leases each recipient to one run).

* :func:`deliver_messages` — run the pipeline over up to ``CAREPOST_DELIVERY_BATCH_SIZE`` messages;
* :func:`deliver_due` — every minute: retries whose time has come, and queued recipients whose
  task was lost (a queue flushed, a worker killed, an enqueue that failed after the commit).
"""

from __future__ import annotations

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
    with system_session() as session:
        ids = pipeline.due_message_ids(session)
        session.commit()
    if ids:
        log.info("delivery_due", messages_count=len(ids))
        enqueue_delivery(ids)


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
