"""Queue tasks of campaigns: planning, sending, and the sweep that resumes both after a crash.

* :func:`plan_campaign` — plan a launched campaign to the end (``planning.plan``, one
  transaction per chunk, resumable from the cursor); then queue :func:`send_campaign`;
* :func:`send_campaign` — materialize due recipients in batches for up to
  ``CAREPOST_CAMPAIGN_SEND_SLICE_SECONDS`` and hand each batch's message ids to the delivery
  task, then queue itself again (so delivery tasks of the same worker run in between), or
  schedule itself for the next due row or throttle window;
* :func:`sweep` — every minute: a campaign planning or sending whose heartbeat
  (``worked_at``) is older than ``CAREPOST_CAMPAIGN_STALE_SECONDS`` lost its task (a worker killed
  mid-plan or mid-send, a queue flushed): queue it again (a worker also does this once when it
  starts, :func:`resume_on_start`); every such campaign at once when the queue's store lost
  the sweep's mark (a Redis restarted empty). Running a task twice is safe
  (``planning`` moves its cursor by compare-and-set; ``sending`` claims rows before writing).

* :func:`ab_winners` — every minute: an A/B test whose ``winner_after_hours`` passed gets its
  winner, and the rows awaiting it are released and sent (``ab_tests.release``).

Tasks carry the organization and campaign ids only.
"""

from __future__ import annotations

import time
from datetime import timedelta

from huey import crontab

from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.database import system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.campaigns.tasks")

MAX_DELAY_SECONDS = 300


@huey.task(name="campaigns.plan_campaign", retries=2, retry_delay=10)
def plan_campaign(org_id: str, campaign_id: str) -> None:
    """Plan a campaign (the task a launch enqueues); sending follows when planning finished."""
    from carepost.campaigns import planning

    report = planning.plan(org_id, campaign_id, chunk_size=get_settings().campaign_plan_chunk)
    log.info("campaign_plan_run", campaign_id=campaign_id, chunks_count=report.chunks, planned_count=report.planned,
             excluded_count=report.excluded, finished=report.finished, stopped=report.stopped)
    if report.finished:
        send_campaign(org_id, campaign_id)


@huey.task(name="campaigns.send_campaign", retries=2, retry_delay=10)
def send_campaign(org_id: str, campaign_id: str) -> None:
    """Materialize due recipients for one time slice, handing each batch to delivery."""
    from carepost.campaigns import sending
    from carepost.delivery.tasks import enqueue_delivery

    settings = get_settings()
    started = time.monotonic()
    total = 0
    while True:
        report = sending.materialize(org_id, campaign_id, batch=settings.campaign_send_batch)
        if report.message_ids:
            enqueue_delivery(report.message_ids)
            total += len(report.message_ids)
        if report.stopped or report.completed:
            break
        if not report.more_due and not report.message_ids:  # nothing due now (a batch was: look again, to finish)
            if report.next_due_at is not None:
                delay = max(1, min(MAX_DELAY_SECONDS, int((report.next_due_at - clock.now()).total_seconds()) + 1))
                send_campaign.schedule(args=(org_id, campaign_id), delay=delay)
            break
        if time.monotonic() - started >= settings.campaign_send_slice_seconds:
            send_campaign(org_id, campaign_id)  # the rest after the delivery tasks just queued
            break
    log.info("campaign_send_run", campaign_id=campaign_id, messages_count=total)


def resume_work(org_id: str, campaign_id: str, status: str) -> None:
    """Queue what a campaign in ``status`` needs next (after a resume, or from the sweep)."""
    if status == "planning":
        plan_campaign(org_id, campaign_id)
    elif status == "sending":
        send_campaign(org_id, campaign_id)


def resume_stalled(*, now: bool = False) -> int:
    """Queue every stalled campaign again (see the module docstring); how many. ``now``: every
    campaign planning or sending, whatever its heartbeat (the queue lost its tasks)."""
    from carepost.campaigns import sending

    stale = timedelta(0) if now else timedelta(seconds=get_settings().campaign_stale_seconds)
    with system_session() as session:
        found = sending.stalled(session, stale)
        session.commit()
    for org_id, campaign_id, status in found:
        resume_work(org_id, campaign_id, status)
    if found:
        log.info("campaigns_resumed", campaigns_count=len(found), queue_emptied=now)
    return len(found)


QUEUE_MARK = "carepost.campaigns.queue_mark"


@huey.periodic_task(crontab(minute="*"), name="campaigns.sweep")
def sweep() -> None:
    """Every minute: stalled campaigns again. When the queue's store lost the mark this sweep
    leaves in it (a Redis restarted without persistence, a failover to an empty replica, a
    flushed queue), every campaign planning or sending may have lost its task: all of them are
    queued again at once rather than after ``CAREPOST_CAMPAIGN_STALE_SECONDS`` (running a
    campaign's task twice is safe). The mark is set again once they are queued; the delivery
    sweep keeps a mark of its own (``delivery.tasks.deliver_due``) for the messages."""
    from huey.constants import EmptyData

    try:
        emptied = huey.storage.peek_data(QUEUE_MARK) is EmptyData
    except Exception as exc:  # noqa: BLE001 - the queue is down: nothing can be queued now anyway
        log.warning("campaigns_queue_mark_unreadable", error_type=type(exc).__name__)
        emptied = False
    resume_stalled(now=emptied)
    if emptied:
        try:
            huey.storage.put_data(QUEUE_MARK, b"1")
        except Exception as exc:  # noqa: BLE001 - the next sweep finds it missing and queues again
            log.warning("campaigns_queue_mark_failed", error_type=type(exc).__name__)


def release_winners() -> list[tuple[str, str]]:
    """Choose the winner of every A/B test whose time is up and queue the rest's sending
    (campaigns.ab_tests.release); ``[(campaign_id, winner key)]``."""
    from carepost.campaigns import ab_tests
    from carepost.campaigns.models import Campaign
    from carepost.core.database import org_session

    with system_session() as session:
        waiting = ab_tests.waiting_campaigns(session)
        session.commit()
    out = []
    for org_id, campaign_id in waiting:
        with org_session(org_id) as session:
            campaign = session.get(Campaign, campaign_id)
            key = ab_tests.release(session, campaign) if campaign is not None else None
            session.commit()
        if key:
            log.info("campaign_ab_winner", campaign_id=campaign_id, variant=key)
            send_campaign(org_id, campaign_id)
            out.append((campaign_id, key))
    return out


@huey.periodic_task(crontab(minute="*"), name="campaigns.ab_winners")
def ab_winners() -> None:
    release_winners()


@huey.on_startup()
def resume_on_start() -> None:
    """A worker that starts (after a crash, a restart) resumes stalled campaigns at once instead
    of at the next minute's sweep. Never stops the worker from starting."""
    try:
        resume_stalled()
    except Exception as exc:  # noqa: BLE001 - the database may not be reachable yet: the sweep will do it
        log.warning("campaigns_resume_on_start_failed", error_type=type(exc).__name__)
