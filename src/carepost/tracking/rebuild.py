"""Recounting the analytics rollups from what is stored, set-wise (issue 13 item 5):
``carepost analytics rebuild --from DAY``.

The live path (:mod:`carepost.tracking.rollups`) counts as things happen. This module recounts
the same figures from the rows those things left — to repair a lost or doubtful window, to count
data older than the rollups, or to fill a dimension added since (the sending domain) — and
**replaces** what the rollups held from ``DAY`` on. Everything happens in the database, one
organization per transaction, with ``INSERT … SELECT … GROUP BY`` (no row travels to Python):

1. the organization's recounted rollup rows from ``DAY`` on are deleted (hour and day rows whose
   period is from ``DAY`` on; message rows of messages created from ``DAY`` on);
2. **base**: the events from ``DAY`` on are grouped once into a temporary table — delivery
   events (``message_events`` with their recipient and message: accepted, excluded:<reason>,
   sent, delivered, secured:<method>, deferred, bounced hard/soft, failed, complained,
   portal_viewed), engagement events (``engagement_events``: opened and clicked, every one; the
   recipient's first and first human one, when that first one is from ``DAY`` on) and
   conversions (``contact_events`` attributed to a message) — per hour, every dimension, and the
   message for messages that keep a message row;
3. the **hour** grain is the base without the message; the **day** grain is derived from the hour
   grain, the **message** grain from the base (not from the events again).

The few values that need Python's own rules — the excluded reason's code, the secured method
(TLS version), the receiving domain (the recipient's domain blind index reduced to a provider
name or ``other`` under the organization's keys) — are computed for the *distinct* values found
and joined back as small temporary tables, so the figures are the live path's exactly (a test
compares the two on a mixed data set: tests/test_analytics_rebuild.py).

**What is not recounted** (kept as it is): ``unsubscribed`` (the opt-out is stored as a
subscription state and a suppression, not as an event with its message), and opens and clicks
of organizations in privacy mode (they keep no engagement events: their rollups are all there
is). An open or click of a token naming no recipient (made while the organization was in
privacy mode) left no event either: a rebuild of a window in which the organization left privacy
mode loses those counts — rebuild such a window only from the day after the switch.

**Locking (events arriving during a rebuild lose nothing, and are not counted twice).** Every
transaction that stores a counted event appends its rollup increments before it commits, in the
same transaction (``rollups`` appends its buffer to ``analytics_increments`` at
``before_commit``). The rebuild takes the organization's fold lock, then makes sure no such
transaction commits between the moment it reads the events and its own commit, and first folds
the increments already appended (the recount then replaces them):

* PostgreSQL: it takes ``LOCK TABLE analytics_increments`` and ``analytics_rollups IN SHARE ROW
  EXCLUSIVE MODE``. That waits for every transaction that has already appended increments (they
  commit first, and the rebuild's statements, each with a fresh READ COMMITTED snapshot taken
  after the lock, see their events and their increments); a transaction reaching its append
  meanwhile waits for the rebuild's commit, and its increments are folded later on top of the
  rebuilt rows (its events were not visible to the rebuild: not committed). Readers are not blocked; writers of counted events wait for the rebuild of one
  organization (seconds).
* SQLite / SQLCipher: every transaction is ``BEGIN IMMEDIATE`` (``core.database``), so the
  rebuild holds the single write lock from its first statement; writers wait (busy timeout 30 s)
  and readers go on (WAL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.orm import Session

from carepost.tracking import rollups
from carepost.tracking.rollups import AnalyticsRollup

ENGAGEMENT_METRICS = ("opened", "opened_unique", "opened_human", "clicked", "clicked_unique", "clicked_human")
KEPT_METRICS = ("unsubscribed",)
CONVERSION_METRICS = ("converted",)
DELIVERY = "delivery"
ENGAGEMENT = "engagement"
CONVERSIONS = "conversions"
FAMILIES = (DELIVERY, ENGAGEMENT, CONVERSIONS)

SQLITE_CACHE_KIB = 256 * 1024
PG_WORK_MEM = "256MB"  # for the rebuild's own connection only, then set back

_DIMS = ("source", "campaign_id", "journey_step_id", "template_id", "segment_id", "receiving_domain", "topic_id",
         "purpose", "sending_domain_id")


@dataclass
class Result:
    organizations: int = 0
    events: dict[str, int] = field(default_factory=dict)  # family -> events counted
    rows: int | None = 0  # rollup rows written (None: the driver did not report them)


# --------------------------------------------------------------------------- temporary tables

_meta = MetaData()


def _temp(name: str, *columns: Column) -> Table:
    return Table(name, _meta, *columns, prefixes=["TEMPORARY"], postgresql_on_commit="DROP")


def _s(name: str, length: int = 64) -> Column:
    return Column(name, String(length), nullable=False, server_default="")


RAW = _temp("rb_raw", Column("hour", DateTime(timezone=True)), _s("type", 32), _s("method", 16), _s("tls"),
            _s("reason", 400), _s("detail_reason", 400), _s("bounce", 16), _s("domain_index"),
            *[_s(d) for d in _DIMS if d != "receiving_domain"], _s("m_message_id", 32),
            Column("m_day", DateTime(timezone=True)), Column("n", BigInteger))
BASE = _temp("rb_base", Column("hour", DateTime(timezone=True)), _s("metric"), *[_s(d) for d in _DIMS],
             _s("m_message_id", 32), Column("m_day", DateTime(timezone=True)), Column("n", BigInteger))
HOUR = _temp("rb_hour", Column("hour", DateTime(timezone=True)), _s("metric"), *[_s(d) for d in _DIMS],
             Column("n", BigInteger))
DOMAINS = _temp("rb_domains", Column("domain_index", String(64), primary_key=True), _s("provider"))
SECURED = _temp("rb_secured", _s("method", 16), _s("tls"), _s("metric"))
REASONS = _temp("rb_reasons", _s("reason", 400), _s("detail_reason", 400), _s("metric"))
PLAIN = _temp("rb_plain", _s("type", 32), _s("metric"))
FIRSTS = _temp("rb_firsts", _s("message_id", 32), _s("recipient_id", 32), _s("type", 8),
               Column("first_at", DateTime(timezone=True)), Column("human_at", DateTime(timezone=True)))
TEMPS = (RAW, BASE, HOUR, DOMAINS, SECURED, REASONS, PLAIN, FIRSTS)

# Delivery event type -> the metrics counted without a lookup (see analytics.metrics_for).
PLAIN_METRICS = (("queued", "accepted"), ("delivered", "sent"), ("delivered", "delivered"), ("sent", "sent"),
                 ("deferred", "deferred"), ("failed", "failed"), ("complained", "complained"),
                 ("portal_viewed", "portal_viewed"))
COUNTED_TYPES = ("queued", "excluded", "delivered", "sent", "bounced", "deferred", "failed", "complained",
                 "portal_viewed")


# --------------------------------------------------------------------------- dialect helpers


class _Sql:
    def __init__(self, session: Session):
        self.dialect = session.get_bind().dialect.name
        self.pg = self.dialect == "postgresql"

    def hour(self, col):
        if self.pg:
            return func.timezone("UTC", func.date_trunc("hour", func.timezone("UTC", col)), type_=DateTime(True))
        # SQLite stores UTC datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' (SQLAlchemy's format): the
        # rollups' period must be the very same text, or the live upsert would not meet the row.
        return func.substr(col, 1, 13).concat(":00:00.000000")

    def day(self, col):
        if self.pg:
            return func.timezone("UTC", func.date_trunc("day", func.timezone("UTC", col)), type_=DateTime(True))
        return func.substr(col, 1, 10).concat(" 00:00:00.000000")

    def new_id(self, prefix: str):
        """A row id in :func:`carepost.core.ids.new_id`'s form: the rebuild's millisecond, 80 random bits."""
        if self.pg:
            return literal(prefix).concat(func.substr(func.md5(func.random().cast(String)
                                                               .concat(func.clock_timestamp().cast(String))), 1, 20))
        return literal(prefix).concat(func.lower(func.hex(func.randomblob(10))))


def _c(expr):
    return func.coalesce(expr, "")


# --------------------------------------------------------------------------- the rebuild


def organizations_of(session: Session, org_id: str | None) -> list[str]:
    from carepost.accounts.models import Organization

    if org_id:
        return [org_id]
    return list(session.scalars(select(Organization.id).order_by(Organization.id)))


def rebuild(session_factory, *, org_id: str | None = None, start: datetime | None = None,
            families: tuple[str, ...] = FAMILIES, progress=None) -> Result:
    """Replace the rollups of ``org_id`` (every organization when None) from ``start`` (a UTC day;
    None: all time) with a recount of ``families`` (see the module docstring). One transaction
    per organization, each committed; ``session_factory()`` gives a system-scope session."""
    if start is not None:
        start = start.astimezone(UTC) if start.tzinfo else start.replace(tzinfo=UTC)
    result = Result()
    with session_factory() as session:
        orgs = organizations_of(session, org_id)
    for org in orgs:
        with session_factory() as session:
            counted, rows = rebuild_organization(session, org, start, families)
            session.commit()
        result.organizations += 1
        result.rows = None if rows is None or result.rows is None else result.rows + rows
        for family, n in counted.items():
            result.events[family] = result.events.get(family, 0) + n
        if progress:
            progress(org, counted)
    return result


def rebuild_organization(session: Session, org_id: str, start: datetime | None,
                         families: tuple[str, ...] = FAMILIES) -> tuple[dict[str, int], int | None]:
    """One organization, in ``session``'s transaction (the caller commits). Returns the events
    counted per family and the rollup rows written (None when the driver does not report them)."""
    from carepost.tracking.links import privacy_mode

    sql = _Sql(session)
    conn = session.connection()
    rollups.lock_fold(session, org_id)  # first, as every fold takes it before its row locks
    if sql.pg:
        conn.execute(text("LOCK TABLE analytics_increments IN SHARE ROW EXCLUSIVE MODE"))
        conn.execute(text("LOCK TABLE analytics_rollups IN SHARE ROW EXCLUSIVE MODE"))
    # Increments appended before the locks are folded first, then replaced by the recount with the
    # rest (they count the same events); those appended after wait and are folded on top.
    while rollups.fold_chunk(session, org_id):
        pass
    if sql.pg:
        # Memory for the day's grouping and sorting in this transaction only (the default 4 MB
        # spills a million-event GROUP BY to disk).
        conn.execute(text(f"SET LOCAL work_mem = '{PG_WORK_MEM}'"))
    else:
        # Page caches large enough for one day's events (each page read is decrypted once) and for
        # the temporary tables (kept in memory rather than spilled to a temporary file).
        cache = conn.exec_driver_sql("PRAGMA main.cache_size").scalar()
        temp_cache = conn.exec_driver_sql("PRAGMA temp.cache_size").scalar()
        conn.exec_driver_sql(f"PRAGMA main.cache_size = -{SQLITE_CACHE_KIB}")
        conn.exec_driver_sql(f"PRAGMA temp.cache_size = -{SQLITE_CACHE_KIB}")
    families = tuple(f for f in families if f in FAMILIES)
    if ENGAGEMENT in families and privacy_mode(session, org_id):
        families = tuple(f for f in families if f != ENGAGEMENT)  # their rollups are all there is: kept
    _delete(conn, org_id, start, families)
    for table in TEMPS:
        if not sql.pg:
            table.drop(conn, checkfirst=True)
        table.create(conn)
    counted: dict[str, int] = {}
    prefix = f"{int(datetime.now(UTC).timestamp() * 1000) & ((1 << 48) - 1):012x}"
    _domains(session, conn, org_id)
    if DELIVERY in families:
        counted[DELIVERY] = _delivery(session, conn, sql, org_id, start)
    if ENGAGEMENT in families:
        counted[ENGAGEMENT] = _engagement(conn, sql, org_id, start)
    if CONVERSIONS in families:
        counted[CONVERSIONS] = _conversions(conn, sql, org_id, start)
    rows = _write(conn, sql, org_id, prefix)
    if not sql.pg:  # PostgreSQL drops them at commit
        for table in TEMPS:
            table.drop(conn, checkfirst=True)
        conn.exec_driver_sql(f"PRAGMA main.cache_size = {int(cache)}")
        conn.exec_driver_sql(f"PRAGMA temp.cache_size = {int(temp_cache)}")
    return counted, rows


def _delete(conn, org_id: str, start: datetime | None, families: tuple[str, ...]) -> None:
    r = AnalyticsRollup.__table__.c
    picked = []
    if DELIVERY in families:
        picked.append(r.metric.not_in(ENGAGEMENT_METRICS + CONVERSION_METRICS + KEPT_METRICS))
    if ENGAGEMENT in families:
        picked.append(r.metric.in_(ENGAGEMENT_METRICS))
    if CONVERSIONS in families:
        picked.append(r.metric.in_(CONVERSION_METRICS))
    if not picked:
        return
    where = [r.org_id == org_id, or_(*picked)]
    if start is not None:
        where.append(r.period >= start)  # hour and day rows by period; message rows by the message's day
    conn.execute(delete(AnalyticsRollup.__table__).where(*where))


def _domains(session: Session, conn, org_id: str) -> None:
    """The organization's blind index of every provider domain (each index version) -> the name."""
    from carepost.core.crypto import get_keyring

    ring = get_keyring()
    rows = {}
    for domain in sorted(rollups.PROVIDER_DOMAINS):
        for index in ring.blind_indexes(session, org_id, "domain", domain):
            rows[index] = domain
    if rows:
        conn.execute(insert(DOMAINS), [{"domain_index": k, "provider": v} for k, v in rows.items()])


def _receiving_domain(domain_index_col):
    """'' without a domain index, the provider's name, or ``other`` (rollups.provider_of_index)."""
    provider = (select(DOMAINS.c.provider).where(DOMAINS.c.domain_index == domain_index_col)
                .limit(1).scalar_subquery())
    return case((_c(domain_index_col) == "", ""), else_=func.coalesce(provider, rollups.OTHER_DOMAIN))


def _message_columns(sql: _Sql, m, start: datetime | None):
    """The dimensions of message ``m`` as the live path writes them, and its message-grain key."""
    from carepost.delivery.models import Message

    journey = getattr(Message.__table__.c, "journey_step_id", None)
    segment = getattr(Message.__table__.c, "segment_id", None)
    journey_col = _c(m.c[journey.name]) if journey is not None else literal("")
    segment_col = _c(m.c[segment.name]) if segment is not None else literal("")
    # Delivery events and opens / clicks are counted under the same dimensions (the receiving
    # domain, a recipient's, is added by the caller where it is known).
    dims = {"source": _c(m.c.source), "campaign_id": _c(m.c.campaign_id), "journey_step_id": journey_col,
            "template_id": _c(m.c.template_id), "segment_id": segment_col, "topic_id": _c(m.c.topic_id),
            "purpose": _c(m.c.purpose), "sending_domain_id": _c(m.c.sending_domain_id)}
    keeps_row = and_(_c(m.c.campaign_id) == "", journey_col == "", _c(m.c.source).not_in(("campaign", "journey")))
    if start is not None:
        keeps_row = and_(keeps_row, m.c.created_at >= start)
    m_message = case((keeps_row, m.c.id), else_="")
    return dims, m_message, sql.day(m.c.created_at)


def _base_insert(rows_select, names):
    return insert(BASE).from_select(names, rows_select)


_BASE_NAMES = ["hour", "metric", *_DIMS, "m_message_id", "m_day", "n"]


def _delivery(session: Session, conn, sql: _Sql, org_id: str, start: datetime | None) -> int:
    from carepost.delivery.models import Message, MessageEvent, MessageRecipient

    e, r, m = MessageEvent.__table__, MessageRecipient.__table__, Message.__table__
    dims, m_message, m_day = _message_columns(sql, m, start)
    kind = e.c.type
    method = case((kind.in_(("sent", "delivered")), _c(r.c.method)), else_="")
    tls = case((kind.in_(("sent", "delivered")), _c(r.c.evidence["tls_version"].as_string())), else_="")
    reason = case((kind == "excluded", _c(r.c.reason)), else_="")
    detail_reason = case((kind == "excluded", _c(e.c.details["reason"].as_string())), else_="")
    bounce = case((kind == "bounced", _c(e.c.details["bounce_type"].as_string())), else_="")
    hour = sql.hour(e.c.created_at)
    cols = {"hour": hour, "type": kind, "method": method, "tls": tls, "reason": reason,
            "detail_reason": detail_reason, "bounce": bounce, "domain_index": _c(r.c.domain_index), **dims,
            "m_message_id": m_message, "m_day": m_day}
    where = [e.c.org_id == org_id, kind.in_(COUNTED_TYPES), m.c.sandbox.is_(False)]
    if start is not None:
        where.append(e.c.created_at >= start)
    group = list(cols.values())
    q = (select(*[v.label(k) for k, v in cols.items()], func.count().label("n"))
         .select_from(e.join(r, r.c.id == e.c.recipient_id).join(m, m.c.id == e.c.message_id))
         .where(*where).group_by(*group))
    conn.execute(insert(RAW).from_select([*cols, "n"], q))
    counted = int(conn.execute(select(func.coalesce(func.sum(RAW.c.n), 0))).scalar() or 0)
    if not counted:
        return 0

    # The lookups for the distinct values found (Python's own rules: analytics._reason_code, _secured).
    from carepost.tracking import analytics

    class _R:  # the recipient as analytics._secured reads it
        def __init__(self, method, tls):
            self.method = method or None
            self.evidence = {"tls_version": tls} if tls else {}

    secured = [{"method": a, "tls": b, "metric": analytics._secured(_R(a, b))}
               for a, b in conn.execute(select(RAW.c.method, RAW.c.tls).distinct()
                                        .where(RAW.c.type.in_(("sent", "delivered"))))]
    if secured:
        conn.execute(insert(SECURED), secured)
    reasons = [{"reason": a, "detail_reason": b, "metric": f"excluded:{analytics._reason_code(b or a or None)}"}
               for a, b in conn.execute(select(RAW.c.reason, RAW.c.detail_reason).distinct()
                                        .where(RAW.c.type == "excluded"))]
    if reasons:
        conn.execute(insert(REASONS), reasons)
    conn.execute(insert(PLAIN), [{"type": t, "metric": mt} for t, mt in PLAIN_METRICS])

    domain = _receiving_domain(RAW.c.domain_index)
    dim_cols = [RAW.c[d] if d != "receiving_domain" else domain for d in _DIMS]
    tail = [RAW.c.m_message_id, RAW.c.m_day]

    def from_raw(metric, joined, where):
        group = [RAW.c.hour, metric, *dim_cols, *tail]
        q = (select(RAW.c.hour, metric, *dim_cols, *tail, func.sum(RAW.c.n)).select_from(joined)
             .where(where).group_by(*group))
        conn.execute(_base_insert(q, _BASE_NAMES))

    from_raw(PLAIN.c.metric, RAW.join(PLAIN, PLAIN.c.type == RAW.c.type), RAW.c.type.in_(COUNTED_TYPES))
    from_raw(SECURED.c.metric, RAW.join(SECURED, and_(SECURED.c.method == RAW.c.method, SECURED.c.tls == RAW.c.tls)),
             RAW.c.type.in_(("sent", "delivered")))
    from_raw(REASONS.c.metric, RAW.join(REASONS, and_(REASONS.c.reason == RAW.c.reason,
                                                      REASONS.c.detail_reason == RAW.c.detail_reason)),
             RAW.c.type == "excluded")
    bounced = case((RAW.c.bounce == "hard", "bounced_hard"), else_="bounced_soft")
    from_raw(bounced, RAW, RAW.c.type == "bounced")
    return counted


def _engagement(conn, sql: _Sql, org_id: str, start: datetime | None) -> int:
    from carepost.delivery.models import Message
    from carepost.tracking.models import EngagementEvent

    ev, m = EngagementEvent.__table__, Message.__table__
    dims, m_message, m_day = _message_columns(sql, m, start)
    dim_cols = [dims.get(d, literal("")) for d in _DIMS]

    # Every open and click.
    hour = sql.hour(ev.c.occurred_at)
    where = [ev.c.org_id == org_id]
    if start is not None:
        where.append(ev.c.occurred_at >= start)
    q = (select(hour, ev.c.type, *dim_cols, m_message, m_day, func.count())
         .select_from(ev.join(m, m.c.id == ev.c.message_id)).where(*where)
         .group_by(hour, ev.c.type, *dim_cols, m_message, m_day))
    conn.execute(_base_insert(q, _BASE_NAMES))
    counted = int(conn.execute(select(func.coalesce(func.sum(BASE.c.n), 0))
                               .where(BASE.c.metric.in_(("opened", "clicked")))).scalar() or 0)

    # A recipient's first (and first human) open / click: counted in the hour of that first
    # event, when it is from ``start`` on (one before ``start`` was counted then, and is kept).
    # One pass gives both per (message, recipient, type); only copies of messages created before
    # ``start`` can have an earlier event, so only theirs are looked up.
    where = [ev.c.org_id == org_id]
    if start is not None:
        where.append(ev.c.occurred_at >= start)
    human_at = case((ev.c.classification == "human", ev.c.occurred_at))
    conn.execute(insert(FIRSTS).from_select(
        ["message_id", "recipient_id", "type", "first_at", "human_at"],
        select(ev.c.message_id, ev.c.recipient_id, ev.c.type, func.min(ev.c.occurred_at), func.min(human_at))
        .where(*where).group_by(ev.c.message_id, ev.c.recipient_id, ev.c.type)))
    if start is not None:
        for column, human in ((FIRSTS.c.first_at, False), (FIRSTS.c.human_at, True)):
            before = [ev.c.message_id == FIRSTS.c.message_id, ev.c.recipient_id == FIRSTS.c.recipient_id,
                      ev.c.type == FIRSTS.c.type, ev.c.occurred_at < start]
            if human:
                before.append(ev.c.classification == "human")
            old = exists(select(literal(1)).select_from(m).where(m.c.id == FIRSTS.c.message_id,
                                                                  m.c.created_at < start))
            conn.execute(FIRSTS.update().where(column.is_not(None), old,
                                               exists(select(literal(1)).select_from(ev).where(*before)))
                         .values({column.name: None}))
    for column, suffix in ((FIRSTS.c.first_at, "_unique"), (FIRSTS.c.human_at, "_human")):
        hour = sql.hour(column)
        metric = FIRSTS.c.type.concat(suffix)
        q = (select(hour, metric, *dim_cols, m_message, m_day, func.count())
             .select_from(FIRSTS.join(m, m.c.id == FIRSTS.c.message_id)).where(column.is_not(None))
             .group_by(hour, metric, *dim_cols, m_message, m_day))
        conn.execute(_base_insert(q, _BASE_NAMES))
    return counted


def _conversions(conn, sql: _Sql, org_id: str, start: datetime | None) -> int:
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.tracking.conversions import ContactEvent

    c, m, r = ContactEvent.__table__, Message.__table__, MessageRecipient.__table__
    dims, m_message, m_day = _message_columns(sql, m, start)
    dims["receiving_domain"] = _receiving_domain(r.c.domain_index)
    dim_cols = [dims[d] for d in _DIMS]
    hour = sql.hour(c.c.occurred_at)
    where = [c.c.org_id == org_id, c.c.message_id.is_not(None)]
    if start is not None:
        where.append(c.c.occurred_at >= start)
    q = (select(hour, literal("converted"), *dim_cols, m_message, m_day, func.count())
         .select_from(c.join(m, m.c.id == c.c.message_id).outerjoin(r, r.c.id == c.c.recipient_id))
         .where(*where).group_by(hour, *dim_cols, m_message, m_day))
    before = int(conn.execute(select(func.coalesce(func.sum(BASE.c.n), 0))).scalar() or 0)
    conn.execute(_base_insert(q, _BASE_NAMES))
    return int(conn.execute(select(func.coalesce(func.sum(BASE.c.n), 0))).scalar() or 0) - before


def _write(conn, sql: _Sql, org_id: str, prefix: str) -> int:
    """Base -> hour grain -> day grain; base -> message grain."""
    t = AnalyticsRollup.__table__
    dims = [BASE.c[d] for d in _DIMS]
    conn.execute(insert(HOUR).from_select(["hour", "metric", *_DIMS, "n"],
                                          select(BASE.c.hour, BASE.c.metric, *dims, func.sum(BASE.c.n))
                                          .group_by(BASE.c.hour, BASE.c.metric, *dims)))
    names = ["id", "org_id", "grain", "period", "metric", *_DIMS, "message_id", "n"]
    hdims = [HOUR.c[d] for d in _DIMS]
    counts = []
    counts.append(conn.execute(insert(t).from_select(names, select(
        sql.new_id(prefix), literal(org_id), literal("h"), HOUR.c.hour, HOUR.c.metric, *hdims, literal(""),
        HOUR.c.n).where(HOUR.c.n != 0))).rowcount)
    day = sql.day(HOUR.c.hour)
    counts.append(conn.execute(insert(t).from_select(names, select(
        sql.new_id(prefix), literal(org_id), literal("d"), day, HOUR.c.metric, *hdims, literal(""),
        func.sum(HOUR.c.n)).group_by(day, HOUR.c.metric, *hdims))).rowcount)
    # The message grain keeps source, template, topic, purpose and sending domain (rollups.add).
    mdims = [BASE.c.source, literal(""), literal(""), BASE.c.template_id, literal(""), literal(""), BASE.c.topic_id,
             BASE.c.purpose, BASE.c.sending_domain_id]
    group = [BASE.c.m_day, BASE.c.metric, BASE.c.source, BASE.c.template_id, BASE.c.topic_id, BASE.c.purpose,
             BASE.c.sending_domain_id, BASE.c.m_message_id]
    counts.append(conn.execute(insert(t).from_select(names, select(
        sql.new_id(prefix), literal(org_id), literal("m"), BASE.c.m_day, BASE.c.metric, *mdims,
        BASE.c.m_message_id, func.sum(BASE.c.n)).where(BASE.c.m_message_id != "").group_by(*group))).rowcount)
    return sum(counts) if all(c is not None and c >= 0 for c in counts) else None  # None: the driver did not say
