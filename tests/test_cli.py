"""The ``carepost`` command as a user runs it: a subprocess on a data dir of its own.

The helpers here (``fresh_env``, ``cli``) are shared with the other CLI test modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from carepost import __version__

ROOT = Path(__file__).resolve().parent.parent
CAREPOST_ENV_KEYS = (
    "CAREPOST_DATA_DIR", "CAREPOST_DATABASE_URL", "CAREPOST_QUEUE_URL", "CAREPOST_REDIS_URL", "CAREPOST_MASTER_KEY",
    "CAREPOST_MASTER_KEY_FILE", "CAREPOST_BASE_URL", "CAREPOST_PORT", "CAREPOST_CAPTURE_PORT", "CAREPOST_CAPTURE_DIR",
    "CAREPOST_QUEUE_NAME",
)


def fresh_env(data_dir: Path, **extra: str) -> dict:
    """The environment of a CarePost on its own embedded SQLCipher data dir."""
    env = {k: v for k, v in os.environ.items() if k not in CAREPOST_ENV_KEYS}
    env.update({"CAREPOST_DATA_DIR": str(data_dir), "CAREPOST_LOG_JSON": "true", "COLUMNS": "400", "CAREPOST_QUEUE_NAME": "t" + uuid.uuid4().hex[:12]})
    env.update(extra)
    return env


def cli(env: dict, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carepost.cli", *args],
        env=env, cwd=str(ROOT), input=input, capture_output=True, text=True, timeout=timeout,
    )


def test_version():
    result = cli(fresh_env(Path("/nonexistent")), "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"carepost {__version__}"


def test_init_creates_an_encrypted_data_dir_and_prints_a_one_time_setup_link(tmp_path):
    data = tmp_path / "data"
    env = fresh_env(data)
    first = cli(env, "init")
    assert first.returncode == 0, first.stderr
    assert "http://localhost:8000/app/setup/" in first.stdout  # default base URL, no IP address
    assert "master.key" in first.stdout
    assert (data / "master.key").stat().st_mode & 0o777 == 0o600
    assert (data / "database.key").stat().st_mode & 0o777 == 0o600
    assert data.stat().st_mode & 0o777 == 0o700
    assert not (data / "carepost.db").read_bytes().startswith(b"SQLite format 3")
    # No default credentials: nothing to log in with but the link, and no password printed.
    assert "password" not in first.stdout.lower()

    again = cli(env, "init")
    assert again.returncode == 0
    assert "Created master key" not in again.stdout  # idempotent: the key is kept


def test_help_lists_every_command():
    result = cli(fresh_env(Path("/nonexistent")), "--help")
    assert result.returncode == 0
    for command in ("init", "serve", "worker", "run", "doctor", "org", "user", "apikey", "keys", "audit"):
        assert command in result.stdout
    keys = cli(fresh_env(Path("/nonexistent")), "keys", "--help")
    assert "rotate" in keys.stdout and "rekey-database" in keys.stdout


def test_worker_refuses_while_maintenance_holds_the_data_dir(tmp_path):
    from carepost.core.config import Settings
    from carepost.core.supervisor import exclusive_data_dir

    data = tmp_path / "data"
    env = fresh_env(data)
    assert cli(env, "init").returncode == 0
    with exclusive_data_dir(Settings(data_dir=data)):
        result = cli(env, "worker")
    assert result.returncode == 1
    assert "offline maintenance" in result.stderr
