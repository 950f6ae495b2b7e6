"""Master keys and the database key: files, wrapping, derivation. No tables here.

The master key (a file with mode 0600, or ``CAREPOST_MASTER_KEY``) wraps every other key; the
database key (SQLCipher) is HKDF of a secret wrapped by it. ``core.database`` needs the SQLCipher
key to open the database, and ``core.crypto`` (per-organization keys, stored in the database)
needs the master key: both import this module, and it imports neither.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.ids import new_id

NONCE_BYTES = 12


class KeyUnavailable(RuntimeError):
    """A key needed to decrypt is missing or the master key is wrong."""


class DecryptionFailed(RuntimeError):
    """Ciphertext was altered, moved to another row/column/organization, or the key is wrong."""


# --------------------------------------------------------------------------- master keys


@dataclass(frozen=True)
class MasterKey:
    id: str
    key: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def generate_master_key() -> MasterKey:
    return MasterKey(id="mk-" + new_id()[:20], key=secrets.token_bytes(32))


def write_master_key_file(path: Path, master: MasterKey) -> None:
    """Write atomically with mode 0600 from the first byte (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"id": master.id, "key": _b64(master.key), "created_at": clock.now().isoformat()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_master_key_file(path: Path) -> MasterKey:
    data = json.loads(path.read_text())
    key = _unb64(data["key"])
    if len(key) != 32:
        raise KeyUnavailable(f"master key in {path} is not 32 bytes")
    return MasterKey(id=data["id"], key=key)


def parse_master_key_env(value: str) -> MasterKey:
    key_id, _, b64 = value.partition(":")
    if not key_id or not b64:
        raise KeyUnavailable("CAREPOST_MASTER_KEY must be '<key id>:<base64 of 32 bytes>'")
    key = _unb64(b64)
    if len(key) != 32:
        raise KeyUnavailable("CAREPOST_MASTER_KEY must hold 32 bytes")
    return MasterKey(id=key_id, key=key)


# Output of CAREPOST_MASTER_KEY_COMMAND, per command line, for the life of the process (a secret
# manager is asked once per process, not per connection).
_COMMAND_CACHE: dict[str, MasterKey] = {}
KEY_COMMAND_TIMEOUT = 30


def run_master_key_command(command: str) -> MasterKey:
    """Run the key command (no shell) and read ``<key id>:<base64 of 32 bytes>`` from its stdout.

    The plug-in point for a KMS or secret manager, as git and docker credential helpers: a small
    program that authenticates to the KMS (instance identity, a TPM, an operator's token), asks it to
    unwrap or return the master key, and prints it. CarePost never sees the KMS credentials, and the
    key never touches the data's disk. Its stderr is not read or logged (it may name paths)."""
    import shlex
    import subprocess

    cached = _COMMAND_CACHE.get(command)
    if cached is not None:
        return cached
    argv = shlex.split(command)
    if not argv:
        raise KeyUnavailable("CAREPOST_MASTER_KEY_COMMAND is empty")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=KEY_COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyUnavailable(f"CAREPOST_MASTER_KEY_COMMAND could not run: {type(exc).__name__}") from None
    if done.returncode != 0:
        raise KeyUnavailable(f"CAREPOST_MASTER_KEY_COMMAND exited with status {done.returncode}")
    try:
        master = parse_master_key_env(done.stdout.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError, KeyUnavailable):
        raise KeyUnavailable("CAREPOST_MASTER_KEY_COMMAND must print '<key id>:<base64 of 32 bytes>'") from None
    _COMMAND_CACHE[command] = master
    return master


def master_key_source(settings: Settings) -> str:
    """``environment``, ``command`` or ``file``: where the current master key comes from."""
    if settings.master_key is not None:
        return "environment"
    if settings.master_key_command:
        return "command"
    return "file"


def pending_master_key_file(settings: Settings) -> Path:
    """Where rotation writes the new master key before the re-wrap commits."""
    p = settings.resolved_master_key_file
    return p.with_name(p.name + ".new")


def load_master_keys(settings: Settings | None = None) -> tuple[str, dict[str, MasterKey]]:
    """Current master key id and every master key available (current plus one pending rotation)."""
    settings = settings or get_settings()
    keys: dict[str, MasterKey] = {}
    current: MasterKey | None = None
    if settings.master_key is not None:
        current = parse_master_key_env(settings.master_key.get_secret_value())
    elif settings.master_key_command:
        current = run_master_key_command(settings.master_key_command)
    else:
        path = settings.resolved_master_key_file
        if not path.exists():
            raise KeyUnavailable(f"no master key at {path}: run `carepost init`")
        current = read_master_key_file(path)
    keys[current.id] = current
    pending = pending_master_key_file(settings)
    if not settings.master_key_external and pending.exists():
        extra = read_master_key_file(pending)
        keys[extra.id] = extra
    return current.id, keys


def wrap(master: MasterKey, secret: bytes, purpose: str) -> dict:
    nonce = secrets.token_bytes(NONCE_BYTES)
    ct = AESGCM(master.key).encrypt(nonce, secret, f"carepost-wrap|{purpose}".encode())
    return {"mk": master.id, "n": _b64(nonce), "c": _b64(ct)}


def unwrap(masters: dict[str, MasterKey], wrapped: dict, purpose: str) -> bytes:
    master = masters.get(wrapped["mk"])
    if master is None:
        raise KeyUnavailable(f"wrapped with master key {wrapped['mk']}, which is not available")
    try:
        return AESGCM(master.key).decrypt(_unb64(wrapped["n"]), _unb64(wrapped["c"]), f"carepost-wrap|{purpose}".encode())
    except InvalidTag as exc:
        raise KeyUnavailable(f"master key {master.id} does not unwrap {purpose}") from exc


def hkdf(secret: bytes, info: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info.encode()).derive(secret)


# --------------------------------------------------------------------------- database key


def database_key_file(settings: Settings) -> Path:
    return settings.data_dir / "database.key"


def create_database_secret(settings: Settings, masters: dict[str, MasterKey], current: str) -> None:
    path = database_key_file(settings)
    secret = secrets.token_bytes(32)
    _write_json_0600(path, wrap(masters[current], secret, "database"))


def sqlcipher_raw_key(settings: Settings | None = None) -> bytes:
    """The raw 256-bit SQLCipher key: HKDF of the wrapped database secret (no passphrase stretching)."""
    settings = settings or get_settings()
    _, masters = load_master_keys(settings)
    path = database_key_file(settings)
    if not path.exists():
        raise KeyUnavailable(f"no database key at {path}: run `carepost init`")
    secret = unwrap(masters, json.loads(path.read_text()), "database")
    return hkdf(secret, "carepost sqlcipher v1")


def _write_json_0600(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
