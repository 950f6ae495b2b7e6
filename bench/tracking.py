"""Benchmark: the open pixel and click redirects on one `carepost serve` process (issue 13, speed).

    .venv/bin/python bench/tracking.py
    .venv/bin/python bench/tracking.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

A fresh data dir (embedded SQLCipher, or a scratch PostgreSQL database); an organization, one
tracked message with three recorded links and ``--recipients`` recipients (1000), and an open
token and a click token per recipient (made by ``tracking.engagement_tokens``, exactly as the
pipeline makes them). Then, under the same server (uvicorn, one process, the options of
``carepost serve``):

* **bare**: a bare ASGI app (:func:`bare_app`, below) answering every ``GET /t/o/<token>.gif``
  with the same 43-byte GIF, nothing else — the ceiling of the server itself;
* **open**: ``GET /t/o/<token>.gif`` on ``carepost serve`` — token decrypted and authenticated,
  the request classified (ua-parser), the event **synced to the server's journal before the
  answer**; the engagement event, counter, rollups and webhook check written into the database by
  the server's ingester (a child process of the server: tracking.journal_ingester; the server's
  CPU figures include it);
* **click**: ``GET /t/c/<token>`` on ``carepost serve`` — the same plus the recorded URL, a 302.

Debian's ``wrk`` (``-t2 -c32 -d15s``; a Lua script walks through the recipients' tokens so each
request is a different copy) runs them side by side in one run, ``--runs`` times (median
reported). An open or click is answered once it is synced to the server's journal
(``tracking.engagement_journal``) and moved into the database by the server's ingester beside
the load. So after each load the bench records how many answered events were not yet in the
database (``backlog``), waits for the ingester to catch up (``catch_up_s``), and reports
``sustained_per_s`` — the answers over the load's duration plus that catch-up, the rate the
database keeps up with — beside the answered rate. Durability is checked: every answered open
and click must be in the database once the ingester has caught up. Prints and writes one JSON document (``--out``, default
``bench/results/tracking_<db>.json``).

``--profile PREFIX`` samples the server with py-spy (GIL holder only) during the first run's open
and click loads — where the server's CPU goes, for the next change.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from api_read import _cpu_seconds, _free_port, parse_wrk, server_protocols

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


async def bare_app(scope, receive, send):
    """The bare endpoint: the same pixel, no routing, no middleware, no database."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"image/gif"), (b"content-length", str(len(PIXEL)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": PIXEL})


def setup(env: dict, recipients: int) -> tuple[str, list[str], list[str]]:
    """An organization, one tracked message with three recorded links; an open and a click token per recipient."""
    os.environ.update(env)
    from carepost.assembly import assemble

    assemble()
    from carepost.accounts.service import create_organization
    from carepost.core import clock
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.config import get_settings
    from carepost.core.crypto import get_keyring
    from carepost.core.database import dispose_engine, org_session, system_session
    from carepost.core.ids import new_id
    from carepost.delivery.models import Message
    from carepost.tracking import engagement_tokens
    from carepost.tracking.models import MessageLink

    initialize_storage(get_settings())
    with system_session() as s:
        org = create_organization(s, "Bench Clinic")
        s.commit()
        org_id = org.id
    ring = get_keyring()
    with org_session(org_id) as s:
        m = Message(id=new_id(), org_id=org_id, source="api", from_address="care@bench.example", subject_enc=b"",
                    security="tls_required", purpose="treatment", tags=[], contains_phi=False, track_opens=True,
                    track_clicks=True, created_at=clock.now())
        m.subject_enc = ring.encrypt(s, org_id, Message.__tablename__, "subject", m.id, "Bench")
        s.add(m)
        s.flush()
        for i, url in enumerate(("https://bench.example/a", "https://bench.example/b", "https://bench.example/c")):
            row = MessageLink(id=new_id(), org_id=org_id, message_id=m.id, link_index=i, part="html", url_enc=b"")
            row.url_enc = ring.encrypt(s, org_id, MessageLink.__tablename__, "url", row.id, url)
            s.add(row)
        composed = clock.now().replace(year=clock.now().year - 1)  # long delivered: no "seconds after delivery" rule
        opens, clicks = [], []
        for _ in range(recipients):
            rid = new_id()
            opens.append(f"/t/o/{engagement_tokens.make(s, 'o', org_id, m.id, rid, None, composed)}.gif")
            clicks.append(f"/t/c/{engagement_tokens.make(s, 'c', org_id, m.id, rid, 1, composed)}")
        s.commit()
    dispose_engine()
    return org_id, opens, clicks


def _server_cpu(pid: int) -> float:
    """CPU seconds of the server and its live children (``carepost serve``'s journal ingester
    process, tracking.journal_ingester): its whole cost, not only the answering process's."""
    total = _cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                total += _cpu_seconds(int(child))
            except OSError:
                pass
    return total


def events_now() -> int:
    """Engagement events in the database now (from this process: setup's settings)."""
    from sqlalchemy import func, select

    from carepost.core.database import system_session
    from carepost.tracking.models import EngagementEvent

    with system_session() as s:
        return s.scalar(select(func.count()).select_from(EngagementEvent))


def event_count(env: dict) -> int:
    code = ("from carepost.assembly import assemble; assemble();"
            "from sqlalchemy import func, select; from carepost.tracking.models import EngagementEvent;"
            "from carepost.core.database import system_session;"
            "s = system_session().__enter__(); print(s.scalar(select(func.count()).select_from(EngagementEvent)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


PATHS_SCRIPT = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local counter = 0
local threads = {}
function setup(thread) thread:set("id", #threads); table.insert(threads, thread) end
function init(args) statuses = {}; counter = id * 7919 end
function request()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1], {["User-Agent"] = "%s"})
end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do io.write("status ", k, " ", v, "\\n") end
  end
end
"""


def wrk(base: str, paths: list[str], args, work: Path) -> tuple[dict, str]:
    listing = work / f"paths-{uuid.uuid4().hex[:6]}.txt"
    listing.write_text("\n".join(paths) + "\n")
    script = work / f"walk-{uuid.uuid4().hex[:6]}.lua"
    script.write_text(PATHS_SCRIPT % (listing, UA))
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", "--timeout", "5s",
           "-s", str(script), base + paths[0]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out), out


def start(cmd: list[str], env: dict, log: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
            return proc
        except urllib.error.HTTPError:
            return proc  # answering (the bare app has no /healthz route but answers)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{cmd[0]} did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--recipients", type=int, default=1000)
    p.add_argument("--out", default=None)
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--profile", default=None, metavar="PREFIX",
                   help="py-spy (in .venv) samples the server while it holds the GIL during the first run's open "
                        "and click loads: PREFIX-open.txt and PREFIX-click.txt (collapsed stacks, flamegraph.pl input); "
                        "the sampler slows that run: profile with --runs 1, measure without")
    args = p.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (Debian package wrk)")
    work = Path(tempfile.mkdtemp(prefix="carepost-bench-tracking-"))
    env = {**os.environ, "CAREPOST_DATA_DIR": str(work / "data"), "CAREPOST_LOG_LEVEL": "WARNING",
           "CAREPOST_BASE_URL": "http://localhost", "PYTHONPATH": str(ROOT / "bench") + os.pathsep + os.environ.get("PYTHONPATH", "")}
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
    procs = []
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        _org_id, opens, clicks = setup(env, args.recipients)
        port, bare_port = _free_port(), _free_port()
        server = start([sys.executable, "-m", "carepost.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                       env, work / "serve.log", port)
        procs.append(server)
        # The same server (uvicorn, one process, the options carepost serve passes) with the bare app:
        # the same HTTP parser and event loop as serve (uvicorn's auto choice, named here so the
        # ratio stays honest: httptools and uvloop when installed).
        proto = server_protocols()
        bare = start([sys.executable, "-m", "uvicorn", "tracking:bare_app", "--host", "127.0.0.1", "--port",
                      str(bare_port), "--workers", "1", "--no-access-log", "--no-server-header", "--log-level", "warning",
                      "--http", proto["http"], "--loop", proto["loop"]],
                     env, work / "bare.log", bare_port)
        procs.append(bare)
        base, bare_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{bare_port}"
        # Warm up: keys loaded, ua-parser compiled, caches filled.
        import http.client

        for path in opens[:5] + clicks[:5]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path, headers={"User-Agent": UA})
            status = conn.getresponse().status  # a click's 302 is not followed (its target is not reachable)
            conn.close()
            assert status in (200, 302), status
        before = event_count(env)
        answered_so_far = 0
        runs = []
        for _ in range(args.runs):
            one = {}
            for name, target, paths, pid in (("bare", bare_base, opens, bare.pid), ("open", base, opens, server.pid),
                                             ("click", base, clicks, server.pid)):
                spy = None
                if args.profile and name != "bare" and not runs:
                    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid),
                                            "-d", str(max(1, args.duration - 2)), "-r", "200", "--gil", "-f", "raw",
                                            "-o", f"{args.profile}-{name}.txt", "--nonblocking"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                c0 = _server_cpu(pid)
                res, _raw = wrk(target, paths, args, work)
                if spy is not None:
                    spy.wait(timeout=60)
                res["server_cpu_ms_per_request"] = round((_server_cpu(pid) - c0) * 1000 / max(1, res["requests"]), 3)
                if name != "bare":
                    # Answered (journaled) but not yet in the database when the load stopped; then
                    # wait for the ingester to catch up, so the next load starts clean and the
                    # sustained figures count the ingestion the answers left behind.
                    mine = res["statuses"].get("200" if name == "open" else "302", 0)
                    answered_so_far += mine
                    res["backlog"] = answered_so_far - (events_now() - before)
                    t_end = time.monotonic()
                    while events_now() - before < answered_so_far and time.monotonic() - t_end < 300:
                        time.sleep(0.1)
                    res["catch_up_s"] = round(time.monotonic() - t_end, 2)
                    res["server_cpu_ms_per_event_with_ingest"] = round((_server_cpu(pid) - c0) * 1000 / max(1, mine), 3)
                    res["sustained_per_s"] = round(mine / (args.duration + res["catch_up_s"]), 1)
                one[name] = res
            one["open_vs_bare"] = round(one["open"]["requests_per_s"] / one["bare"]["requests_per_s"], 3)
            one["click_vs_bare"] = round(one["click"]["requests_per_s"] / one["bare"]["requests_per_s"], 3)
            one["open_sustained_vs_bare"] = round(one["open"]["sustained_per_s"] / one["bare"]["requests_per_s"], 3)
            one["click_sustained_vs_bare"] = round(one["click"]["sustained_per_s"] / one["bare"]["requests_per_s"], 3)
            runs.append(one)
        answered = sum(r[k]["statuses"].get(code, 0) for r in runs for k, code in (("open", "200"), ("click", "302")))
        waited = time.monotonic()
        while events_now() - before < answered and time.monotonic() - waited < 600:
            time.sleep(0.2)
        catch_up_s = round(time.monotonic() - waited, 2)
        after = event_count(env)

        def med(kind: str, key: str):
            vals = [r[kind][key] for r in runs if r[kind].get(key) is not None]
            return round(statistics.median(vals), 3) if vals else None

        result = {
            "database": "postgresql" if args.database_url else "sqlcipher",
            "command": " ".join([".venv/bin/python", "bench/tracking.py", *sys.argv[1:]]),
            "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration}s",
            "server": server_protocols(),
            "recipients": args.recipients,
            "median": {kind: {key: med(kind, key) for key in ("requests_per_s", "p50_ms", "p99_ms", "non_2xx",
                                                               "server_cpu_ms_per_request", "backlog", "catch_up_s",
                                                               "server_cpu_ms_per_event_with_ingest", "sustained_per_s")}
                       for kind in ("bare", "open", "click")},
            "median_open_vs_bare": round(statistics.median(r["open_vs_bare"] for r in runs), 3),
            "median_click_vs_bare": round(statistics.median(r["click_vs_bare"] for r in runs), 3),
            "median_open_sustained_vs_bare": round(statistics.median(r["open_sustained_vs_bare"] for r in runs), 3),
            "median_click_sustained_vs_bare": round(statistics.median(r["click_sustained_vs_bare"] for r in runs), 3),
            "runs": runs,
            "durable": {"events_recorded": after - before, "answers_received": answered,
                        "every_answer_recorded": after - before >= answered, "catch_up_s": catch_up_s},
            "loadavg_before": loadavg_before,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name")), None),
            "cpus": os.cpu_count(),
        }
        text = json.dumps(result, indent=2)
        print(text)
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"tracking_{result['database']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if scratch:
            import psycopg

            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        if not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
