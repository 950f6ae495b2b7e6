"""The transactional send (``POST /api/v1/messages``) measured in process (issue 17): server CPU
per accepted message without HTTP parsing, sockets or a load generator competing for the two
cores, for comparing code versions and for profiling the accept path.

    .venv/bin/python bench/api_send_inprocess.py
    .venv/bin/python bench/api_send_inprocess.py --requests 1000 --concurrency 8 --runs 3
    .venv/bin/python bench/api_send_inprocess.py --profile /tmp/send.prof   # yappi profile of the last run
    .venv/bin/python bench/api_send_inprocess.py --count-sql                 # SQL statements per request

The same set-up as ``bench/api_send.py`` (fresh data dir, an organization with a proven sending
domain, an API key with ``messages:send``), and the same request bodies (a PHI appointment reminder
to another patient, its own ``Idempotency-Key``), sent straight into the ASGI app with its lifespan
run (as in ``serve``): ``--concurrency`` requests at a time on one event loop. Reports this
process's CPU time (user + system, all threads) per request, requests per second, per run and the
median, and checks that every 202 named its own stored message.
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

import api_send


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database-url", default=None, help="a PostgreSQL database to use (must be empty)")
    p.add_argument("--profile", default=None, help="write a profile (yappi, CPU clock, every thread; pstats format) of the last run here")
    p.add_argument("--count-sql", action="store_true", help="count SQL statements per request (one run)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="carepost-bench-send-inproc-"))
    env = {"CAREPOST_DATA_DIR": str(work / "data"), "CAREPOST_LOG_LEVEL": "WARNING",
           "CAREPOST_BASE_URL": "http://localhost"}
    if args.database_url:
        env["CAREPOST_DATABASE_URL"] = args.database_url
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    org_id, token = api_send.setup(env)
    from carepost.app import create_app
    from carepost.assembly import assemble

    assemble()
    app = create_app()
    statements = [0]
    if args.count_sql:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        @event.listens_for(Engine, "before_cursor_execute")
        def _count(*_a, **_k):
            statements[0] += 1

    answered: list[str] = []

    async def one(body: bytes, key: str) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": api_send.PATH, "raw_path": api_send.PATH.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode()),
                             (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             (b"idempotency-key", key.encode())],
                 "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80)}
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        if sent[0]["status"] != 202:
            raise SystemExit(f"send answered {sent[0]['status']}: {b''.join(m.get('body', b'') for m in sent[1:])[:300]!r}")
        answered.append(json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["id"])

    async def lifespan_and(coro_factory):
        queue: asyncio.Queue = asyncio.Queue()
        await queue.put({"type": "lifespan.startup"})
        sent: list = []

        async def receive():
            return await queue.get()

        async def send(message):
            sent.append(message)

        task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
        while not sent:
            await asyncio.sleep(0.01)
        try:
            return await coro_factory()
        finally:
            await queue.put({"type": "lifespan.shutdown"})
            await task

    async def requests(bodies) -> None:
        it = iter(bodies)

        async def worker() -> None:
            for body, key in it:
                await one(body, key)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))

    runs = []

    async def all_runs() -> None:
        await requests(api_send.payloads("warm", 100))
        for r in range(args.runs if not args.count_sql else 1):
            bodies = api_send.payloads(f"r{r}", args.requests)
            statements[0] = 0
            prof = args.profile and r == args.runs - 1
            t = os.times()
            cpu, wall = t.user + t.system, time.perf_counter()
            if prof:
                import yappi

                yappi.set_clock_type("cpu")
                yappi.start(builtins=False, profile_threads=True)
            await requests(bodies)
            if prof:
                yappi.stop()
                yappi.get_func_stats().save(args.profile, type="pstat")
            t = os.times()
            cpu, wall = t.user + t.system - cpu, time.perf_counter() - wall
            runs.append({"requests": len(bodies), "cpu_ms_per_request": round(1000 * cpu / len(bodies), 3),
                         "requests_per_s": round(len(bodies) / wall, 1),
                         **({"sql_statements_per_request": round(statements[0] / len(bodies), 2)} if args.count_sql else {})})

    asyncio.run(lifespan_and(all_runs))
    ids, recipients = api_send.stored(org_id)
    result = {
        "database": "postgresql" if args.database_url else "sqlcipher",
        "command": " ".join([".venv/bin/python", "bench/api_send_inprocess.py", *sys.argv[1:]]),
        "median": {k: statistics.median(r[k] for r in runs) for k in ("cpu_ms_per_request", "requests_per_s")},
        "runs": runs,
        "every_202_stored": len(set(answered)) == len(answered) and set(answered) == set(ids) and recipients == len(ids),
        "loadavg_before": loadavg_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
