"""A campaign of 1,000,000 recipients end to end on one machine, PostgreSQL and Redis (issue 17,
item 4: "plan, send to a sink, tracking events, analytics updated").

    .venv/bin/python bench/campaign_million.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \\
        --queue-url redis://127.0.0.1:6379/9                                  # 1,000,000 recipients
    .venv/bin/python bench/campaign_million.py --recipients 3000 --database-url ... --queue-url ...  # a quick check

Set-up (untimed, reported): a scratch PostgreSQL database (dropped after, ``--keep`` keeps it)
and a fresh data dir; the segments benchmark's synthetic population (``bench/segments_population.py``)
large enough that about ``--recipients`` of its contacts are planned (~62 % are: a living contact
with an email address and a signed marketing authorization; ``bench/campaigns.py``'s
``prepare_consent``), every address at the sink's domain; a proven sending domain with DKIM keys.

Then, each step timed:

1. **Plan** in this process: ``bench/campaign_send.py``'s campaign (segment ``age >= 0``,
   ``{{ first_name }}`` decrypted per contact, a dynamic block on ``has condition icd10cm:E11.*``,
   ``tls_required``, opens and clicks tracked), this process's RSS sampled.
2. **Send**: the campaign's sending task queued in Redis and ``--workers`` ``carepost worker``
   processes (``--threads`` each) started at once: materializing (rendering, storing, link and
   pixel rewriting), the delivery pipeline (consent re-check, DKIM RSA-2048 + Ed25519, pooled
   verified TLS to ``bench/smtp_sink.py``, evidence). The clock runs until every planned
   recipient's delivery is over; the sink records every Message-ID and every message's
   open-pixel path, read from its HTML part.
3. **Tracking events**: while the campaign is sent, ONE ``carepost serve`` process is opened by a
   client as a mail reader would: for ``--open-share`` of the received messages (chosen by the
   pixel's hash, so the same ones in every run) ``GET /t/o/<token>.gif`` with a desktop mail
   client's user agent, over keep-alive connections (``--openers`` threads), as soon as the sink
   has it. Answers by status are counted.
4. **Analytics**: once every open is answered the server is stopped (its journal drained into
   the database), then the campaign's figures are read as the dashboard reads them
   (``tracking.analytics.summary`` in a read session: pending increments folded first), timed,
   and checked: ``delivered`` equals the recipients delivered, ``opened_unique`` the distinct
   pixels answered 200.

Reported (JSON on stdout and in ``--out``, default bench/results/campaign_million_<time>.json):
population and consent set-up times; planned/excluded and planning seconds and RSS; the send's
wall seconds, messages per second, workers' CPU per message, RSS over the run (flat?), deciles;
the sink's count by Message-ID (missing, arrived twice, unexpected: all must be 0); opens fired,
answered by status, the server's CPU; the analytics read's seconds and its checks; the load
average before and after each step, and the machine. Speed is measured here, never asserted in
tests (ARCHITECTURE.md section 7).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import campaign_send as cs
import campaigns as campaigns_bench
import delivery_worker as dw
import segments_population as pop
from _scratch import start_serve, stop
from tracking import (
    _server_cpu as cpu_seconds_tree,  # the server and its live children (the ingester)
)

PLANNED_SHARE = 0.615  # of the population's contacts, planned (bench/results/campaigns-postgresql-1m.json)
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.6.0"


def chosen(pixel: str, share: float) -> bool:
    """The same pixels in every run: by the hash of the path."""
    return int.from_bytes(hashlib.sha256(pixel.encode()).digest()[:4], "big") < share * 2**32


class Opener:
    """Follows the sink's file of open pixels and loads the chosen ones from ``carepost serve``,
    ``threads`` keep-alive connections; counts the answers by status."""

    def __init__(self, opens_file: Path, base: str, share: float, threads: int):
        self.opens_file, self.share = opens_file, share
        self.host, self.port = base.removeprefix("http://").split(":")
        self.work: queue.Queue = queue.Queue(maxsize=10000)
        self.status: Counter = Counter()
        self.answered_200: set[str] = set()
        self.lock = threading.Lock()
        self.seen = self.fired = 0
        self.done = threading.Event()  # the sink has nothing more (set by the caller)
        self.threads = [threading.Thread(target=self._load, daemon=True) for _ in range(threads)]
        self.reader = threading.Thread(target=self._follow, daemon=True)

    def start(self) -> None:
        self.reader.start()
        for t in self.threads:
            t.start()

    def _follow(self) -> None:
        offset, rest = 0, b""
        while True:
            finished = self.done.is_set()  # read once more after the last message arrived
            with open(self.opens_file, "rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                pixel = line.decode()
                self.seen += 1
                if chosen(pixel, self.share):
                    self.fired += 1
                    self.work.put(pixel)
            if finished:
                break
            time.sleep(0.2)
        for _ in self.threads:
            self.work.put(None)

    def _load(self) -> None:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        while True:
            pixel = self.work.get()
            if pixel is None:
                conn.close()
                return
            try:
                conn.request("GET", pixel, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
            with self.lock:
                self.status[str(status)] += 1
                if status == 200:
                    self.answered_200.add(pixel)

    def join(self, timeout: float) -> None:
        self.reader.join(timeout)
        for t in self.threads:
            t.join(timeout)


class Progress:
    """``done_of`` for ``run_worker`` without a count over the campaign's recipients every half
    second (at a million rows that query was the busiest PostgreSQL backend of the run, and grew
    with the table): the sink's count of arrived messages, read incrementally, and the database's
    count once a minute and whenever the sink has them all. Prints a progress line each minute."""

    def __init__(self, record: Path, org_id: str, campaign_id: str, total: int):
        self.record, self.org_id, self.campaign_id, self.total = record, org_id, campaign_id, total
        self.offset = self.arrived = 0
        self.last = time.monotonic()
        self.started = self.last
        self.statuses: dict[str, int] = {}
        self.done = 0

    def __call__(self) -> tuple[int, dict[str, int]]:
        with open(self.record, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        self.arrived += data.count(b"\n")
        now = time.monotonic()
        if self.arrived >= self.total or now - self.last >= 60:
            self.done, self.statuses = cs.campaign_statuses(self.org_id, self.campaign_id)
            self.last = now
            print(json.dumps({"progress": {"seconds": round(now - self.started), "arrived": self.arrived,
                                           "done": self.done, "load": os.getloadavg()}}), file=sys.stderr, flush=True)
        if self.done >= self.total:
            return self.done, self.statuses
        return min(max(self.arrived, self.done), self.total - 1), self.statuses


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                        * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version()}


def analytics_read(org_id: str, campaign_id: str) -> tuple[dict, float]:
    """The campaign's totals as the dashboard reads them (pending increments folded first): (figures, seconds)."""
    from carepost.core import clock
    from carepost.core.database import read_only_session
    from carepost.tracking import analytics

    today = clock.now().date()
    f = analytics.Filters(start=today - timedelta(days=2), end=today + timedelta(days=1), campaign_id=campaign_id)
    started = time.perf_counter()
    with read_only_session(org_id) as s:
        figures = analytics.summary(s, org_id, f)
    return figures, time.perf_counter() - started


def server_settings(admin_url: str) -> dict:
    """The PostgreSQL server's settings that change what a long run measures: autovacuum (off, dead
    rows pile up in every index a queue's status walks) and shared_buffers."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as c:
        return {name: c.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
                for name in ("server_version", "server_version_num", "autovacuum", "shared_buffers")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipients", type=int, default=1_000_000, help="about this many planned (the population is sized for it)")
    p.add_argument("--database-url", required=True, help="PostgreSQL admin URL; a scratch database is created")
    p.add_argument("--queue-url", required=True, help="redis://... (the queue of the workers)")
    p.add_argument("--workers", type=int, default=3, help="carepost worker processes")
    p.add_argument("--threads", type=int, default=4, help="task threads of each worker")
    p.add_argument("--open-share", type=float, default=0.2, help="share of the received messages opened")
    p.add_argument("--openers", type=int, default=4, help="client threads loading the pixels")
    p.add_argument("--keep", action="store_true", help="keep the scratch database and data dir")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args()

    contacts = max(100, round(args.recipients / PLANNED_SHARE))
    admin, scratch = pop.setup_database(args.database_url, keep=args.keep)
    server = {"start": server_settings(args.database_url)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            record, opens = tmp_path / "arrived.txt", tmp_path / "opens.txt"
            record.touch()
            opens.touch()
            sink, port, ca_file = dw.start_sink(tmp_path, record, opens)
            try:
                result = run(args, contacts, tmp_path, record, opens, port, ca_file)
            finally:
                result_received = dw.stop_sink(sink)
    finally:
        if not args.keep:
            pop.drop_database(admin, scratch)
            pop.remove_data_dir()
    result["sink_received"] = result_received
    server["end"] = server_settings(args.database_url)  # a setting changed during the run shows here
    result["postgresql"] = server
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / f"campaign_million_{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def run(args, contacts: int, tmp_path: Path, record: Path, opens: Path, port: int, ca_file: Path) -> dict:
    from carepost.campaigns import planning
    from carepost.campaigns.tasks import send_campaign
    from carepost.core.config import get_settings
    from carepost.core.database import get_engine
    from carepost.delivery.tasks import refresh_statistics

    env = dw.bench_env(os.environ["CAREPOST_DATA_DIR"], port, ca_file,
                       database_url=os.environ.get("CAREPOST_DATABASE_URL"), queue_url=args.queue_url,
                       mx_domains=(cs.SINK_DOMAIN,))
    dw.start_carepost(env)  # applies env, then assemble() (the one composition root) and initialize_storage()
    loads = {"start": os.getloadavg()}

    def step(name: str, started: float) -> float:
        loads[name] = os.getloadavg()
        print(json.dumps({"step": name, "seconds": round(time.perf_counter() - started, 1),
                          "load": loads[name]}), file=sys.stderr, flush=True)
        return round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    org_id = pop.create_org("Campaign Million Bench")
    population = pop.populate(get_engine(), org_id, contacts)
    pop.analyze(get_engine())
    consent = campaigns_bench.prepare_consent(org_id)
    consent["sink_addresses"] = cs.sink_addresses(org_id)
    cs.sending_domain(org_id, "clinic.example")
    setup_seconds = step("setup", started)

    campaign_id = cs.make_campaign(org_id, contacts)
    chunk = get_settings().campaign_plan_chunk
    with campaigns_bench.RssSampler() as sampler:
        started = time.perf_counter()
        report = planning.plan(org_id, campaign_id, chunk_size=chunk)
        plan_seconds = step("plan", started)
    if not report.finished or not report.planned:
        raise SystemExit(f"planning did not finish with recipients: {report}")
    refresh_statistics.call_local()

    serve_env = {**os.environ, **env, "CAREPOST_LOG_LEVEL": "WARNING"}
    server, base = start_serve(serve_env, tmp_path / "serve.log")
    opener = Opener(opens, base, args.open_share, args.openers)
    server_cpu_before = cpu_seconds_tree(server.pid)
    try:
        opener.start()
        send_campaign(org_id, campaign_id)
        run_ = dw.run_worker(env, tmp_path / "worker-million.log", args.threads, report.planned,
                             Progress(record, org_id, campaign_id, report.planned), processes=args.workers)
        send_seconds = round(run_["elapsed"], 1)
        loads["send"] = os.getloadavg()
        opener.done.set()
        started = time.perf_counter()
        opener.join(timeout=600)
        opens_after_send_seconds = round(time.perf_counter() - started, 1)
        server_cpu = cpu_seconds_tree(server.pid) - server_cpu_before
    finally:
        stop(server, timeout=120)  # a clean stop drains the server's journal into the database
    loads["opens"] = os.getloadavg()

    check, _ = cs.sink_check(record, 0, cs.message_id_headers(org_id, campaign_id=campaign_id))
    figures, read_seconds = analytics_read(org_id, campaign_id)
    second_read = analytics_read(org_id, campaign_id)[1]
    delivered = run_["statuses"].get("delivered", 0)
    opened = len(opener.answered_200)
    return {
        "database": "postgresql", "queue": "redis", "machine": machine(),
        "command": " ".join(["bench/campaign_million.py", *sys.argv[1:]]),
        "population": population, "consent": consent, "setup_seconds": setup_seconds,
        "plan": {"seconds": plan_seconds, "planned": report.planned, "excluded": report.excluded,
                 "chunk": chunk, "rss_mb_max": max(sampler.samples or [0]),
                 "rss_mb_first_tenth_max": max((sampler.samples or [0])[: max(1, len(sampler.samples) // 10)])},
        "send": {"workers": args.workers, "threads": args.threads, "send_seconds": send_seconds,
                 **dw.worker_figures(run_, report.planned), "statuses": run_["statuses"],
                 "worker_errors": len(run_["errors"]),
                 **({"worker_error_lines": [e.rstrip()[:2000] for e in run_["errors"][:20]]} if run_["errors"] else {}),
                 "sink": check},
        "opens": {"share": args.open_share, "pixels_received": opener.seen, "fired": opener.fired,
                  "answers": dict(opener.status), "distinct_answered_200": opened,
                  "seconds_after_send": opens_after_send_seconds,
                  # the serve's CPU over the whole send (idle time included), per open fired
                  "server_cpu_seconds": round(server_cpu, 2),
                  "server_cpu_ms_per_open": round(1000 * server_cpu / max(opener.fired, 1), 3)},
        "analytics": {"read_seconds": round(read_seconds, 3), "second_read_seconds": round(second_read, 3),
                      "figures": figures,
                      "delivered_matches": figures.get("delivered") == delivered,
                      "opened_unique_matches": figures.get("opened_unique") == opened},
        "all_counted_once": check["missing"] == 0 and check["arrived_twice"] == 0 and check["unexpected"] == 0,
        "load_average": loads,
    }


if __name__ == "__main__":
    main()
