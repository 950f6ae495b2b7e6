"""Engines, sessions and the one mechanism that scopes queries to an organization.

SQLite (embedded default) is SQLCipher-encrypted: every pooled connection is opened with the raw
key first, then ``foreign_keys=ON``, WAL and a busy timeout. PostgreSQL goes through psycopg 3.

Tenant isolation (ARCHITECTURE.md section 5): a session carries ``info["org_id"]`` (or the
explicit ``info["scope"] = "system"``). Every ORM statement touching an :class:`OrgScoped`
table gets ``org_id = :org`` added by :func:`_scope_to_organization`; a statement with neither
raises :class:`TenantScopeError`, so forgetting the scope fails closed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, MetaData, String, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Mapper,
    ORMExecuteState,
    Session,
    mapped_column,
    sessionmaker,
    with_loader_criteria,
)
from sqlalchemy.pool import QueuePool

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.errors import TenantScopeError

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True)}


class OrgScoped:
    """Mixin for every table holding organization data; see the module docstring."""

    org_id: Mapped[str] = mapped_column(String(32), ForeignKey("organizations.id", ondelete="CASCADE"), index=True)


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(default=clock.now, onupdate=clock.now)


# --------------------------------------------------------------------------- engines


def normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlcipher_engine(path: str, settings: Settings) -> Engine:
    import sqlcipher3

    from carepost.core.masterkeys import sqlcipher_raw_key

    key_hex = sqlcipher_raw_key(settings).hex()

    def connect():
        conn = sqlcipher3.dbapi2.connect(path, check_same_thread=False, timeout=30)
        # The key must be the first statement on the connection. A raw key (x'..') skips
        # SQLCipher's PBKDF2 stretching, which would otherwise cost ~100 ms per connection.
        conn.execute(f"PRAGMA key = \"x'{key_hex}'\"")
        conn.execute("SELECT count(*) FROM sqlite_master")  # fails here when the key is wrong
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    engine = create_engine(
        "sqlite+pysqlite://",
        creator=connect,
        module=sqlcipher3.dbapi2,
        poolclass=QueuePool,
        # Kept open for a busy `serve` (16+ concurrent requests, each with its session, plus the
        # audit group commit): an overflow connection is closed when returned, and re-opening one
        # (key, schema read, pragmas) costs more than a request's own queries.
        pool_size=20,
        max_overflow=20,
        pool_pre_ping=False,
        hide_parameters=True,  # SQL parameters (PHI) never reach exception texts or echo logs
    )

    # pysqlite's own transaction handling defers BEGIN until the first write, which makes
    # "read the chain head, then append" racy. Take control: autocommit at the driver level,
    # and an explicit BEGIN IMMEDIATE for every SQLAlchemy transaction.
    @event.listens_for(engine, "connect")
    def _no_driver_tx(dbapi_conn, _record):
        dbapi_conn.isolation_level = None

    # IMMEDIATE takes the write lock at BEGIN, so a transaction never fails half-way when it
    # upgrades from reading to writing. Read-only tooling may ask for DEFERRED through the
    # ``sqlite_begin`` execution option (see ``read_only_session``).
    @event.listens_for(engine, "begin")
    def _begin(conn):
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def make_engine(settings: Settings | None = None, url: str | None = None) -> Engine:
    settings = settings or get_settings()
    url = normalize_url(url or settings.effective_database_url)
    if url.startswith("sqlite+sqlcipher:///"):
        path = url.split(":///", 1)[1]
        return _sqlcipher_engine(path, settings)
    if url.startswith("postgresql+psycopg://"):
        return create_engine(url, pool_size=settings.database_pool_size, max_overflow=settings.database_max_overflow,
                             pool_pre_ping=True, hide_parameters=True)
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


_engine: Engine | None = None
_factory: sessionmaker | None = None
_lock = threading.Lock()


def get_engine() -> Engine:
    global _engine, _factory
    with _lock:
        if _engine is None:
            _engine = make_engine()
            _factory = sessionmaker(_engine, class_=ScopedSession, expire_on_commit=False)
        return _engine


def session_factory() -> sessionmaker:
    get_engine()
    assert _factory is not None
    return _factory


def dispose_engine() -> None:
    global _engine, _factory
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None
        _factory = None


@contextmanager
def org_session(org_id: str) -> Iterator[Session]:
    """A session that can see only ``org_id``'s data."""
    with session_factory()() as session:
        session.info["org_id"] = org_id
        yield session


@contextmanager
def read_only_session(org_id: str | None = None) -> Iterator[Session]:
    """A session that does not take SQLite's write lock at BEGIN (reports, verification,
    tests inspecting state). It may read; a write through it can fail with "database is locked"."""
    engine = get_engine().execution_options(sqlite_begin="DEFERRED")
    with ScopedSession(engine, expire_on_commit=False) as session:
        if org_id:
            session.info["org_id"] = org_id
        else:
            session.info["scope"] = "system"
        yield session


def begin_read(session: Session) -> None:
    """Start ``session``'s next transaction without SQLite's write lock (``BEGIN DEFERRED``): for
    a request that only reads, so it does not queue behind writers (WAL readers never wait).
    No effect on PostgreSQL, or when a transaction is already open. A write through it can fail
    with "database is locked"; an audited read records its event with
    ``audit.service.record_read`` after this transaction ended."""
    if not session.in_transaction():
        session.connection(execution_options={"sqlite_begin": "DEFERRED"})


@contextmanager
def system_session() -> Iterator[Session]:
    """A session for cross-organization work (CLI administration, workers, key rotation)."""
    with session_factory()() as session:
        session.info["scope"] = "system"
        yield session


# --------------------------------------------------------------------------- tenant scoping

# The one escape hatch: ``select(...).execution_options(**ALL_ORGANIZATIONS)`` reads across
# organizations (a person's own memberships for the switcher). Grep for it in review.
ALL_ORGANIZATIONS_OPTION = "carepost_all_organizations"
ALL_ORGANIZATIONS = {ALL_ORGANIZATIONS_OPTION: True}


def _scoped_mappers(state: ORMExecuteState) -> bool:
    return any(isinstance(m.class_, type) and issubclass(m.class_, OrgScoped) for m in state.all_mappers)


_scoped_tables_cache: list = [None]  # frozenset, recomputed when a mapper is added (event below)


def _org_scoped_tables() -> frozenset[str]:
    """The names of the organization tables (checked at every INSERT: cached, not rebuilt from the
    mapper registry each time)."""
    found = _scoped_tables_cache[0]
    if found is None:
        found = _scoped_tables_cache[0] = frozenset(
            m.local_table.name for m in Base.registry.mappers
            if isinstance(m.class_, type) and issubclass(m.class_, OrgScoped))
    return found


@event.listens_for(Mapper, "after_mapper_constructed")
def _forget_scoped_tables(_mapper, _cls) -> None:
    _scoped_tables_cache[0] = None


def _inserted_org_ids(state: ORMExecuteState) -> set:
    """Every ``org_id`` an INSERT statement would write: from its VALUES (one or many rows) and
    from the parameters it is executed with (executemany)."""
    found = set()
    params = state.parameters
    for row in (params if isinstance(params, (list, tuple)) else [params or {}]):
        if isinstance(row, dict) and "org_id" in row:
            found.add(row["org_id"])
    stmt = state.statement

    def add_from(values) -> None:
        for key, value in (values or {}).items():
            if getattr(key, "key", key) == "org_id":
                found.add(value.value if isinstance(value, BindParameter) else value)

    add_from(getattr(stmt, "_values", None))
    for rows in getattr(stmt, "_multi_values", None) or ():
        for row in rows:
            if isinstance(row, dict):
                add_from(row)
    return found


def _check_insert(state: ORMExecuteState) -> None:
    """Issue 9 item 14: the tenant scope covers INSERT statements too (``insert(Model).values``
    and executemany with rows): a session of organization A cannot write a row of B. ORM objects
    added to the session are checked at flush (:func:`_stamp_organization`)."""
    table = getattr(state.statement, "table", None)
    if table is None or getattr(table, "name", None) not in _org_scoped_tables():
        return
    session = state.session
    org_id = session.info.get("org_id")
    if org_id is None:
        if session.info.get("scope") == "system" or state.execution_options.get(ALL_ORGANIZATIONS_OPTION):
            return
        raise TenantScopeError(f"insert into {table.name} without an organization scope")
    if getattr(state.statement, "select", None) is not None:
        state.statement = _scoped_insert_from_select(state.statement, table.name, org_id)
        return
    others = {value for value in _inserted_org_ids(state) if value != org_id}
    if others:
        raise TenantScopeError(f"insert into {table.name} for another organization")


def _scoped_insert_from_select(stmt, table_name: str, org_id: str):
    """``INSERT ... SELECT`` in an organization's session: the SELECT reads only that
    organization's rows (each organization table it reads from is filtered to it, and a subquery
    reading organization data is refused), and every row it inserts carries that organization's
    ``org_id`` (a literal of another organization's is refused, an expression is filtered)."""
    from sqlalchemy import Table, and_, insert as insert_, select
    from sqlalchemy.sql import visitors
    from sqlalchemy.sql.selectable import Alias, Join, Select
    from sqlalchemy.sql.util import find_tables

    scoped_tables = _org_scoped_tables()
    names = [getattr(n, "key", n) for n in stmt._select_names]
    if "org_id" not in names:
        raise TenantScopeError(f"insert into {table_name} from a select that names no org_id")
    inner = stmt.select
    if not isinstance(inner, Select):
        raise TenantScopeError(f"insert into {table_name} from a compound select in an organization's session")
    for element in visitors.iterate(inner):
        if element is not inner and isinstance(element, Select) and any(
                t.name in scoped_tables for t in find_tables(element, include_aliases=True) if isinstance(t, Table)):
            raise TenantScopeError(f"insert into {table_name} from a subquery of organization data")

    def direct(froms):
        for f in froms:
            if isinstance(f, Join):
                yield from direct([f.left, f.right])
            else:
                yield f

    conditions = []
    for f in direct(inner.get_final_froms()):
        base = f.element if isinstance(f, Alias) else f
        if isinstance(base, Table) and base.name in scoped_tables:
            conditions.append(f.c.org_id == org_id)
    if conditions:
        inner = inner.where(and_(*conditions))
    position = names.index("org_id")
    value = list(inner.selected_columns)[position]
    if isinstance(value, BindParameter):
        if value.value != org_id:
            raise TenantScopeError(f"insert into {table_name} for another organization")
        scoped = inner
    else:
        rows = inner.subquery()
        scoped = select(*rows.c).where(list(rows.c)[position] == org_id)
    return insert_(stmt.table).from_select(stmt._select_names, scoped,
                                           include_defaults=stmt.include_insert_from_select_defaults)


class ScopedSession(Session):
    """The Session every CarePost session is: its legacy bulk methods skip the ORM events the
    tenant scope hangs on, so they check the organization themselves (issue 9 item 14)."""

    def _check_bulk(self, mapper, rows) -> None:
        cls = getattr(mapper, "class_", mapper)
        if not (isinstance(cls, type) and issubclass(cls, OrgScoped)):
            return
        org_id = self.info.get("org_id")
        for row in rows:
            value = row.get("org_id") if isinstance(row, dict) else getattr(row, "org_id", None)
            if org_id is None:
                if self.info.get("scope") != "system":
                    raise TenantScopeError(f"{cls.__name__} written without an organization scope")
                if value is None:
                    raise TenantScopeError(f"{cls.__name__} written without an organization")
            elif value is None:
                if isinstance(row, dict):
                    row["org_id"] = org_id
                else:
                    row.org_id = org_id
            elif value != org_id:
                raise TenantScopeError(f"{cls.__name__} belongs to another organization")

    def bulk_insert_mappings(self, mapper, mappings, *args, **kwargs):
        mappings = [dict(m) for m in mappings]
        self._check_bulk(mapper, mappings)
        return super().bulk_insert_mappings(mapper, mappings, *args, **kwargs)

    def bulk_update_mappings(self, mapper, mappings):
        mappings = list(mappings)
        self._check_bulk(mapper, [m for m in mappings if "org_id" in m])
        return super().bulk_update_mappings(mapper, mappings)

    def bulk_save_objects(self, objects, *args, **kwargs):
        objects = list(objects)
        for obj in objects:
            self._check_bulk(type(obj), [obj])
        return super().bulk_save_objects(objects, *args, **kwargs)


@event.listens_for(Session, "do_orm_execute")
def _scope_to_organization(state: ORMExecuteState) -> None:
    if state.is_insert:
        _check_insert(state)
        return
    if not (state.is_select or state.is_update or state.is_delete):
        return
    if state.execution_options.get(ALL_ORGANIZATIONS_OPTION):
        return
    session = state.session
    org_id = session.info.get("org_id")
    if org_id is None:
        if session.info.get("scope") == "system":
            return
        if _scoped_mappers(state):
            raise TenantScopeError("query of organization data without an organization scope")
        return
    state.statement = state.statement.options(
        with_loader_criteria(OrgScoped, lambda cls: cls.org_id == org_id, include_aliases=True)
    )


@event.listens_for(Session, "before_flush")
def _stamp_organization(session: Session, _ctx, _instances) -> None:
    org_id = session.info.get("org_id")
    for obj in list(session.new) + list(session.dirty):
        if not isinstance(obj, OrgScoped):
            continue
        if org_id is None:
            if session.info.get("scope") == "system":
                if obj.org_id is None:
                    raise TenantScopeError(f"{type(obj).__name__} written without an organization")
                continue
            raise TenantScopeError(f"{type(obj).__name__} written without an organization scope")
        if obj.org_id is None:
            obj.org_id = org_id
        elif obj.org_id != org_id:
            raise TenantScopeError(f"{type(obj).__name__} belongs to another organization")
