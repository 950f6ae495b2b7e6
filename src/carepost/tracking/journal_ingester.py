"""The /t/ journal's ingester as a **process** of its own (issue 13, speed of ``/t/``).

``carepost serve`` answers an open or a click once its event is synced to the process's journal
slot (``tracking.engagement_journal``); moving the journal into the database took about a
quarter of the serve process's GIL when it ran as a thread there. So ``serve`` runs it as a child
process per slot (:class:`IngesterProcess`, started by ``Recorder.start``), which:

* reads only what the writer has **synced**: after each ``fdatasync`` the writer sends the
  durable end (segment, offset) down a pipe; the child never reads a frame past it (a frame past
  it may be cut off by a power loss, and the mark would then point past the segment's end);
* ingests exactly as the thread did (``Recorder.ingest_from``: one transaction per batch, the
  mark moved in it), so a kill anywhere loses and doubles nothing; and reports how far it got up
  the other pipe, which is what ``Recorder.drain`` and ``stop`` wait for;
* dies with its parent: ``PR_SET_PDEATHSIG`` (SIGKILL), and the end of the parent's pipe (read
  by a thread) stops it too. A child killed alone is started again by its parent (a new child
  reads the mark from the database again). What a killed ``serve`` journaled is drained by the
  next process, as before (``orphans``, or the slot taken again).

The child is started with the serve's own interpreter and environment (the master key comes
the way it comes to ``serve``: its environment or key file); its arguments are the slot's
directory, two pipe descriptors and the parent's pid — no token, no address, nothing of a
patient. In-process apps (tests' ``TestClient``) keep the ingester thread: ``serve`` asks for
the process by setting ``CAREPOST_ENGAGEMENT_INGESTER=process``.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from carepost.core.logging import get_logger

log = get_logger("carepost.tracking.journal_ingester")

MODE_ENV = "CAREPOST_ENGAGEMENT_INGESTER"
_TO_CHILD = struct.Struct(">BQQ")  # kind, segment, offset
_FROM_CHILD = struct.Struct(">QQ")  # ingested up to (segment, offset)
SYNCED, WAKE = 0, 1
RESTART_SECONDS = 0.5


def wanted() -> bool:
    return os.environ.get(MODE_ENV) == "process"


class IngesterProcess:
    """The parent's side: starts the child for ``journal`` (the slot this process holds), feeds
    it the durable end, starts it again if it dies, and hands its progress to ``on_progress``."""

    def __init__(self, journal, on_progress):
        self.journal = journal
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._to_child: int | None = None
        self.pid: int | None = None
        self.stopping = False
        journal.publish = self.publish
        self._thread = threading.Thread(target=self._supervise, name="carepost-engagement-ingester", daemon=True)
        self._thread.start()

    def publish(self, position, kind: int = SYNCED) -> None:
        """The durable end, to the child (never blocks the writer: a full pipe drops the message;
        a later one carries a later end, and ``drain`` sends it again)."""
        with self._lock:
            fd = self._to_child
            if fd is None:
                return
            try:
                os.write(fd, _TO_CHILD.pack(kind, position.segment, position.offset))
            except OSError:  # full (BlockingIOError) or the child gone (BrokenPipeError): see above
                pass

    def wake(self) -> None:
        self.publish(self.journal.durable, WAKE)

    def _supervise(self) -> None:
        from carepost.tracking.engagement_journal import Position

        while not self.stopping:
            down_r, down_w = os.pipe()
            up_r, up_w = os.pipe()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "carepost.tracking.journal_ingester", str(self.journal.directory),
                     str(down_r), str(up_w), str(os.getpid())],
                    pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL)
            except OSError as exc:
                log.error("engagement_ingester_not_started", error_type=type(exc).__name__)
                for fd in (down_r, down_w, up_r, up_w):
                    os.close(fd)
                time.sleep(1.0)
                continue
            started = time.monotonic()
            os.close(down_r)
            os.close(up_w)
            os.set_blocking(down_w, False)
            with self._lock:
                self._to_child, self.pid = down_w, proc.pid
            if self.stopping:
                self._close_down()
            self.publish(self.journal.durable)
            buffer = b""
            while True:
                try:
                    chunk = os.read(up_r, 4096)
                except InterruptedError:
                    continue
                if not chunk:
                    break  # the child is gone (or stopping)
                buffer += chunk
                whole = len(buffer) - len(buffer) % _FROM_CHILD.size
                if whole:
                    self._on_progress(Position(*_FROM_CHILD.unpack_from(buffer, whole - _FROM_CHILD.size)))
                    buffer = buffer[whole:]
            os.close(up_r)
            self._close_down(down_w)
            code = proc.wait()
            if not self.stopping:
                log.warning("engagement_ingester_exited", returncode=code)
                # at once after a kill; not a start-up per half second if it cannot start (database down)
                time.sleep(RESTART_SECONDS if time.monotonic() - started > 10 else 5.0)

    def _close_down(self, fd: int | None = None) -> None:
        """Close the pipe to the child (its end of input: it stops after its current batch)."""
        with self._lock:
            if self._to_child is not None and (fd is None or fd == self._to_child):
                os.close(self._to_child)
                self._to_child = None

    def stop(self, timeout: float) -> bool:
        """Stop the child (after its current batch) and its supervision; True once it has exited."""
        self.stopping = True
        self.journal.publish = None
        self._close_down()
        self._thread.join(timeout)
        if self._thread.is_alive() and self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # not done in time: its transaction rolls back
            except ProcessLookupError:
                pass
            self._thread.join(5.0)
        return not self._thread.is_alive()


# --------------------------------------------------------------------------- the child


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the end of the parent's pipe still stops the child


def _listen(fd: int, journal) -> None:
    """The parent's messages: the durable end (and wake-ups); its end of input: stop."""
    from carepost.tracking.engagement_journal import Position

    buffer = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            journal.stopping = True
            journal.wake.set()
            return
        buffer += chunk
        whole = len(buffer) - len(buffer) % _TO_CHILD.size
        wake = False
        latest = None
        for at in range(0, whole, _TO_CHILD.size):
            kind, segment, offset = _TO_CHILD.unpack_from(buffer, at)
            latest = Position(segment, offset) if latest is None else max(latest, Position(segment, offset))
            wake = wake or kind == WAKE
        buffer = buffer[whole:]
        if latest is not None:
            journal.synced(latest)
        if wake:
            journal.wake.set()


def main(argv: list[str] | None = None) -> int:
    directory, down, up, parent = (argv or sys.argv[1:])[:4]
    _die_with_parent()
    if os.getppid() != int(parent):
        return 0  # the parent died before the signal was asked for
    from carepost.assembly import assemble
    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging
    from carepost.tracking import engagement
    from carepost.tracking.engagement_journal import Journal

    assemble()
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json, access_log=False)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a serve's SIGTERM (its process group): the parent stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    journal = Journal.reader(Path(directory), engagement._journal_keys)
    up_fd = int(up)

    class _Child(engagement.Recorder):
        def _done(self, journal, position) -> None:
            os.write(up_fd, _FROM_CHILD.pack(position.segment, position.offset))

    threading.Thread(target=_listen, args=(int(down), journal), name="carepost-ingester-listen", daemon=True).start()
    try:
        _Child()._ingest_loop(journal)
    except BrokenPipeError:
        return 0  # the parent is gone
    finally:
        from carepost.core.database import dispose_engine

        dispose_engine()
    return 0


if __name__ == "__main__":
    sys.exit(main())
