"""Backup and restore (issue 17 item 5): ``carepost backup`` / ``carepost restore``.

A backup restored into a fresh data dir (with the master key brought in separately) opens, its
audit chains verify against the restored checkpoints, and a stored message body decrypts. On
PostgreSQL the database goes through the documented ``pg_dump`` / ``pg_restore`` procedure
(docs/backup.md) and ``carepost backup`` carries the data dir's files. A backup taken while the
API keeps writing is consistent: its checkpoints never run ahead of its database.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import pytest
from sqlalchemy import select

from tests.conftest import apply_env, create_pg_database, drop_pg_database

pytestmark = pytest.mark.slow  # real `carepost backup` / `restore` processes

PHI = "Your potassium was 5.9 mmol/L; please repeat the test this week."


def _send(client, key, i: int) -> str:
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "Bar Clinic <care@bar.example>", "to": [f"patient{i}@valid.test"],
        "subject": "From your care team", "text": f"Dear patient {i}: {PHI}"})
    assert r.status_code in (200, 201, 202), r.text
    return r.json()["id"]


def _cli(args: list[str], env: dict, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAREPOST_") or k == "CAREPOST_QUEUE_NAME"}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "carepost.cli", *args], env=full, input=stdin,
                          capture_output=True, timeout=300)


def _pg_dump_restore(url: str) -> str:
    """The documented procedure: ``pg_dump -Fc`` of the live database, ``pg_restore`` into a new one."""
    from sqlalchemy.engine import make_url

    src = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    target_url = create_pg_database("carepost_restore")
    target = make_url(target_url).set(drivername="postgresql").render_as_string(hide_password=False)
    dump = subprocess.run(["pg_dump", "-Fc", "--no-owner", "-d", src], capture_output=True, check=True, timeout=300)
    subprocess.run(["pg_restore", "--no-owner", "--exit-on-error", "-d", target], input=dump.stdout,
                   capture_output=True, check=True, timeout=300)
    return target_url


def _check_restored(env: dict, message_id: str, org_id: str) -> int:
    """In the restored environment: the audit log verifies (with the restored checkpoints) and the
    message body decrypts. Returns the number of audit events verified."""
    from carepost.audit.verify import verify
    from carepost.core.crypto import get_keyring
    from carepost.core.database import read_only_session
    from carepost.delivery.models import Message

    apply_env(env)
    with read_only_session() as s:
        report = verify(s, org_id=None)
        assert report.ok, report.to_dict()
        chains = {c.chain: c for c in report.chains}
        assert chains[org_id].events > 0
        assert chains[org_id].checkpoints, "the restored checkpoint was not used"
        row = s.scalars(select(Message).where(Message.id == message_id)).one()
        text = get_keyring().decrypt_text(s, row.org_id, Message.__tablename__, "text", row.id, row.text_enc)
        assert PHI in text
        return sum(c.events for c in report.chains)


def test_backup_restores_into_a_fresh_data_dir(storage, sender, delivery_queue, client, tmp_path):
    key = sender.key()
    message_id = _send(client, key, 1)
    settings_env = dict(storage.env)
    archive = tmp_path / "carepost.backup"

    done = _cli(["backup", str(archive)], settings_env)
    assert done.returncode == 0, done.stderr.decode()
    assert archive.stat().st_mode & 0o077 == 0  # 0600
    blob = archive.read_bytes()
    assert PHI.encode() not in blob and b"patient1@valid.test" not in blob

    # The archive's contents, decrypted: never the master key, never the queue.
    from carepost.core.backup import BackupError, restore_backup
    from carepost.core.config import Settings

    fresh = tmp_path / "restored"
    fresh.mkdir()
    restore_env = {"CAREPOST_DATA_DIR": str(fresh), "CAREPOST_LOG_JSON": "true"}
    pg_copy = None
    if storage.backend == "postgresql":
        pg_copy = _pg_dump_restore(storage.env["CAREPOST_DATABASE_URL"])
        restore_env["CAREPOST_DATABASE_URL"] = pg_copy
    try:
        # Without the master key nothing restores, and the error says what is missing.
        with pytest.raises(BackupError, match="master key"):
            restore_backup(Settings(data_dir=fresh, database_url=restore_env.get("CAREPOST_DATABASE_URL")), archive)
        assert not any(fresh.iterdir())

        shutil.copy2(storage.data_dir / "master.key", fresh / "master.key")  # brought in separately
        started = time.monotonic()
        done = _cli(["restore", str(archive)], restore_env)
        assert done.returncode == 0, done.stderr.decode()
        print(f"restored in {time.monotonic() - started:.2f} s (with process start)")
        restored = {p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file()}
        assert ("database.key" in restored) == (storage.backend == "sqlite")  # SQLCipher's key, wrapped
        assert any(name.startswith("audit/checkpoints/") for name in restored)
        assert ("carepost.db" in restored) == (storage.backend == "sqlite")
        assert "queue.db" not in restored

        # A second restore into the same dir is refused (nothing is overwritten).
        if storage.backend == "sqlite":
            with pytest.raises(BackupError, match="fresh data dir"):
                restore_backup(Settings(data_dir=fresh), archive)

        _check_restored(restore_env, message_id, sender.org_id)
    finally:
        apply_env(settings_env)
        if pg_copy:
            drop_pg_database(pg_copy)


def test_archive_is_authenticated_and_holds_no_master_key(storage, db, tmp_path):
    from carepost.core.backup import (
        BackupError,
        _archive_key,
        _ChunkReader,
        _decrypted_chunks,
        create_backup,
        read_header,
        restore_backup,
    )
    from carepost.core.config import Settings, get_settings
    from carepost.core.masterkeys import load_master_keys

    settings = get_settings()
    archive = tmp_path / "a.backup"
    create_backup(settings, archive)
    current, masters = load_master_keys(settings)
    with open(archive, "rb") as src:
        header, aad = read_header(src)
        assert header["kdf"] == "hkdf-master" and header["mk"] == current
        import io

        key = _archive_key(header, master=masters[current], passphrase=None)
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(_decrypted_chunks(src, key, aad))), mode="r|") as tar:
            names = [m.name for m in tar]
    assert ("database.key" in names) == (storage.backend == "sqlite")
    assert not any(n.startswith("master.key") or n.startswith("queue.db") for n in names), names

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy2(settings.resolved_master_key_file, fresh / "master.key")
    target = Settings(data_dir=fresh, database_url=settings.database_url)

    # One altered byte anywhere past the header: refused, and nothing is moved into the data dir.
    tampered = tmp_path / "t.backup"
    data = bytearray(archive.read_bytes())
    data[len(aad) + 7 + 4 + 100] ^= 1
    tampered.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="does not decrypt|altered"):
        restore_backup(target, tampered)
    # Truncated (the last chunk dropped): refused.
    truncated = tmp_path / "cut.backup"
    truncated.write_bytes(archive.read_bytes()[: len(aad) + 7 + 4 + 50])
    with pytest.raises(BackupError):
        restore_backup(target, truncated)
    assert {p.name for p in fresh.iterdir()} == {"master.key"}

    # A passphrase archive needs the passphrase (and still the master key for the data inside).
    pw = tmp_path / "p.backup"
    create_backup(settings, pw, passphrase=b"correct horse battery staple")
    with pytest.raises(BackupError, match="passphrase"):
        restore_backup(target, pw)
    with pytest.raises(BackupError, match="does not decrypt"):
        restore_backup(target, pw, passphrase=b"wrong horse battery staple")
    result = restore_backup(target, pw, passphrase=b"correct horse battery staple")
    assert ("database.key" in result.files) == (storage.backend == "sqlite")


def test_backup_while_writes_continue_is_consistent(storage, sender, delivery_queue, client, tmp_path):
    """Writers keep appending messages and audit events (each API call audits) while the backup
    runs; the restored copy passes the integrity checks and its audit chains verify against its own
    checkpoints (a checkpoint copied after the snapshot would name events the copy lacks)."""
    from carepost.core.backup import create_backup, restore_backup
    from carepost.core.config import Settings, get_settings

    key = sender.key()
    first = _send(client, key, 0)
    for i in range(1, 40):
        _send(client, key, i)

    stop = threading.Event()
    written: list[tuple[float, str]] = []
    errors: list[BaseException] = []

    def writer():
        i = 1000
        while not stop.is_set():
            try:
                written.append((time.monotonic(), _send(client, key, i)))
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)
                return
            i += 1

    settings = get_settings()
    pg_copies: list[str] = []
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 5:
            time.sleep(0.01)
        backups = []
        for n in range(3):  # several backups, each taken while the writer runs
            t0 = time.monotonic()
            archive = tmp_path / f"live-{n}.backup"
            create_backup(settings, archive)
            # PostgreSQL, as docs/backup.md says: `carepost backup` first, then pg_dump (the
            # checkpoints it copied are then never ahead of the dump).
            copy = _pg_dump_restore(storage.env["CAREPOST_DATABASE_URL"]) if storage.backend == "postgresql" else None
            if copy:
                pg_copies.append(copy)
            backups.append((archive, copy, t0, time.monotonic()))
    finally:
        stop.set()
        thread.join(60)
    settings_env = dict(storage.env)
    try:
        assert not errors, errors
        during = [w for w in written if backups[0][2] <= w[0] <= backups[-1][3]]
        assert during, "no write happened while the backups ran"
        for n, (archive, copy, _t0, _t1) in enumerate(backups):
            fresh = tmp_path / f"restored-{n}"
            fresh.mkdir()
            shutil.copy2(storage.data_dir / "master.key", fresh / "master.key")
            env = {"CAREPOST_DATA_DIR": str(fresh), "CAREPOST_LOG_JSON": "true"}
            if copy:
                env["CAREPOST_DATABASE_URL"] = copy
            restore_backup(Settings(data_dir=fresh, database_url=copy), archive)
            events = _check_restored(env, first, sender.org_id)
            assert events > 40
            apply_env(settings_env)
    finally:
        apply_env(settings_env)
        for copy in pg_copies:
            drop_pg_database(copy)
