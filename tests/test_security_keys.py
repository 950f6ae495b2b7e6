"""Issue 9 item 4: the master key apart from the data.

* ``doctor`` fails in production mode when the master key file is on the data's filesystem
  (``st_dev``), tells (info) otherwise, and is content when it is elsewhere;
* the key can come from a key command (``CAREPOST_MASTER_KEY_COMMAND``, the KMS plug-in point):
  ``carepost init`` then writes no key file and the encrypted database opens with it;
* ``carepost init`` never silently creates a new master key over an existing database (SQLCipher
  and PostgreSQL).

Everything runs the real CLI in subprocesses.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import stat
import sys
import uuid
from pathlib import Path

import pytest

from carepost.core.masterkeys import read_master_key_file
from carepost.doctor import check_master_key
from tests.test_cli import cli, fresh_env
from tests.test_doctor import settings_for

# A filesystem other than the data's: tmpfs /dev/shm, or /var/tmp when the test's own temporary
# directory (the data's) is on /dev/shm (tests/conftest.py puts it there when there is room).
OTHER_FS_CANDIDATES = (Path("/dev/shm"), Path("/var/tmp"), Path("/tmp"))


@pytest.fixture
def other_fs_dir(tmp_path):
    data_dev = os.stat(tmp_path).st_dev
    other = next((p for p in OTHER_FS_CANDIDATES if p.is_dir() and os.stat(p).st_dev != data_dev), None)
    assert other is not None, f"the test needs one of {[str(p) for p in OTHER_FS_CANDIDATES]} on another filesystem than {tmp_path}"
    path = other / f"carepost-key-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _levels(findings, check: str) -> list[str]:
    return [f.level for f in findings if f.check == check]


def test_doctor_fails_in_production_when_the_master_key_is_beside_the_data(tmp_path):
    data = tmp_path / "data"
    assert cli(fresh_env(data), "init").returncode == 0
    assert (data / "master.key").exists()
    prod = check_master_key(settings_for(data, base_url="https://carepost.clinic.example"))
    assert _levels(prod, "master key location") == ["fail"]
    assert "same filesystem" in [f for f in prod if f.check == "master key location"][0].message
    assert _levels(check_master_key(settings_for(data, production=True)), "master key location") == ["fail"]
    # A local trial is told, not stopped.
    assert _levels(check_master_key(settings_for(data)), "master key location") == ["info"]
    # And the command says so, with exit status 1.
    result = cli(fresh_env(data, CAREPOST_PRODUCTION="true"), "doctor")
    assert result.returncode == 1 and "master key location" in result.stdout


def test_a_master_key_file_on_another_filesystem_passes(tmp_path, other_fs_dir):
    data = tmp_path / "data"
    key_file = other_fs_dir / "master.key"
    env = fresh_env(data, CAREPOST_MASTER_KEY_FILE=str(key_file))
    assert cli(env, "init").returncode == 0
    assert key_file.exists() and not (data / "master.key").exists()
    findings = check_master_key(settings_for(data, master_key_file=key_file, production=True))
    assert _levels(findings, "master key location") == ["ok"]
    assert all(f.level == "ok" for f in findings)


def _key_helper(directory: Path, key_id: str, key: bytes, *, status: int = 0) -> Path:
    """A credential-helper style program: prints the key (as a KMS client would after unwrapping)."""
    helper = directory / "print-master-key"
    helper.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"print({key_id!r} + ':' + {base64.b64encode(key).decode()!r})\n"
        f"sys.exit({status})\n"
    )
    helper.chmod(stat.S_IRWXU)
    return helper


def test_the_master_key_can_come_from_a_key_command(tmp_path, other_fs_dir):
    data = tmp_path / "data"
    helper = _key_helper(other_fs_dir, "mk-kms-1", secrets.token_bytes(32))
    env = fresh_env(data, CAREPOST_MASTER_KEY_COMMAND=f"{helper} --org clinic", CAREPOST_PRODUCTION="true")
    first = cli(env, "init")
    assert first.returncode == 0, first.stderr
    assert not (data / "master.key").exists(), "no key file is written when the key comes from a command"
    # The encrypted database opens with the command's key (doctor proves SQLCipher encryption and
    # reads the schema through it), and the key check is satisfied.
    doctor = cli(env, "doctor")
    assert "mk-kms-1" in doctor.stdout and "key command" in doctor.stdout
    assert "master key location" not in doctor.stdout
    assert "Could not check" not in doctor.stdout, doctor.stdout
    # Another key from the command cannot open it.
    wrong = _key_helper(tmp_path, "mk-kms-1", secrets.token_bytes(32))
    bad = cli(fresh_env(data, CAREPOST_MASTER_KEY_COMMAND=str(wrong)), "doctor")
    assert bad.returncode == 1


def test_a_failing_key_command_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    helper = _key_helper(tmp_path, "mk-x", secrets.token_bytes(32), status=3)
    result = cli(fresh_env(data, CAREPOST_MASTER_KEY_COMMAND=str(helper)), "init")
    assert result.returncode != 0
    assert "CAREPOST_MASTER_KEY_COMMAND exited with status 3" in result.stderr + result.stdout
    assert not (data / "master.key").exists()


def test_init_refuses_a_new_master_key_over_an_existing_sqlite_database(tmp_path):
    data = tmp_path / "data"
    env = fresh_env(data)
    assert cli(env, "init").returncode == 0
    original = read_master_key_file(data / "master.key")
    (data / "master.key").unlink()
    again = cli(env, "init")
    assert again.returncode != 0
    assert "refusing to create a new master key" in again.stderr
    assert not (data / "master.key").exists()
    # Restoring the key makes everything work again.
    from carepost.core.masterkeys import write_master_key_file

    write_master_key_file(data / "master.key", original)
    assert cli(env, "init").returncode == 0


def test_init_refuses_a_new_master_key_over_an_existing_postgresql_database(tmp_path):
    from tests.conftest import _pg_admin_url, create_pg_database, drop_pg_database

    if not _pg_admin_url():
        pytest.skip("PostgreSQL tests need CAREPOST_TEST_DATABASE_URL (as every PostgreSQL case of the suite)")
    url = create_pg_database("carepost_keys")
    try:
        data = tmp_path / "data"
        env = fresh_env(data, CAREPOST_DATABASE_URL=url)
        first = cli(env, "init")
        assert first.returncode == 0, first.stderr
        (data / "master.key").unlink()
        again = cli(env, "init")
        assert again.returncode != 0 and "refusing to create a new master key" in again.stderr
        assert "PostgreSQL" in again.stderr
        assert not (data / "master.key").exists()
    finally:
        drop_pg_database(url)
