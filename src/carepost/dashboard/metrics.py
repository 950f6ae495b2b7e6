"""Installation-wide gauges computed when Prometheus scrapes a server's ``/metrics``.

What a worker cannot count for itself because it is the state of the whole installation: the
queue's depth, how late webhook deliveries, message deliveries and journey runs are (the age of
the oldest one that is due and not yet done), and the progress of running imports. One scrape
of any ``carepost serve`` answers for the whole installation (the same values from every
server: aggregate with ``max`` in dashboards). Read in one short read-only transaction; values
are counts, ages and import ids, never PHI. When the database or the queue cannot be reached
the matching ``carepost_up`` gauge is 0 and the other values are left out.

This module reads the tables of delivery, tracking, patients and journeys directly: set-based
aggregates across every organization (the dashboard sits above them all).
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from carepost.core import clock
from carepost.core.logging import get_logger

log = get_logger("carepost.dashboard.metrics")


def _age(oldest, now) -> float:
    return max(0.0, (now - clock.aware(oldest)).total_seconds()) if oldest is not None else 0.0


class InstallationCollector:
    """A prometheus-client collector; registered into each exposition, not globally."""

    def collect(self):
        up = GaugeMetricFamily("carepost_up", "Whether this server reaches a backend (1) or not (0)",
                               labels=["component"])
        yield from self._queue(up)
        yield from self._database(up)
        yield up

    def _queue(self, up):
        from carepost.core.queue import huey

        try:
            pending = huey.pending_count()
            scheduled = huey.scheduled_count()
        except Exception as exc:  # noqa: BLE001 - reported as a gauge, the scrape must answer
            log.warning("metrics_queue_unreachable", error_type=type(exc).__name__)
            up.add_metric(["queue"], 0)
            return
        up.add_metric(["queue"], 1)
        depth = GaugeMetricFamily("carepost_queue_depth", "Tasks in the queue", labels=["state"])
        depth.add_metric(["pending"], pending)
        depth.add_metric(["scheduled"], scheduled)
        yield depth

    def _database(self, up):
        from carepost.core.database import read_only_session
        from carepost.delivery.models import MessageRecipient
        from carepost.journeys.models import JourneyRun
        from carepost.patients.models import ImportJob
        from carepost.tracking.models import WebhookDelivery

        now = clock.now()
        naive = now.replace(tzinfo=None)
        try:
            with read_only_session() as session:
                webhook_oldest = session.scalar(select(func.min(WebhookDelivery.next_attempt_at)).where(
                    WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= naive))
                webhooks_due = session.scalar(select(func.count()).select_from(WebhookDelivery).where(
                    WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= naive))
                R = MessageRecipient
                delivery = {  # queued: waiting since its last change; deferred: due since its next attempt
                    "queued": session.execute(select(func.count(), func.min(R.updated_at)).where(
                        R.status == "queued")).one(),
                    "deferred": session.execute(select(func.count(), func.min(R.next_attempt_at)).where(
                        R.status == "deferred", R.next_attempt_at <= naive)).one(),
                }
                journey_oldest, journeys_due = session.execute(
                    select(func.min(JourneyRun.wake_at), func.count()).where(
                        JourneyRun.wake_at.is_not(None), JourneyRun.wake_at <= naive)).one()
                imports = session.execute(select(ImportJob.id, ImportJob.status, ImportJob.processed,
                                                 ImportJob.error_count).where(
                    ImportJob.status.in_(("queued", "running")))).all()
        except Exception as exc:  # noqa: BLE001 - reported as a gauge, the scrape must answer
            log.warning("metrics_database_unreachable", error_type=type(exc).__name__)
            up.add_metric(["database"], 0)
            return
        up.add_metric(["database"], 1)
        g = GaugeMetricFamily("carepost_webhook_lag_seconds", "Age of the oldest webhook delivery that is due")
        g.add_metric([], _age(webhook_oldest, now))
        yield g
        g = GaugeMetricFamily("carepost_webhook_deliveries_due", "Webhook deliveries due and not yet done")
        g.add_metric([], webhooks_due or 0)
        yield g
        lag = GaugeMetricFamily("carepost_delivery_lag_seconds",
                                "Age of the oldest recipient due for a delivery attempt", labels=["status"])
        due = GaugeMetricFamily("carepost_delivery_due", "Recipients due for a delivery attempt", labels=["status"])
        for status, (count, oldest) in delivery.items():
            lag.add_metric([status], _age(oldest, now))
            due.add_metric([status], count or 0)
        yield lag
        yield due
        g = GaugeMetricFamily("carepost_journey_lag_seconds", "Age of the oldest journey run whose wake time passed")
        g.add_metric([], _age(journey_oldest, now))
        yield g
        g = GaugeMetricFamily("carepost_journey_runs_due", "Journey runs whose wake time passed")
        g.add_metric([], journeys_due or 0)
        yield g
        running = GaugeMetricFamily("carepost_imports", "Imports not finished", labels=["status"])
        for status in ("queued", "running"):
            running.add_metric([status], sum(1 for i in imports if i.status == status))
        yield running
        done = GaugeMetricFamily("carepost_import_records_processed", "Records processed by an unfinished import",
                                 labels=["import_id"])
        failed = GaugeMetricFamily("carepost_import_records_failed", "Records an unfinished import could not import",
                                   labels=["import_id"])
        for i in imports:
            done.add_metric([i.id], i.processed or 0)
            failed.add_metric([i.id], i.error_count or 0)
        yield done
        yield failed


COLLECTOR = InstallationCollector()
