"""Shared fixtures: every database test runs on SQLCipher and on PostgreSQL.

* ``storage`` (session scope, parametrized): a data dir, master key and migrated database for
  one backend. PostgreSQL runs when ``CAREPOST_TEST_DATABASE_URL`` is set (CI sets it); each
  xdist worker gets a database of its own.
* ``db``: a clean database for one test (tables emptied, key caches dropped, clock reset).
* ``app``: the FastAPI app, built once and reused while the settings stay the same.
* ``client``: a FastAPI TestClient on the app.
* ``live_server``: ``carepost serve`` as a real subprocess for Playwright (tests/fixtures/ui.py).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.accounts", "tests.fixtures.ui", "tests.fixtures.delivery"]

BACKENDS = ["sqlite", "postgresql"]
_ENV_KEYS = ("CAREPOST_DATA_DIR", "CAREPOST_DATABASE_URL", "CAREPOST_QUEUE_URL", "CAREPOST_REDIS_URL", "CAREPOST_MASTER_KEY")


@dataclass
class Storage:
    backend: str
    data_dir: Path
    env: dict


def _pg_admin_url() -> str | None:
    return os.environ.get("CAREPOST_TEST_DATABASE_URL")


def create_pg_database(prefix: str = "carepost_test") -> str:
    """A fresh PostgreSQL database; returns its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(_pg_admin_url())
    name = f"{prefix}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{uuid.uuid4().hex[:8]}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        # The suite's shared server is never crashed (tests/faults restarts a private one), so a
        # commit need not wait for its WAL to reach the disk (about 5 ms each here): nothing a
        # test can observe changes, and a server crash would only lose this throwaway database.
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    return admin.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    target = make_url(url).database
    admin = make_url(_pg_admin_url()).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')


def close_engagement_journal() -> None:
    """Let go of this process's /t/ journal (tracking.engagement): it is process-wide, tied to
    the data dir, keys and database it was opened with. Left open, the next test's requests were
    journaled under the previous database's keys (503, KeyUnavailable) and another backend's
    journal was ingested into this one's database."""
    from carepost.tracking.engagement import recorder

    recorder().stop(timeout=2.0)  # drained into the database it belongs to, if it can be
    recorder().reset()


def apply_env(env: dict) -> None:
    from carepost.core.config import reset_settings
    from carepost.core.crypto import reset_keyring
    from carepost.core.database import dispose_engine

    close_engagement_journal()
    for key in _ENV_KEYS:
        os.environ.pop(key, None)
    os.environ.update(env)
    reset_settings()
    reset_keyring()
    dispose_engine()


def pytest_configure(config):
    """Write CarePost's bytecode once, before any test starts a process. Where
    ``PYTHONDONTWRITEBYTECODE`` is set (as on the development machines) nothing else writes it, and
    every ``carepost`` subprocess of the suite — workers, servers, CLI commands, hundreds of them —
    compiled its few hundred modules from source again: 0.3–0.5 s of CPU each
    (docs/performance.md, "Process start-up"). A ``.pyc`` older than its source is not used (the
    import system checks the source's time stamp and size), so an edit during the run costs only
    the compile it would have cost anyway. The xdist controller compiles; its workers find it done."""
    if hasattr(config, "workerinput"):
        return
    _temporary_files_in_memory()
    import compileall

    import carepost

    compileall.compile_dir(Path(carepost.__file__).parent, quiet=2)


def _temporary_files_in_memory() -> None:
    """pytest's temporary directories (every test's data dir: SQLCipher files, audit checkpoints,
    queues, the live servers' data) on tmpfs ``/dev/shm`` when it has room. CarePost fsyncs what
    must survive a crash (each audited request's checkpoint file, SQLite's WAL checkpoints), about
    5 ms each on this machine's disk and nothing on tmpfs; no test crashes the machine, so no test
    sees a difference. Not when ``--basetemp`` or ``PYTEST_DEBUG_TEMPROOT`` chooses the place;
    pytest keeps its usual three last runs there. xdist's workers get directories below the one
    the controller chose."""
    if os.environ.get("PYTEST_DEBUG_TEMPROOT"):
        return
    shm = Path("/dev/shm")
    try:
        free = os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize
    except OSError:
        return
    if free >= 4 << 30 and os.access(shm, os.W_OK | os.X_OK):
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(shm)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Files holding a test marked ``slow`` run first (pytest-xdist deals whole files out in this
    order with ``--dist loadfile``): the long ones overlap the many short ones instead of trailing
    alone at the end. The sort is stable, so the order within a file is pytest's own."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items[:] = sorted(items, key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def _storage_pool():
    """Each backend's storage, made once per process and kept until the session ends. pytest
    finalizes a parametrized session fixture whenever the next test has the other parameter; with
    ``--dist loadfile`` that happens at nearly every file (a file's SQLite and PostgreSQL tests run
    in one process), and making a new database each time cost about a second per file."""
    pool: dict[str, tuple[Storage, str | None]] = {}
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    yield pool
    from carepost.core.database import dispose_engine

    dispose_engine()
    for _, url in pool.values():
        if url:
            drop_pg_database(url)
    apply_env({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="session", params=BACKENDS)
def storage(request, tmp_path_factory, _storage_pool):
    backend = request.param
    if backend == "postgresql" and not _pg_admin_url():
        pytest.skip("PostgreSQL tests need CAREPOST_TEST_DATABASE_URL")
    if backend in _storage_pool:
        made, _ = _storage_pool[backend]
        apply_env(made.env)  # back to this backend: settings, key caches and engine follow it
        yield made
        return
    data_dir = tmp_path_factory.mktemp(f"data-{backend}")
    env = {"CAREPOST_DATA_DIR": str(data_dir), "CAREPOST_LOG_JSON": "true"}
    url = None
    if backend == "postgresql":
        url = create_pg_database()
        env["CAREPOST_DATABASE_URL"] = url
    apply_env(env)
    from carepost.assembly import assemble
    from carepost.core.bootstrap import initialize_storage

    assemble()  # the one composition root, as every entry point

    initialize_storage()
    made = Storage(backend, data_dir, env)
    _storage_pool[backend] = (made, url)
    yield made


def empty_database() -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from carepost.core.bootstrap import SYSTEM_KEY_OWNER
    from carepost.core.config import get_settings
    from carepost.core.crypto import get_keyring, reset_keyring
    from carepost.core.database import Base, get_engine, system_session
    from carepost.models import load_all_models

    load_all_models()
    # Checkpoints of the previous test's chains would no longer match the emptied database, nor
    # would the /t/ journal (its keys and mark are rows deleted here).
    shutil.rmtree(get_settings().data_dir / "audit" / "checkpoints", ignore_errors=True)
    close_engagement_journal()
    from carepost.tracking import engagement_journal

    shutil.rmtree(engagement_journal.root_of(get_settings().data_dir), ignore_errors=True)
    engine = get_engine()
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # DELETE, children first, in one round trip: a test leaves a few rows, and TRUNCATE
            # would give every table and index of the schema a new file (over a second per test).
            # Should an order between tables ever not hold, TRUNCATE ... CASCADE still empties all.
            try:
                with conn.begin_nested():
                    conn.exec_driver_sql("; ".join(f'DELETE FROM "{t}"' for t in tables))
            except IntegrityError:
                conn.execute(text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE"))
        else:
            for t in tables:
                conn.execute(text(f'DELETE FROM "{t}"'))
    reset_keyring()
    with system_session() as session:
        get_keyring().ensure_org_keys(session, SYSTEM_KEY_OWNER)
        session.commit()


def read_elsewhere(path: Path) -> bytes:
    """The bytes of a file of the open embedded database, read by another process. Opening and
    closing it here would drop every POSIX lock this process holds on it (SQLite's locks), and a
    server closing its connection could then delete the WAL this process still uses."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())",
                           str(path)], check=True, capture_output=True, timeout=120).stdout


@pytest.fixture
def db(storage):
    from carepost.core import clock

    clock.reset()
    empty_database()
    yield storage
    clock.reset()


@pytest.fixture
def session(db):
    """A system-scoped session (cross-organization), for arranging and asserting.

    On SQLite it begins DEFERRED, so merely reading never holds the write lock while the app
    under test works; commit what you arrange before calling the app."""
    from carepost.core.database import read_only_session

    with read_only_session() as s:
        yield s


# Building the app (about 360 routes: FastAPI makes a pydantic field for every parameter) costs
# 0.3-0.5 s of CPU, and over half the tests ask for one. The app keeps no per-request state of
# its own (sessions, keys, rate limits and audit live in the database and module caches, which
# ``db`` resets), so one app is reused for as long as the settings it was built from are the
# same; a test that changes a CAREPOST_* setting gets an app of its own, as before.
_APPS: dict[tuple, object] = {}
_APPS_KEPT = 4


def _settings_key(backend: str) -> tuple:
    from carepost.core.config import get_settings

    settings = get_settings()
    values = {name: getattr(settings, name) for name in type(settings).model_fields}
    values = {k: (v.get_secret_value() if hasattr(v, "get_secret_value") else v) for k, v in values.items()}
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("CAREPOST_"))
    return backend, repr(sorted(values.items())), tuple(env)


@pytest.fixture
def app(db):
    from carepost.app import create_app
    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    key = _settings_key(db.backend)
    built = _APPS.pop(key, None)
    if built is None:
        built = create_app()
    else:
        settings = get_settings()
        configure_logging(settings.log_level, settings.log_json)  # as create_app does
    _APPS[key] = built  # most recently used last
    while len(_APPS) > _APPS_KEPT:
        _APPS.pop(next(iter(_APPS)))
    return built


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://localhost:8000") as c:
        yield c


@pytest.fixture(autouse=True)
def _fresh_logging():
    """In-process CLI runs bind logging to a stream that closes afterwards; start each test clean."""
    from carepost.core.logging import configure_logging

    configure_logging("INFO", True)
    yield
