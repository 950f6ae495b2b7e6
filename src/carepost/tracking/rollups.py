"""Analytics rollups (issue 13 item 5): counters per organization, period and dimensions, kept
incrementally as things happen, so a dashboard over a million-recipient send reads a few hundred
rows instead of a million events.

One table, :class:`AnalyticsRollup`. A row is a counter ``n`` for one key:

* ``grain`` — ``h`` (the hour starting at ``period``), ``d`` (the UTC day starting at
  ``period``) or ``m`` (one message over its whole life, ``period`` = the day it was created);
* ``metric`` — see :data:`METRICS` (``excluded:<reason>`` and ``secured:<method>`` carry a code);
* the dimensions — ``source`` (api | smtp | ui | campaign | journey | …), ``campaign_id``,
  ``journey_step_id``, ``template_id``, ``segment_id``, ``receiving_domain``, ``topic_id``,
  ``purpose``, ``sending_domain_id`` (the organization's own sending domain the copy went out
  from: deliverability per sending domain) and, for grain ``m`` only, ``message_id``.

Dimensions are stored as ``''`` when absent, never NULL: SQL unique constraints treat NULLs as
distinct, which would let two writers create two rows for the same key. The hour and day grains
carry every dimension except the message, so any filter (purpose, topic, date range) combines
with any breakdown (source, campaign, receiving domain) by summing rows; grain ``m`` is written
only for messages that are not part of a campaign or a journey (one message per recipient there:
their figures are the campaign's and the journey step's).

**Receiving domain.** Only the large mailbox providers of :data:`PROVIDER_DOMAINS` are kept by
name; every other domain is ``other`` — a small clinic's or a family's own domain could identify a
patient. Delivery stores the recipient's domain as a blind index only; :func:`provider_of_index`
maps that index back to a provider name by comparing it with the providers' own indexes under the
organization's keys (cached per organization for a few minutes), without decrypting anything.

**Writing — appended, then folded (issue 13 speed).** :func:`add` does not write at once: it adds
to a buffer kept on the session, which merges increments of the same key (a batch of 500
deliveries of one campaign becomes a few hundred keys). When the session commits
(``before_commit``) the buffer is **appended** to :class:`AnalyticsIncrement`
(``analytics_increments``) inside that same transaction (on PostgreSQL one ``COPY``; see
:func:`flush_pending`) — so the increments commit or roll back with the work they count, and no
hot counter row is locked or updated by the event's transaction. Only the hour and message grains are appended; the day grain
is derived from the hour rows when they are folded.

:func:`fold` moves an organization's appended increments into the rollups set-wise, in chunks of
:data:`FOLD_CHUNK` rows, each chunk one transaction: ``INSERT INTO analytics_rollups SELECT …
GROUP BY key ON CONFLICT (key) DO UPDATE SET n = n + excluded.n`` (hour, day and message grains)
and the **deletion** of exactly the rows folded — deleting is what marks them aggregated, so an
increment is counted exactly once, never rescanned, and a crash anywhere (kill -9 mid-chunk)
rolls back both halves. On PostgreSQL the chunk is one statement (``WITH moved AS (DELETE …
RETURNING …) INSERT … SELECT … FROM moved``: one snapshot, so a writer committing between two
statements cannot slip a row into the deletion that was not folded), under a per-organization
transaction advisory lock (two aggregators never upsert the same keys in different orders; even
without it, a row deleted by one is skipped by the other's ``DELETE``). On SQLite every
transaction holds the single write lock (``BEGIN IMMEDIATE``), so the chunk's statements cannot
interleave with another writer.

Who folds: the worker's periodic task (``tracking.tasks.fold_rollups``, every minute, every
organization: :func:`fold_all`), ``carepost analytics fold`` on demand, the rebuild (first, under
its locks), and **every reader**: a SELECT of :class:`AnalyticsRollup` first folds the reading
organization's pending increments in the reader's own transaction (:func:`_fold_before_read`), so
dashboards show the increments committed before the read. Where the reader cannot write at once
(a SQLite ``BEGIN DEFERRED`` read whose snapshot is older than a commit, or another writer holding
the lock beyond a short wait; a PostgreSQL reader finding another aggregator folding that
organization) it reads what is folded — behind by at most one fold (the periodic task's minute, or
the other aggregator's chunk).

Readers never scan events: :mod:`carepost.tracking.analytics` sums rollup rows.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import Mapped, ORMExecuteState, Session, mapped_column

from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id

# --------------------------------------------------------------------------- vocabulary

METRICS: dict[str, str] = {
    "accepted": "A recipient's copy was accepted for delivery (API, SMTP, compose page, campaign, journey).",
    "excluded": "A recipient was not sent the message; excluded:<reason> names the reason code.",
    "sent": "A copy was handed to the next server (the recipient's, a relay, or a portal notification).",
    "delivered": "The recipient's own server accepted the copy.",
    "secured": "How a sent copy was protected; secured:<method> (tls1.3, tls1.2, pgp, smime, portal, none).",
    "deferred": "A delivery attempt failed for now (retried) or a remote server reported a delay.",
    "failed": "Delivery failed for good (retries over, or no allowed secure method).",
    "bounced_hard": "A permanent bounce (unknown mailbox, refused for good).",
    "bounced_soft": "A temporary or unclassified bounce.",
    "complained": "A recipient reported the message as spam (feedback report).",
    "portal_viewed": "A recipient opened the message in the secure portal for the first time.",
    "opened": "An open (every one).",
    "opened_unique": "A recipient's first open.",
    "opened_human": "A recipient's first open classified as a person (not a privacy proxy or scanner).",
    "clicked": "A click (every one).",
    "clicked_unique": "A recipient's first click.",
    "clicked_human": "A recipient's first click classified as a person.",
    "unsubscribed": "A recipient opted out of a topic or of all marketing.",
    "converted": "A goal's event attributed to the last message delivered to the contact within its window.",
}
PARAMETRIC = ("excluded", "secured")
MAX_METRIC_CHARS = 64

# Large mailbox providers, kept by name; every other receiving domain is "other". Maintained here:
# add a provider when it hosts a large share of consumer mailboxes (never a clinic's own domain).
PROVIDER_DOMAINS: frozenset[str] = frozenset({
    # Google
    "gmail.com", "googlemail.com",
    # Yahoo / AOL (Yahoo Inc.)
    "yahoo.com", "yahoo.co.uk", "yahoo.fr", "yahoo.de", "yahoo.es", "yahoo.it", "yahoo.ca", "yahoo.com.au",
    "yahoo.co.in", "yahoo.co.jp", "ymail.com", "rocketmail.com", "aol.com", "aim.com",
    # Microsoft
    "outlook.com", "hotmail.com", "hotmail.co.uk", "hotmail.fr", "hotmail.de", "hotmail.it", "hotmail.es",
    "live.com", "live.co.uk", "live.fr", "msn.com", "passport.com",
    # Apple
    "icloud.com", "me.com", "mac.com",
    # US access providers and others with many consumer mailboxes
    "comcast.net", "verizon.net", "att.net", "sbcglobal.net", "bellsouth.net", "charter.net", "cox.net",
    "earthlink.net", "optonline.net", "frontier.com", "windstream.net", "centurylink.net",
    "proton.me", "protonmail.com", "pm.me", "zoho.com", "gmx.com", "gmx.net", "gmx.de", "web.de",
    "mail.com", "yandex.com", "yandex.ru", "mail.ru", "qq.com", "163.com", "126.com", "fastmail.com",
    "hushmail.com", "tutanota.com", "orange.fr", "free.fr", "laposte.net", "t-online.de", "libero.it",
    "btinternet.com", "shaw.ca", "rogers.com", "sympatico.ca", "bigpond.com", "rediffmail.com",
})
OTHER_DOMAIN = "other"


def receiving_domain_of(domain: str | None) -> str:
    """The name analytics keeps for a recipient's domain: the provider's, or ``other``."""
    if not domain:
        return ""
    domain = domain.strip().lower().rstrip(".")
    return domain if domain in PROVIDER_DOMAINS else OTHER_DOMAIN


_provider_cache: dict[str, tuple[float, dict[str, str]]] = {}
_provider_lock = threading.Lock()
_PROVIDER_CACHE_SECONDS = 300


def provider_of_index(session: Session, org_id: str, domain_index: str | None) -> str:
    """The provider name for a recipient's ``domain_index`` (blind index), or ``other``."""
    if not domain_index:
        return ""
    now = time.monotonic()
    with _provider_lock:
        cached = _provider_cache.get(org_id)
    if cached is None or cached[0] < now:
        from carepost.core.crypto import get_keyring

        ring = get_keyring()
        table: dict[str, str] = {}
        for domain in sorted(PROVIDER_DOMAINS):
            for index in ring.blind_indexes(session, org_id, "domain", domain):
                table[index] = domain
        cached = (now + _PROVIDER_CACHE_SECONDS, table)
        with _provider_lock:
            if len(_provider_cache) > 10_000:
                _provider_cache.clear()
            _provider_cache[org_id] = cached
    return cached[1].get(domain_index, OTHER_DOMAIN)


def valid_metric(metric: str) -> bool:
    if not isinstance(metric, str) or not metric or len(metric) > MAX_METRIC_CHARS:
        return False
    base, _, code = metric.partition(":")
    if base not in METRICS:
        return False
    if base in PARAMETRIC:
        return bool(code) and all(c.isalnum() or c in "._-" for c in code)
    return not code


# --------------------------------------------------------------------------- the table

DIMENSIONS = ("source", "campaign_id", "journey_step_id", "template_id", "segment_id", "receiving_domain",
              "topic_id", "purpose", "sending_domain_id", "message_id")


class AnalyticsRollup(OrgScoped, Base):
    """A counter: how many ``metric`` for one organization, period and set of dimensions."""

    __tablename__ = "analytics_rollups"
    __table_args__ = (
        UniqueConstraint("org_id", "grain", "period", "metric", *DIMENSIONS, name="uq_analytics_rollups_key"),
        Index("ix_analytics_rollups_org_grain_period", "org_id", "grain", "period"),
        Index("ix_analytics_rollups_org_campaign", "org_id", "campaign_id", "grain", "period"),
        Index("ix_analytics_rollups_org_message", "org_id", "message_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    grain: Mapped[str] = mapped_column(String(1))  # h | d | m
    period: Mapped[datetime]
    metric: Mapped[str] = mapped_column(String(MAX_METRIC_CHARS))
    source: Mapped[str] = mapped_column(String(16), default="")
    campaign_id: Mapped[str] = mapped_column(String(32), default="")
    journey_step_id: Mapped[str] = mapped_column(String(32), default="")
    template_id: Mapped[str] = mapped_column(String(32), default="")
    segment_id: Mapped[str] = mapped_column(String(32), default="")
    receiving_domain: Mapped[str] = mapped_column(String(64), default="")
    topic_id: Mapped[str] = mapped_column(String(32), default="")
    purpose: Mapped[str] = mapped_column(String(64), default="")
    sending_domain_id: Mapped[str] = mapped_column(String(32), default="", server_default="")
    message_id: Mapped[str] = mapped_column(String(32), default="")
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class AnalyticsIncrement(Base):
    """An appended increment of one rollup key (hour or message grain), not yet folded into
    :class:`AnalyticsRollup` (see the module docstring). Append-only; :func:`fold` deletes the
    rows it folded in the same transaction. ``id`` grows with each append (the fold's order)."""

    __tablename__ = "analytics_increments"
    __table_args__ = (Index("ix_analytics_increments_org_id", "org_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    org_id: Mapped[str] = mapped_column(String(32), ForeignKey("organizations.id", ondelete="CASCADE"))
    grain: Mapped[str] = mapped_column(String(1))  # h | m
    period: Mapped[datetime]
    metric: Mapped[str] = mapped_column(String(MAX_METRIC_CHARS))
    source: Mapped[str] = mapped_column(String(16), default="")
    campaign_id: Mapped[str] = mapped_column(String(32), default="")
    journey_step_id: Mapped[str] = mapped_column(String(32), default="")
    template_id: Mapped[str] = mapped_column(String(32), default="")
    segment_id: Mapped[str] = mapped_column(String(32), default="")
    receiving_domain: Mapped[str] = mapped_column(String(64), default="")
    topic_id: Mapped[str] = mapped_column(String(32), default="")
    purpose: Mapped[str] = mapped_column(String(64), default="")
    sending_domain_id: Mapped[str] = mapped_column(String(32), default="")
    message_id: Mapped[str] = mapped_column(String(32), default="")
    n: Mapped[int] = mapped_column(BigInteger, default=0)


# --------------------------------------------------------------------------- writing

_BUFFER = "carepost_rollup_buffer"


def _hour(at: datetime) -> datetime:
    if at.tzinfo is not UTC:
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.replace(minute=0, second=0, microsecond=0)


_LIMITS = (16, 32, 32, 32, 32, 64, 32, 64, 32)
_valid_metrics: set[str] = set()
_checked_dims: set[tuple] = set()
_KEPT_DOMAINS = PROVIDER_DOMAINS | {OTHER_DOMAIN}


def add(session: Session, *, org_id: str, at: datetime, metric: str, n: int = 1, message_id: str | None = None,
        source: str | None = None, campaign_id: str | None = None, journey_step_id: str | None = None,
        template_id: str | None = None, segment_id: str | None = None, receiving_domain: str | None = None,
        topic_id: str | None = None, purpose: str | None = None, message_created_at: datetime | None = None,
        sending_domain_id: str | None = None) -> None:
    """Count ``n`` of ``metric`` at ``at`` (hour and day grains; the message grain too when a
    ``message_id`` of a message outside any campaign or journey is given). ``receiving_domain``
    may be given clear: it is reduced to a provider name or ``other`` here. Written when the
    session commits (see the module docstring). Runs once per counted event: kept lean."""
    if metric not in _valid_metrics:
        if not valid_metric(metric):
            raise ValueError(f"unknown analytics metric {metric!r}")
        _valid_metrics.add(metric)
    if not n:
        return
    if receiving_domain and receiving_domain not in _KEPT_DOMAINS:
        receiving_domain = receiving_domain_of(receiving_domain.rsplit("@", 1)[-1])
    dims = (source or "", campaign_id or "", journey_step_id or "", template_id or "", segment_id or "",
            receiving_domain or "", topic_id or "", purpose or "", sending_domain_id or "")
    if dims not in _checked_dims:
        for value, limit in zip(dims, _LIMITS):
            if len(value) > limit:
                raise ValueError(f"rollup dimension longer than {limit} characters")
        if len(_checked_dims) > 100_000:
            _checked_dims.clear()
        _checked_dims.add(dims)
    hour = _hour(at)
    buffer = session.info.get(_BUFFER)
    if buffer is None:
        buffer = session.info[_BUFFER] = defaultdict(int)
    buffer[(org_id, "h", hour, metric, *dims, "")] += n  # the day grain is derived when folded
    if message_id and not campaign_id and not journey_step_id and source not in ("campaign", "journey"):
        if len(message_id) > 32:
            raise ValueError("rollup dimension longer than 32 characters")
        created = _hour(message_created_at).replace(hour=0) if message_created_at else hour.replace(hour=0)
        buffer[(org_id, "m", created, metric, dims[0], "", "", dims[3], "", "", dims[6], dims[7], dims[8],
                message_id)] += n


def pending(session: Session) -> int:
    """How many counters wait in the session's buffer."""
    return len(session.info.get(_BUFFER) or ())


_COLUMNS = ("org_id", "grain", "period", "metric", *DIMENSIONS)
# SQLite: one row per execution (the driver's executemany; an insert there is a call into the
# library, no round trip). PostgreSQL: the whole buffer as one ``COPY … FROM STDIN`` in the
# transaction (the driver formats the rows in C; the server parses no statement per row) — the
# driver's executemany executed ~300 INSERTs per 500-event batch, two thirds of the appending
# time. Inside a pipeline (COPY cannot run there) one INSERT of ``unnest`` over a binary array per
# column: also one execution per transaction.
_COPY_SQL = f"COPY analytics_increments ({', '.join(_COLUMNS)}, n) FROM STDIN"
_PIPELINE_OFF = 0  # psycopg.pq.PipelineStatus.OFF
_APPEND_SQL = {
    "postgresql": f"INSERT INTO analytics_increments ({', '.join(_COLUMNS)}, n) SELECT * FROM unnest("
                  + ", ".join("%b::timestamptz[]" if c == "period" else "%b::varchar[]" for c in _COLUMNS)
                  + ", %b::bigint[])",
    "sqlite": f"INSERT INTO analytics_increments ({', '.join(_COLUMNS)}, n) "
              f"VALUES ({', '.join(['?'] * (len(_COLUMNS) + 1))})",
}


def sqlite_datetime(value: datetime) -> str:
    """A UTC datetime as SQLAlchemy stores it in SQLite (the rollup key compares this text)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    # the same text as strftime("%Y-%m-%d %H:%M:%S.%f"), a tenth of its cost (once per /t/ event)
    return value.isoformat(" ", "microseconds")


def flush_pending(session: Session) -> int:
    """Append the session's buffered increments now (in its transaction) to
    ``analytics_increments``, in key order. Returns the row count."""
    buffer = session.info.pop(_BUFFER, None)
    if not buffer:
        return 0
    connection = session.connection()
    dialect = connection.dialect.name
    if dialect not in _APPEND_SQL:
        session.execute(AnalyticsIncrement.__table__.insert(),
                        [dict(zip(_COLUMNS, key), n=n) for key, n in buffer.items()])
        return len(buffer)
    # The driver on the session's connection, in its transaction (one SQL text; keys were checked
    # by add()). SQLAlchemy's per-row parameter processing was most of the cost. No order is
    # needed: appends lock no shared row.
    cursor = connection.connection.driver_connection.cursor()
    try:
        if dialect == "sqlite":
            texts: dict = {}
            rows = []
            for k, n in buffer.items():
                period = texts.get(k[2])
                if period is None:
                    period = texts[k[2]] = sqlite_datetime(k[2])
                rows.append((k[0], k[1], period, *k[3:], n))
            cursor.executemany(_APPEND_SQL[dialect], rows)
        elif cursor.connection.pgconn.pipeline_status == _PIPELINE_OFF:
            with cursor.copy(_COPY_SQL) as copy:
                for k, n in buffer.items():
                    copy.write_row((*k, n))
        else:  # inside the caller's pipeline (the /t/ writer's), where COPY cannot run
            columns = [list(c) for c in zip(*buffer.keys())]
            columns.append(list(buffer.values()))
            cursor.execute(_APPEND_SQL[dialect], columns)
    finally:
        cursor.close()
    return len(buffer)


def discard_pending(session: Session) -> None:
    session.info.pop(_BUFFER, None)


@event.listens_for(Session, "before_commit")
def _write_before_commit(session: Session) -> None:
    if session.info.get(_BUFFER):
        flush_pending(session)


@event.listens_for(Session, "after_rollback")
def _discard_after_rollback(session: Session) -> None:
    session.info.pop(_BUFFER, None)


# --------------------------------------------------------------------------- folding

FOLD_CHUNK = 50_000  # appended rows per chunk (one transaction each in fold_all)
FOLD_CACHE_KIB = 128 * 1024  # SQLite page cache during a chunk

_KEY = ", ".join(_COLUMNS[1:])  # grain, period, metric, dimensions, message_id
_DIMS_SQL = ", ".join(DIMENSIONS[:-1])
_CONFLICT = (f"ON CONFLICT ({', '.join(_COLUMNS)}) DO UPDATE SET n = analytics_rollups.n + excluded.n")

_GROUPED = ", ".join("sum(n) AS n" if c == "n" else c for c in (*_COLUMNS[1:], "n"))
_DAY_ROWS = {
    "postgresql": f"SELECT 'd', timezone('UTC', date_trunc('day', timezone('UTC', period))), metric, {_DIMS_SQL}, "
                  f"message_id, sum(n) FROM g WHERE grain = 'h' GROUP BY 2, metric, {_DIMS_SQL}, message_id",
    "sqlite": f"SELECT 'd', substr(period, 1, 10) || ' 00:00:00.000000', metric, {_DIMS_SQL}, message_id, sum(n) "
              f"FROM g WHERE grain = 'h' GROUP BY 2, metric, {_DIMS_SQL}, message_id",
}
# The increments are grouped once per key (g); the day rows are grouped again from g's hour rows.
# g's rows and the day rows are distinct keys (the grain differs), so each key is upserted once.
# PostgreSQL: one statement per chunk, so the rows folded are exactly the rows deleted (one
# snapshot). No two folds upsert the same organization's rows at once (the advisory lock).
# The chunk is a range of ids from the organization's oldest pending one (``min`` reads the
# (org_id, id) index whatever the table's statistics say; picking the first N ids by ``ORDER BY id
# LIMIT`` was planned, with the statistics of a table that grew by half a million rows since the
# last analyze, as a scan of the whole backlog sorted for every chunk). A row of the range not
# visible to the statement (its writer had not committed) is neither deleted nor folded: the next
# chunk's ``min`` finds it. The rollup rows get time-ordered ids like
# :func:`carepost.core.ids.new_id` (48-bit milliseconds + 80 random bits: the primary key's index
# grows at its right edge; random ids dirtied a random leaf page per row).
_FOLD_PG = f"""
WITH lo AS (
    SELECT min(id) AS id FROM analytics_increments WHERE org_id = %(org)s
), moved AS (
    DELETE FROM analytics_increments i USING lo
    WHERE i.org_id = %(org)s AND i.id >= lo.id AND i.id < lo.id + %(chunk)s
    RETURNING {", ".join("i." + c for c in (*_COLUMNS[1:], "n"))}
), g AS (
    SELECT {_GROUPED} FROM moved GROUP BY {_KEY}
)
INSERT INTO analytics_rollups (id, {", ".join(_COLUMNS)}, n)
SELECT lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')
       || substr(md5(random()::text || clock_timestamp()::text), 1, 20), %(org)s, k.*
FROM (SELECT * FROM g UNION ALL {_DAY_ROWS["postgresql"]}) AS k
{_CONFLICT}
"""
_BOUND_SQLITE = ("SELECT max(id), count(*) FROM (SELECT id FROM analytics_increments WHERE org_id = ? "
                 "ORDER BY id LIMIT ?)")
# SQLite: the chunk's statements run under the single write lock (BEGIN IMMEDIATE).
_FOLD_SQLITE = f"""
WITH g AS MATERIALIZED (
    SELECT {_GROUPED} FROM analytics_increments WHERE org_id = ? AND id <= ? GROUP BY {_KEY}
)
INSERT INTO analytics_rollups (id, {", ".join(_COLUMNS)}, n)
SELECT lower(hex(randomblob(16))), ?, k.* FROM (SELECT * FROM g UNION ALL {_DAY_ROWS["sqlite"]}) AS k
WHERE true
{_CONFLICT}
"""
_DELETE_SQLITE = "DELETE FROM analytics_increments WHERE org_id = ? AND id <= ?"


def _lock_key(org_id: str) -> int:
    """The PostgreSQL advisory lock key of an organization's fold (64-bit signed)."""
    return int.from_bytes(hashlib.sha256(f"carepost.rollups.fold:{org_id}".encode()).digest()[:8], "big",
                          signed=True)


def lock_fold(session: Session, org_id: str, *, wait: bool = True) -> bool:
    """Take the organization's fold lock for ``session``'s transaction (PostgreSQL; SQLite's
    ``BEGIN IMMEDIATE`` is the lock there). False when ``wait`` is False and another holds it."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return True
    fn = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    got = connection.exec_driver_sql(f"SELECT {fn}(%(key)s)", {"key": _lock_key(org_id)}).scalar()
    return wait or bool(got)


def fold_chunk(session: Session, org_id: str, chunk: int = FOLD_CHUNK) -> int:
    """Fold up to ``chunk`` of the organization's oldest appended increments into the rollups and
    delete them, in ``session``'s transaction (the caller holds :func:`lock_fold` and commits).
    Returns the increments folded (0: none were pending)."""
    connection = session.connection()
    cursor = connection.connection.driver_connection.cursor()
    cache = None
    try:
        if connection.dialect.name == "postgresql":
            cursor.execute(_FOLD_PG, {"org": org_id, "chunk": chunk})
            # rows of the rollups touched: 0 only when nothing was pending (every row has n != 0
            # or at least one key)
            return cursor.rowcount if cursor.rowcount and cursor.rowcount > 0 else 0
        cursor.execute(_BOUND_SQLITE, (org_id, chunk))
        upper, count = cursor.fetchone()
        if upper is None:
            return 0
        # A page cache holding the rollups' key index for the chunk's upserts (each page read is
        # decrypted once), set back after it.
        cache = cursor.execute("PRAGMA cache_size").fetchone()[0]
        cursor.execute(f"PRAGMA cache_size = -{FOLD_CACHE_KIB}")
        cursor.execute(_FOLD_SQLITE, (org_id, upper, org_id))
        cursor.execute(_DELETE_SQLITE, (org_id, upper))
        return int(count)
    finally:
        if cache is not None:
            cursor.execute(f"PRAGMA cache_size = {int(cache)}")
        cursor.close()


def fold(session: Session, org_id: str, chunk: int = FOLD_CHUNK, *, commit: bool = True) -> int:
    """Fold every increment of ``org_id`` appended (and committed) before the call. With
    ``commit`` each chunk is its own transaction (a crash loses no more than the chunk in flight,
    which rolls back whole); without it everything happens in ``session``'s transaction.
    Returns how many chunks folded something."""
    chunks = 0
    while True:
        lock_fold(session, org_id)
        folded = fold_chunk(session, org_id, chunk)
        if commit:
            session.commit()
        if not folded:
            return chunks
        chunks += 1


def pending_organizations(session: Session) -> list[str]:
    """Organizations with appended increments not yet folded."""
    connection = session.connection()
    return [row[0] for row in connection.exec_driver_sql(
        "SELECT DISTINCT org_id FROM analytics_increments ORDER BY org_id")]


def fold_all(session_factory, chunk: int = FOLD_CHUNK) -> int:
    """Fold every organization's pending increments (the periodic task, ``carepost analytics fold``),
    one transaction per chunk. ``session_factory()`` gives a system-scope session."""
    with session_factory() as session:
        orgs = pending_organizations(session)
        session.rollback()
        return sum(fold(session, org, chunk) for org in orgs)


_FOLDING = "carepost_rollup_folding"


@event.listens_for(Session, "do_orm_execute")
def _fold_before_read(state: ORMExecuteState) -> None:
    """A read (or a correction) of the rollups first folds the session's organization's pending
    increments (every organization's, for a system-scope session) in the session's own
    transaction, so it sees them. A reader that does not commit folds them again next time: exact
    either way, the fold and the deletion of what it folded commit or roll back together."""
    if not _touches_rollups(state):
        return
    session = state.session
    if session.info.get(_FOLDING):
        return
    org_id = session.info.get("org_id")
    session.info[_FOLDING] = True
    try:
        connection = session.connection()
        if org_id:
            mark = "%s" if connection.dialect.name == "postgresql" else "?"
            orgs = [org_id] if connection.exec_driver_sql(
                f"SELECT 1 FROM analytics_increments WHERE org_id = {mark} LIMIT 1", (org_id,)).first() else []
        elif session.info.get("scope") == "system":
            orgs = pending_organizations(session)
        else:
            return
        for org in orgs:
            _fold_in_reader(session, connection, org)
    finally:
        session.info.pop(_FOLDING, None)


def _touches_rollups(state: ORMExecuteState) -> bool:
    """A SELECT (or an UPDATE / DELETE: a correction, a purge) of :class:`AnalyticsRollup`: its
    first entity (also when only aggregates of its columns are selected), or its table."""
    if not (state.is_select or state.is_update or state.is_delete):
        return False
    subject = state.statement._propagate_attrs.get("plugin_subject")
    if getattr(subject, "mapper", None) is AnalyticsRollup.__mapper__:
        return True
    if state.is_select:
        return any(m is AnalyticsRollup.__mapper__ for m in state.all_mappers)
    return getattr(getattr(state.statement, "table", None), "name", None) == AnalyticsRollup.__tablename__


def _fold_in_reader(session: Session, connection, org_id: str) -> None:
    if connection.dialect.name == "postgresql":
        if lock_fold(session, org_id, wait=False):  # else another aggregator is folding it now
            while fold_chunk(session, org_id):
                pass
        return
    # SQLite: a BEGIN IMMEDIATE session holds the write lock already. A DEFERRED reader tries
    # for it briefly, in a savepoint: a stale snapshot or a busy writer leaves the read as folded.
    deferred = connection.get_execution_options().get("sqlite_begin") == "DEFERRED"
    if not deferred:
        while fold_chunk(session, org_id):
            pass
        return
    raw = connection.connection.driver_connection
    raw.execute("PRAGMA busy_timeout = 200")
    try:
        raw.execute("SAVEPOINT carepost_fold")
        try:
            while fold_chunk(session, org_id):
                pass
        except Exception as error:  # the driver's OperationalError: database is locked / busy
            if "locked" not in str(error) and "busy" not in str(error):
                raise
            raw.execute("ROLLBACK TO carepost_fold")
        raw.execute("RELEASE carepost_fold")
    finally:
        raw.execute("PRAGMA busy_timeout = 30000")


# --------------------------------------------------------------------------- periods

def day_range(start: datetime, end: datetime) -> list[datetime]:
    """The UTC days from ``start`` to ``end`` inclusive."""
    day, last, out = _hour(start).replace(hour=0), _hour(end).replace(hour=0), []
    while day <= last:
        out.append(day)
        day += timedelta(days=1)
    return out
