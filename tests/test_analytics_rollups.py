"""Analytics rollups (issue 13 item 5): increments merge per key, commit with the transaction,
vanish with a rollback, and stay exact when two threads count the same key at once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from sqlalchemy import func, select

from carepost.core.database import org_session, read_only_session
from carepost.tracking import rollups
from carepost.tracking.rollups import AnalyticsRollup

AT = datetime(2026, 12, 3, 14, 25, tzinfo=UTC)


def _total(org_id: str, metric: str, grain: str = "d", **dims) -> int:
    with read_only_session(org_id) as s:
        q = select(func.coalesce(func.sum(AnalyticsRollup.n), 0)).where(AnalyticsRollup.grain == grain,
                                                                      AnalyticsRollup.metric == metric)
        for key, value in dims.items():
            q = q.where(getattr(AnalyticsRollup, key) == value)
        return int(s.scalar(q))


def test_increments_merge_and_commit_with_the_transaction(org):
    with org_session(org.id) as s:
        for _ in range(5):
            rollups.add(s, org_id=org.id, at=AT, metric="delivered", source="api", receiving_domain="Gmail.com")
        rollups.add(s, org_id=org.id, at=AT, metric="delivered", source="api", receiving_domain="smallclinic.example")
        rollups.add(s, org_id=org.id, at=AT, metric="excluded:unsubscribed_all", source="api", message_id="m1")
        assert rollups.pending(s) == 3 + 1  # hour and message keys (the day grain is derived when folded)
        s.commit()
    assert _total(org.id, "delivered") == 6
    assert _total(org.id, "delivered", "h", period=AT.replace(minute=0)) == 6
    assert _total(org.id, "delivered", receiving_domain="gmail.com") == 5
    # A small clinic's domain could identify a patient: kept only as "other".
    assert _total(org.id, "delivered", receiving_domain="other") == 1
    assert _total(org.id, "excluded:unsubscribed_all", "m", message_id="m1") == 1
    with org_session(org.id) as s:
        rollups.add(s, org_id=org.id, at=AT, metric="delivered", source="api", receiving_domain="gmail.com")
        s.rollback()
    assert _total(org.id, "delivered") == 6


def test_unknown_metric_is_refused(org):
    import pytest

    with org_session(org.id) as s:
        for bad in ("openned", "secured", "excluded:", "secured:tls 1.3", "x" * 80):
            with pytest.raises(ValueError):
                rollups.add(s, org_id=org.id, at=AT, metric=bad)
        assert rollups.pending(s) == 0


def test_two_threads_count_the_same_key_exactly(org):
    rounds, per_commit = 20, 7
    errors: list[BaseException] = []

    def worker():
        try:
            for _ in range(rounds):
                with org_session(org.id) as s:
                    for _ in range(per_commit):
                        rollups.add(s, org_id=org.id, at=AT, metric="sent", source="campaign", campaign_id="c1")
                    s.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _total(org.id, "sent", campaign_id="c1") == 2 * rounds * per_commit
    with read_only_session(org.id) as s:
        rows = s.scalar(select(func.count()).select_from(AnalyticsRollup).where(AnalyticsRollup.grain == "d"))
    assert rows == 1


def test_small_cells_are_suppressed_and_not_derivable():
    from carepost.tracking import analytics
    from carepost.tracking.analytics_api import _rates

    shown = analytics.suppress_counts({"accepted": 500, "excluded:deceased": 3, "excluded:unsubscribed_all": 40,
                                       "excluded:no_authorization": 90, "delivered": 0})
    assert shown["accepted"] == 500 and shown["delivered"] == 0
    assert shown["excluded:deceased"] == "<11"
    # One hidden cell in the family: the smallest shown one is hidden too (no recovery by subtraction).
    assert shown["excluded:unsubscribed_all"] == "suppressed" and shown["excluded:no_authorization"] == 90
    column = analytics.suppress_column({"api": 7, "campaign": 770, "journey": 1200, "ui": 0}, "accepted")
    assert column == {"api": "<11", "campaign": "suppressed", "journey": 1200, "ui": 0}
    assert analytics.suppress_column({"a": 4, "b": 5, "c": 300}, "accepted") == {"a": "<11", "b": "<11", "c": 300}
    assert analytics.suppress_list([0, 3, 50, 12], "delivered") == [0, "<11", 50, "suppressed"]
    # A rate whose numerator is a small cell would give it away (rate × sent): left out when masked.
    rates = _rates({"sent": 500, "delivered": 490, "bounced_hard": 2, "complained": 0}, masked=True)
    assert rates["bounce_rate"] is None and rates["delivery_rate"] == 0.98 and rates["complaint_rate"] == 0.0
    assert _rates({"sent": 500, "delivered": 490, "bounced_hard": 2})["bounce_rate"] == 0.004
