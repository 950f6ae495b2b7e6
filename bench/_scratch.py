"""What the benchmarks share: a throw-away data dir and, on request, a scratch PostgreSQL database.

    with scratch_storage(args.database_url, prefix="carepost-bench-"):
        ...  # CAREPOST_DATA_DIR and, with a URL, CAREPOST_DATABASE_URL point at fresh storage

``database_url`` is an administrator's URL (``postgresql://postgres@127.0.0.1:5432/postgres``):
a database named ``carepost_bench_<random>`` is created on that server and dropped with FORCE
when the block ends, whatever happened inside it. Without a URL the embedded SQLCipher file in
the data dir is used. Bench scripts import this module as ``_scratch`` (``python bench/x.py``
puts ``bench/`` first on the path).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_database(database_url: str | None) -> Iterator[str | None]:
    """Create a scratch database beside ``database_url``; yield its psycopg URL (None without a URL)."""
    if not database_url:
        yield None
        return
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"carepost_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(database_url).set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False)
    finally:
        try:
            from carepost.core.database import dispose_engine

            dispose_engine()  # this process's pooled connections would block the DROP
        except ImportError:
            pass
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_storage(database_url: str | None, prefix: str = "carepost-bench-") -> Iterator[Path]:
    """Point this process's CAREPOST_DATA_DIR (and CAREPOST_DATABASE_URL) at fresh storage; yield the work dir."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["CAREPOST_DATA_DIR"] = str(work / "data")
    with scratch_database(database_url) as url:
        if url:
            os.environ["CAREPOST_DATABASE_URL"] = url
        yield work


def bench_organization(name: str) -> str:
    """Configure logging, assemble the application and initialize storage; create and return one organization."""
    from carepost.accounts.service import create_organization
    from carepost.assembly import assemble
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.database import system_session
    from carepost.core.logging import configure_logging

    configure_logging("WARNING", True)
    assemble()  # the one composition root, as every entry point
    initialize_storage()
    with system_session() as s:
        org_id = create_organization(s, name).id
        s.commit()
    return org_id


def repeat(runs: int, run_once, median_of: tuple[str, ...], out: Path) -> dict:
    """Call ``run_once()`` ``runs`` times, printing each result (one JSON line); write the results
    with the median of each key in ``median_of`` and the command line to ``out``; print the
    medians. Returns the summary."""
    import json
    import statistics
    import sys

    results = []
    for _ in range(runs):
        result = run_once()
        print(json.dumps(result), flush=True)
        results.append(result)
    summary = {"runs": results, "median": {k: statistics.median(r[k] for r in results) for k in median_of},
               "command": " ".join(sys.argv)}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["median"], indent=2))
    return summary


def stop(proc, timeout: float = 30) -> None:
    """Ask a process the bench started to stop (SIGTERM), and kill it if it has not within ``timeout``."""
    import signal
    import subprocess

    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_serve(env: dict, log_path: Path, timeout: float = 120):
    """Start ONE ``carepost serve`` process (``env`` is its whole environment) on a free local
    port, its stderr into ``log_path``; wait until ``GET /healthz`` answers. Returns
    ``(process, base URL)``; stop it with :func:`stop`. Exits with the log's tail if it does not start."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "carepost.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))  # noqa: SIM115 - the server owns it
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=2).read()
            return server, base
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                sys.exit("serve did not start:\n" + Path(log_path).read_text()[-3000:])
            time.sleep(0.3)
