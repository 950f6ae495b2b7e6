"""``carepost doctor``: one test per finding, and the exit code of the command."""

from __future__ import annotations

import os
import uuid

import pytest

from carepost.core.config import Settings
from carepost.doctor import (
    check_base_url,
    check_connection_urls,
    check_data_dir,
    check_database_encryption,
    check_database_maintenance,
    check_database_tls,
    check_master_key,
    check_mfa,
    check_migrations,
    check_queue,
    evaluate_autovacuum,
    evaluate_database_tls,
    is_loopback_host,
    run_checks,
    worst,
)
from tests.test_cli import cli, fresh_env


def levels(findings) -> list[str]:
    return [f.level for f in findings]


@pytest.fixture(scope="module")
def initialized(tmp_path_factory):
    """An embedded data dir made by `carepost init` (separate from the shared test database)."""
    data = tmp_path_factory.mktemp("doctor") / "data"
    env = fresh_env(data)
    result = cli(env, "init")
    assert result.returncode == 0, result.stderr
    return data, env


def settings_for(data, **kw) -> Settings:
    """Settings of ``data`` alone, whatever the shared test storage put in the environment."""
    base = {
        "data_dir": data, "queue_name": "t" + uuid.uuid4().hex[:12], "database_url": None, "queue_url": None,
        "redis_url": None, "master_key": None, "master_key_file": None, "base_url": "http://localhost:8000",
        "smtp_relay": None, "extra_ca_file": None,
    }
    return Settings(**{**base, **kw})


# --------------------------------------------------------------------------- master key and data dir


def test_master_key_file_0600_is_ok(initialized):
    data, _ = initialized
    findings = check_master_key(settings_for(data))
    assert [f.level for f in findings if f.check == "master key"] == ["ok"]
    # Beside the data on a local trial: told, not warned (tests/test_security_keys.py covers production).
    assert [f.level for f in findings if f.check == "master key location"] == ["info"]


def test_master_key_readable_by_others_fails(tmp_path):
    from carepost.core.crypto import generate_master_key, write_master_key_file

    path = tmp_path / "master.key"
    write_master_key_file(path, generate_master_key())
    os.chmod(path, 0o644)
    [finding] = check_master_key(settings_for(tmp_path))
    assert finding.level == "fail" and "0644" in finding.message and "0600" in finding.message


def test_missing_master_key_fails(tmp_path):
    [finding] = check_master_key(settings_for(tmp_path))
    assert finding.level == "fail" and "carepost init" in finding.message


def test_master_key_from_environment_warns_where_it_is_stored(tmp_path):
    [finding] = check_master_key(settings_for(tmp_path, master_key="mk-1:" + "A" * 43 + "="))
    assert finding.level == "warn" and "Where is it stored" in finding.message


def test_interrupted_rotation_warns(tmp_path):
    from carepost.core.crypto import generate_master_key, write_master_key_file

    write_master_key_file(tmp_path / "master.key", generate_master_key())
    write_master_key_file(tmp_path / "master.key.new", generate_master_key())
    findings = [f for f in check_master_key(settings_for(tmp_path)) if f.check == "master key"]
    assert levels(findings) == ["ok", "warn"]


@pytest.mark.parametrize(("mode", "level"), [(0o700, "ok"), (0o750, "warn"), (0o755, "fail"), (0o777, "fail")])
def test_data_dir_permissions(tmp_path, mode, level):
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(d, mode)
    [finding] = check_data_dir(settings_for(d))
    assert finding.level == level


# --------------------------------------------------------------------------- database


def test_embedded_database_is_proven_encrypted(initialized):
    data, _ = initialized
    findings = check_database_encryption(settings_for(data))
    assert levels(findings) == ["ok"]
    assert "SQLCipher" in findings[0].message and "plain SQLite cannot read it" in findings[0].message


def test_plain_sqlite_database_fails(tmp_path):
    import sqlite3

    from carepost.core.crypto import create_database_secret, generate_master_key, write_master_key_file

    master = generate_master_key()
    write_master_key_file(tmp_path / "master.key", master)
    settings = settings_for(tmp_path)
    create_database_secret(settings, {master.id: master}, master.id)
    with sqlite3.connect(tmp_path / "carepost.db") as conn:  # an unencrypted file where the database belongs
        conn.execute("CREATE TABLE t (x)")
    [finding] = check_database_encryption(settings)
    assert finding.level == "fail"


def test_the_check_keeps_the_processs_locks_on_the_open_database(db):
    """The evidence pack runs this check inside the server, which holds the database open. The
    check must not close a descriptor of the file through a second SQLite library: POSIX locks are
    per process, so that would drop the server's, and another process closing its connection would
    then take itself for the last one, checkpoint and delete the WAL the server still writes to."""
    import subprocess
    import sys

    from sqlalchemy import text

    from carepost.core.config import get_settings
    from carepost.core.database import get_engine
    from carepost.core.masterkeys import sqlcipher_raw_key

    if db.backend != "sqlite":
        pytest.skip("the embedded database")
    settings = get_settings()
    with get_engine().connect() as held:  # this process keeps the database open, as a server does
        held.execute(text("SELECT count(*) FROM organizations")).scalar()
        held.commit()
        wal = settings.sqlite_path.with_name("carepost.db-wal")
        assert wal.exists()
        assert levels(check_database_encryption(settings))[-1] == "ok"
        other = ("import sqlcipher3, sys; c = sqlcipher3.dbapi2.connect(sys.argv[1]); "
                 "c.execute(\"PRAGMA key = \\\"x'\" + sys.argv[2] + \"'\\\"\"); "
                 "c.execute('SELECT count(*) FROM sqlite_master').fetchone(); c.close()")
        subprocess.run([sys.executable, "-c", other, str(settings.sqlite_path), sqlcipher_raw_key(settings).hex()],
                       check=True, timeout=60)
        assert wal.exists(), "another process deleted the WAL: this process had lost its locks"


def test_database_key_file_permissions_are_checked(initialized, tmp_path):
    import shutil

    data, _ = initialized
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    os.chmod(copy / "database.key", 0o644)
    findings = check_database_encryption(settings_for(copy))
    assert "fail" in levels(findings)
    assert any("database.key" in f.message for f in findings)


@pytest.fixture
def postgresql_settings(tmp_path):
    url = os.environ.get("CAREPOST_TEST_DATABASE_URL")
    if not url:
        pytest.skip("PostgreSQL tests need CAREPOST_TEST_DATABASE_URL")
    return settings_for(tmp_path, database_url=url)


def test_postgresql_says_disk_encryption_cannot_be_verified(postgresql_settings):
    [finding] = check_database_encryption(postgresql_settings)
    assert finding.level == "warn"
    assert "can't be verified from here" in finding.message


def test_postgresql_tls_on_loopback_is_ok(postgresql_settings):
    [finding] = check_database_tls(postgresql_settings)
    assert finding.level == "ok"
    assert "server ssl=" in finding.message and "Loopback" in finding.message


def test_postgresql_autovacuum_is_read_from_the_server(postgresql_settings):
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(os.environ["CAREPOST_TEST_DATABASE_URL"]).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        server = conn.execute("SHOW autovacuum").fetchone()[0]
    [finding] = check_database_maintenance(postgresql_settings)
    assert finding.level == ("ok" if server == "on" else "warn")
    assert f"autovacuum is {server}" in finding.message


@pytest.mark.parametrize(("value", "level"), [("on", "ok"), ("off", "warn")])
def test_autovacuum_off_is_a_warning_naming_what_slows(value, level):
    [finding] = evaluate_autovacuum(value)
    assert finding.level == level and finding.check == "database maintenance"
    if value == "off":
        assert "VACUUM" in finding.message and "postgresql.conf" in finding.message


def test_sqlite_has_no_autovacuum_to_check(initialized):
    data, _ = initialized
    assert levels(check_database_maintenance(settings_for(data))) == ["info"]


def test_sqlite_has_no_database_connection_to_protect(initialized):
    data, _ = initialized
    assert levels(check_database_tls(settings_for(data))) == ["info"]


@pytest.mark.parametrize(
    ("host", "sslmode", "in_use", "level"),
    [
        ("db.internal", "", False, "fail"),
        ("db.internal", "prefer", True, "fail"),  # TLS happened, but nothing requires it
        ("db.internal", "require", True, "warn"),  # encrypted, certificate not verified
        ("db.internal", "verify-full", True, "ok"),
        ("127.0.0.1", "", False, "ok"),
        ("/var/run/postgresql", "", False, "ok"),
    ],
)
def test_postgresql_tls_rules(host, sslmode, in_use, level):
    [finding] = evaluate_database_tls(host, sslmode, "on" if in_use else "off", in_use)
    assert finding.level == level


def test_migrations_at_head(initialized):
    data, _ = initialized
    assert levels(check_migrations(settings_for(data))) == ["ok"]


def test_migrations_behind_fail(initialized, tmp_path):
    import shutil

    from sqlalchemy import text

    from carepost.core.database import make_engine

    data, _ = initialized
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    settings = settings_for(copy)
    engine = make_engine(settings)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
    engine.dispose()
    [finding] = check_migrations(settings)
    assert finding.level == "fail" and "carepost init" in finding.message


# --------------------------------------------------------------------------- network, base URL, MFA, queue


@pytest.mark.parametrize(
    ("field", "url", "level"),
    [
        ("queue_url", "redis://10.0.0.5:6379/0", "fail"),
        ("queue_url", "rediss://redis.internal:6380/0", "ok"),
        ("queue_url", "redis://127.0.0.1:6379/0", "ok"),
        ("redis_url", "redis://cache.internal:6379/0", "fail"),
        ("redis_url", "unix:///run/redis.sock", "ok"),
        ("redis_url", "redis://[::1]:6379/0", "ok"),
    ],
)
def test_redis_connections_need_tls_unless_loopback(tmp_path, field, url, level):
    findings = check_connection_urls(settings_for(tmp_path, **{field: url}))
    assert [f.level for f in findings if f.check == f"CAREPOST_{field.upper()}"] == [level]


def test_a_later_smtp_url_setting_is_checked_too(tmp_path):
    """Capabilities add settings ending in _url (SMTP relay): they are checked without changes here."""

    class WithRelay(Settings):
        smtp_relay_url: str | None = None

    def check(url):
        s = WithRelay(**{**settings_for(tmp_path).model_dump(), "smtp_relay_url": url})
        return [f.level for f in check_connection_urls(s) if f.check == "CAREPOST_SMTP_RELAY_URL"]

    assert check("smtp://relay.example.net:25") == ["fail"]
    assert check("smtp://relay.example.net:587?starttls=require") == ["ok"]
    assert check("smtps://relay.example.net:465") == ["ok"]
    assert check("smtp://127.0.0.1:2525") == ["ok"]


@pytest.mark.parametrize(
    ("url", "level"),
    [
        ("https://carepost.clinic.example", "ok"),
        ("http://localhost:8000", "info"),
        ("http://127.0.0.1:8000", "info"),
        ("http://carepost.clinic.example", "fail"),
        ("http://10.1.2.3:8000", "fail"),
    ],
)
def test_base_url_must_be_https_outside_localhost(tmp_path, url, level):
    [finding] = check_base_url(settings_for(tmp_path, base_url=url))
    assert finding.level == level


def test_smtp_relay_is_reported_with_its_tls_requirement(tmp_path):
    from carepost.doctor import check_smtp

    [relay] = check_smtp(settings_for(tmp_path, smtp_relay="smtp.relay.example:587"))
    assert relay.level == "ok" and "smtp.relay.example" in relay.message and "verified TLS" in relay.message
    [direct] = check_smtp(settings_for(tmp_path, smtp_relay=None))
    assert direct.level == "info" and "portal, PGP or S/MIME" in direct.message


def test_mfa_is_reported_enforced(tmp_path):
    [finding] = check_mfa(settings_for(tmp_path))
    assert finding.level == "ok" and "cannot be turned off" in finding.message


def test_sqlite_queue_is_reachable(initialized):
    data, _ = initialized
    [finding] = check_queue(settings_for(data))
    assert finding.level == "ok" and "SQLite" in finding.message


def test_redis_queue_is_reachable():
    from tests.test_worker import redis_test_url

    url = redis_test_url()
    if url is None:
        pytest.skip("Redis not reachable and CAREPOST_TEST_REDIS_URL not set")
    [finding] = check_queue(settings_for(Settings().data_dir, queue_url=url))
    assert finding.level == "ok" and "Redis" in finding.message


def test_unreachable_queue_is_a_failure_not_a_crash(tmp_path):
    findings = run_checks(settings_for(tmp_path, queue_url="redis://127.0.0.1:1/0"))
    [queue] = [f for f in findings if f.check == "task queue"]
    assert queue.level == "fail" and "Could not check" in queue.message


def test_loopback_detection():
    assert is_loopback_host("localhost") and is_loopback_host("127.0.0.2") and is_loopback_host("::1")
    assert is_loopback_host(None) and is_loopback_host("/var/run/postgresql")
    assert not is_loopback_host("10.0.0.1") and not is_loopback_host("db.example.org")


# --------------------------------------------------------------------------- the command


def test_doctor_on_a_fresh_embedded_setup_passes(initialized):
    data, env = initialized
    result = cli(env, "doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("master key", "data dir", "database encryption", "migrations", "MFA", "task queue"):
        assert check in result.stdout
    assert worst(run_checks(settings_for(data))) in ("ok", "info")


def test_doctor_exits_non_zero_on_any_failure(initialized, tmp_path):
    import shutil

    data, env = initialized
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    os.chmod(copy / "master.key", 0o640)
    result = cli({**env, "CAREPOST_DATA_DIR": str(copy), "CAREPOST_BASE_URL": "http://carepost.clinic.example"}, "doctor")
    assert result.returncode == 1
    assert "fail" in result.stdout
    assert "2 check(s) failed" in result.stderr
