"""The durable local journal of opens and clicks (issue 13, speed of ``/t/``).

A ``/t/`` request is answered once its event is in this journal **and on disk** (``fdatasync``),
not once it is in the database: the writer thread of ``tracking.engagement`` appends a whole
group of waiting requests as one frame and syncs it once (group commit, as a database does with
its own log), then answers them. A background ingester moves what the journal holds into the
database set-wise — events, counters, rollups, webhooks — in one transaction per batch, and in
the **same transaction** records how far it got (``EngagementJournalMark``: journal id, segment,
offset). So a crash anywhere neither loses nor doubles an event: an answered request's event is
in the journal; whatever the ingester committed moved the mark with it; whatever it did not
commit is read again from the mark.

Layout, under ``<data dir>/engagement-journal/``: one **slot** directory per ``serve`` process
(``0``, ``1``, …), held with an exclusive ``flock`` on its ``lock`` file while the process lives;
its ``id`` file names the journal (a random id, the key of its mark row); its segments
``<number>.journal`` are appended and rotated at :data:`SEGMENT_BYTES`, and a segment is deleted
once the mark has moved past it. A process takes the first slot nobody holds; a slot left by a
process that died is taken by the next one that starts, or drained by any running process that
finds it unheld (:func:`orphans`), so what a killed process journaled reaches the database once
anything runs on that data dir again.

A frame: ``length (4) | key version (1) | nonce (12) | AES-256-GCM(records as JSON)``, the
associated data binding the journal id, segment and offset (a frame copied elsewhere does not
authenticate). The key is the installation's ``journal`` named key (wrapped by the
master key, like every other key; rotatable: its version is in the frame). Records hold ids,
class and rule, the user agent's family and the time — no token, no IP address, no user agent —
and are encrypted anyway: everything CarePost stores is encrypted at rest. A frame cut short by
a crash (never answered: the answer waits for the sync) fails authentication and is cut off when
the slot is next opened.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from carepost.core.files import fsync_dir

KEY_OWNER = "installation"
KEY_KIND = "journal"  # org_keys.kind is 8 characters at most
SEGMENT_BYTES = 64 * 1024 * 1024
_HEAD = struct.Struct(">IB")
_NONCE = 12
MAX_FRAME = 64 * 1024 * 1024
KEY_SECONDS = 60.0


class JournalDamaged(Exception):
    """A frame that does not authenticate in the middle of a segment (wrong key, damaged disk)."""


@dataclass(frozen=True, order=True)
class Position:
    segment: int
    offset: int


def _aad(journal_id: str, segment: int, offset: int) -> bytes:
    return b"carepost-engagement-journal|1|" + journal_id.encode() + struct.pack(">QQ", segment, offset)


def _segment_path(directory: Path, segment: int) -> Path:
    return directory / f"{segment:012d}.journal"


def _segments(directory: Path) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in directory.glob("*.journal") if p.name.split(".")[0].isdigit())


class Journal:
    """One slot, held (flock) by this process: appended by one writer thread, read by one ingester.

    ``keys(version)`` gives ``(version, key)``: the current key when ``version`` is None."""

    def __init__(self, directory: Path, lock_fd: int, keys):
        self.directory = directory
        self._lock_fd = lock_fd
        self._keys = keys
        id_file = directory / "id"
        if not id_file.exists():
            tmp = directory / "id.tmp"
            tmp.write_text(uuid.uuid4().hex)
            os.replace(tmp, id_file)
            fsync_dir(directory)
        self.id = id_file.read_text().strip()
        self._mutex = threading.Lock()
        self._current: tuple[float, int, bytes] | None = None  # (until, version, key): not a look-up per group
        self._versions: dict[int, bytes] = {}
        self.ingested: Position | None = None  # what the database holds (the ingester's; None: not looked yet)
        self.stopping = False
        self.wake = threading.Event()  # look now (drain, stop)
        self.mark: Position | bool | None = None  # the database's mark, once read (False: none yet)
        segments = _segments(directory)
        self._segment = segments[-1] if segments else 1
        path = _segment_path(directory, self._segment)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if not segments:
            fsync_dir(directory)
        end = self._valid_end(self._segment)
        if end != os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, end)  # a frame cut short by a crash: never answered
            os.fsync(self._fd)
        self.durable = Position(self._segment, end)
        self.publish = None  # called with each new durable Position (the ingester process's feed)

    @classmethod
    def reader(cls, directory: Path, keys) -> Journal:
        """The slot as its ingester **process** sees it (``tracking.journal_ingester``): not held,
        not written, never cut; read only up to :attr:`durable`, which the writer publishes after
        each sync (a frame past it may still be cut off by a power loss)."""
        self = cls.__new__(cls)
        self.directory = directory
        self._lock_fd = self._fd = None
        self._keys = keys
        self.id = (directory / "id").read_text().strip()
        self._mutex = threading.Lock()
        self._current = None
        self._versions = {}
        self.ingested = None
        self.stopping = False
        self.wake = threading.Event()
        self.mark = None
        segments = _segments(directory)
        self._segment = segments[0] if segments else 1
        self.durable = Position(self._segment, 0)  # nothing, until the writer says
        self.publish = None
        return self

    def synced(self, position: Position) -> None:
        """(A reader) the writer's durable end moved to ``position``."""
        with self._mutex:
            if position > self.durable:
                self.durable = position
                self._segment = position.segment

    # ------------------------------------------------------------------ writing

    def _key(self, version: int | None) -> tuple[int, bytes]:
        """The current key (looked up again every :data:`KEY_SECONDS`: a rotation is taken up
        within that), or a given version's (kept: a version's key never changes)."""
        if version is None:
            now = time.monotonic()
            if self._current is None or self._current[0] < now:
                found = self._keys(None)
                self._current = (now + KEY_SECONDS, *found)
                self._versions[found[0]] = found[1]
            return self._current[1], self._current[2]
        key = self._versions.get(version)
        if key is None:
            key = self._versions[version] = self._keys(version)[1]
        return version, key

    def append(self, records: list) -> Position:
        """One frame of ``records`` (JSON-able), on disk before this returns."""
        version, key = self._key(None)
        payload = json.dumps(records, separators=(",", ":")).encode()
        with self._mutex:
            offset = self.durable.offset
            nonce = os.urandom(_NONCE)
            sealed = AESGCM(key).encrypt(nonce, payload, _aad(self.id, self._segment, offset))
            frame = _HEAD.pack(len(sealed), version) + nonce + sealed
            try:
                if os.write(self._fd, frame) != len(frame):
                    raise OSError("engagement journal: short write")
                os.fdatasync(self._fd)
            except OSError:
                # Not durable, so not answered as recorded (503): take the frame back, or a later
                # read would ingest an event whose request was told to try again.
                try:
                    os.ftruncate(self._fd, offset)
                except OSError:
                    pass
                raise
            end = Position(self._segment, offset + len(frame))
            self.durable = end
            if end.offset >= SEGMENT_BYTES:
                self._rotate()
            if self.publish is not None:
                self.publish(self.durable)
            return end

    def _rotate(self) -> None:
        self._segment += 1
        fd = os.open(_segment_path(self.directory, self._segment), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fsync_dir(self.directory)
        os.close(self._fd)
        self._fd = fd
        self.durable = Position(self._segment, 0)

    # ------------------------------------------------------------------ reading

    def first(self) -> Position:
        segments = _segments(self.directory)
        return Position(segments[0] if segments else self._segment, 0)

    def read(self, start: Position, limit: int) -> tuple[list, Position]:
        """Records from ``start`` up to what is durable (about ``limit`` of them, whole frames),
        and the position after them (the next segment's start once a segment is read through)."""
        durable = self.durable
        records: list = []
        position = start
        while len(records) < limit and position < durable:
            current = position.segment == durable.segment
            if not _segment_path(self.directory, position.segment).exists() and not current:
                position = Position(min(s for s in _segments(self.directory) + [durable.segment]
                                        if s > position.segment), 0)
                continue
            frames, after = self._frames(position, durable.offset if current else None, limit - len(records))
            for found in frames:
                records.extend(found)
            if after == position:
                if current:
                    break
                # an older segment read through: on to the next one
                position = Position(min(s for s in _segments(self.directory) + [durable.segment]
                                        if s > position.segment), 0)
                continue
            position = after
        return records, position

    def _frames(self, start: Position, end: int | None, limit: int) -> tuple[list, Position]:
        path = _segment_path(self.directory, start.segment)
        out: list = []
        offset = start.offset
        count = 0
        with open(path, "rb") as f:
            f.seek(offset)
            while (end is None or offset < end) and count < limit:
                head = f.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    break
                length, version = _HEAD.unpack(head)
                if length > MAX_FRAME:
                    break
                body = f.read(_NONCE + length)
                if len(body) < _NONCE + length:
                    break
                try:
                    payload = AESGCM(self._key(version)[1]).decrypt(body[:_NONCE], body[_NONCE:],
                                                                     _aad(self.id, start.segment, offset))
                except InvalidTag:
                    break
                records = json.loads(payload)
                out.append(records)
                count += len(records)
                offset += _HEAD.size + _NONCE + length
        return out, Position(start.segment, offset)

    def _valid_end(self, segment: int) -> int:
        """Where the last whole, authentic frame ends. Only the **last** frame may be cut off (a
        crash while it was written: never answered); a bad frame with more after it is damage,
        not a crash, and nothing is cut (:class:`JournalDamaged`)."""
        _frames, after = self._frames(Position(segment, 0), None, 1 << 62)
        size = _segment_path(self.directory, segment).stat().st_size
        if after.offset < size:
            with open(_segment_path(self.directory, segment), "rb") as f:
                f.seek(after.offset)
                head = f.read(_HEAD.size)
            if len(head) == _HEAD.size:
                length = _HEAD.unpack(head)[0]
                if after.offset + _HEAD.size + _NONCE + length < size:
                    raise JournalDamaged(f"{self.directory.name}/{segment}: frame at {after.offset} does not "
                                         "authenticate and more follows")
        return after.offset

    def forget_before(self, position: Position) -> None:
        """Delete the segments wholly before ``position`` (the mark has moved past them)."""
        for segment in _segments(self.directory):
            if segment < position.segment and segment != self._segment:
                _segment_path(self.directory, segment).unlink(missing_ok=True)

    def retire(self) -> None:
        """Everything is in the database: start an empty segment and delete the others (a clean
        stop leaves nothing to read again; segment numbers keep growing, so a mark never points
        into a newer segment's bytes)."""
        with self._mutex:
            if self.durable.offset > 0:
                self._rotate()
                if self.publish is not None:
                    self.publish(self.durable)
        self.forget_before(self.durable)

    def close(self) -> None:
        with self._mutex:
            for fd in (self._fd, self._lock_fd):
                if fd is None:
                    continue  # a reader holds neither
                try:
                    os.close(fd)  # closing the lock file releases the flock
                except OSError:
                    pass


def _try_lock(directory: Path) -> int | None:
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _open(slot: Path, fd: int, keys) -> Journal:
    try:
        return Journal(slot, fd, keys)
    except BaseException:
        os.close(fd)  # not held after all
        raise


def root_of(data_dir: Path) -> Path:
    return Path(data_dir) / "engagement-journal"


def _slots(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def claim(root: Path, keys) -> Journal:
    """The first slot nobody holds (a new one if all are held), now held by this process."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    while True:
        slots = _slots(root)
        for slot in slots:
            fd = _try_lock(slot)
            if fd is not None:
                return _open(slot, fd, keys)
        number = int(slots[-1].name) + 1 if slots else 0
        try:
            (root / str(number)).mkdir(mode=0o700)
        except FileExistsError:
            continue  # another process made it first: look again
        fsync_dir(root)


def orphans(root: Path, keys, held: set[str]) -> list[Journal]:
    """Slots nobody holds that still have segments (their process died): held now, to be drained
    and given back (:meth:`Journal.close`)."""
    out = []
    if not root.exists():
        return out
    for slot in _slots(root):
        if str(slot) in held or not any(_segment_path(slot, n).stat().st_size for n in _segments(slot)):
            continue  # held, or nothing in it (a clean stop leaves one empty segment)
        fd = _try_lock(slot)
        if fd is not None:
            out.append(_open(slot, fd, keys))
    return out
