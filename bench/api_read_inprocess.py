"""The API contact read measured in process (issue 11 item 6): CPU per read without HTTP, sockets
or ``wrk`` competing for the two cores, for comparing code versions on a loaded machine.

    .venv/bin/python bench/api_read_inprocess.py
    .venv/bin/python bench/api_read_inprocess.py --reads 2000 --concurrency 16 --runs 3

The same set-up as ``bench/api_read.py`` (fresh data dir, three imported patients, an API key with
``phi:read_unmasked``), then ``GET /api/v1/contacts/{id}`` sent straight into the ASGI app:
``--concurrency`` requests at a time on one event loop, the app's own thread pool, the audit group
commit and checkpoint as in ``serve``. Reports this process's CPU time (user + system, all threads)
per read, and reads per second, per run and the median; checks every read wrote its audit event.
What it leaves out (HTTP parsing, uvicorn) is the same for every version, about 1 ms per request
(``/healthz`` in ``bench/api_read.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import api_read


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database-url", default=None, help="a PostgreSQL database to use (must be empty)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="carepost-bench-api-inproc-"))
    env = {**os.environ, "CAREPOST_DATA_DIR": str(work / "data"), "CAREPOST_LOG_LEVEL": "WARNING",
           "CAREPOST_BASE_URL": "http://localhost"}
    if args.database_url:
        env["CAREPOST_DATABASE_URL"] = args.database_url
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    org_id, token, ids = api_read.setup(env)
    from carepost.app import create_app
    from carepost.assembly import assemble

    assemble()  # the one composition root, as every entry point (setup assembled it already)

    app = create_app()
    path = f"/api/v1/contacts/{ids[0]}"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode())],
             "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80)}

    async def one() -> None:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app(dict(scope), receive, send)
        if sent[0]["status"] != 200:
            raise SystemExit(f"read answered {sent[0]['status']}")

    async def reads(n: int) -> None:
        async def worker(k: int) -> None:
            for _ in range(k):
                await one()

        await asyncio.gather(*(worker(n // args.concurrency) for _ in range(args.concurrency)))

    asyncio.run(reads(min(args.reads, 160)))  # warm-up: imports, pools, keys, remembered key
    before_events = api_read.audit_count(env, org_id)
    runs = []
    for _ in range(args.runs):
        t = os.times()
        cpu, wall = t.user + t.system, time.perf_counter()
        asyncio.run(reads(args.reads))
        t = os.times()
        cpu, wall = t.user + t.system - cpu, time.perf_counter() - wall
        done = args.reads // args.concurrency * args.concurrency
        runs.append({"reads": done, "cpu_ms_per_read": round(1000 * cpu / done, 3), "reads_per_s": round(done / wall, 1)})
    served = sum(r["reads"] for r in runs)
    events = api_read.audit_count(env, org_id) - before_events
    result = {
        "database": "postgresql" if args.database_url else "sqlcipher",
        "command": " ".join([".venv/bin/python", "bench/api_read_inprocess.py", *sys.argv[1:]]),
        "median": {k: statistics.median(r[k] for r in runs) for k in ("cpu_ms_per_read", "reads_per_s")},
        "runs": runs, "every_read_audited": events >= served, "audit_events_written": events,
        "loadavg_before": loadavg_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
