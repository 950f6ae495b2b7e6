"""A message's opens and clicks as ``GET /api/v1/messages/{id}`` shows them (issue 13 item 6).

Filled into ``delivery.messages.engagement_summary`` by the composition root. Read set-wise: one
grouped query over ``engagement_counts`` (totals, kept in privacy mode too) and one over
``engagement_events`` (per recipient: counts by class, first and last times; the first human
event). No URL, no user agent, no address — counts, classes and times only.

The totals use the analytics metric names and meanings (``GET /api/v1/analytics/metrics``):
``opened``/``clicked`` every event, ``opened_unique``/``clicked_unique`` recipients with at least
one, ``opened_human``/``clicked_human`` recipients with at least one classified human;
``opened_machine``/``clicked_machine`` the events from privacy proxies and security scanners. In
privacy mode (no per-recipient rows) the unique figures are not known: null, and recipients
carry no engagement (only rows kept before the mode was switched on).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carepost.core import clock

TYPES = ("opened", "clicked")
MACHINE = ("proxy", "scanner")


def _empty_kind() -> dict:
    return {"human": 0, "machine": 0, "first_at": None, "last_at": None, "first_human_at": None}


def summary(session: Session, org_id: str, message_id: str) -> dict:
    """``{"privacy_mode", "totals", "recipients": {recipient_id: {"opened": {...}, "clicked": {...}}}}``."""
    from carepost.tracking.links import privacy_mode
    from carepost.tracking.models import EngagementCount as C
    from carepost.tracking.models import EngagementEvent as E

    totals: dict[str, int | None] = {}
    for t in TYPES:
        totals.update({t: 0, f"{t}_machine": 0})
    for type_, cls, n in session.execute(
            select(C.type, C.classification, C.count).where(C.org_id == org_id, C.message_id == message_id)):
        if type_ in TYPES:
            totals[type_] += n
            if cls in MACHINE:
                totals[f"{type_}_machine"] += n
    recipients: dict[str, dict] = {}
    rows = session.execute(
        select(E.recipient_id, E.type, E.classification, func.count(), func.min(E.occurred_at), func.max(E.occurred_at))
        .where(E.org_id == org_id, E.message_id == message_id)
        .group_by(E.recipient_id, E.type, E.classification)).all()
    for recipient_id, type_, cls, n, first, last in rows:
        if type_ not in TYPES:
            continue
        entry = recipients.setdefault(recipient_id, {t: _empty_kind() for t in TYPES})[type_]
        first, last = clock.aware(first), clock.aware(last)
        entry["human" if cls == "human" else "machine"] += n
        entry["first_at"] = first if entry["first_at"] is None else min(entry["first_at"], first)
        entry["last_at"] = last if entry["last_at"] is None else max(entry["last_at"], last)
        if cls == "human":
            entry["first_human_at"] = first
    private = privacy_mode(session, org_id)
    for t in TYPES:
        if private:
            totals[f"{t}_unique"] = totals[f"{t}_human"] = None
        else:
            totals[f"{t}_unique"] = sum(1 for r in recipients.values() if r[t]["human"] or r[t]["machine"])
            totals[f"{t}_human"] = sum(1 for r in recipients.values() if r[t]["human"])
    return {"privacy_mode": private, "totals": totals, "recipients": recipients}
