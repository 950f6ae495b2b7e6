"""Queue tasks of journeys: the periodic tick and the prompt advance after an event.

* :func:`tick` — every minute: segment and date entries that are due, then every due run of every
  organization, chunk by chunk (``engine.run_tick``), for at most ``TICK_SECONDS`` (what is left
  is taken by the next minute's tick; ticks that overlap are safe: see ``engine``);
* :func:`advance` — queued after a transaction that started or woke runs on an event
  (``entries.advance_after_commit``), so they go on at once instead of at the next minute.

Tasks carry an organization id only. ``carepost journeys tick`` runs :func:`engine.run_tick`
in the foreground.
"""

from __future__ import annotations

from huey import crontab

from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.journeys.tasks")

TICK_SECONDS = 50.0


@huey.periodic_task(crontab(minute="*"), name="journeys.tick")
def tick() -> None:
    from carepost.core.config import get_settings
    from carepost.journeys import engine

    engine.run_tick(max_seconds=TICK_SECONDS, chunk=get_settings().journey_tick_chunk)


@huey.task(name="journeys.advance", retries=2, retry_delay=5)
def advance(org_id: str) -> None:
    from carepost.core.config import get_settings
    from carepost.journeys import engine

    engine.run_tick(org_id, max_seconds=TICK_SECONDS, entries=False, chunk=get_settings().journey_tick_chunk)
