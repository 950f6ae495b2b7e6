"""Benchmark: the API read path on one `carepost serve` process (issue 11, item 6).

    .venv/bin/python bench/api_read.py
    .venv/bin/python bench/api_read.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

A fresh data dir (embedded SQLCipher, or a scratch PostgreSQL database), three synthetic
patients imported through the FHIR importer, an API key with ``phi:read_unmasked``; then one
`carepost serve` process and Debian's ``wrk`` (``-t2 -c16 -d20s --latency``, configurable) against

* ``GET /healthz`` (no authentication, no database), the ceiling of the server itself, and
* ``GET /api/v1/contacts/{id}`` with the Bearer key (authentication, decryption, one audit event
  appended to the hash chain per read — committed before the response),

side by side in the same run, each ``--runs`` times (median reported). Besides requests per
second and latency percentiles it reads the server's own CPU time (``/proc/<pid>/stat``, user +
system) to report CPU milliseconds per request, which a loaded machine does not distort the way
it distorts rates. It checks that every read wrote its audit event (events counted before and
after). Prints and writes one JSON document (``--out``, default ``bench/results/api_read_<db>.json``).

``--rate 200`` offers about 200 requests/s instead of as many as the server answers (each
connection waits between requests through wrk's ``delay()`` hook): the latency percentiles at a
given load, as the issue's goal states it, rather than at saturation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_protocols() -> dict:
    """What uvicorn's auto choice (``carepost serve``'s, and the bare app's in bench/tracking.py)
    runs with on this machine: httptools and uvloop when installed, else h11 and asyncio."""
    import importlib.util

    return {"http": "httptools" if importlib.util.find_spec("httptools") else "h11",
            "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> dict:
    res: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["requests_per_s"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else None
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = round(_ms(m.group(1)), 2) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["timeouts"] = int(m.group(4)) if m else 0
    res["socket_errors"] = sum(int(x) for x in m.groups()[:3]) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    statuses: dict[str, int] = {}
    for code, n in re.findall(r"^status (\d+) (\d+)$", out, re.M):
        statuses[code] = statuses.get(code, 0) + int(n)
    res["statuses"] = statuses
    return res


def setup(env: dict) -> tuple[str, str, list[str]]:
    """Schema, an organization, three imported patients and an API key (in this process)."""
    os.environ.update(env)
    from carepost.assembly import assemble

    assemble()
    from sqlalchemy import select

    from carepost.accounts.credentials import create_credential
    from carepost.accounts.service import create_organization
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.config import get_settings
    from carepost.core.database import org_session, system_session
    from carepost.patients.demo import load_demo
    from carepost.patients.models import Contact

    initialize_storage(get_settings())
    with system_session() as s:
        org = create_organization(s, "Bench Clinic")
        s.commit()
        cred, secret = create_credential(s, org.id, name="bench", scopes=["phi:read_masked", "phi:read_unmasked"],
                                         rate_limit_per_minute=100_000)  # the default 600/min would answer 429
        s.commit()
        org_id, token = org.id, f"{cred.key_id}.{secret}"
    with org_session(org_id) as s:
        load_demo(s, org_id, count=3, seed=7)
        ids = list(s.scalars(select(Contact.id).where(Contact.org_id == org_id)))
    from carepost.core.database import dispose_engine

    dispose_engine()
    return org_id, token, ids


def audit_count(env: dict, org_id: str) -> int:
    code = ("import sys; from carepost.assembly import assemble; assemble();"
            "from sqlalchemy import func, select; from carepost.audit.models import AuditEvent;"
            "from carepost.core.database import system_session;"
            "s = system_session().__enter__(); print(s.scalar(select(func.count()).select_from(AuditEvent)"
            f".where(AuditEvent.org_id == '{org_id}', AuditEvent.action == 'contact.read')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _status_sample(req, n: int, concurrency: int) -> dict:
    """Status codes of n concurrent reads (wrk counts non-2xx answers but does not say which)."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor
    import urllib.error

    def one(_):
        try:
            return urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError as err:
            return type(err).__name__

    with ThreadPoolExecutor(concurrency) as pool:
        return dict(Counter(str(x) for x in pool.map(one, range(n))))


STATUS_SCRIPT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do io.write("status ", k, " ", v, "\\n") end
  end
end
"""


def wrk(url: str, args, headers: dict | None = None) -> tuple[dict, str]:
    script = Path(tempfile.mkdtemp(prefix="carepost-wrk-")) / "statuses.lua"
    text = STATUS_SCRIPT
    if getattr(args, "delay_ms", None):
        # --rate: each connection waits this long before its next request (wrk's delay() hook), so
        # the connections together offer about the rate asked for; wrk reports the rate reached.
        text += f"function delay() return {args.delay_ms} end\n"
    script.write_text(text)
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", "--timeout", "2s",
           "-s", str(script)]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="after the timed runs, sample the server with py-spy during one more contact-read run "
                        "(folded stacks into FILE; top functions in the JSON)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the data dir and serve.log")
    p.add_argument("--rate", type=float, default=None,
                   help="offer about this many requests/s instead of as many as the server answers: each "
                        "connection waits connections/rate seconds, less one request's time, between requests")
    args = p.parse_args()
    args.delay_ms = None
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (Debian package wrk)")
    work = Path(tempfile.mkdtemp(prefix="carepost-bench-api-"))
    env = {**os.environ, "CAREPOST_DATA_DIR": str(work / "data"), "CAREPOST_LOG_LEVEL": "WARNING",
           "CAREPOST_BASE_URL": "http://localhost"}
    admin = scratch = None
    if args.database_url:
        import psycopg
        from sqlalchemy.engine import make_url

        admin = make_url(args.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        scratch = f"carepost_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{scratch}"')
        env["CAREPOST_DATABASE_URL"] = make_url(args.database_url).set(
            drivername="postgresql+psycopg", database=scratch).render_as_string(hide_password=False)
    server = None
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        org_id, token, ids = setup(env)
        sys.path.insert(0, str(ROOT / "bench"))
        from _scratch import start_serve

        server, base = start_serve(env, work / "serve.log")
        auth = {"Authorization": f"Bearer {token}"}
        url = f"{base}/api/v1/contacts/{ids[0]}"
        req = urllib.request.Request(url, headers=auth)
        single = []
        for _ in range(20):
            t = time.perf_counter()
            assert urllib.request.urlopen(req, timeout=5).status == 200
            single.append((time.perf_counter() - t) * 1000)
        if args.rate:
            args.delay_ms = max(0, round(args.connections * 1000 / args.rate - statistics.median(single)))
        before_events = audit_count(env, org_id)
        runs = []
        for _ in range(args.runs):
            c0 = _cpu_seconds(server.pid)
            health, _ = wrk(base + "/healthz", args)
            health["server_cpu_ms_per_request"] = round((_cpu_seconds(server.pid) - c0) * 1000 / max(1, health["requests"]), 3)
            c0 = _cpu_seconds(server.pid)
            read, raw = wrk(url, args, auth)
            read["server_cpu_ms_per_request"] = round((_cpu_seconds(server.pid) - c0) * 1000 / max(1, read["requests"]), 3)
            runs.append({"healthz": health, "contact_read": read})
        profile = None
        if args.profile:
            sys.path.insert(0, str(ROOT / "bench"))
            from delivery_worker import summarize_profile

            spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.pid), "--rate", "200", "--format", "raw",
                                    "--nonblocking", "-o", args.profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            wrk(url, args, auth)
            spy.send_signal(2)
            spy.wait(60)
            profile = summarize_profile(Path(args.profile), top=40)
        statuses = _status_sample(req, 200, args.connections)
        after_events = audit_count(env, org_id)
        served = sum(r["contact_read"]["requests"] - r["contact_read"]["non_2xx"] for r in runs)

        def med(kind: str, key: str):
            vals = [r[kind][key] for r in runs if r[kind][key] is not None]
            return round(statistics.median(vals), 3) if vals else None

        result = {
            "database": "postgresql" if args.database_url else "sqlcipher",
            "command": " ".join([".venv/bin/python", "bench/api_read.py", *sys.argv[1:]]),
            "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration}s"
                   + (f", delay {args.delay_ms} ms per connection (--rate {args.rate:g})" if args.rate else ""),
            "server": server_protocols(),
            "single_request_ms_median": round(statistics.median(single), 2),
            "median": {kind: {key: med(kind, key) for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "timeouts",
                                                               "non_2xx", "server_cpu_ms_per_request")}
                       for kind in ("healthz", "contact_read")},
            "runs": runs,
            "status_sample": statuses,
            "profile": profile,
            "audit_events_written": after_events - before_events,
            "contact_reads_answered_2xx": served,
            "every_read_audited": after_events - before_events >= served,
            "loadavg_before": loadavg_before,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "cpus": os.cpu_count(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        text = json.dumps(result, indent=2)
        out = Path(args.out or ROOT / "bench" / "results" / f"api_read_{result['database']}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(text)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if scratch:
            import psycopg

            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        if args.keep_workdir:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
