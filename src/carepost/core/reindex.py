"""Rotate an organization's blind-index key: a new index-key version and a re-index of every row.

Blind indexes are chained (``Keyring.blind_index``): version 1 is ``HMAC(k1, kind|normalized
value)`` and version n+1 is ``HMAC(k(n+1), version n)``. So a rotation moves each stored index to
the new version with the new key alone — rows that keep only the index (suppressions of
addresses no longer held, source references, name tokens) included, with no plaintext.

One transaction per organization (``rotate_index_key``):

1. take the organization's index lock exclusively (``crypto.index_lock``, a PostgreSQL
   transaction-level advisory lock; every transaction that computes or copies an index holds it
   shared through ``Keyring.index_version``, so the rotation waits for them to commit, and they
   wait for the rotation); on SQLite the transaction's ``BEGIN IMMEDIATE`` holds the single
   writer lock;
2. add index-key version n+1;
3. rewrite every index column of the organization (``INDEX_COLUMNS``): on PostgreSQL in
   batches (read id and index by keyset pages, compute the next link in Python, one
   ``UPDATE ... FROM (VALUES ...)`` per page); on SQLite with one ``UPDATE`` per column through a function registered on the
   connection (``carepost_chain_index``), which computes the same link;
4. record the rotation (a callback writes the audit event in the same transaction) and commit.

Look-ups between tables (a suppression against a recipient's address index, a contact's email
index against an authorization's subject index) never see two versions: every row moves at the
commit. An interrupted rotation rolls back whole: the organization stays at version n; running
it again starts over. Older index keys stay: they are links of the chain every look-up computes
(see docs/keys.md, "Rotating blind-index keys"); no row holds an index under them any more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import String, Table, func, select, update, values
from sqlalchemy import column as sa_column
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import INDEX_VERSIONS_INFO, OrgKey, chain_index, get_keyring, index_lock
from carepost.core.database import Base

# Every column that holds an organization's blind index (keyed with its ``index`` key). A test
# compares this with the models (every text column named ``*_index``, ``blind_index`` or a
# 64-character ``*_key``), so a new one cannot be forgotten.
INDEX_COLUMNS: tuple[tuple[str, str], ...] = (
    ("contact_identifiers", "blind_index"),  # email, phone, identifiers (MRN ...), source refs, name tokens
    ("suppressions", "address_index"),
    ("authorizations", "subject_index"),
    ("recipient_keys", "address_index"),
    ("message_recipients", "address_index"),
    ("message_recipients", "domain_index"),
    ("portal_messages", "address_index"),
    # clinical facts: ``source_key`` is the blind index of the source resource (``Condition/abc``)
    ("appointments", "source_key"),
    ("care_plans", "source_key"),
    ("conditions", "source_key"),
    ("coverages", "source_key"),
    ("encounters", "source_key"),
    ("immunizations", "source_key"),
    ("medications", "source_key"),
    ("observations", "source_key"),
    ("procedures", "source_key"),
)
# ``*_index`` columns that are not organization blind indexes: the MTA-STS policy cache is
# installation-wide and keyed with its own ``mtasts`` secret.
NOT_ORG_INDEXES: frozenset[tuple[str, str]] = frozenset({("mta_sts_policies", "domain_index")})
BATCH = 1000


@dataclass
class OrgReindex:
    org_id: str
    old_version: int
    new_version: int
    rows: dict[str, int] = field(default_factory=dict)  # "table.column" -> rows re-indexed
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def as_dict(self) -> dict:
        return {"old_version": self.old_version, "new_version": self.new_version,
                "reindexed_count": self.total, **{f"{k}_count": v for k, v in self.rows.items()}}


@dataclass
class IndexRotationReport:
    rotated: list[OrgReindex] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # org id, why


def index_columns() -> list[tuple[Table, str]]:
    """The tables and columns of ``INDEX_COLUMNS`` (the models must be loaded)."""
    tables = Base.metadata.tables
    return [(tables[t], c) for t, c in INDEX_COLUMNS]


def organizations_with_index_keys(session: Session) -> list[str]:
    """Organizations holding an index key (the installation's own ``system`` keys index nothing)."""
    orgs = Base.metadata.tables["organizations"]
    return sorted(set(session.scalars(select(OrgKey.org_id).where(
        OrgKey.kind == "index", OrgKey.org_id.in_(select(orgs.c.id)))).all()))


def _lock_for_rotation(session: Session, org_id: str) -> int:
    """Take the organization's index lock exclusively; the current version, read after it."""
    index_lock(session, org_id, exclusive=True)
    version = session.scalar(select(func.max(OrgKey.version)).where(OrgKey.org_id == org_id, OrgKey.kind == "index"))
    if version is None:
        raise LookupError(f"organization {org_id} has no index key")
    return version


def _move_columns(session: Session, org_id: str, key: bytes, result: OrgReindex, batch: int, *, set_based: bool) -> None:
    """Replace every index of the organization by its next link under ``key``."""
    for table, column in index_columns():
        col = table.c[column]
        # not an edit of the row: ``updated_at`` (and its onupdate default) stays as it was
        keep = {c.name: c for c in table.c if c.onupdate is not None and c.name != column}
        if set_based:
            result.rows[f"{table.name}.{column}"] = session.execute(
                update(table).where(table.c.org_id == org_id, col.is_not(None))
                .values({column: func.carepost_chain_index(col), **keep}).execution_options(synchronize_session=False)
            ).rowcount
            continue
        last = ""
        count = 0
        while True:
            rows = session.execute(
                select(table.c.id, col).where(table.c.org_id == org_id, col.is_not(None), table.c.id > last)
                .order_by(table.c.id).limit(batch)
            ).all()
            if not rows:
                break
            last = rows[-1][0]
            moved = values(sa_column("rid", String), sa_column("new", String), name="moved").data(
                [(rid, chain_index(key, value)) for rid, value in rows])
            session.execute(update(table).where(table.c.id == moved.c.rid).values({column: moved.c.new, **keep})
                            .execution_options(synchronize_session=False))
            count += len(rows)
        result.rows[f"{table.name}.{column}"] = count


def reindex_organization(session: Session, org_id: str, *, batch: int = BATCH,
                         on_done: Callable[[Session, OrgReindex], None] | None = None) -> OrgReindex:
    """Steps 1-4 of the module docstring in ``session`` (a system-scoped session); commits."""
    t0 = time.perf_counter()
    ring = get_keyring()
    old = _lock_for_rotation(session, org_id)
    new = ring.add_version(session, org_id, "index")
    key = ring.index_key(session, org_id, new)
    result = OrgReindex(org_id=org_id, old_version=old, new_version=new)
    sqlite = session.get_bind().dialect.name == "sqlite"
    raw = session.connection().connection.driver_connection if sqlite else None
    if raw is not None:  # set-based: the next link computed by a function registered on this connection
        raw.create_function("carepost_chain_index", 1, lambda value: None if value is None else chain_index(key, value))
    try:
        _move_columns(session, org_id, key, result, batch, set_based=raw is not None)
    finally:
        if raw is not None:  # the pooled connection must not keep the key
            raw.create_function("carepost_chain_index", 1, None)
    # This transaction holds the new version from here on (its own look-ups compute with it).
    session.info.setdefault(INDEX_VERSIONS_INFO, {})[org_id] = (new, session.get_transaction())
    result.seconds = time.perf_counter() - t0
    if on_done is not None:
        on_done(session, result)
    session.commit()
    ring.forget_current_versions()
    return result


def rotate_index_keys(session_factory, org_ids: list[str] | None = None, *, batch: int = BATCH,
                      skip_rotated_since: datetime | None = None,
                      on_done: Callable[[Session, OrgReindex], None] | None = None) -> IndexRotationReport:
    """Rotate the blind-index key of every organization (or of ``org_ids``), one transaction
    each. ``skip_rotated_since`` resumes an interrupted run: organizations whose current index
    version was created after that moment are left alone."""
    report = IndexRotationReport()
    with session_factory() as session:
        session.info["scope"] = "system"
        known = organizations_with_index_keys(session)
        current = {o: (v, c) for o, v, c in session.execute(
            select(OrgKey.org_id, OrgKey.version, OrgKey.created_at).where(OrgKey.kind == "index")
            .order_by(OrgKey.org_id, OrgKey.version)).all()}
    targets = known if org_ids is None else list(dict.fromkeys(org_ids))
    for org_id in targets:
        if org_id not in known:
            report.skipped.append((org_id, "no index key"))
            continue
        version, created = current[org_id]
        if skip_rotated_since is not None and version > 1:
            created = created if created.tzinfo else created.replace(tzinfo=skip_rotated_since.tzinfo)
            if created >= skip_rotated_since:
                report.skipped.append((org_id, f"already rotated (version {version})"))
                continue
        with session_factory() as session:
            session.info["scope"] = "system"
            report.rotated.append(reindex_organization(session, org_id, batch=batch, on_done=on_done))
    return report


def resume_since(hours: float = 24) -> datetime:
    return clock.now() - timedelta(hours=hours)


# Where an index copied from one row to another comes from (a message recipient, a contact's
# e-mail identifier, another suppression).
COPY_SOURCES: tuple[tuple[str, str], ...] = (
    ("message_recipients", "address_index"),
    ("contact_identifiers", "blind_index"),
    ("suppressions", "address_index"),
)


def _in_use(session: Session, org_id: str, index: str, sources) -> bool:
    tables = Base.metadata.tables
    for name, column in sources:
        table = tables[name]
        if session.execute(select(table.c.id).where(table.c.org_id == org_id, table.c[column] == index).limit(1)).first():
            return True
    return False


def current_copy(session: Session, org_id: str, index: str, sources=COPY_SOURCES) -> str:
    """An index a caller read from a row and now writes into another (a suppression by index),
    at the organization's current version. The version is locked first (``index_version``); if a
    rotation committed between the caller's read and that lock, the copy is one link behind:
    it then matches no row, while its next link does — return that. Otherwise unchanged."""
    ring = get_keyring()
    version = ring.index_version(session, org_id)
    with session.no_autoflush:
        if version < 2 or _in_use(session, org_id, index, sources):
            return index
        advanced = chain_index(ring.index_key(session, org_id, version), index)
        return advanced if _in_use(session, org_id, advanced, sources) else index
