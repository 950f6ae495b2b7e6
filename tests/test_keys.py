"""``carepost keys rotate`` (master key) and ``carepost keys rekey-database`` (SQLCipher file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from carepost.core.config import Settings
from carepost.core.crypto import sqlcipher_raw_key
from tests.test_cli import ROOT, cli, fresh_env


def own_settings(data) -> Settings:
    """Settings of ``data`` alone, whatever the shared test storage put in the environment."""
    return Settings(data_dir=data, database_url=None, queue_url=None, redis_url=None, master_key=None, master_key_file=None)


# --------------------------------------------------------------------------- master key rotation


def test_rotate_rewraps_keys_and_old_ciphertexts_still_decrypt(storage, session, org):
    from carepost import cli as carepost_cli
    from carepost.audit.models import AuditEvent
    from carepost.core.crypto import Keyring, OrgKey, get_keyring, read_master_key_file

    ring = get_keyring()
    old_id = ring.current_master_id
    blob = ring.encrypt(session, org.id, "contacts", "email", "row1", "jane@example.org")
    index_before = ring.blind_index(session, org.id, "email", "Jane@Example.org")
    session.commit()

    result = CliRunner().invoke(carepost_cli.app, ["keys", "rotate"])
    assert result.exit_code == 0, result.output
    key_file = storage.data_dir / "master.key"
    new_id = read_master_key_file(key_file).id
    assert new_id != old_id
    assert old_id in result.output and new_id in result.output
    assert "Re-wrapped" in result.output
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not (storage.data_dir / "master.key.new").exists()

    session.rollback()
    fresh = get_keyring()
    assert fresh is not ring and fresh.current_master_id == new_id
    assert fresh.decrypt_text(session, org.id, "contacts", "email", "row1", blob) == "jane@example.org"
    new_blob = fresh.encrypt(session, org.id, "contacts", "email", "row2", "x")
    assert Keyring.key_version_of(blob) == 1 and Keyring.key_version_of(new_blob) == 2
    assert fresh.blind_index(session, org.id, "email", "jane@example.org") == index_before  # look-ups keep working
    assert {k.master_key_id for k in session.scalars(select(OrgKey))} == {new_id}

    [event] = session.scalars(select(AuditEvent).where(AuditEvent.action == "keys.master_rotated")).all()
    assert event.actor_type == "system" and event.target_id == new_id
    assert event.details["old_key_id"] == old_id and event.details["new_key_id"] == new_id
    assert event.details["rewrapped_count"] >= 3  # the org's data and index keys and the system keys
    if storage.backend == "sqlite":
        # The database secret is re-wrapped too; the file still opens.
        wrapped = json.loads((storage.data_dir / "database.key").read_text())
        assert wrapped["mk"] == new_id


def test_rotate_refuses_a_master_key_from_the_environment(tmp_path):
    import base64
    import secrets

    key = "mk-env:" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = fresh_env(tmp_path / "data", CAREPOST_MASTER_KEY=key)
    assert cli(env, "init").returncode == 0
    result = cli(env, "keys", "rotate")
    assert result.returncode == 1
    assert "CAREPOST_MASTER_KEY" in result.stderr and "rotate it where it is stored" in result.stderr
    assert key.split(":")[1] not in result.stdout + result.stderr


# --------------------------------------------------------------------------- database re-key


@pytest.fixture
def embedded(tmp_path):
    data = tmp_path / "data"
    env = fresh_env(data)
    assert cli(env, "init").returncode == 0
    created = cli(env, "org", "create", "Bar Clinic")
    assert created.returncode == 0, created.stderr
    return data, env


def test_rekey_database_changes_the_file_key(embedded):
    from carepost.core.rekey import opens_with

    data, env = embedded
    settings = own_settings(data)
    old_raw = sqlcipher_raw_key(settings)

    result = cli(env, "keys", "rekey-database")
    assert result.returncode == 0, result.stderr
    assert "Re-keyed" in result.stdout

    new_raw = sqlcipher_raw_key(settings)
    assert new_raw != old_raw
    db = data / "carepost.db"
    assert opens_with(db, new_raw)
    assert not opens_with(db, old_raw)
    assert (data / "database.key").stat().st_mode & 0o777 == 0o600
    assert not (data / "database.key.new").exists()
    # Everything is still there and CarePost opens it with the new key.
    listed = cli(env, "org", "list")
    assert listed.returncode == 0 and "bar-clinic" in listed.stdout
    assert cli(env, "doctor").returncode == 0


def test_rekey_refuses_while_a_worker_is_running(embedded, tmp_path):
    from carepost.core.rekey import opens_with
    from carepost.core.supervisor import data_dir_in_use

    data, env = embedded
    settings = own_settings(data)
    old_raw = sqlcipher_raw_key(settings)
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "carepost.cli", "worker"], env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not data_dir_in_use(settings) and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
        result = cli(env, "keys", "rekey-database")
        assert result.returncode == 1
        assert "stop it first" in result.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        log.close()
    assert opens_with(data / "carepost.db", old_raw)
    assert not (data / "database.key.new").exists()


def test_rekey_refuses_while_another_program_has_the_file_open(embedded):
    import sqlcipher3

    from carepost.core.rekey import RekeyError, opens_with, rekey_database

    data, _ = embedded
    settings = own_settings(data)
    old_raw = sqlcipher_raw_key(settings)
    other = sqlcipher3.dbapi2.connect(str(data / "carepost.db"))
    other.isolation_level = None
    other.execute(f"PRAGMA key = \"x'{old_raw.hex()}'\"")
    other.execute("BEGIN")
    other.execute("SELECT count(*) FROM organizations").fetchone()  # holds a read lock
    try:
        with pytest.raises(RekeyError, match="stop it first"):
            rekey_database(settings)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert opens_with(data / "carepost.db", old_raw)
    assert not (data / "database.key.new").exists()


def test_an_interrupted_rekey_is_finished_by_the_next_run(embedded, monkeypatch):
    from carepost.core import rekey
    from carepost.core.rekey import opens_with, rekey_database

    data, env = embedded
    settings = own_settings(data)
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("database.key"):
            raise OSError("power lost")
        return real_replace(src, dst)

    monkeypatch.setattr(rekey.os, "replace", crash)
    with pytest.raises(OSError, match="power lost"):
        rekey_database(settings)
    monkeypatch.setattr(rekey.os, "replace", real_replace)
    # The file is under the new key, the key file still holds the old one.
    assert not opens_with(data / "carepost.db", sqlcipher_raw_key(settings))
    assert (data / "database.key.new").exists()

    result = rekey_database(settings)
    assert result.recovered
    assert opens_with(data / "carepost.db", sqlcipher_raw_key(settings))
    assert not (data / "database.key.new").exists()
    assert "bar-clinic" in cli(env, "org", "list").stdout


def test_a_rekey_that_never_started_is_restarted(embedded):
    from carepost.core.crypto import load_master_keys, wrap
    from carepost.core.rekey import opens_with, pending_key_file, rekey_database

    data, _ = embedded
    settings = own_settings(data)
    current, masters = load_master_keys(settings)
    pending_key_file(settings).write_text(json.dumps(wrap(masters[current], os.urandom(32), "database")))
    result = rekey_database(settings)
    assert not result.recovered and result.pages > 0
    assert opens_with(data / "carepost.db", sqlcipher_raw_key(settings))


def test_rekey_is_for_the_embedded_database_only(tmp_path):
    from carepost.core.rekey import RekeyError, rekey_database

    settings = Settings(data_dir=tmp_path, database_url="postgresql://db.internal/carepost")
    with pytest.raises(RekeyError, match="embedded SQLCipher"):
        rekey_database(settings)
