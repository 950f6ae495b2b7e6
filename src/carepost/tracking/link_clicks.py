"""Clicks per link of a message or a campaign (issue 13 item 6: "clicks … per link").

A link is named by its position (``link_index``, as the click redirects number them: the HTML's
links in document order, then the text part's), its part (html | text) and its target's **host
only** — never the full URL, whose path or query may be private (the link guard keeps PHI out of
URLs, but a path can still say more than a dashboard should).

The figures come from the append-only engagement events (one row per click; clicks are few
next to deliveries, and the events are read through their message index), in two grouped
queries, never per recipient in Python:

* ``clicked`` — every click; ``clicked_human`` — clicks classified as a person;
* ``clicked_unique`` — recipients who clicked the link; ``clicked_unique_human`` — of them, those
  with a human click.

Organizations in privacy mode keep no per-recipient events, so per-link figures are not known
there (``privacy_mode`` true, counts null). This module reads ``delivery.models.Message`` to find
a campaign's messages: a set-based read (ARCHITECTURE.md section 3).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from sqlalchemy import case, distinct, func, select
from sqlalchemy.orm import Session

from carepost.tracking import analytics

METRICS = ("clicked", "clicked_human", "clicked_unique", "clicked_unique_human")


def _host(url: str | None) -> str | None:
    if not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return (host or "").lower() or None


def link_clicks(session: Session, org_id: str, *, message_id: str | None = None,
                campaign_id: str | None = None) -> dict:
    """``{"privacy_mode", "links": [{"link_index", "part", "host", "clicked", "clicked_human",
    "clicked_unique", "clicked_unique_human"}]}`` for one message or one campaign's messages."""
    from carepost.delivery.models import Message
    from carepost.tracking.links import link_url, privacy_mode
    from carepost.tracking.models import EngagementEvent as E
    from carepost.tracking.models import MessageLink as L

    if (message_id is None) == (campaign_id is None):
        raise ValueError("give one of message_id, campaign_id")
    if message_id is not None:
        messages = select(Message.id).where(Message.org_id == org_id, Message.id == message_id).scalar_subquery()
        in_scope = E.message_id == messages
        sample = message_id
    else:
        ids = select(Message.id).where(Message.org_id == org_id, Message.campaign_id == campaign_id)
        in_scope = E.message_id.in_(ids)
        sample = session.scalar(select(L.message_id).join(Message, Message.id == L.message_id)
                                .where(L.org_id == org_id, Message.org_id == org_id,
                                       Message.campaign_id == campaign_id).order_by(L.message_id).limit(1))
    clicks = (E.org_id == org_id, E.type == "clicked", E.link_index.is_not(None), in_scope)
    links: dict[int, dict] = {}
    where_from: dict[int, str] = {}

    def entry(index: int) -> dict:
        return links.setdefault(index, {"link_index": index, "part": None, "host": None,
                                        **{m: 0 for m in METRICS}})

    for index, cls, n, some_message in session.execute(
            select(E.link_index, E.classification, func.count(), func.min(E.message_id))
            .where(*clicks).group_by(E.link_index, E.classification)):
        row = entry(index)
        row["clicked"] += n
        if cls == "human":
            row["clicked_human"] += n
        where_from.setdefault(index, some_message)
    for index, everyone, people in session.execute(
            select(E.link_index, func.count(distinct(E.recipient_id)),
                   func.count(distinct(case((E.classification == "human", E.recipient_id)))))
            .where(*clicks).group_by(E.link_index)):
        entry(index).update(clicked_unique=int(everyone), clicked_unique_human=int(people or 0))
    if sample is not None:
        for index, part in session.execute(select(L.link_index, L.part).where(L.org_id == org_id,
                                                                              L.message_id == sample)):
            entry(index)["part"] = part
            where_from.setdefault(index, sample)
    for index, row in links.items():
        source = where_from.get(index)
        if source is not None:
            if row["part"] is None:
                row["part"] = session.scalar(select(L.part).where(L.message_id == source, L.link_index == index))
            row["host"] = _host(link_url(session, org_id, source, index))
    private = privacy_mode(session, org_id)
    out = [links[i] for i in sorted(links)]
    if private:
        for row in out:
            row.update({m: None for m in METRICS})
    return {"privacy_mode": private, "links": out}


def shown(rows: list[dict], unmasked: bool) -> list[dict]:
    """Small-cell suppression down each column for viewers without PHI rights (as the analytics
    API does for a breakdown: a link's cell must not be derivable from the message's total)."""
    if unmasked:
        return rows
    out = [dict(r) for r in rows]
    for metric in METRICS:
        column = analytics.suppress_column({i: (r[metric] or 0) for i, r in enumerate(rows)}, "clicked")
        for i, value in column.items():
            if rows[i][metric] is not None:
                out[i][metric] = value
    return out
