"""Queue tasks of segments.

* ``record_daily_counts`` (daily) counts every saved segment of every organization and keeps the
  day's figure (membership counts over time); ``carepost segment daily-counts`` does the same
  for one organization by hand. Counts only: no member list, no PHI in the log.
"""

from __future__ import annotations

from huey import crontab
from sqlalchemy import select

from carepost.core.database import org_session, system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.segments.tasks")


def count_all_organizations() -> int:
    from carepost.segments import service
    from carepost.segments.models import Segment

    with system_session() as session:
        org_ids = list(session.scalars(select(Segment.org_id).distinct()))
    done = 0
    for org_id in org_ids:
        with org_session(org_id) as session:
            done += service.record_daily_counts(session, org_id)
            session.commit()
    return done


@huey.periodic_task(crontab(minute="23", hour="3"), name="segments.record_daily_counts")
def record_daily_counts() -> int:
    done = count_all_organizations()
    log.info("segment_daily_counts_recorded", segment_count=done)
    return done
