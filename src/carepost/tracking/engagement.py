"""Recording opens and clicks durably and fast (issue 13 items 1, 2, 4, 8).

A ``/t/`` request hands a :class:`Hit` to the process's :class:`Recorder` and waits for it: one
writer thread takes every hit waiting (up to :data:`MAX_BATCH`), reads each token, classifies it
(``classify``), and writes the whole group in **one transaction** — the engagement events (not in
privacy mode), the per-message counters (``EngagementCount``), the analytics rollups
(``tracking.rollups``: opened, opened_unique, opened_human, clicked, clicked_unique,
clicked_human — a recipient's first, and first human, where recipients are known; merged per
group and hour) and the ``message.opened`` / ``message.clicked`` webhooks — then answers each
request. A pixel or redirect is answered only after its event is committed (nothing is dropped
when the process dies), and under load one commit carries many events (group commit), which is
what lets the endpoint keep up with a bare one (bench/tracking.py).

Privacy mode (the organization's ``engagement_privacy`` delivery setting): tokens name no
recipient, no event row is written and no per-recipient webhook is sent; only the counters and
the rollups (totals, human and machine; "unique" figures are not known there).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.database import system_session
from carepost.core.ids import new_id
from carepost.core.logging import get_logger
from carepost.tracking import classify as classifier
from carepost.tracking import engagement_tokens as tokens

log = get_logger("carepost.tracking.engagement")

MAX_BATCH = 500
EVENT_TYPES = {
    "message.opened": "A recipient's copy was opened (the open pixel loaded); data.class is human, proxy (Apple Mail "
                      "Privacy Protection, Gmail/Yahoo image proxy) or scanner, data.rule what decided it.",
    "message.clicked": "A link of a recipient's copy was followed; data.link_index is its position (never the URL), "
                       "data.class human, proxy or scanner.",
}
CACHE_SECONDS = 30.0
TYPES = {"o": "opened", "c": "clicked"}


@dataclass
class Hit:
    kind: str  # o | c
    token: str
    user_agent: str | None
    ip: str | None
    method: str
    at: datetime = field(default_factory=clock.now)


@dataclass(frozen=True)
class Outcome:
    """What the request answers: ``valid`` False -> the plain 404 page; a click's ``url`` (None
    for the trap link, or a message whose links are gone -> 410)."""

    valid: bool
    url: str | None = None
    trap: bool = False
    classification: str | None = None


INVALID = Outcome(False)


class _Ttl:
    """A small time-bounded cache (message facts, privacy mode, recorded URLs)."""

    def __init__(self, limit: int = 20000):
        self._data: OrderedDict = OrderedDict()
        self._limit = limit

    def get(self, key):
        found = self._data.get(key)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def put(self, key, value) -> None:
        self._data[key] = (time.monotonic() + CACHE_SECONDS, value)
        self._data.move_to_end(key)
        while len(self._data) > self._limit:
            self._data.popitem(last=False)


class Recorder:
    """One writer thread per process; requests wait on a Future for their group's commit."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.memory = classifier.RecentActivity()
        self._messages = _Ttl()
        self._privacy = _Ttl()
        self._urls = _Ttl()
        self._links = _Ttl()
        self._human = _Ttl(100_000)  # (message, recipient, type) with a human event committed: see _Group
        self._handing: dict = {}  # event loop -> hits of its current turn, not yet handed to the writer

    def submit(self, hit: Hit) -> Future:
        future: Future = Future()
        self._ensure()
        self._queue.put([(hit, future)])
        return future

    def submit_async(self, hit: Hit) -> asyncio.Future:
        """From a running event loop: an asyncio future, answered with the rest of its group in one
        wake-up of the loop (one ``call_soon_threadsafe`` per group, not one per request). The
        hits of one turn of the loop are handed to the writer together, in one ``put`` (waking
        the writer thread once per turn, not once per request, was ~12% of the server's time)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiting = self._handing.get(loop)
        if waiting is None:
            waiting = self._handing[loop] = []
            loop.call_soon(self._hand_over, loop)
        waiting.append((hit, (loop, future)))
        return future

    def _hand_over(self, loop) -> None:
        waiting = self._handing.pop(loop, None)
        if waiting:
            self._ensure()
            self._queue.put(waiting)

    def _ensure(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="carepost-engagement", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            items = list(self._queue.get())
            while len(items) < MAX_BATCH:
                try:
                    items.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                outcomes = self.write([hit for hit, _f in items])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets an answer
                log.error("engagement_write_failed", error_type=type(exc).__name__, count=len(items))
                _answer([(future, exc) for _hit, future in items], failed=True)
                continue
            _answer([(future, outcome) for (_hit, future), outcome in zip(items, outcomes)])

    def reset(self) -> None:
        """Forget caches and recent activity (tests change settings between cases)."""
        self.memory = classifier.RecentActivity()
        self._messages, self._privacy, self._urls, self._links = _Ttl(), _Ttl(), _Ttl(), _Ttl()
        self._human = _Ttl(100_000)

    # ------------------------------------------------------------------ one group, one transaction

    def write(self, hits: list[Hit]) -> list[Outcome]:
        from carepost.tracking import rollups

        with system_session() as session:
            group = _Group(self._human)
            decoded = [self._decode(session, hit) for hit in hits]
            group.load_seen(session, [(hit.kind, d) for hit, d in zip(hits, decoded) if d is not None])
            outcomes = [self._one(session, hit, d, group) if d is not None else INVALID for hit, d in zip(hits, decoded)]
            for (org_id, at, metric, message_id, source, template_id, purpose, topic_id, created_at, tags), n in \
                    group.rollups.items():
                campaign_id, journey_step_id, sending_domain_id = tags
                rollups.add(session, org_id=org_id, at=at, metric=metric, n=n, message_id=message_id, source=source,
                            campaign_id=campaign_id, journey_step_id=journey_step_id, template_id=template_id,
                            purpose=purpose, topic_id=topic_id, sending_domain_id=sending_domain_id,
                            message_created_at=created_at)
            _write_group(session, group)
            session.commit()
        for key in group.human:
            self._human.put(key, True)
        return outcomes

    def _message(self, session: Session, message_id: str):
        """(org id, created_at, source, template, purpose, topic, (campaign, journey step, sending
        domain)) or None: the dimensions the message's delivery events are counted under."""
        found = self._messages.get(message_id)
        if found is None:
            from carepost.delivery.models import Message

            m = session.get(Message, message_id)
            found = (None,) if m is None else (m.org_id, clock.aware(m.created_at), m.source, m.template_id,
                                                m.purpose, m.topic_id,
                                                (m.campaign_id, m.journey_step_id, m.sending_domain_id))
            self._messages.put(message_id, found)
        return None if found[0] is None else found

    def _privacy_mode(self, session: Session, org_id: str) -> bool:
        found = self._privacy.get(org_id)
        if found is None:
            from carepost.tracking.links import privacy_mode

            found = privacy_mode(session, org_id)
            self._privacy.put(org_id, found)
        return found

    def _link_count(self, session: Session, message_id: str) -> int:
        found = self._links.get(message_id)
        if found is None:
            from carepost.tracking.models import MessageLink

            found = session.scalar(select(func.count()).select_from(MessageLink)
                                   .where(MessageLink.message_id == message_id)) or 0
            self._links.put(message_id, found)
        return found

    def _url(self, session: Session, org_id: str, message_id: str, index: int) -> str | None:
        key = (message_id, index)
        found = self._urls.get(key)
        if found is None:
            from carepost.tracking.links import link_url

            found = (link_url(session, org_id, message_id, index),)
            self._urls.put(key, found)
        return found[0]

    def _decode(self, session: Session, hit: Hit):
        """(token data, message facts, privacy mode) of a hit, or None for anything not valid."""
        try:
            data = tokens.read(session, hit.token, hit.kind)
        except tokens.InvalidToken:
            return None
        message = self._message(session, data.message_id)
        if message is None or message[0] != data.org_id:
            return None  # unknown, purged, or another organization's message
        return data, message, self._privacy_mode(session, data.org_id)

    def _one(self, session: Session, hit: Hit, decoded, group: _Group) -> Outcome:
        data, message, privacy = decoded
        org_id, created_at, source, template_id, purpose, topic_id, tags = message
        url = None
        if hit.kind == "c" and not data.trap:
            url = self._url(session, org_id, data.message_id, data.link_index)
            if url is None:
                return INVALID
        recipient_id = None if privacy else data.recipient_id
        key = (data.message_id, recipient_id or "")
        verdict = classifier.classify(
            hit.kind, user_agent=hit.user_agent, ip=hit.ip, method=hit.method, composed_at=data.composed_at,
            at=hit.at, key=key, memory=self.memory, trap=data.trap, link_index=data.link_index,
            links=self._link_count(session, data.message_id) if hit.kind == "c" else None)
        type_ = TYPES[hit.kind]
        first, first_human = False, False
        if recipient_id is not None:
            first, first_human = group.firsts(data.message_id, recipient_id, type_, verdict.classification)
            group.rows.append({
                "id": new_id(), "org_id": org_id, "message_id": data.message_id, "recipient_id": recipient_id,
                "type": type_, "link_index": None if data.trap else data.link_index,
                "classification": verdict.classification, "rule": verdict.rule,
                "agent_family": (verdict.family or "")[:64] or None, "occurred_at": hit.at})
        key4 = (org_id, data.message_id, type_, verdict.classification)
        group.counts[key4] = group.counts.get(key4, 0) + 1
        # Rollups are merged per group (one add per metric and hour, not per event): see write().
        hour = hit.at.replace(minute=0, second=0, microsecond=0)
        for metric, yes in ((type_, True), (f"{type_}_unique", first), (f"{type_}_human", first_human)):
            if yes:
                rkey = (org_id, hour, metric, data.message_id, source, template_id, purpose, topic_id, created_at,
                        tags)
                group.rollups[rkey] = group.rollups.get(rkey, 0) + 1
        if recipient_id is not None and group.webhooks_wanted(session, org_id, type_):
            _webhook(session, org_id, data.message_id, recipient_id, type_, verdict,
                     None if data.trap else data.link_index)
        return Outcome(True, url=url, trap=data.trap, classification=verdict.classification)


def _answer(pairs: list, failed: bool = False) -> None:
    """Set each waiting request's result (or exception): a concurrent future at once; asyncio
    futures gathered per event loop and set in one callback on that loop."""
    by_loop: dict = {}
    for future, value in pairs:
        if isinstance(future, tuple):
            by_loop.setdefault(future[0], []).append((future[1], value))
        elif failed:
            future.set_exception(value)
        else:
            future.set_result(value)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items, failed)
        except RuntimeError:  # the loop is closed (server stopping): nobody waits any more
            pass


def _settle(items: list, failed: bool) -> None:
    for future, value in items:
        if not future.done():  # a cancelled request (client gone) is left as it is
            if failed:
                future.set_exception(value)
            else:
                future.set_result(value)


class _Group:
    """One group's rows and counters, and which (message, recipient, type, class) were seen before:
    read once per group (one SELECT), then kept up to date as the group's events are added.

    ``known_human`` (the recorder's, kept across groups for a while): (message, recipient, type)
    whose human event is committed. For such a hit both answers are known — not the first, not the
    first human — whatever was recorded since, so its pair is not read again (events are
    append-only: a fact once seen stays true). Repeated opens of the same copy skip the SELECT."""

    def __init__(self, known_human: _Ttl | None = None):
        self.rows: list[dict] = []
        self.counts: dict[tuple, int] = {}
        self.rollups: dict[tuple, int] = {}
        self.seen: set[tuple] = set()
        self.known_human = known_human
        self.human: set[tuple] = set()  # (message, recipient, type) with a human event: seen or written
        self.subscribed: dict[str, tuple] = {}  # org id -> event types of its enabled webhook endpoints

    def webhooks_wanted(self, session: Session, org_id: str, type_: str) -> bool:
        """Does an enabled endpoint of the organization take ``message.<type>``? Read once per
        group and organization (one cached Core SELECT); only then is the webhook built."""
        types = self.subscribed.get(org_id)
        if types is None:
            types = self.subscribed[org_id] = tuple(
                name for (names,) in session.connection().execute(_statements()["subscribed"], {"org_id": org_id})
                for name in (names or ()))
        return bool(types) and ("*" in types or f"message.{type_}" in types)

    def load_seen(self, session: Session, decoded: list) -> None:
        """``decoded``: (kind, (token data, message facts, privacy)) of the group's valid hits."""
        from carepost.tracking.models import EngagementEvent as E

        known = self.known_human
        pairs = set()
        for kind, (d, _m, privacy) in decoded:
            if not d.recipient_id or privacy:
                continue
            if known is not None and known.get((d.message_id, d.recipient_id, TYPES[kind])):
                self.seen.add((d.message_id, d.recipient_id, TYPES[kind], "human"))
                continue
            pairs.add((d.message_id, d.recipient_id))
        if not pairs:
            return
        messages = sorted({m for m, _r in pairs})
        recipients = sorted({r for _m, r in pairs})
        for start in range(0, len(recipients), 500):
            for m, r, t, c in session.execute(
                    select(E.message_id, E.recipient_id, E.type, E.classification).distinct()
                    .where(E.message_id.in_(messages), E.recipient_id.in_(recipients[start:start + 500]))):
                if (m, r) in pairs:
                    self.seen.add((m, r, t, c))

    def firsts(self, message_id: str, recipient_id: str, type_: str, classification: str) -> tuple[bool, bool]:
        """Is this the recipient's first event of this type, and the first human one?"""
        any_before = any((message_id, recipient_id, type_, c) in self.seen for c in ("human", "proxy", "scanner"))
        human_before = (message_id, recipient_id, type_, "human") in self.seen
        self.seen.add((message_id, recipient_id, type_, classification))
        if human_before or classification == "human":
            self.human.add((message_id, recipient_id, type_))
        return not any_before, classification == "human" and not human_before


_STATEMENTS: dict = {}


def _statements() -> dict:
    """The writer's Core statement, built once (compiled once per dialect and cached): the webhook
    subscriptions of an organization."""
    if "subscribed" not in _STATEMENTS:
        from carepost.tracking.models import WebhookEndpoint

        w = WebhookEndpoint.__table__
        _STATEMENTS["subscribed"] = select(w.c.event_types).where(w.c.org_id == bindparam("org_id"),
                                                                  w.c.enabled.is_(True))
    return _STATEMENTS


_EVENT_COLUMNS = ("id", "org_id", "message_id", "recipient_id", "type", "link_index", "classification", "rule",
                  "agent_family", "occurred_at")


def _sql(dialect: str) -> tuple[str, str]:
    """The group's two writes as SQL text for the driver's ``executemany`` (built once per
    dialect): the events' INSERT, and the counters' upsert — ``+n`` on the (message, type, class)
    counter, the first of its kind inserted (race-free: its unique key)."""
    found = _STATEMENTS.get(("sql", dialect))
    if found is None:
        from carepost.tracking.models import EngagementCount, EngagementEvent

        mark = "%s" if dialect == "postgresql" else "?"
        events = (f"INSERT INTO {EngagementEvent.__tablename__} ({', '.join(_EVENT_COLUMNS)}) "
                  f"VALUES ({', '.join([mark] * len(_EVENT_COLUMNS))})")
        table = EngagementCount.__tablename__
        counts = (f"INSERT INTO {table} (id, org_id, message_id, type, classification, count, updated_at) "
                  f"VALUES ({', '.join([mark] * 7)}) ON CONFLICT (message_id, type, classification) "
                  f"DO UPDATE SET count = {table}.count + excluded.count, updated_at = excluded.updated_at")
        found = _STATEMENTS[("sql", dialect)] = (events, counts)
    return found


def _write_group(session: Session, group: _Group) -> None:
    """The group's events, counters and rollups, in the session's transaction, through the
    driver's ``executemany`` (SQLAlchemy's per-row parameter processing was a large part of the
    writer's time). On PostgreSQL the three are sent in one pipeline: one round trip instead of
    one per statement (the rates there were bound by round trips, not CPU)."""
    from carepost.tracking import rollups

    connection = session.connection()
    dialect = connection.dialect.name
    now = clock.now()
    if dialect == "sqlite":
        stamp = rollups.sqlite_datetime
        events = [(*(r[c] for c in _EVENT_COLUMNS[:-1]), stamp(r["occurred_at"])) for r in group.rows]
        now = stamp(now)
    else:
        events = [tuple(r[c] for c in _EVENT_COLUMNS) for r in group.rows]
    counts = [(new_id(), org_id, message_id, type_, classification, n, now)
              for (org_id, message_id, type_, classification), n in sorted(group.counts.items())]
    events_sql, counts_sql = _sql(dialect)
    driver = connection.connection.driver_connection
    cursor = driver.cursor()
    try:
        if dialect == "postgresql":
            with driver.pipeline():
                _send(cursor, events_sql, events, counts_sql, counts)
                rollups.flush_pending(session)
        else:
            _send(cursor, events_sql, events, counts_sql, counts)
    finally:
        cursor.close()


def _send(cursor, events_sql: str, events: list, counts_sql: str, counts: list) -> None:
    if events:
        cursor.executemany(events_sql, events)
    if counts:
        cursor.executemany(counts_sql, counts)  # sorted: two writers take counter rows in the same order


def _webhook(session: Session, org_id: str, message_id: str, recipient_id: str, type_: str, verdict,
             link_index: int | None) -> None:
    """``message.opened`` / ``message.clicked``: ids, the class and the link's position — never the
    URL (it may be private)."""
    from carepost.tracking.service import emit

    data = {"message_id": message_id, "recipient_id": recipient_id, "class": verdict.classification,
            "rule": verdict.rule}
    if type_ == "clicked":
        data["link_index"] = link_index
    emit(session, org_id, f"message.{type_}", data)


_RECORDER = Recorder()


def recorder() -> Recorder:
    return _RECORDER


# --------------------------------------------------------------------------- the message page


def message_engagement(session: Session, message_id: str) -> dict:
    """For the message page: totals per type and class; per recipient (unless privacy mode) the
    opens and clicks with their class and the clicked links' positions."""
    from carepost.tracking.models import EngagementCount, EngagementEvent

    totals: dict[str, dict[str, int]] = {"opened": {}, "clicked": {}}
    for row in session.scalars(select(EngagementCount).where(EngagementCount.message_id == message_id)):
        totals.setdefault(row.type, {})[row.classification] = row.count
    per_recipient: dict[str, dict] = {}
    for e in session.scalars(select(EngagementEvent).where(EngagementEvent.message_id == message_id)
                             .order_by(EngagementEvent.occurred_at, EngagementEvent.id)):
        entry = per_recipient.setdefault(e.recipient_id, {"opened": [], "clicked": []})
        entry[e.type].append({"at": clock.aware(e.occurred_at), "class": e.classification, "rule": e.rule,
                              "link_index": e.link_index, "family": e.agent_family})
    return {"totals": totals, "recipients": per_recipient}
