"""``carepost run``: the server, the task consumer and the local mail capture as child processes.

The supervisor forwards SIGINT/SIGTERM to every child as SIGTERM (each stops cleanly: uvicorn
drains requests, the consumer lets running tasks finish, the capture closes its socket), waits,
and kills what is still running after the grace period. When one child dies on its own, the
others are stopped and the supervisor exits non-zero: a half-running platform is worse than a
stopped one. Children run in their own session (a terminal's Ctrl-C reaches only the supervisor,
which forwards it once) and get SIGTERM from the kernel if the supervisor itself is killed
(Linux ``PR_SET_PDEATHSIG``), so nothing is left orphaned.

Also here: the data-dir lock. Every ``serve``, ``worker`` and ``run`` process holds a shared
``flock`` on ``<data dir>/carepost.lock``; offline maintenance (``keys rekey-database``) takes it
exclusively, and so refuses to run while any of them might be using the database. The kernel
drops the lock when a process dies, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from carepost.core.config import Settings
from carepost.core.logging import get_logger

log = get_logger("carepost.supervisor")

LOCK_NAME = "carepost.lock"


# --------------------------------------------------------------------------- data-dir lock


class DataDirBusy(RuntimeError):
    """Another CarePost process holds the data dir (or maintenance holds it exclusively)."""


def lock_path(settings: Settings) -> Path:
    return settings.data_dir / LOCK_NAME


@contextmanager
def _flock(settings: Settings, mode: int) -> Iterator[None]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(settings), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirBusy(str(settings.data_dir)) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def using_data_dir(settings: Settings) -> Iterator[None]:
    """Held for the lifetime of ``serve``/``worker``/``run``."""
    try:
        with _flock(settings, fcntl.LOCK_SH):
            yield
    except DataDirBusy:
        raise DataDirBusy(f"the data dir {settings.data_dir} is held by offline maintenance (keys rekey-database)") from None


@contextmanager
def exclusive_data_dir(settings: Settings) -> Iterator[None]:
    """Held by offline maintenance; fails at once if any CarePost process uses the data dir."""
    try:
        with _flock(settings, fcntl.LOCK_EX):
            yield
    except DataDirBusy:
        raise DataDirBusy(
            f"a CarePost process (serve, worker or run) is using {settings.data_dir}: stop it first"
        ) from None


def data_dir_in_use(settings: Settings) -> bool:
    try:
        with _flock(settings, fcntl.LOCK_EX):
            return False
    except DataDirBusy:
        return True


# --------------------------------------------------------------------------- supervision


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the supervisor's environment
    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def default_children(settings: Settings, mail_env: dict[str, str] | None = None) -> list[Child]:
    """``mail_env`` points the server's and worker's outgoing mail at the capture."""
    py = sys.executable
    return [
        Child("server", [py, "-m", "carepost.cli", "serve"], dict(mail_env or {})),
        Child("worker", [py, "-m", "carepost.cli", "worker"], dict(mail_env or {})),
        Child("mail-capture", [py, "-m", "carepost.core.mailcapture"]),
        Child("inbound", [py, "-m", "carepost.cli", "inbound"]),  # the return path: bounces and complaints
        # SMTP submission for applications; on one machine with a self-signed certificate kept in
        # the data dir unless CAREPOST_SMTP_SUBMISSION_CERT_FILE is set.
        # It gets the mail environment too: messages it accepts go to the capture, so a sending
        # domain whose ownership is not proven yet may be used here as through the API.
        Child("smtp", [py, "-m", "carepost.cli", "smtp", "--self-signed"], dict(mail_env or {})),
    ]


@dataclass
class Supervisor:
    children: list[Child]
    stop_timeout: float = 45.0
    poll_interval: float = 0.2
    env: dict | None = None
    _signal: int | None = field(default=None, init=False)

    def _on_signal(self, signum, _frame) -> None:
        self._signal = signum

    def start(self) -> None:
        for child in self.children:
            env = {**(self.env if self.env is not None else os.environ), **child.env}
            child.process = subprocess.Popen(child.argv, env=env, preexec_fn=_die_with_parent)
            log.info("child_started", child_kind=child.name, pid=child.pid)

    def stop(self) -> None:
        """SIGTERM to every running child, then SIGKILL whatever outlives the grace period."""
        for child in self.children:
            if child.alive():
                try:
                    child.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.stop_timeout
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("child_killed", child_kind=child.name, pid=child.pid)
                child.process.kill()
                child.process.wait()
            log.info("child_stopped", child_kind=child.name, exit_status=child.process.returncode)

    def run(self) -> int:
        """Start the children and watch them. Returns the exit code for ``carepost run``:
        0 after a requested stop, non-zero when a child died on its own."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while True:
                if self._signal is not None:
                    log.info("stopping", signal=signal.Signals(self._signal).name)
                    self.stop()
                    return 0
                for child in self.children:
                    if not child.alive():
                        code = child.process.returncode
                        log.error("child_died", child_kind=child.name, exit_status=code)
                        self.stop()
                        return code if code and code > 0 else 1
                time.sleep(self.poll_interval)
        finally:
            if any(c.alive() for c in self.children):
                self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
