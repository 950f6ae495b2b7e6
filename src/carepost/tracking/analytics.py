"""Analytics (issue 13 items 5 and 6): what feeds the rollups, and what reads them.

**Feeding** — handlers of domain events, wired by :mod:`carepost.assembly` (delivery never
imports tracking). Each runs in the transaction of the work it counts:

* ``message.recipient_event`` → :func:`count_message_event`: ``queued`` is *accepted*,
  ``excluded`` is ``excluded:<reason>``, ``sent``/``delivered`` count *sent* (and *delivered*
  for the recipient's own server) with ``secured:<method>`` (``tls1.3``, ``tls1.2``, ``pgp``,
  ``smime``, ``portal``, ``none``), ``deferred``, ``bounced`` as hard or soft, ``failed``,
  ``complained``, ``portal_viewed``. Sandbox messages are not counted.
* ``consent.unsubscribed`` → :func:`count_unsubscribe` (attributed to the message the link came
  from, when there is one).
* conversions: :mod:`carepost.tracking.conversions` calls :func:`count_conversion`.

The dimensions come from the message row (already in the session's identity map on every path
that records an event) and the recipient's domain blind index (reduced to a provider name or
``other`` by :func:`carepost.tracking.rollups.provider_of_index`).

The recount from stored events (``carepost analytics rebuild``) is :mod:`carepost.tracking.rebuild`:
a set-based read of messages, recipients and events (ARCHITECTURE.md section 3 allows it).

**Reading** — :func:`summary`, :func:`series`, :func:`breakdown` sum rollup rows only, never
events. :func:`suppress_small_cells` applies small-cell suppression for viewers without
``phi:read_unmasked``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.tracking import rollups
from carepost.tracking.rollups import AnalyticsRollup

# --------------------------------------------------------------------------- feeding


def _secured(recipient) -> str:
    method = (recipient.method or "none").lower()
    if method == "tls":
        version = ((recipient.evidence or {}).get("tls_version") or "").lower().replace("tlsv", "tls")
        return f"secured:{version}" if version and rollups.valid_metric(f"secured:{version}") else "secured:tls"
    return f"secured:{method}" if rollups.valid_metric(f"secured:{method}") else "secured:other"


def _reason_code(text: str | None) -> str:
    code = (text or "other").split(":", 1)[0].strip().lower()[:40]
    code = "".join(c if c.isalnum() or c in "._-" else "_" for c in code)
    return code or "other"


def metrics_for(event, recipient) -> list[str]:
    """The metrics one recipient event counts."""
    kind = event.type
    details = event.details or {}
    if kind == "queued":
        return ["accepted"]
    if kind == "excluded":
        return [f"excluded:{_reason_code(details.get('reason') or recipient.reason)}"]
    if kind == "delivered":
        return ["sent", "delivered", _secured(recipient)]
    if kind == "sent":
        return ["sent", _secured(recipient)]
    if kind == "bounced":
        return ["bounced_hard" if details.get("bounce_type") == "hard" else "bounced_soft"]
    if kind in ("deferred", "failed", "complained", "portal_viewed"):
        return [kind]
    return []


@dataclass(frozen=True)
class MessageDims:
    source: str | None
    template_id: str | None
    purpose: str | None
    topic_id: str | None
    campaign_id: str | None
    journey_step_id: str | None
    segment_id: str | None
    created_at: datetime | None
    sandbox: bool
    sending_domain_id: str | None = None

    @classmethod
    def of(cls, message) -> MessageDims:
        return cls(message.source, message.template_id, message.purpose, message.topic_id,
                   getattr(message, "campaign_id", None), getattr(message, "journey_step_id", None),
                   getattr(message, "segment_id", None), message.created_at, bool(message.sandbox),
                   message.sending_domain_id)


def _message_dims(session: Session, message_id: str, stored=None) -> MessageDims | None:
    """The message's dimensions: cached per session; from ``stored`` (the message's columns, when
    the publisher has them: ``delivery.messages.store_messages`` stores a campaign batch's messages
    without ORM objects, so a ``session.get`` would be one SELECT per recipient) or read."""
    from carepost.delivery.models import Message

    cache = session.info.setdefault("carepost_analytics_messages", {})
    dims = cache.get(message_id)
    if dims is None:
        message = stored if stored is not None else session.get(Message, message_id)
        if message is None:
            return None
        dims = MessageDims.of(message)
        if len(cache) > 20_000:
            cache.clear()
        cache[message_id] = dims
    return dims


def _add(session: Session, org_id: str, at: datetime, metric: str, dims: MessageDims, message_id: str,
         receiving_domain: str, n: int = 1) -> None:
    rollups.add(session, org_id=org_id, at=at, metric=metric, n=n, message_id=message_id, source=dims.source,
                campaign_id=dims.campaign_id, journey_step_id=dims.journey_step_id, template_id=dims.template_id,
                segment_id=dims.segment_id, receiving_domain=receiving_domain, topic_id=dims.topic_id,
                purpose=dims.purpose, message_created_at=dims.created_at, sending_domain_id=dims.sending_domain_id)


def count_message_event(session: Session, recipient, event) -> int:
    """Handler of ``message.recipient_event``: count what the event means (see the module docstring)."""
    metrics = metrics_for(event, recipient)
    if not metrics:
        return 0
    dims = _message_dims(session, recipient.message_id, getattr(recipient, "stored_message", None))
    if dims is None or dims.sandbox:
        return 0
    at = event.created_at or clock.now()
    domain = rollups.provider_of_index(session, recipient.org_id, recipient.domain_index)
    for metric in metrics:
        _add(session, recipient.org_id, at, metric, dims, recipient.message_id, domain)
    return len(metrics)


def _recipient(session: Session, recipient_id: str | None):
    from carepost.delivery.models import MessageRecipient

    return session.get(MessageRecipient, recipient_id) if recipient_id else None


def count_unsubscribe(session: Session, org_id: str, data: dict) -> int:
    """Handler of ``consent.unsubscribed``: one *unsubscribed*, with the dimensions of the message
    the opt-out came from (a link, a reply) or none (staff, the API, a form)."""
    at = clock.now()
    recipient = _recipient(session, data.get("recipient_id"))
    message_id = data.get("message_id") or (recipient.message_id if recipient is not None else None)
    dims = _message_dims(session, message_id) if message_id else None
    if dims is None:
        rollups.add(session, org_id=org_id, at=at, metric="unsubscribed", topic_id=data.get("topic_id"))
        return 1
    if dims.sandbox:
        return 0
    domain = rollups.provider_of_index(session, org_id, recipient.domain_index) if recipient is not None \
        and recipient.org_id == org_id else ""
    _add(session, org_id, at, "unsubscribed", dims, message_id, domain)
    return 1


def count_conversion(session: Session, org_id: str, at: datetime, message_id: str, recipient_id: str | None) -> None:
    """One *converted* for the message a goal attributed an event to."""
    dims = _message_dims(session, message_id)
    if dims is None:
        return
    recipient = _recipient(session, recipient_id)
    domain = rollups.provider_of_index(session, org_id, recipient.domain_index) if recipient is not None else ""
    _add(session, org_id, at, "converted", dims, message_id, domain)


# --------------------------------------------------------------------------- backfill
# ``carepost analytics rebuild``: a set-wise recount in the database, :mod:`carepost.tracking.rebuild`.


# --------------------------------------------------------------------------- reading

SOURCES = ("api", "smtp", "ui", "campaign", "journey")
BREAKDOWNS = {
    "source": AnalyticsRollup.source,
    "campaign": AnalyticsRollup.campaign_id,
    "journey_step": AnalyticsRollup.journey_step_id,
    "template": AnalyticsRollup.template_id,
    "segment": AnalyticsRollup.segment_id,
    "receiving_domain": AnalyticsRollup.receiving_domain,
    "topic": AnalyticsRollup.topic_id,
    "purpose": AnalyticsRollup.purpose,
    "sending_domain": AnalyticsRollup.sending_domain_id,
}
MAX_DAYS = 731
MAX_HOURS_DAYS = 31
SMALL_CELL = 11  # counts 1..10 are suppressed
SUPPRESSED = "<11"

# Metrics that count people (a recipient, a contact): subject to small-cell suppression.
PEOPLE_METRICS_PREFIXES = ("accepted", "excluded", "sent", "delivered", "secured", "deferred", "failed",
                           "bounced_hard", "bounced_soft", "complained", "portal_viewed", "opened", "clicked",
                           "unsubscribed", "converted")


@dataclass(frozen=True)
class Filters:
    start: date
    end: date  # inclusive
    source: str | None = None
    purpose: str | None = None
    topic_id: str | None = None
    campaign_id: str | None = None
    journey_step_id: str | None = None
    template_id: str | None = None
    segment_id: str | None = None
    receiving_domain: str | None = None
    sending_domain_id: str | None = None
    message_id: str | None = None

    @property
    def start_at(self) -> datetime:
        return datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC)

    @property
    def end_before(self) -> datetime:
        return datetime(self.end.year, self.end.month, self.end.day, tzinfo=UTC) + timedelta(days=1)


def _where(q, f: Filters, grain: str):
    q = q.where(AnalyticsRollup.grain == grain)
    if grain != "m" or not f.message_id:
        q = q.where(AnalyticsRollup.period >= f.start_at, AnalyticsRollup.period < f.end_before)
    for name, column in (("source", AnalyticsRollup.source), ("purpose", AnalyticsRollup.purpose),
                         ("topic_id", AnalyticsRollup.topic_id), ("campaign_id", AnalyticsRollup.campaign_id),
                         ("journey_step_id", AnalyticsRollup.journey_step_id),
                         ("template_id", AnalyticsRollup.template_id), ("segment_id", AnalyticsRollup.segment_id),
                         ("receiving_domain", AnalyticsRollup.receiving_domain),
                         ("sending_domain_id", AnalyticsRollup.sending_domain_id),
                         ("message_id", AnalyticsRollup.message_id)):
        value = getattr(f, name)
        if value is not None:
            q = q.where(column == value)
    return q


def _grain(f: Filters) -> str:
    return "m" if f.message_id else "d"


def summary(session: Session, org_id: str, f: Filters) -> dict[str, int]:
    """metric -> total over the filters."""
    q = select(AnalyticsRollup.metric, func.sum(AnalyticsRollup.n)).where(AnalyticsRollup.org_id == org_id)
    q = _where(q, f, _grain(f)).group_by(AnalyticsRollup.metric)
    return {metric: int(n) for metric, n in session.execute(q).all() if n}


def breakdown(session: Session, org_id: str, f: Filters, by: str) -> dict[str, dict[str, int]]:
    """value of ``by`` -> metric -> total."""
    column = BREAKDOWNS[by]
    q = select(column, AnalyticsRollup.metric, func.sum(AnalyticsRollup.n)).where(AnalyticsRollup.org_id == org_id)
    q = _where(q, f, "d").group_by(column, AnalyticsRollup.metric)
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for value, metric, n in session.execute(q).all():
        if n:
            out[value or ""][metric] = int(n)
    return dict(out)


def series(session: Session, org_id: str, f: Filters, interval: str, metrics: list[str]) -> tuple[list[datetime], dict[str, list[int]]]:
    """Periods (every hour or day of the range, empty ones included) and per metric its counts."""
    grain = "h" if interval == "hour" else "d"
    q = select(AnalyticsRollup.period, AnalyticsRollup.metric, func.sum(AnalyticsRollup.n)).where(
        AnalyticsRollup.org_id == org_id, AnalyticsRollup.metric.in_(metrics))
    q = _where(q, f, grain).group_by(AnalyticsRollup.period, AnalyticsRollup.metric)
    step = timedelta(hours=1) if grain == "h" else timedelta(days=1)
    periods, t = [], f.start_at
    while t < f.end_before:
        periods.append(t)
        t += step
    index = {p: i for i, p in enumerate(periods)}
    values = {m: [0] * len(periods) for m in metrics}
    for period, metric, n in session.execute(q).all():
        if period.tzinfo is None:
            period = period.replace(tzinfo=UTC)
        i = index.get(period.astimezone(UTC))
        if i is not None:
            values[metric][i] += int(n or 0)
    return periods, values


def is_people_metric(metric: str) -> bool:
    return metric.split(":", 1)[0] in PEOPLE_METRICS_PREFIXES


def suppress(n: int, metric: str = "accepted"):
    """A count as shown to a viewer without PHI rights: 1..10 people become ``"<11"``."""
    if is_people_metric(metric) and 0 < n < SMALL_CELL:
        return SUPPRESSED
    return n


def suppress_counts(counts: dict[str, int]) -> dict:
    """Small-cell suppression of one group of counts (one row of a table, or the totals).

    Besides the small cells themselves, a suppressed cell must not be derivable by subtraction
    from the others of its family (``excluded:<reason>``, ``secured:<method>``, whose sum other
    figures may give away): when exactly one cell of a family is suppressed, the smallest shown
    cell of that family is hidden too (complementary suppression, shown as ``"suppressed"``)."""
    out: dict = {m: suppress(n, m) for m, n in counts.items()}
    for family in ("excluded:", "secured:"):
        cells = sorted((n, m) for m, n in counts.items() if m.startswith(family) and n > 0)
        hidden = [m for n, m in cells if n < SMALL_CELL]
        shown = [(n, m) for n, m in cells if n >= SMALL_CELL]
        if len(hidden) == 1 and shown:
            out[shown[0][1]] = SUPPRESSED_COMPLEMENT
    return out


SUPPRESSED_COMPLEMENT = "suppressed"


def suppress_column(cells: dict, metric: str) -> dict:
    """Small-cell suppression down one column (a metric over the rows of a breakdown, whose total
    is shown): 1..10 become ``"<11"``, and when exactly one cell is suppressed the smallest
    shown non-zero cell is hidden too, so the total minus the others does not give it away."""
    if not is_people_metric(metric):
        return dict(cells)
    out = {k: suppress(n, metric) for k, n in cells.items()}
    hidden = [k for k, n in cells.items() if 0 < n < SMALL_CELL]
    shown = sorted((n, str(k)) for k, n in cells.items() if n >= SMALL_CELL)
    if len(hidden) == 1 and shown:
        smallest = shown[0][1]
        for k in cells:
            if str(k) == smallest:
                out[k] = SUPPRESSED_COMPLEMENT
    return out


def suppress_list(values: list[int], metric: str) -> list:
    """The same for a time series (its sum is the total shown beside it)."""
    column = suppress_column(dict(enumerate(values)), metric)
    return [column[i] for i in range(len(values))]
