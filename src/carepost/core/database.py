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
        pool_size=8,
        max_overflow=16,
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
        return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, hide_parameters=True)
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


_engine: Engine | None = None
_factory: sessionmaker | None = None
_lock = threading.Lock()


def get_engine() -> Engine:
    global _engine, _factory
    with _lock:
        if _engine is None:
            _engine = make_engine()
            _factory = sessionmaker(_engine, expire_on_commit=False)
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
    with Session(engine, expire_on_commit=False) as session:
        if org_id:
            session.info["org_id"] = org_id
        else:
            session.info["scope"] = "system"
        yield session


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


def _org_scoped_tables() -> frozenset[str]:
    return frozenset(m.local_table.name for m in Base.registry.mappers
                     if isinstance(m.class_, type) and issubclass(m.class_, OrgScoped))


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
        return  # INSERT ... SELECT: its select is scoped like any query (its org_id comes from the caller)
    others = {value for value in _inserted_org_ids(state) if value != org_id}
    if others:
        raise TenantScopeError(f"insert into {table.name} for another organization")


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
