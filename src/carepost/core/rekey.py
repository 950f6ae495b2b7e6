"""Offline re-key of the SQLCipher database file (``carepost keys rekey-database``).

Rotating the master key re-wraps the database secret but keeps the secret itself, so the file
stays encrypted under the same SQLCipher key. This command changes that key:

1. take the data dir exclusively (refuses while ``serve``, ``worker`` or ``run`` holds it);
2. make a new database secret and write it, wrapped by the master key, to ``database.key.new``;
3. open the file with the current key, checkpoint the WAL, switch to rollback journal (which
   needs exclusive access, so a foreign process holding the file open also stops us), then
   ``PRAGMA rekey`` with the new raw key (every page is re-encrypted in one transaction);
4. re-open with the new key to prove it, restore WAL mode;
5. move ``database.key.new`` over ``database.key`` (atomic rename).

A crash between 3 and 5 leaves both key files on disk; running the command again sees
``database.key.new``, finds which key opens the file, and finishes (or restarts) the job.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from carepost.core.config import Settings
from carepost.core.crypto import (
    _write_json_0600,
    database_key_file,
    hkdf,
    load_master_keys,
    sqlcipher_raw_key,
    unwrap,
    wrap,
)
from carepost.core.files import fsync_dir
from carepost.core.supervisor import exclusive_data_dir

# Must match carepost.core.crypto.sqlcipher_raw_key; tests prove the two agree.
SQLCIPHER_KDF_INFO = "carepost sqlcipher v1"


class RekeyError(RuntimeError):
    pass


@dataclass
class RekeyResult:
    database: Path
    pages: int
    recovered: bool = False


def pending_key_file(settings: Settings) -> Path:
    p = database_key_file(settings)
    return p.with_name(p.name + ".new")


def _connect(path: Path, raw_key: bytes):
    import sqlcipher3

    conn = sqlcipher3.dbapi2.connect(str(path), timeout=2)
    conn.isolation_level = None
    conn.execute(f"PRAGMA key = \"x'{raw_key.hex()}'\"")
    return conn


def opens_with(path: Path, raw_key: bytes) -> bool:
    import sqlcipher3

    conn = _connect(path, raw_key)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return True
    except sqlcipher3.dbapi2.DatabaseError:
        return False
    finally:
        conn.close()


def _raw_key(secret: bytes) -> bytes:
    return hkdf(secret, SQLCIPHER_KDF_INFO)


def rekey_database(settings: Settings) -> RekeyResult:
    if not settings.is_sqlite:
        raise RekeyError("rekey-database applies to the embedded SQLCipher database; PostgreSQL encryption at rest is the disk's job")
    path = settings.sqlite_path
    if not path.exists():
        raise RekeyError(f"no database at {path}: run `carepost init`")
    with exclusive_data_dir(settings):
        current_id, masters = load_master_keys(settings)
        key_file = database_key_file(settings)
        pending = pending_key_file(settings)
        if pending.exists():
            new_raw = _raw_key(unwrap(masters, json.loads(pending.read_text()), "database"))
            if opens_with(path, new_raw):
                # The file was re-keyed but the key file was not yet replaced: finish.
                os.replace(pending, key_file)
                fsync_dir(key_file.parent)
                return RekeyResult(path, 0, recovered=True)
            pending.unlink()  # the re-key never happened: start over
        old_raw = sqlcipher_raw_key(settings)
        if not opens_with(path, old_raw):
            raise RekeyError(f"{path} does not open with the key in {key_file}")

        new_secret = secrets.token_bytes(32)
        _write_json_0600(pending, wrap(masters[current_id], new_secret, "database"))
        new_raw = _raw_key(new_secret)

        import sqlcipher3

        conn = _connect(path, old_raw)
        try:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            if str(mode).lower() != "delete":
                raise RekeyError(f"{path} is open in another process (journal mode stays {mode}): stop it first")
            conn.execute(f"PRAGMA rekey = \"x'{new_raw.hex()}'\"")
        except sqlcipher3.dbapi2.OperationalError as exc:
            pending.unlink(missing_ok=True)
            raise RekeyError(f"{path} is in use by another process ({exc}): stop it first") from exc
        except Exception:
            pending.unlink(missing_ok=True)
            raise
        finally:
            conn.close()

        conn = _connect(path, new_raw)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        os.replace(pending, key_file)
        fsync_dir(key_file.parent)
        return RekeyResult(path, pages)
