"""Soak: is memory flat over an hour of steady transactional traffic? (issue 17, item 4)

    .venv/bin/python bench/soak.py --minutes 60 --rate 20 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres --queue-url redis://127.0.0.1:6379/10

Set-up (the helpers of ``bench/api_send.py`` and ``bench/delivery_worker.py``): a scratch
PostgreSQL database (``_scratch.scratch_storage``, created and dropped), Redis as the queue, the
TLS sink (``bench/smtp_sink.py``, its CA trusted: verified TLS) recording each Message-ID, an
organization with a proven sending domain and a ``messages:send`` API key; then ONE
``carepost serve`` and ONE ``carepost worker`` with its periodic tasks ON (as in production).

Load: ``POST /api/v1/messages`` at a constant rate (open loop: request *i* is due at
``t0 + i / rate``, its latency measured from that due time), each one patient and a PHI
appointment reminder (``api_send.payloads``), for ``--minutes``.

Every ``--interval`` seconds a sample: RSS (``/proc/<pid>/status``) and USS/PSS
(``/proc/<pid>/smaps_rollup``) of serve and worker (each with its child processes, if any),
accepted (202) and delivered (database) counts, p50/p99 latency of the requests answered in that
interval, the load average. After the load: waits until every accepted message is delivered,
stops everything and counts the Message-IDs the sink received (each message exactly once?).

Reported (``--out``, default ``bench/results/soak_postgresql.json``): the samples; per process
the RSS after ``--warmup-minutes`` and at the end, and the least-squares slope of RSS over the
post-warm-up samples in MiB per hour; "flat" = slope under 5 MiB/hour AND end RSS within 10 % of
the post-warm-up RSS. The machine is shared during a soak: latencies are reported but are not a
latency benchmark (``bench/api_send.py`` is); memory is what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _scratch import scratch_storage, start_serve, stop
from api_send import PATH, _pct, exchange, loadavg, machine, payloads, request_head, setup, stored
from delivery_worker import (
    bench_env,
    count_statuses,
    sink_arrivals,
    start_sink,
    stop_sink,
)

FLAT_SLOPE_MIB_PER_HOUR = 5.0
FLAT_END_WITHIN = 0.10


def _children(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def memory_mib(pid: int) -> dict:
    """RSS, USS (private clean + dirty) and PSS of ``pid`` and its descendants, MiB."""
    rss = uss = pss = 0
    pids = _children(pid)
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    kib = int(rest.split()[0])
                    if key == "Rss":
                        rss += kib
                    elif key == "Pss":
                        pss += kib
                    else:
                        uss += kib
        except (FileNotFoundError, ProcessLookupError):
            continue
    return {"rss": round(rss / 1024, 1), "uss": round(uss / 1024, 1), "pss": round(pss / 1024, 1),
            "processes": len(pids)}


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per hour."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    return round(sum((t - mx) * (v - my) for t, v in points) / sxx * 3600, 2)


class Load:
    """Open-loop POSTs at ``rate`` per second over at most ``connections`` keep-alive connections,
    bodies made as they fall due; each answer recorded as (answered at, latency ms, status, id)."""

    def __init__(self, base: str, token: str, rate: float, seconds: float, connections: int, timeout: float):
        self.base, self.token, self.rate, self.seconds = base, token, rate, seconds
        self.connections, self.timeout = connections, timeout
        self.answers: list[tuple[float, float, str, str | None]] = []  # appended by the loop thread
        self.lock = threading.Lock()

    async def run(self) -> None:
        host, port = self.base.removeprefix("http://").split(":")
        head = request_head(host, port, self.token)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def connection() -> None:
            conn = None
            while True:
                item = await queue.get()
                if item is None:
                    break
                i, due = item
                (body, key), = payloads(f"s{i}", 1)
                raw = head + f"Idempotency-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(host, int(port))
                    status, answer = await asyncio.wait_for(exchange(conn, raw), self.timeout)
                    mid = json.loads(answer)["id"] if status == 202 else None
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as err:
                    status, mid = type(err).__name__, None
                    if conn is not None:
                        conn[1].close()
                    conn = None
                now = loop.time()
                with self.lock:
                    self.answers.append((time.monotonic(), (now - due) * 1000, str(status), mid))
            if conn is not None:
                conn[1].close()

        workers = [asyncio.create_task(connection()) for _ in range(self.connections)]
        t0 = loop.time() + 0.1
        for i in range(int(self.rate * self.seconds)):
            due = t0 + i / self.rate
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.put_nowait((i, due))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)


def delivered_count(org_id: str) -> tuple[int, dict]:
    statuses = count_statuses(org_id)
    return statuses.get("delivered", 0), statuses


def log_errors(path: Path) -> list[str]:
    try:
        return [line.strip()[:300] for line in path.read_text(errors="replace").splitlines()
                if "ERROR" in line or '"level": "error"' in line or "Traceback" in line]
    except FileNotFoundError:
        return []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="PostgreSQL admin URL; a scratch database is created and dropped")
    p.add_argument("--queue-url", default="redis://127.0.0.1:6379/10")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (constant, open loop)")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--warmup-minutes", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--worker-threads", type=int, default=4)
    p.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for the last deliveries")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    seconds = args.minutes * 60
    load_before = loadavg()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    samples: list[dict] = []
    sink = worker = server = None
    with scratch_storage(args.database_url, prefix="carepost-bench-soak-") as work:
        record = work / "sink-message-ids.txt"
        sink, sink_port, ca_file = start_sink(work, record=record)
        env = {**os.environ, "CAREPOST_BASE_URL": "http://localhost"}
        env.update(bench_env(env["CAREPOST_DATA_DIR"], sink_port, ca_file,
                             database_url=env["CAREPOST_DATABASE_URL"], queue_url=args.queue_url))
        try:
            # api_send.setup runs assemble() (the one composition root) before it touches CarePost.
            org_id, token = setup(env)
            server, base = start_serve(env, work / "serve.log")
            worker = subprocess.Popen([sys.executable, "-m", "carepost.cli", "worker", "--threads",
                                       str(args.worker_threads)],  # periodic tasks on, as in production
                                      env=env, stdout=open(work / "worker.log", "w"),  # noqa: SIM115 - the worker owns it
                                      stderr=subprocess.STDOUT)
            load = Load(base, token, args.rate, seconds, args.connections, args.timeout)
            thread = threading.Thread(target=lambda: asyncio.run(load.run()), daemon=True)
            t0 = time.monotonic()
            thread.start()
            seen = 0
            while True:
                alive = thread.is_alive()
                time.sleep(max(0.0, t0 + args.interval * (len(samples) + 1) - time.monotonic()) if alive else 0)
                now = time.monotonic()
                with load.lock:
                    fresh = load.answers[seen:]
                    seen = len(load.answers)
                    accepted = sum(1 for a in load.answers if a[2] == "202")
                lat = sorted(a[1] for a in fresh)
                delivered, _ = delivered_count(org_id)
                sample = {"t_s": round(now - t0, 1), "serve_mib": memory_mib(server.pid),
                          "worker_mib": memory_mib(worker.pid), "answered": seen, "accepted": accepted,
                          "delivered": delivered, "interval_answers": len(fresh),
                          "interval_errors": sum(1 for a in fresh if a[2] != "202"),
                          "interval_p50_ms": _pct(lat, 50), "interval_p99_ms": _pct(lat, 99),
                          "loadavg": loadavg()}
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                for proc, name in ((server, "serve"), (worker, "worker")):
                    if proc.poll() is not None:
                        raise SystemExit(f"{name} exited: " + (work / f"{name}.log").read_text()[-3000:])
                if not alive:
                    break
            thread.join()
            accepted_ids = [a[3] for a in load.answers if a[2] == "202"]
            # Drain: every accepted message delivered (the worker keeps running, periodic tasks on).
            drain_start = time.monotonic()
            while True:
                delivered, statuses = delivered_count(org_id)
                if delivered >= len(accepted_ids) or time.monotonic() - drain_start > args.drain_timeout:
                    break
                time.sleep(2)
            drain_seconds = round(time.monotonic() - drain_start, 1)
            end_memory = {"serve": memory_mib(server.pid), "worker": memory_mib(worker.pid)}
            time.sleep(3)  # the sink's last records
            arrivals = sink_arrivals(org_id, [line.strip() for line in record.read_text().splitlines()])
            stored_ids, _recipients = stored(org_id)
        finally:
            stop(worker)
            stop(server)
            received = stop_sink(sink) if sink is not None else None
            errors = {"serve_log": log_errors(work / "serve.log"), "worker_log": log_errors(work / "worker.log")}
            from carepost.core.database import dispose_engine

            dispose_engine()
            shutil.rmtree(work, ignore_errors=True)

    statuses_all: dict[str, int] = {}
    for a in load.answers:
        statuses_all[a[2]] = statuses_all.get(a[2], 0) + 1
    warm = [s for s in samples if s["t_s"] >= args.warmup_minutes * 60]
    memory = {}
    for name in ("serve", "worker"):
        key = f"{name}_mib"
        if not warm:
            memory[name] = None
            continue
        rss_warm, rss_end = warm[0][key]["rss"], warm[-1][key]["rss"]
        slope = slope_per_hour([(s["t_s"], s[key]["rss"]) for s in warm])
        uss_slope = slope_per_hour([(s["t_s"], s[key]["uss"]) for s in warm])
        memory[name] = {
            "rss_after_warmup_mib": rss_warm, "rss_end_mib": rss_end,
            "rss_max_post_warmup_mib": max(s[key]["rss"] for s in warm),
            "rss_end_change_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2),
            "rss_slope_mib_per_hour": slope,
            "uss_after_warmup_mib": warm[0][key]["uss"], "uss_end_mib": warm[-1][key]["uss"],
            "uss_slope_mib_per_hour": uss_slope,
            "rss_after_drain_mib": end_memory[name]["rss"],
            "flat": slope is not None and slope < FLAT_SLOPE_MIB_PER_HOUR
                    and abs(rss_end - rss_warm) <= FLAT_END_WITHIN * rss_warm,
        }
    lat_all = sorted(a[1] for a in load.answers)
    result = {
        "command": " ".join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]]),
        "machine": machine(),
        "database": "postgresql (scratch database)", "queue": args.queue_url,
        "processes": {"serve": 1, "worker": f"1, {args.worker_threads} threads, periodic tasks on"},
        "load": f"open loop, {args.rate:g} POST {PATH}/s (one PHI message each) for {args.minutes:g} min, "
                f"up to {args.connections} keep-alive connections; sink over verified TLS",
        "flat_definition": f"post-warm-up RSS slope (least squares, samples after {args.warmup_minutes:g} min) under "
                           f"{FLAT_SLOPE_MIB_PER_HOUR:g} MiB/hour AND end RSS within "
                           f"{FLAT_END_WITHIN:.0%} of the post-warm-up RSS",
        "memory": memory,
        "flat": all(m and m["flat"] for m in memory.values()),
        "requests": len(load.answers), "accepted": len(accepted_ids), "stored_messages": len(stored_ids),
        "statuses": statuses_all,
        "latency_whole_run_ms": {"p50": _pct(lat_all, 50), "p99": _pct(lat_all, 99),
                                 "max": round(lat_all[-1], 1) if lat_all else None,
                                 "note": "shared machine: not a latency benchmark"},
        "delivery": {"statuses": statuses, "drain_seconds_after_load": drain_seconds, "sink_received": received,
                     **arrivals,
                     "every_accepted_delivered_once": arrivals["missing"] == 0 and arrivals["arrived_twice"] == 0
                     and statuses.get("delivered", 0) == arrivals["messages"]
                     and len(set(accepted_ids)) == len(accepted_ids) and set(accepted_ids) == set(stored_ids)},
        "errors": {"request_errors": len(load.answers) - len(accepted_ids), **{k: len(v) for k, v in errors.items()},
                   "first_log_errors": (errors["serve_log"] + errors["worker_log"])[:20]},
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "loadavg_max_1min": max((float(s["loadavg"][0]) for s in samples), default=None),
        "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "samples": samples,
    }
    text = json.dumps(result, indent=2)
    out = Path(args.out or ROOT / "bench" / "results" / "soak_postgresql.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(json.dumps({k: result[k] for k in ("memory", "flat", "accepted", "delivery", "errors")}, indent=2))


if __name__ == "__main__":
    main()
