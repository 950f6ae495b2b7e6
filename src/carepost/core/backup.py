"""``carepost backup`` / ``carepost restore``: an online, consistent, encrypted copy of the data dir.

What goes in (docs/backup.md):

* the embedded database, copied with SQLite's online backup API in one step (one read
  transaction: WAL writers go on meanwhile, and the copy is the database as of one commit). The
  copy stays SQLCipher-encrypted under the same key: its pages are never decrypted to disk;
* ``database.key`` (the database secret, wrapped by the master key — useless without it);
* every other durable file of the data dir: audit checkpoints (``audit/checkpoints``), the TLS
  keys of the listeners, the local mail capture;
* **not** the master key (``master.key``, ``master.key.new``): it is kept apart (an operator's
  safe, a KMS), so a stolen archive alone decrypts nothing; **not** the task queue (``queue.db``):
  durable state lives in the database and the periodic sweep queues lost work again; not the
  data-dir lock.

The archive is a tar stream encrypted with AES-256-GCM in 1 MiB chunks (the STREAM construction:
a random 7-byte nonce prefix, a chunk counter and a last-chunk flag in every nonce, the header as
associated data, so chunks cannot be reordered, dropped or the archive truncated unnoticed). The
archive key is HKDF-SHA256 of the master key with a random salt (default), or scrypt of a
passphrase (``--passphrase-stdin``, for copies that leave the keyholder's reach: it is then
needed *and* the master key, since the data inside is still wrapped by the master key).

On PostgreSQL the database is backed up with PostgreSQL's own tools (pg_dump, base backups with
WAL archiving — docs/backup.md); ``carepost backup`` then archives the data dir's files only.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import struct
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from carepost.core.config import Settings
from carepost.core.masterkeys import KeyUnavailable, MasterKey, load_master_keys, sqlcipher_raw_key

MAGIC = b"CAREPOST-BACKUP\x01"
CHUNK = 1 << 20
DATABASE_MEMBER = "carepost.db"
# Never archived: key material kept apart, the transient queue, locks and the live database files
# (the database goes in as the consistent snapshot instead).
EXCLUDED = {"master.key", "master.key.new", "master.key.tmp", "queue.db", "queue.db-wal", "queue.db-shm",
            "carepost.lock", "carepost.db", "carepost.db-wal", "carepost.db-shm", "carepost.db-journal"}
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1


class BackupError(RuntimeError):
    """The backup or restore cannot proceed; the message says why (no key material in it)."""


@dataclass
class BackupResult:
    path: Path
    bytes_written: int
    files: list[str] = field(default_factory=list)
    database_pages: int = 0
    seconds: float = 0.0


@dataclass
class RestoreResult:
    data_dir: Path
    files: list[str]
    database_ok: bool
    seconds: float = 0.0


# --------------------------------------------------------------------------- keys


def _archive_key(header: dict, *, master: MasterKey | None, passphrase: bytes | None) -> bytes:
    salt = bytes.fromhex(header["salt"])
    if header["kdf"] == "scrypt":
        if passphrase is None:
            raise BackupError("this archive is encrypted with a passphrase: give it with --passphrase-stdin")
        return Scrypt(salt=salt, length=32, n=header["n"], r=header["r"], p=header["p"]).derive(passphrase)
    if header["kdf"] == "hkdf-master":
        if master is None:
            raise BackupError(f"this archive is encrypted under master key {header['mk']}, which is not available")
        if master.id != header["mk"]:
            raise BackupError(f"this archive is encrypted under master key {header['mk']}; the master key given is {master.id}")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"carepost backup v1").derive(master.key)
    raise BackupError(f"unknown archive key derivation {header['kdf']!r}")


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">I", index) + (b"\x01" if last else b"\x00")


# --------------------------------------------------------------------------- encrypted stream


class _EncryptingWriter(io.RawIOBase):
    """A write-only file object: buffers, seals each full chunk, seals the last one on close."""

    def __init__(self, out, key: bytes, aad: bytes) -> None:
        self._out, self._aead, self._aad = out, AESGCM(key), aad
        self._prefix = secrets.token_bytes(7)
        self._buf = bytearray()
        self._index = 0
        out.write(self._prefix)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buf += data
        while len(self._buf) > CHUNK:  # keep at least one byte back: the last chunk is sealed on close
            self._seal(bytes(self._buf[:CHUNK]), last=False)
            del self._buf[:CHUNK]
        return len(data)

    def _seal(self, chunk: bytes, *, last: bool) -> None:
        sealed = self._aead.encrypt(_nonce(self._prefix, self._index, last), chunk, self._aad)
        self._out.write(struct.pack(">I", len(sealed)) + sealed)
        self._index += 1

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self._buf), last=True)
            self._buf.clear()
        super().close()


def _decrypted_chunks(src, key: bytes, aad: bytes) -> Iterator[bytes]:
    aead = AESGCM(key)
    prefix = src.read(7)
    index = 0
    pending = None
    while True:
        head = src.read(4)
        if not head:
            break
        if len(head) != 4:
            raise BackupError("the archive is truncated")
        sealed = src.read(struct.unpack(">I", head)[0])
        if pending is not None:
            yield _open(aead, prefix, index - 1, pending, aad, last=False)
        pending = sealed
        index += 1
    if pending is None:
        raise BackupError("the archive is empty or truncated")
    yield _open(aead, prefix, index - 1, pending, aad, last=True)


def _open(aead: AESGCM, prefix: bytes, index: int, sealed: bytes, aad: bytes, *, last: bool) -> bytes:
    try:
        return aead.decrypt(_nonce(prefix, index, last), sealed, aad)
    except InvalidTag:
        if index == 0:
            raise BackupError("the archive does not decrypt: wrong master key or passphrase, or the file was altered") from None
        raise BackupError(f"the archive was altered or truncated (chunk {index} does not authenticate)") from None


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _write_header(out, header: dict) -> bytes:
    body = json.dumps(header, sort_keys=True).encode()
    blob = MAGIC + struct.pack(">I", len(body)) + body
    out.write(blob)
    return blob


def read_header(src) -> tuple[dict, bytes]:
    magic = src.read(len(MAGIC))
    if magic != MAGIC:
        raise BackupError("not a CarePost backup archive")
    size = struct.unpack(">I", src.read(4))[0]
    body = src.read(size)
    return json.loads(body), magic + struct.pack(">I", size) + body


# --------------------------------------------------------------------------- backup


def _snapshot_database(settings: Settings, target: Path) -> int:
    """Copy the live SQLCipher database to ``target`` with the online backup API, in one step (one
    read transaction), keyed with the same key: a consistent, still-encrypted copy."""
    import sqlcipher3

    key = sqlcipher_raw_key(settings).hex()
    src = sqlcipher3.dbapi2.connect(str(settings.sqlite_path), timeout=30)
    dst = sqlcipher3.dbapi2.connect(str(target))
    try:
        for conn in (src, dst):
            conn.execute(f"PRAGMA key = \"x'{key}'\"")
        src.execute("PRAGMA busy_timeout = 30000")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # fails here on a wrong key
        src.backup(dst, pages=-1)
        pages = dst.execute("PRAGMA page_count").fetchone()[0]
        dst.execute("PRAGMA journal_mode = DELETE")
        return pages
    finally:
        dst.close()
        src.close()


def _durable_files(data_dir: Path, never: set[Path]) -> list[Path]:
    found = []
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(data_dir)
        if len(rel.parts) == 1 and rel.name in EXCLUDED:
            continue
        if rel.name.endswith((".tmp", ".partial")) or path.resolve() in never:
            continue
        found.append(rel)
    return found


def create_backup(settings: Settings, out_path: Path, *, passphrase: bytes | None = None) -> BackupResult:
    started = time.monotonic()
    data_dir = settings.data_dir
    if not data_dir.is_dir():
        raise BackupError(f"no data dir at {data_dir}")
    out_path = Path(out_path)
    if out_path.resolve().is_relative_to(data_dir.resolve()):
        raise BackupError("write the backup outside the data dir")
    current_id, masters = load_master_keys(settings)
    salt = secrets.token_bytes(16)
    header = {"format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "database": "sqlcipher" if settings.is_sqlite else "external", "salt": salt.hex(), "chunk": CHUNK}
    if passphrase is not None:
        header.update(kdf="scrypt", n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    else:
        header.update(kdf="hkdf-master", mk=current_id)
    key = _archive_key(header, master=masters[current_id], passphrase=passphrase)
    result = BackupResult(out_path, 0)
    with tempfile.TemporaryDirectory(prefix="carepost-backup-", dir=out_path.parent) as tmp:
        staging = Path(tmp)
        # The data dir's files first, the database after: an audit checkpoint is written only after
        # its events committed and only moves forward, so every checkpoint copied now names events
        # the later database snapshot holds (the other order could archive a checkpoint ahead of the
        # snapshot, and `audit verify` would then report the restored log as truncated).
        master_file = settings.resolved_master_key_file.resolve()
        never = {master_file, master_file.with_name(master_file.name + ".new")}
        copied = []
        for rel in _durable_files(data_dir, never):
            target = staging / "files" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(data_dir / rel, target)
            except FileNotFoundError:
                continue  # removed meanwhile (a rotated capture file): not durable
            copied.append(rel)
        snapshot = staging / DATABASE_MEMBER
        if settings.is_sqlite:
            if not settings.sqlite_path.exists():
                raise BackupError(f"no database at {settings.sqlite_path}: run `carepost init`")
            result.database_pages = _snapshot_database(settings, snapshot)
        partial = out_path.with_name(out_path.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw:
                aad = _write_header(raw, header)
                writer = _EncryptingWriter(raw, key, aad)
                with tarfile.open(fileobj=writer, mode="w|") as tar:
                    for rel in copied:
                        tar.add(staging / "files" / rel, arcname=rel.as_posix(), recursive=False)
                        result.files.append(rel.as_posix())
                    if settings.is_sqlite:
                        tar.add(snapshot, arcname=DATABASE_MEMBER, recursive=False)
                        result.files.append(DATABASE_MEMBER)
                writer.close()
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, out_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    result.bytes_written = out_path.stat().st_size
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- restore


def _safe_member(member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
        raise BackupError(f"the archive holds an unsafe entry: {member.name!r}")
    if len(name.parts) == 1 and name.name in EXCLUDED - {DATABASE_MEMBER}:
        raise BackupError(f"the archive holds {member.name!r}, which a CarePost backup never holds")
    return name


def restore_backup(settings: Settings, archive: Path, *, passphrase: bytes | None = None) -> RestoreResult:
    """Restore into ``settings.data_dir``, which must hold no database yet. The master key must
    be available there already (its file copied in from where it is kept, or the environment / key
    command): the archive never holds it."""
    started = time.monotonic()
    data_dir = settings.data_dir
    if settings.is_sqlite and settings.sqlite_path.exists():
        raise BackupError(f"{settings.sqlite_path} exists: restore into a fresh data dir (or move the old one away)")
    try:
        current_id, masters = load_master_keys(settings)
    except (KeyUnavailable, OSError, ValueError) as exc:  # say what is missing, never the key
        raise BackupError(f"the master key is needed to restore: {exc}") from None
    with open(archive, "rb") as src:
        header, aad = read_header(src)
        if header.get("database") == "sqlcipher" and not settings.is_sqlite:
            raise BackupError("this archive holds an embedded database; restore it with CAREPOST_DATABASE_URL unset")
        master = masters.get(header.get("mk", ""), masters[current_id])
        key = _archive_key(header, master=master, passphrase=passphrase)
        data_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
        files = []
        try:
            with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(_decrypted_chunks(src, key, aad)), CHUNK),
                              mode="r|") as tar:
                for member in tar:
                    name = _safe_member(member)
                    target = staging.joinpath(*name.parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "wb") as out, tar.extractfile(member) as data:
                        while block := data.read(CHUNK):
                            out.write(block)
                        out.flush()
                        os.fsync(out.fileno())
                    files.append(name.as_posix())
            # Everything decrypted and authenticated: only now move it into place.
            for rel in files:
                dest = data_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists() and rel != DATABASE_MEMBER:
                    raise BackupError(f"{dest} exists: restore into a fresh data dir")
            for rel in sorted(files, key=lambda r: r == DATABASE_MEMBER):  # the database last
                os.replace(staging / rel, data_dir / rel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    ok = True
    if DATABASE_MEMBER in files:
        ok = check_database(settings)
    return RestoreResult(data_dir, files, ok, time.monotonic() - started)


def check_database(settings: Settings) -> bool:
    """Open the restored database with the key from its ``database.key`` and the master key, and
    run SQLCipher's page-authentication check and SQLite's integrity check."""
    import sqlcipher3

    key = sqlcipher_raw_key(settings).hex()
    conn = sqlcipher3.dbapi2.connect(str(settings.sqlite_path))
    try:
        conn.execute(f"PRAGMA key = \"x'{key}'\"")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        bad = conn.execute("PRAGMA cipher_integrity_check").fetchall()
        if bad:
            raise BackupError(f"the restored database fails SQLCipher's integrity check ({len(bad)} pages)")
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise BackupError("the restored database fails SQLite's integrity check")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    return True
