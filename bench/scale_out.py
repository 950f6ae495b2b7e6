"""Scale-out (issue 17): messages sent per worker CPU-second with three worker processes against one,
measured in one run.

    .venv/bin/python bench/scale_out.py --count 10000 --runs 3 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres --queue-url redis://127.0.0.1:6379/9
    .venv/bin/python bench/scale_out.py --count 2000            # SQLCipher, the local SQLite queue

One run, in a fresh scratch database (``--database-url`` is an administrator's URL: a database is
created beside it and dropped after, bench/_scratch.py) and a fresh data dir, with one local TLS
sink (bench/smtp_sink.py, its own process) recording every Message-ID it accepts:

* phase A: ``--count`` personalized messages carrying PHI (verified TLS required, DKIM RSA-2048 +
  Ed25519) are accepted through ``delivery.service.accept_batch`` (untimed) by a new organization,
  queued, and sent by ONE ``carepost worker`` process;
* phase B: ``--count`` more, by a second organization, sent by ``--processes`` (3) worker
  processes started at once.

The pipeline is bench/delivery_worker.py's (``transactional``, ``run_worker``). Per phase: wall
time from the workers' start until every recipient's delivery is over, messages per second, the
workers' CPU (user + system from ``/proc/<pid>/stat``, summed over the processes), messages per
worker CPU-second (whole phase, and steady: from the first delivery on, without the workers'
start-up), the share of the machine's cores that were busy (``/proc/stat``: workers, database,
queue and sink together); then the ratio B / A of messages per worker CPU-second (issue 17's goal:
>= 0.80) and every Message-ID counted at the sink (missing, twice, flagged ``possible_duplicate``).

``--runs N`` runs it N times, each in its own process (a fresh interpreter, database and data
dir), and writes every run and the medians to ``bench/results/scale_out_<database>.json`` with the
command, the machine and the load average before and after. Speed is measured here, never
asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _scratch  # noqa: E402
from delivery_worker import (  # noqa: E402
    bench_env,
    sink_arrivals,
    start_carepost,
    start_sink,
    stop_sink,
    transactional,
    worker_figures,
)

# The figures whose median over the runs is published (keys of one run's result).
MEDIAN_OF = ("a_seconds", "a_messages_per_second", "a_worker_cpu_seconds", "a_messages_per_worker_cpu_second",
             "a_steady_messages_per_worker_cpu_second", "a_machine_cpu_busy",
             "b_seconds", "b_messages_per_second", "b_worker_cpu_seconds", "b_messages_per_worker_cpu_second",
             "b_steady_messages_per_worker_cpu_second", "b_machine_cpu_busy",
             "ratio_b_over_a", "steady_ratio_b_over_a", "rate_ratio_b_over_a")


def machine() -> dict:
    """What the figures were measured on (from /proc)."""
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"cpus": os.cpu_count(), "cpu_model": models[0] if models else None,
            "memory_gib": round(mem_kb / 1024 / 1024, 1)}


def phase(name: str, count: int, processes: int, tmp_path: Path, env: dict[str, str], threads: int) -> tuple[str, dict]:
    """Accept ``count`` messages for a new organization and send them with ``processes`` workers:
    (organization id, figures)."""
    load_before = os.getloadavg()
    org_id, ids, accept_seconds, run = transactional(count, tmp_path, env, threads, domain=f"{name}.bar.example",
                                                     processes=processes)
    figures = worker_figures(run, len(ids))
    steady_ms = figures["steady_worker_cpu_ms_per_message"]
    return org_id, {
        "processes": processes, "messages": len(ids), "seconds": figures["seconds"],
        "messages_per_second": figures["messages_per_second"],
        "steady_messages_per_second": figures["steady_messages_per_second"],
        "worker_cpu_seconds": figures["worker_cpu_seconds"],
        "worker_cpu_seconds_each": [round(c, 2) for c in run["worker_cpu_each"]],
        "worker_cpu_ms_per_message": figures["worker_cpu_ms_per_message"],
        "messages_per_worker_cpu_second": figures["messages_per_worker_cpu_second"],
        "steady_worker_cpu_ms_per_message": steady_ms,
        "steady_messages_per_worker_cpu_second": round(1000 / steady_ms, 1) if steady_ms else None,
        "machine_cpu_busy": round(run["machine_cpu_busy"], 3),
        "worker_start_seconds": figures["worker_start_seconds"],
        "deciles": figures["deciles"], "worker_rss_mib_summed": figures["worker_rss_mib"],
        "statuses": run["statuses"], "worker_errors": len(run["errors"]),
        "accept_seconds": round(accept_seconds, 1),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }


def one_run(args) -> dict:
    """Phase A (one worker) then phase B (``args.processes`` workers) in one scratch database."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="carepost-scale-out-") as tmp, \
            _scratch.scratch_database(args.database_url) as database_url:
        tmp_path = Path(tmp)
        record = tmp_path / "arrived.txt"
        record.touch()
        sink, port, ca_file = start_sink(tmp_path, record)
        try:
            env = bench_env(tmp_path / "data", port, ca_file, batch_size=args.batch_size,
                            concurrency=args.concurrency, pool_size=args.pool_size, database_url=database_url,
                            queue_url=args.queue_url)
            start_carepost(env)
            org_a, a = phase("a", args.count, 1, tmp_path, env, args.threads)
            org_b, b = phase("b", args.count, args.processes, tmp_path, env, args.threads)
            arrived = record.read_text().splitlines()
            sink_a, sink_b = sink_arrivals(org_a, arrived), sink_arrivals(org_b, arrived)
        finally:
            received = stop_sink(sink)

    def ratio(key: str) -> float | None:
        return round(b[key] / a[key], 3) if a[key] and b[key] else None

    result = {
        "a_" + k: a[k] for k in ("seconds", "messages_per_second", "worker_cpu_seconds",
                                 "messages_per_worker_cpu_second", "steady_messages_per_worker_cpu_second",
                                 "machine_cpu_busy")}
    result.update({
        "b_" + k: b[k] for k in ("seconds", "messages_per_second", "worker_cpu_seconds",
                                 "messages_per_worker_cpu_second", "steady_messages_per_worker_cpu_second",
                                 "machine_cpu_busy")})
    result.update({
        "ratio_b_over_a": ratio("messages_per_worker_cpu_second"),
        "steady_ratio_b_over_a": ratio("steady_messages_per_worker_cpu_second"),
        "rate_ratio_b_over_a": ratio("messages_per_second"),
        "goal_ratio_at_least": 0.80,
        "phase_a": a, "phase_b": b,
        "sink": {"received": received, "phase_a": sink_a, "phase_b": sink_b,
                 "every_message_once_or_flagged": all(s["missing"] == 0 and s["duplicates_not_flagged"] == 0
                                                      for s in (sink_a, sink_b))},
        "database": "postgresql" if args.database_url else "sqlcipher",
        "queue": "redis" if args.queue_url else "sqlite",
        "worker_threads": args.threads, "batch_size": args.batch_size, "concurrency": args.concurrency,
        "pool_size": args.pool_size,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000, help="messages per phase")
    parser.add_argument("--processes", type=int, default=3, help="worker processes of phase B")
    parser.add_argument("--runs", type=int, default=1, help="runs, each in its own process; the medians are written")
    parser.add_argument("--threads", type=int, default=4, help="task threads of each worker process")
    parser.add_argument("--batch-size", type=int, default=500, help="CAREPOST_DELIVERY_BATCH_SIZE")
    parser.add_argument("--concurrency", type=int, default=64, help="CAREPOST_DELIVERY_CONCURRENCY (per process)")
    parser.add_argument("--pool-size", type=int, default=16, help="CAREPOST_SMTP_POOL_SIZE (per process)")
    parser.add_argument("--database-url", default=None,
                        help="PostgreSQL administrator's URL (a scratch database is made beside it); "
                             "default: the embedded SQLCipher file")
    parser.add_argument("--queue-url", default=None, help="redis://host:port/<db> instead of the SQLite queue")
    parser.add_argument("--out", default=None, help="default bench/results/scale_out_<database>.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one run; JSON on stdout
    args = parser.parse_args()

    if args.child:
        print(json.dumps(one_run(args)), flush=True)
        return

    def run_once() -> dict:
        # A fresh interpreter per run: its own scratch database, data dir, keys and engine.
        argv = [*sys.argv[1:], "--child"]
        out = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    database = "postgresql" if args.database_url else "sqlcipher"
    out = Path(args.out) if args.out else HERE / "results" / f"scale_out_{database}.json"
    load_before = os.getloadavg()
    summary = _scratch.repeat(args.runs, run_once, MEDIAN_OF, out)
    summary.update({
        "command": ".venv/bin/python bench/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": machine(), "database": database, "queue": "redis" if args.queue_url else "sqlite",
        "messages_per_phase": args.count, "processes_b": args.processes,
        "goal": "ratio_b_over_a (messages per worker CPU-second, B / A) >= 0.80",
        "goal_met_by_median": summary["median"]["ratio_b_over_a"] is not None
        and summary["median"]["ratio_b_over_a"] >= 0.80,
        "every_message_once_or_flagged": all(r["sink"]["every_message_once_or_flagged"] for r in summary["runs"]),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "load_average_1min_per_run": [[r["load_average_before"][0], r["load_average_after"][0]]
                                      for r in summary["runs"]],
        "median_load_average_1min_after": statistics.median(r["load_average_after"][0] for r in summary["runs"]),
    })
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("goal_met_by_median", "every_message_once_or_flagged",
                                              "load_average_before", "load_average_after")}))


if __name__ == "__main__":
    main()
