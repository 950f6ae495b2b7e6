"""The embedded database is SQLCipher-encrypted; queries are scoped to one organization."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import select

from carepost.accounts.models import ApiCredential, Membership, User
from carepost.core.errors import TenantScopeError
from tests.conftest import read_elsewhere


def test_sqlite_file_is_encrypted(db, session, org):
    if db.backend != "sqlite":
        pytest.skip("SQLCipher file check applies to the embedded database")
    from carepost.core.database import dispose_engine

    session.add(User(email="visible-marker@example.org", display_name="Marker Person"))
    session.commit()
    dispose_engine()  # checkpoint the WAL into the main file
    path = db.data_dir / "carepost.db"
    # Plain SQLite (the standard library's) in another process: a second SQLite library closing the
    # file here would drop this process's locks on it (tests/conftest.py read_elsewhere).
    plain = subprocess.run([sys.executable, "-c", "import sqlite3, sys; "
                            "sqlite3.connect(sys.argv[1]).execute('SELECT * FROM sqlite_master').fetchall()", str(path)],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0 and "file is not a database" in plain.stderr
    for f in db.data_dir.glob("carepost.db*"):
        raw = read_elsewhere(f)
        assert b"visible-marker" not in raw and b"Bar Clinic" not in raw and b"Marker Person" not in raw


def test_sqlite_pragmas(db):
    if db.backend != "sqlite":
        pytest.skip("SQLite only")
    from carepost.core.database import get_engine

    with get_engine().connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert "community" in conn.exec_driver_sql("PRAGMA cipher_version").scalar()


def _cred(org_id, key_id):
    return ApiCredential(org_id=org_id, key_id=key_id, name="k", secret_hash="x", scopes=[])


def test_org_scope_filters_reads_and_writes(db, session, org):
    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session

    other = create_organization(session, "Other Clinic")
    session.add_all([_cred(org.id, "a1"), _cred(other.id, "b1")])
    session.commit()
    with org_session(org.id) as s:
        assert [c.key_id for c in s.scalars(select(ApiCredential))] == ["a1"]
        other_cred_id = session.scalar(select(ApiCredential.id).where(ApiCredential.key_id == "b1"))
        session.rollback()
        assert s.scalars(select(ApiCredential).where(ApiCredential.id == other_cred_id)).first() is None
        assert s.get(ApiCredential, other_cred_id) is None
        # bulk update cannot reach the other organization
        from sqlalchemy import update

        s.execute(update(ApiCredential).values(name="changed"))
        s.commit()
        s.add(_cred(other.id, "b2"))
        with pytest.raises(TenantScopeError):
            s.flush()
    session.rollback()  # end the old read snapshot
    names = {c.key_id: c.name for c in session.scalars(select(ApiCredential))}
    assert names == {"a1": "changed", "b1": "k"}


def test_unscoped_session_refuses_org_tables(db):
    from carepost.core.database import session_factory

    with session_factory()() as s:
        with pytest.raises(TenantScopeError):
            s.scalars(select(Membership)).all()
        # non-organization tables stay readable (users, to authenticate)
        s.scalars(select(User)).all()


def test_migrations_reach_head(db):
    from carepost.core.database import get_engine
    from carepost.core.migrate import current_revision

    assert current_revision(get_engine()) == "0001"
