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
from datetime import UTC, datetime

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
INGEST_BATCH = 5000  # journal records per database transaction
INGEST_SECONDS = 0.5  # the ingester looks at the journal at least this often
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
        self._lock = threading.Lock()  # the writer and the ingester thread share the caches

    def get(self, key):
        found = self._data.get(key)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + CACHE_SECONDS, value)
            self._data.move_to_end(key)
            while len(self._data) > self._limit:
                self._data.popitem(last=False)


class Recorder:
    """One writer thread per process (requests wait on a Future for their group's journal sync),
    one ingester moving the journal into the database: a child process under ``carepost serve``
    (``tracking.journal_ingester``, out of this process's GIL), a thread otherwise (in-process apps)."""

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
        self._later: list = []  # hits handed over while the writer was busy (see _run)
        self._later_lock = threading.Lock()
        self._busy = False
        self._journal = None  # engagement_journal.Journal of this process, opened on first use
        self._ingester: threading.Thread | None = None
        self._child = None  # journal_ingester.IngesterProcess, when serve asked for one (instead of the thread)
        self._progress = threading.Condition()  # journal.ingested moved

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
            with self._later_lock:
                # The writer takes these when its group is answered: no wake-up (unless it died).
                if self._busy and self._thread is not None and self._thread.is_alive():
                    self._later.extend(waiting)
                    return
                self._busy = False
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
        """The writer. While it works, event loops leave their hits in ``_later`` instead of
        waking it through the queue (a thread wake-up per turn of the loop was ~8% of the
        server's time in the profile); it takes them when its group is answered, and waits on the
        queue only when nothing is left."""
        items: list = []
        with self._later_lock:  # what a writer that died left behind
            items, self._later = self._later[:MAX_BATCH], self._later[MAX_BATCH:]
        while True:
            if not items:
                items = list(self._queue.get())
            with self._later_lock:
                self._busy = True
            while len(items) < MAX_BATCH:
                try:
                    items.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._later_lock:
                room = MAX_BATCH - len(items)
                if room > 0 and self._later:
                    items.extend(self._later[:room])
                    del self._later[:room]
            try:
                outcomes = self.journal([hit for hit, _f in items])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets an answer
                log.error("engagement_write_failed", error_type=type(exc).__name__, count=len(items))
                _answer([(future, exc) for _hit, future in items], failed=True)
            else:
                _answer([(future, outcome) for (_hit, future), outcome in zip(items, outcomes)])
            with self._later_lock:
                items = self._later[:MAX_BATCH]
                del self._later[:MAX_BATCH]
                if not items:
                    self._busy = False

    def reset(self) -> None:
        """Forget caches and recent activity (tests change settings between cases); the journal
        is drained into the database and let go (the next request opens the data dir's)."""
        self.stop()
        self.memory = classifier.RecentActivity()
        self._messages, self._privacy, self._urls, self._links = _Ttl(), _Ttl(), _Ttl(), _Ttl()
        self._human = _Ttl(100_000)

    # ------------------------------------------------------------------ the journal and its ingester

    def start(self) -> None:
        """Open this process's journal and start its ingester (``serve`` at start-up, so what a
        killed process left in a journal reaches the database without waiting for traffic)."""
        from carepost.core.config import get_settings
        from carepost.tracking import engagement_journal, journal_ingester

        with self._lock:
            if self._journal is not None:
                return
            journal = engagement_journal.claim(engagement_journal.root_of(get_settings().data_dir), _journal_keys)
            self._journal = journal
            if journal_ingester.wanted():  # serve: the ingester out of this process's GIL
                self._child = journal_ingester.IngesterProcess(journal, lambda p: self._done(journal, p))
                return
            self._ingester = threading.Thread(target=self._ingest_loop, args=(journal,),
                                              name="carepost-engagement-ingest", daemon=True)
            self._ingester.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let go of the journal: what it holds is ingested first (up to ``timeout``; what is not
        stays in it for the next process). A request after this opens a journal again."""
        with self._lock:
            journal, ingester, child = self._journal, self._ingester, self._child
            self._journal = self._ingester = self._child = None
        if journal is None:
            return
        drained = self._drain(journal, timeout, child)
        if not drained:
            log.warning("engagement_journal_not_drained")
        journal.stopping = True
        journal.wake.set()
        stopped = True
        if child is not None:
            stopped = child.stop(timeout)
        if ingester is not None:
            ingester.join(timeout)
            stopped = not ingester.is_alive()
        try:
            if drained and stopped:
                journal.retire()
        finally:
            journal.close()

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until everything journaled before this call is in the database (tests, shutdown)."""
        journal, child = self._journal, self._child
        if journal is not None and not self._drain(journal, timeout, child):
            raise TimeoutError("engagement journal not ingested in time")

    def _drain(self, journal, timeout: float, child=None) -> bool:
        target = journal.durable
        deadline = time.monotonic() + timeout
        with self._progress:
            while journal.ingested is None or journal.ingested < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if child is not None:
                    child.wake()  # the ingester process: look now
                else:
                    journal.wake.set()
                self._progress.wait(min(left, 0.2))
        return True

    def journal(self, hits: list[Hit]) -> list[Outcome]:
        """A group of hits read, classified and appended to the journal (synced) — the request
        path. Cache misses (message facts, recorded URLs) read the database."""
        journal = self._journal
        if journal is None:
            self.start()
            journal = self._journal
        with system_session() as session:
            outcomes, records = self.capture(session, hits)
        if records:
            journal.append(records)  # the ingester looks every INGEST_SECONDS: batches, not a transaction per group
        return outcomes

    def _ingest_loop(self, journal) -> None:
        from carepost.tracking import engagement_journal

        held = {str(journal.directory)}
        next_orphan_look = 0.0
        while not journal.stopping:
            try:
                if time.monotonic() >= next_orphan_look:  # slots of processes that died: drained here
                    next_orphan_look = time.monotonic() + 60
                    for orphan in engagement_journal.orphans(journal.directory.parent, _journal_keys, held):
                        try:
                            while self.ingest_from(orphan):
                                pass
                            orphan.retire()
                        finally:
                            orphan.close()
                while self.ingest_from(journal, own=True):
                    if journal.stopping:
                        return
            except Exception as exc:  # noqa: BLE001 - kept in the journal; tried again shortly
                log.error("engagement_ingest_failed", error_type=type(exc).__name__)
                time.sleep(1.0)
            journal.wake.wait(INGEST_SECONDS)  # set by drain() and stop(), not by each append
            journal.wake.clear()

    def ingest_from(self, journal, own: bool = False) -> int:
        """One batch (up to :data:`INGEST_BATCH` records) from the journal's mark into the database,
        the mark moved in the same transaction. Returns how many records were ingested."""
        from carepost.core.database import read_only_session
        from carepost.tracking import engagement_journal

        # The journal is read before any transaction, and the database's write lock is taken only
        # when there is something to ingest. An idle ingester that took SQLite's write lock every
        # INGEST_SECONDS made other connections' reads that turn into writes (begin_read, then an
        # audit event) fail at once with "database is locked" (33 tests of one whole run).
        mark = journal.mark
        if mark is None:  # read once: this process is the journal's only ingester (flock)
            with read_only_session() as session:
                found = session.connection().execute(_statements()["mark"], {"journal_id": journal.id}).first()
            mark = journal.mark = engagement_journal.Position(*found) if found else False
        start = mark or journal.first()
        records, end = journal.read(start, INGEST_BATCH)
        if end == start:
            if own:
                self._done(journal, end)
            return 0
        with system_session() as session:
            connection = session.connection()
            human = self.ingest(session, records)
            if mark:
                connection.execute(_statements()["mark_update"], {
                    "mark_journal": journal.id, "mark_segment": end.segment, "mark_position": end.offset,
                    "mark_at": clock.now()})
            else:
                connection.execute(_statements()["mark_insert"], {
                    "journal_id": journal.id, "segment": end.segment, "position": end.offset,
                    "updated_at": clock.now()})
            session.commit()
        journal.mark = end
        self.remember_human(human)
        journal.forget_before(end)
        if own:
            self._done(journal, end)
        return max(1, len(records))

    def _done(self, journal, position) -> None:
        with self._progress:
            journal.ingested = position
            self._progress.notify_all()

    # ------------------------------------------------------------------ one group, one transaction

    def write(self, hits: list[Hit]) -> list[Outcome]:
        """Read, classify and record a group straight into the database in one transaction
        (without the journal: tools and tests that want the rows at once)."""
        with system_session() as session:
            outcomes, records = self.capture(session, hits)
            human = self.ingest(session, records)
            session.commit()
        self.remember_human(human)
        return outcomes

    def capture(self, session: Session, hits: list[Hit]) -> tuple[list[Outcome], list[list]]:
        """Each hit's answer, and the journal records of the valid ones (see :func:`_record`)."""
        outcomes, records = [], []
        for hit in hits:
            decoded = self._decode(session, hit)
            if decoded is None:
                outcomes.append(INVALID)
                continue
            outcome, record = self._one(session, hit, decoded)
            outcomes.append(outcome)
            if record is not None:
                records.append(record)
        return outcomes, records

    def ingest(self, session: Session, records: list[list]) -> set:
        """Journal records into the database, in the session's transaction (not committed here):
        the events (not in privacy mode), counters, rollups merged per hour, webhooks."""
        from carepost.tracking import rollups

        group = _Group(self._human)
        found = []
        for record in records:
            message = self._message(session, record[3])
            if message is None or message[0] != record[2]:
                continue  # purged since it was journaled
            found.append((record, message))
        group.load_seen(session, [(r[1], r[3], r[4]) for r, _m in found])
        for record, message in found:
            self._ingest_one(session, record, message, group)
        for (org_id, at, metric, message_id, source, template_id, purpose, topic_id, created_at, tags), n in \
                group.rollups.items():
            campaign_id, journey_step_id, sending_domain_id = tags
            rollups.add(session, org_id=org_id, at=at, metric=metric, n=n, message_id=message_id, source=source,
                        campaign_id=campaign_id, journey_step_id=journey_step_id, template_id=template_id,
                        purpose=purpose, topic_id=topic_id, sending_domain_id=sending_domain_id,
                        message_created_at=created_at)
        _write_group(session, group)
        return group.human

    def remember_human(self, keys: set) -> None:
        """After the commit: (message, recipient, type) whose human event is now in the database."""
        for key in keys:
            self._human.put(key, True)

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

    def _one(self, session: Session, hit: Hit, decoded) -> tuple[Outcome, list | None]:
        """The answer to one valid hit and its journal record: ``[event id, kind, org, message,
        recipient (None in privacy mode), link index, trap, class, rule, agent family, time (µs)]``."""
        data, _message, privacy = decoded
        url = None
        if hit.kind == "c" and not data.trap:
            url = self._url(session, data.org_id, data.message_id, data.link_index)
            if url is None:
                return INVALID, None
        recipient_id = None if privacy else data.recipient_id
        key = (data.message_id, recipient_id or "")
        verdict = classifier.classify(
            hit.kind, user_agent=hit.user_agent, ip=hit.ip, method=hit.method, composed_at=data.composed_at,
            at=hit.at, key=key, memory=self.memory, trap=data.trap, link_index=data.link_index,
            links=self._link_count(session, data.message_id) if hit.kind == "c" else None)
        record = [new_id(), hit.kind, data.org_id, data.message_id, recipient_id, data.link_index, int(data.trap),
                  verdict.classification, verdict.rule, (verdict.family or "")[:64] or None,
                  int(hit.at.timestamp() * 1_000_000)]
        return Outcome(True, url=url, trap=data.trap, classification=verdict.classification), record

    def _ingest_one(self, session: Session, record: list, message, group: _Group) -> None:
        event_id, kind, org_id, message_id, recipient_id, link_index, trap, classification, rule, family, at_us = record
        _org, created_at, source, template_id, purpose, topic_id, tags = message
        at = datetime.fromtimestamp(at_us / 1_000_000, tz=UTC)
        type_ = TYPES[kind]
        first, first_human = False, False
        if recipient_id is not None:
            first, first_human = group.firsts(message_id, recipient_id, type_, classification)
            group.rows.append({
                "id": event_id, "org_id": org_id, "message_id": message_id, "recipient_id": recipient_id,
                "type": type_, "link_index": None if trap else link_index, "classification": classification,
                "rule": rule, "agent_family": family, "occurred_at": at})
        key4 = (org_id, message_id, type_, classification)
        group.counts[key4] = group.counts.get(key4, 0) + 1
        # Rollups are merged per group (one add per metric and hour, not per event): see ingest().
        hour = at.replace(minute=0, second=0, microsecond=0)
        for metric, yes in ((type_, True), (f"{type_}_unique", first), (f"{type_}_human", first_human)):
            if yes:
                rkey = (org_id, hour, metric, message_id, source, template_id, purpose, topic_id, created_at, tags)
                group.rollups[rkey] = group.rollups.get(rkey, 0) + 1
        if recipient_id is not None and group.webhooks_wanted(session, org_id, type_):
            _webhook(session, org_id, message_id, recipient_id, type_, classification, rule,
                     None if trap else link_index)


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

    def load_seen(self, session: Session, hits: list) -> None:
        """``hits``: (kind, message id, recipient id or None) of the group's events."""
        from carepost.tracking.models import EngagementEvent as E

        known = self.known_human
        pairs = set()
        for kind, message_id, recipient_id in hits:
            if not recipient_id:
                continue
            if known is not None and known.get((message_id, recipient_id, TYPES[kind])):
                self.seen.add((message_id, recipient_id, TYPES[kind], "human"))
                continue
            pairs.add((message_id, recipient_id))
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
        from sqlalchemy import insert, update

        from carepost.tracking.models import EngagementJournalMark, WebhookEndpoint

        w = WebhookEndpoint.__table__
        _STATEMENTS["subscribed"] = select(w.c.event_types).where(w.c.org_id == bindparam("org_id"),
                                                                  w.c.enabled.is_(True))
        m = EngagementJournalMark.__table__
        _STATEMENTS["mark"] = select(m.c.segment, m.c.position).where(m.c.journal_id == bindparam("journal_id"))
        _STATEMENTS["mark_insert"] = insert(m)
        _STATEMENTS["mark_update"] = update(m).where(m.c.journal_id == bindparam("mark_journal")).values(
            segment=bindparam("mark_segment"), position=bindparam("mark_position"), updated_at=bindparam("mark_at"))
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


def _webhook(session: Session, org_id: str, message_id: str, recipient_id: str, type_: str, classification: str,
             rule: str, link_index: int | None) -> None:
    """``message.opened`` / ``message.clicked``: ids, the class and the link's position — never the
    URL (it may be private)."""
    from carepost.tracking.service import emit

    data = {"message_id": message_id, "recipient_id": recipient_id, "class": classification, "rule": rule}
    if type_ == "clicked":
        data["link_index"] = link_index
    emit(session, org_id, f"message.{type_}", data)


def _journal_keys(version: int | None) -> tuple[int, bytes]:
    """The installation's journal key: the current one (``version`` None) or a given version."""
    from carepost.core.crypto import get_keyring
    from carepost.tracking.engagement_journal import KEY_KIND, KEY_OWNER

    ring = get_keyring()
    with system_session() as session:
        if version is None:
            found = ring.named_key_version(session, KEY_OWNER, KEY_KIND)
            session.commit()  # created on first use
            return found
        return ring._load(session, KEY_OWNER, KEY_KIND, version)


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
