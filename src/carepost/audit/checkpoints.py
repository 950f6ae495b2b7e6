"""Chain-head checkpoints kept outside the database (45 CFR 164.312(c)(1) integrity).

A hash chain alone cannot reveal that its *newest* events were deleted: cut the tail, rewind
``audit_chain_heads`` to the new last event, and every remaining link still verifies. So after
each committed append the chain head (chain, seq, hash, event id, time) is written to
``<data dir>/audit/checkpoints/<chain>.json`` — a place a database-only attacker cannot reach —
and into every export. ``carepost audit verify`` then fails when the log ends before a checkpoint
or holds a different event at the checkpoint's position.

Each checkpoint carries an HMAC under a key derived (HKDF) from the chain's audit key, which is
wrapped by the master key: without the master key a checkpoint can be neither forged nor moved
to another chain.

Rules of the file:

* written only after the transaction that appended commits (``after_commit``), never for a
  rolled-back transaction or savepoint, and before that caller goes on (its response is sent
  after the file covers its event); concurrent commits in one process share one write (group
  commit, :class:`_GroupWriter`), so a burst of audited reads costs one ``fsync``, not one each;
* atomic (temp file + ``os.replace``), mode 0600, under an exclusive ``flock`` so concurrent
  processes never regress it to an older seq — it only moves forward;
* never advanced past evidence: when the chain in the database no longer contains the event the
  file names (the log was truncated or rewritten), the file is left alone and an error logged,
  so later appends cannot paper over the gap.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import hmac
import io
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.crypto import hkdf
from carepost.core.logging import get_logger

log = get_logger("carepost.audit.checkpoints")

FORMAT = "carepost-audit-checkpoint/1"
SIGNED_FIELDS = ("format", "chain", "seq", "hash", "event_id", "occurred_at", "written_at")
_CHAIN_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
# How messages name this machine's file (never its path: API responses must not reveal internals).
LOCAL_SOURCE = "local checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or parsed."""


@dataclass(frozen=True)
class Checkpoint:
    chain: str
    seq: int
    hash: str
    event_id: str | None
    occurred_at: str | None
    written_at: str
    mac: str
    source: str = ""  # where it was read from (file path, export), for messages only

    def signed_payload(self) -> bytes:
        data = {
            "format": FORMAT,
            "chain": self.chain,
            "seq": self.seq,
            "hash": self.hash,
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "written_at": self.written_at,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "chain": self.chain,
            "seq": self.seq,
            "hash": self.hash,
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "written_at": self.written_at,
            "mac": self.mac,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> Checkpoint:
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise CheckpointError(f"{source or 'checkpoint'}: not a CarePost audit checkpoint")
            chain = str(data["chain"])
            if not _CHAIN_RE.match(chain):
                raise CheckpointError(f"{source or 'checkpoint'}: invalid chain name")
            return cls(
                chain=chain,
                seq=int(data["seq"]),
                hash=str(data["hash"]),
                event_id=data.get("event_id"),
                occurred_at=data.get("occurred_at"),
                written_at=str(data["written_at"]),
                mac=str(data["mac"]),
                source=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{source or 'checkpoint'}: missing or invalid field ({exc})") from None


def checkpoint_key(chain_key: bytes) -> bytes:
    """The checkpoint MAC key: derived from the chain key for this one purpose."""
    return hkdf(chain_key, "carepost/audit-checkpoint/v1")


def sign(chain_key: bytes, *, chain: str, seq: int, hash: str, event_id: str | None, occurred_at: str | None) -> Checkpoint:
    unsigned = Checkpoint(
        chain=chain,
        seq=seq,
        hash=hash,
        event_id=event_id,
        occurred_at=occurred_at,
        written_at=timestamp(clock.now()),
        mac="",
    )
    mac = hmac.new(checkpoint_key(chain_key), unsigned.signed_payload(), hashlib.sha256).hexdigest()
    return Checkpoint(**{**unsigned.__dict__, "mac": mac})


def mac_ok(chain_key: bytes, cp: Checkpoint) -> bool:
    expected = hmac.new(checkpoint_key(chain_key), cp.signed_payload(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, cp.mac)


# --------------------------------------------------------------------------- files


def checkpoint_dir(settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    return settings.data_dir / "audit" / "checkpoints"


def checkpoint_path(chain: str, settings: Settings | None = None) -> Path:
    if not _CHAIN_RE.match(chain):
        raise CheckpointError("invalid chain name")
    return checkpoint_dir(settings) / f"{chain}.json"


def read_local(chain: str, settings: Settings | None = None) -> Checkpoint | None:
    """This machine's checkpoint of ``chain``, or None when it has never written one."""
    path = checkpoint_path(chain, settings)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"{LOCAL_SOURCE}: cannot read ({exc.strerror})") from None
    try:
        return Checkpoint.from_dict(json.loads(text), source=LOCAL_SOURCE)
    except json.JSONDecodeError:
        raise CheckpointError(f"{LOCAL_SOURCE}: not valid JSON") from None


def local_chains(settings: Settings | None = None) -> list[str]:
    directory = checkpoint_dir(settings)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json") if _CHAIN_RE.match(p.stem))


def write_forward(cp: Checkpoint, settings: Settings | None = None) -> bool:
    """Write ``cp`` unless the file already holds this seq or a newer one. Returns True if written.

    The exclusive ``flock`` on a sibling lock file serializes writers across processes and
    threads (each call opens the lock file anew, and flock locks belong to the open file
    description), so the check-then-replace is atomic and the file never moves backwards.
    """
    directory = checkpoint_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = checkpoint_path(cp.chain, settings)
    lock_path = directory / f".{cp.chain}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = json.loads(path.read_text())
            current_seq = int(current.get("seq", 0))
        except FileNotFoundError:
            current_seq = 0
        except (ValueError, TypeError, AttributeError):
            # An unreadable file is evidence of tampering: never overwrite it.
            log.error("audit_checkpoint_unreadable", chain=cp.chain)
            return False
        if current_seq >= cp.seq:
            return False
        tmp = directory / f".{cp.chain}.{os.getpid()}.{threading.get_ident()}.tmp"
        wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(wfd, "w") as fh:
            json.dump(cp.to_dict(), fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class _GroupWriter:
    """Group commit of checkpoint files within one process.

    Every committed append must be covered by the file before its caller goes on (the response
    is sent after the checkpoint), but a write costs an ``fsync``. Callers that commit while a
    write of the same file is under way wait for it to finish; then one of them writes the newest
    checkpoint of everything that arrived meanwhile, for all of them. Under concurrent requests
    one ``fsync`` covers many appends; a lone caller writes at once, as before.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tickets: dict[Path, int] = {}  # requests issued per file
        self._done: dict[Path, int] = {}  # requests covered by a finished write
        self._pending: dict[Path, list[Checkpoint]] = {}
        self._busy: set[Path] = set()

    def write(self, cp: Checkpoint, settings: Settings | None = None) -> None:
        path = checkpoint_path(cp.chain, settings)
        with self._cond:
            ticket = self._tickets[path] = self._tickets.get(path, 0) + 1
            self._pending.setdefault(path, []).append(cp)
            while self._done.get(path, 0) < ticket:
                if path not in self._busy:
                    self._busy.add(path)
                    batch, upto = self._pending.pop(path), self._tickets[path]
                    break
                self._cond.wait()
            else:
                return  # another caller's write covered this checkpoint
        try:
            write_forward(max(batch, key=lambda c: c.seq), settings)
        finally:
            with self._cond:
                self._busy.discard(path)
                self._done[path] = max(self._done.get(path, 0), upto)
                self._cond.notify_all()


_group = _GroupWriter()


def write_committed(cp: Checkpoint, settings: Settings | None = None) -> None:
    """Write the checkpoint of a committed append (group commit: see :class:`_GroupWriter`)."""
    _group.write(cp, settings)


# --------------------------------------------------------------------------- reading checkpoint files


def load_file(path: Path) -> list[Checkpoint]:
    """Checkpoints from a checkpoint file (JSON), or from a JSONL or CSV audit export (its trailer).

    ``carepost audit verify --checkpoint FILE`` takes any of these, so a checkpoint copied from
    another machine or kept with an export can be checked against the database.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    source = str(path)
    stripped = text.lstrip()
    found: list[Checkpoint] = []
    if stripped.startswith("{"):
        try:
            single = json.loads(text)
        except json.JSONDecodeError:
            single = None
        if isinstance(single, dict):
            if single.get("format") == FORMAT:
                return [Checkpoint.from_dict(single, source)]
            return _from_trailer(single, source)
        for line in text.splitlines():  # JSONL export: the trailer is the record_type=checkpoint line
            if '"record_type"' not in line or '"checkpoint"' not in line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("record_type") == "checkpoint":
                found.extend(_from_trailer(record, source))
    else:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames and "record_type" in reader.fieldnames:
            for row in reader:
                if row.get("record_type") == "checkpoint":
                    try:
                        found.extend(_from_trailer(json.loads(row.get("details") or "{}"), source))
                    except json.JSONDecodeError:
                        raise CheckpointError(f"{path}: unreadable checkpoint row") from None
    if not found:
        raise CheckpointError(f"{path}: no audit checkpoint found (expected a checkpoint file or an audit export)")
    return found


def _from_trailer(record: dict, source: str) -> list[Checkpoint]:
    out = []
    for key in ("checkpoint", "head"):
        value = record.get(key)
        if isinstance(value, dict):
            out.append(Checkpoint.from_dict(value, f"{source} ({key})"))
    if not out:
        raise CheckpointError(f"{source}: no audit checkpoint found")
    return out


def timestamp(value: datetime) -> str:
    """UTC, microseconds, ``Z`` — the same form the event hash covers."""
    return clock.aware(value).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
