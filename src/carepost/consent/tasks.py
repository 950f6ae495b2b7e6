"""Queue tasks of consent. (The consent checks reach the delivery pipeline through the
composition root, ``carepost.assembly``, not through this module.)

* ``purge_expired_suppressions`` (daily) removes suppressions whose ``expires_at`` passed
  (soft bounces); an expired one already stops applying at once, this only tidies the table.
"""

from __future__ import annotations

from huey import crontab
from sqlalchemy import delete

from carepost.core import clock
from carepost.core.database import system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.consent.tasks")


@huey.periodic_task(crontab(minute="41", hour="4"), name="consent.purge_expired_suppressions")
def purge_expired_suppressions() -> int:
    from carepost.consent.models import Suppression

    with system_session() as session:
        removed = session.execute(delete(Suppression).where(Suppression.expires_at.is_not(None),
                                                            Suppression.expires_at <= clock.now())).rowcount or 0
        session.commit()
    log.info("expired_suppressions_purged", removed_count=removed)
    return removed
