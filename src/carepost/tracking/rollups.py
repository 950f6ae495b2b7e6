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

**Writing.** :func:`add` does not write at once: it adds to a buffer kept on the session, which
merges increments of the same key (a batch of 500 deliveries of one campaign becomes a handful of
upserts). The buffer is written when the session commits (``before_commit``), inside that same
transaction — so the counters commit or roll back with the work they count, and row locks on hot
counters are held only for the last moment of the transaction — in a fixed key order (two
transactions never wait on each other in a cycle on PostgreSQL). Each key is one
``INSERT ... ON CONFLICT (key) DO UPDATE SET n = n + excluded.n``: race-free on SQLite and on
PostgreSQL alike. A rollback discards the buffer. :func:`flush_pending` writes it earlier (a
reader in the same session).

Readers never scan events: :mod:`carepost.tracking.analytics` sums rollup rows.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from sqlalchemy import BigInteger, Index, String, UniqueConstraint, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

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


# --------------------------------------------------------------------------- writing

_BUFFER = "carepost_rollup_buffer"


def _hour(at: datetime) -> datetime:
    if at.tzinfo is not UTC:
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.replace(minute=0, second=0, microsecond=0)


_LIMITS = (16, 32, 32, 32, 32, 64, 32, 64, 32)
_valid_metrics: set[str] = set()
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
    for value, limit in zip(dims, _LIMITS):
        if len(value) > limit:
            raise ValueError(f"rollup dimension longer than {limit} characters")
    hour = _hour(at)
    buffer = session.info.get(_BUFFER)
    if buffer is None:
        buffer = session.info[_BUFFER] = defaultdict(int)
    buffer[(org_id, "h", hour, metric, *dims, "")] += n
    buffer[(org_id, "d", hour.replace(hour=0), metric, *dims, "")] += n
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
_CHUNK = 2000


_statements: dict[str, object] = {}


def _upsert(dialect: str):
    """``INSERT ... ON CONFLICT (key) DO UPDATE SET n = n + excluded.n``, built once per dialect
    (executed with many rows: compiled once and cached, not one statement per batch)."""
    stmt = _statements.get(dialect)
    if stmt is None:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        table = AnalyticsRollup.__table__
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=list(_COLUMNS), set_={"n": table.c.n + stmt.excluded.n})
        _statements[dialect] = stmt
    return stmt


def _upsert_sql(dialect: str) -> str:
    """The same upsert as :func:`_upsert`, as SQL text for the driver's own ``executemany``: it is
    executed for every transaction that counts something, and SQLAlchemy's per-row parameter
    processing was most of its cost (bench/tracking.py profile)."""
    sql = _statements.get(("sql", dialect))
    if sql is None:
        mark = "%s" if dialect == "postgresql" else "?"
        names = ("id", *_COLUMNS, "n")
        sql = (f"INSERT INTO {AnalyticsRollup.__tablename__} ({', '.join(names)}) "
               f"VALUES ({', '.join([mark] * len(names))}) ON CONFLICT ({', '.join(_COLUMNS)}) "
               f"DO UPDATE SET n = {AnalyticsRollup.__tablename__}.n + excluded.n")
        _statements[("sql", dialect)] = sql
    return sql


def sqlite_datetime(value: datetime) -> str:
    """A UTC datetime as SQLAlchemy stores it in SQLite (the rollup key compares this text)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def flush_pending(session: Session) -> int:
    """Write the session's buffered increments now (in its transaction). Returns the row count."""
    buffer = session.info.pop(_BUFFER, None)
    if not buffer:
        return 0
    connection = session.connection()
    dialect = connection.dialect.name
    keys = sorted(buffer, key=lambda k: tuple(str(v) for v in k))
    if dialect not in ("postgresql", "sqlite"):
        stmt = _upsert(dialect)
        for start in range(0, len(keys), _CHUNK):
            rows = [dict(zip(_COLUMNS, key), id=new_id(), n=buffer[key]) for key in keys[start:start + _CHUNK]]
            session.execute(stmt, rows)  # one cached statement, executemany
        return len(keys)
    # The driver's executemany on the session's connection, in its transaction (one cached SQL
    # text; keys were checked by add()).
    if dialect == "sqlite":
        rows = [(new_id(), k[0], k[1], sqlite_datetime(k[2]), *k[3:], buffer[k]) for k in keys]
    else:
        rows = [(new_id(), *k, buffer[k]) for k in keys]
    cursor = connection.connection.driver_connection.cursor()
    try:
        cursor.executemany(_upsert_sql(dialect), rows)
    finally:
        cursor.close()
    return len(keys)


def discard_pending(session: Session) -> None:
    session.info.pop(_BUFFER, None)


@event.listens_for(Session, "before_commit")
def _write_before_commit(session: Session) -> None:
    if session.info.get(_BUFFER):
        flush_pending(session)


@event.listens_for(Session, "after_rollback")
def _discard_after_rollback(session: Session) -> None:
    session.info.pop(_BUFFER, None)


# --------------------------------------------------------------------------- periods

def day_range(start: datetime, end: datetime) -> list[datetime]:
    """The UTC days from ``start`` to ``end`` inclusive."""
    day, last, out = _hour(start).replace(hour=0), _hour(end).replace(hour=0), []
    while day <= last:
        out.append(day)
        day += timedelta(days=1)
    return out
