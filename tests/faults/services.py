"""Private PostgreSQL and Redis servers for the fault tests that restart them.

The suite runs on two xdist workers against one shared PostgreSQL and one shared Redis: a test
that restarted those would break the other worker's tests. A test that restarts a service starts
its own instead — ``initdb`` + ``pg_ctl`` (Debian's PostgreSQL 15) on a free port in a temporary
directory, ``redis-server`` without persistence on a free port — and restarts that one. Without
the binaries the test is skipped, saying which is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fixtures.delivery import free_port

PG_BIN = Path(os.environ.get("CAREPOST_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PrivatePostgres:
    """A PostgreSQL cluster of one test module: ``url(name)``, ``create_database``, ``restart``.

    initdb refuses to run as root: as root the cluster belongs to the ``postgres`` user and its
    commands run through ``runuser``. The directory is made with ``tempfile`` (not under pytest's
    root-only temporary directory, which that user could not enter)."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / tool).exists():
                pytest.skip(f"a private PostgreSQL needs {PG_BIN / tool} (Debian's postgresql package)")
        self.as_root = os.geteuid() == 0
        if self.as_root and shutil.which("runuser") is None:
            pytest.skip("a private PostgreSQL started as root needs runuser (util-linux)")
        self.dir = Path(tempfile.mkdtemp(prefix="carepost-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        # fsync off: the machine does not crash, only the server stops, and what it wrote is in the
        # OS's cache. synchronous_commit stays on: an immediate stop must not lose an acknowledged commit.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                       "fsync = off\nfull_page_writes = off\nmax_connections = 60\n"
                       "shared_buffers = 32MB\n")
        self.start()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(PG_BIN / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return done

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: the clean shutdown of a restart; ``immediate``: as a crash (recovery at start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "immediate", down_seconds: float = 2.0) -> None:
        """Stop (every connection is cut), stay down a while, start again on the same port."""
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A ``redis-server`` of one test, without persistence: a restart loses every key (the queue,
    scheduled tasks, limit slots), as a Redis without AOF/RDB, or a failover to an empty replica."""

    def __init__(self, directory: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("a private Redis needs redis-server (Debian's redis-server package)")
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        with open(self.dir / f"redis-{self.port}.log", "a") as log:
            self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.dir)], stdout=log,
                                         stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, (self.dir / f"redis-{self.port}.log").read_text()[-2000:]
            try:
                client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # no persistence: SIGKILL and SIGTERM lose the same (everything)
            self.proc.wait(10)

    def restart(self, down_seconds: float = 2.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.stop()


@contextmanager
def private_redis_queue(directory: Path, **settings) -> Iterator[PrivateRedis]:
    """The queue and the cross-worker limits on a :class:`PrivateRedis` for the block, with
    ``CAREPOST_*`` settings given as keyword arguments (``delivery_batch_size=5``); the settings,
    the queue's storage and the limits are reset on the way in and out."""
    from carepost.core.config import reset_settings
    from carepost.core.limits import reset_limits
    from carepost.core.queue import huey

    server = PrivateRedis(directory)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CAREPOST_QUEUE_URL", server.url)
            for name, value in settings.items():
                mp.setenv(f"CAREPOST_{name.upper()}", str(value))
            reset_settings()
            huey.reset_storage()
            reset_limits()
            yield server
            huey.reset_storage()
            reset_limits()
        reset_settings()
        huey.reset_storage()
    finally:
        server.close()
