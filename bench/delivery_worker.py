"""Delivery through the worker: stored messages -> one ``carepost worker`` process -> a local TLS
sink, the whole pipeline (claim with a lease, consent re-check, decrypt, decide, compose, DKIM
RSA-2048 + Ed25519, pooled verified-TLS SMTP, record evidence and events).

    .venv/bin/python bench/delivery_worker.py --count 20000
    .venv/bin/python bench/delivery_worker.py --count 200000 --threads 4     # memory flatness
    .venv/bin/python bench/delivery_worker.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench

Messages are personalized (name, date and a token in text and html), marked as carrying PHI
(so verified TLS is required) and accepted through ``delivery.service.accept_batch`` in this
process first (not timed: that is the API's work). Then the delivery tasks are queued and ONE
worker process is started; the clock runs from its start until every recipient is delivered.
Prints JSON (and writes it to ``--out``): messages per second; the worker's CPU time (user +
system, from the kernel's accounting of the worker process, ``/proc/<pid>/stat``) per message
and messages per worker CPU-second; the rate and CPU per message in each decile of the run (does
it fall as the tables grow?); OpenSSL's RSA-2048 signing rate measured in the same run and the
ratio to it; the worker's resident memory sampled during the run; how long accepting took.

Speed is measured here, never asserted in tests (ARCHITECTURE.md section 7).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from delivery_throughput import HTML, TEXT, make_certificates  # noqa: E402


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from the kernel."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (``/proc/stat``): what
    everything used (workers, database, queue, sink), to set a run's rate against what it had."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def openssl_rsa2048_signs_per_second(seconds: int = 3) -> float | None:
    """``openssl speed`` on one core, in this run: the yardstick the worker's rate is set against."""
    try:
        out = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "rsa2048"], capture_output=True,
                             text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        bits = line.split()
        if bits[:2] == ["rsa", "2048"] and len(bits) >= 6:
            return float(bits[5])
    return None


def deciles(samples: list[tuple[int, float, float]], total: int) -> list[dict]:
    """Rate and CPU per message between the samples where 10 %, 20 %, ... of the messages were done."""
    out, previous = [], (0, 0.0, 0.0)
    for k in range(1, 11):
        target = total * k / 10
        sample = next((s for s in samples if s[0] >= target), samples[-1])
        done, seconds, cpu = sample[0] - previous[0], sample[1] - previous[1], sample[2] - previous[2]
        if done > 0 and seconds > 0:
            out.append({"decile": k, "messages_per_second": round(done / seconds, 1),
                        "cpu_ms_per_message": round(1000 * cpu / done, 3)})
        previous = sample
    return out


def summarize_profile(path: Path, top: int = 25) -> dict:
    """Top functions of py-spy's folded stacks: by samples on the CPU in the function itself
    (self) and anywhere below it (inclusive), as shares of all samples."""
    own, inclusive, total = {}, {}, 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 2)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n

    def share(d):
        return [{"function": k, "share": round(v / total, 4)} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accept(count: int, chunk: int = 1000, domain: str = "bar.example") -> tuple[str, list[str], float]:
    """A new organization sending from ``domain`` (proven), and ``count`` personalized PHI messages
    accepted through ``accept_batch``: (organization id, message ids, seconds). A domain is proven
    by one organization only: a second call in the same database needs another ``domain``."""
    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session, system_session
    from carepost.delivery import service
    from carepost.delivery.schemas import MessageIn

    with system_session() as session:
        org = create_organization(session, f"Bench Clinic {time.time_ns()}")
        session.commit()
        org_id = org.id
    with org_session(org_id) as session:
        row = service.create_sending_domain(session, org_id, domain)
        # bar.example is the bench's own name, answered by no public DNS: its ownership record is
        # taken as found (the one call the service makes when the TXT look-up succeeds).
        service.confirm_ownership(session, row)
        service.update_delivery_settings(session, org_id, {"default_purpose": "treatment"})
        session.commit()
    ids: list[str] = []
    started = time.perf_counter()
    for start in range(0, count, chunk):
        batch = []
        for i in range(start, min(count, start + chunk)):
            name = f"Patient {i}"
            batch.append(MessageIn.model_validate({
                "from": f"Bar Clinic <care@{domain}>", "to": [f"{name} <patient{i}@sink.test>"],
                "subject": "Your appointment", "text": TEXT.format(name=name, doctor="Dr. Lee", date="March 3"),
                "html": HTML.format(name=name, doctor="Dr. Lee", date="March 3", token=f"{i:032x}"),
            }))
        with org_session(org_id) as session:
            ids += [m.id for m in service.accept_batch(session, org_id, batch, source="api", created_by="bench")]
            session.commit()
    return org_id, ids, time.perf_counter() - started


def count_statuses(org_id: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from carepost.core.database import read_only_session
    from carepost.delivery.models import MessageRecipient

    with read_only_session(org_id) as session:
        return dict(session.execute(select(MessageRecipient.status, func.count()).group_by(MessageRecipient.status)).all())


def finished(statuses: dict[str, int]) -> int:
    """Recipients whose delivery is over (the bench's clock stops when all are)."""
    return statuses.get("delivered", 0) + statuses.get("failed", 0) + statuses.get("bounced", 0)


def start_sink(tmp_path: Path, record: Path | None = None,
               opens: Path | None = None) -> tuple[subprocess.Popen, int, Path]:
    """The TLS sink (bench/smtp_sink.py) in its own process, its certificate signed by a CA of
    this run: (process, port, CA file for ``CAREPOST_EXTRA_CA_FILE``). ``record``: the sink
    appends each message's Message-ID there; ``opens``: each message's open-pixel path."""
    ca_file, cert_file, key_file = make_certificates(tmp_path)
    port = free_port()
    sink = subprocess.Popen([sys.executable, str(HERE / "smtp_sink.py"), "--port", str(port), "--cert", str(cert_file),
                             "--key", str(key_file)] + (["--record", str(record)] if record else [])
                            + (["--record-opens", str(opens)] if opens else []),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert sink.stdout.readline().strip() == "ready"
    return sink, port, ca_file


def stop_sink(sink: subprocess.Popen) -> int | None:
    """Stop the sink; how many messages it received."""
    sink.terminate()
    out, _ = sink.communicate(timeout=10)
    return int(out.split()[-1]) if out.strip() else None


def bench_env(data_dir: Path | str, port: int, ca_file: Path, *, batch_size: int = 500, concurrency: int = 64,
              pool_size: int = 16, database_url: str | None = None, queue_url: str | None = None,
              mx_domains: tuple[str, ...] = ("sink.test",)) -> dict[str, str]:
    """The settings of the bench and of its worker: mail for ``mx_domains`` goes to the sink,
    whose CA is trusted (verified TLS)."""
    env = {
        "CAREPOST_DATA_DIR": str(data_dir),
        "CAREPOST_MX_OVERRIDES": ",".join(f"{d}=mx.sink.test@127.0.0.1:{port}" for d in mx_domains),
        "CAREPOST_EXTRA_CA_FILE": str(ca_file),
        "CAREPOST_SMTP_HELO_NAME": "bench.carepost.example",
        "CAREPOST_LOG_LEVEL": "WARNING",
        "CAREPOST_QUEUE_NAME": f"bench{os.getpid()}",
        "CAREPOST_DELIVERY_BATCH_SIZE": str(batch_size),
        "CAREPOST_DELIVERY_CONCURRENCY": str(concurrency),
        "CAREPOST_SMTP_POOL_SIZE": str(pool_size),
        "CAREPOST_SMTP_MAX_MESSAGES_PER_CONNECTION": "1000",
    }
    if database_url:
        env["CAREPOST_DATABASE_URL"] = database_url
    if queue_url:
        env["CAREPOST_QUEUE_URL"] = queue_url
    return env


def start_carepost(env: dict[str, str]) -> None:
    """Apply ``env`` to this process and assemble CarePost (storage initialized)."""
    os.environ.update(env)
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.config import reset_settings

    reset_settings()
    from carepost.core.logging import configure_logging

    configure_logging("WARNING", True)  # stdout carries the JSON result only
    from carepost.assembly import assemble

    assemble()  # the one composition root, as every entry point
    initialize_storage()


def run_worker(env: dict[str, str], log_path: Path, threads: int, total: int, done_of, *,
               profile: str | None = None, processes: int = 1, profile_gil: bool = False) -> dict:
    """Start ``processes`` ``carepost worker`` processes (one by default) at once and sample them
    every 0.5 s until ``done_of()`` (which returns ``(done, statuses)``) reports ``total`` done;
    then stop them. Returns the raw samples: ``elapsed`` (from the workers' start),
    ``worker_cpu`` (kernel accounting, summed over the processes) and ``worker_cpu_each``,
    ``machine_cpu_busy`` (the share of all cores busy, everything on the machine),
    ``samples`` (done, RSS MiB summed, seconds), ``progress`` (done, seconds, CPU seconds),
    ``statuses``, ``errors`` (error lines of the workers' logs). The queue holds the work before
    the call. ``profile`` samples the first process only; ``profile_gil``: only the thread holding
    the GIL (py-spy ``--gil``), not native work done with it released."""
    from carepost.core.database import dispose_engine
    from carepost.core.queue import huey

    dispose_engine()
    logs = [log_path if k == 0 else log_path.with_name(f"{log_path.stem}-{k + 1}{log_path.suffix}")
            for k in range(processes)]
    worker_logs = [open(path, "w+") for path in logs]  # files: an unread pipe would fill and block a worker
    busy_before, total_before = machine_cpu()
    workers = [subprocess.Popen([sys.executable, "-m", "carepost.cli", "worker", "--threads", str(threads),
                                 "--no-periodic"], env={**os.environ, **env}, stdout=worker_log,
                                stderr=subprocess.STDOUT, text=True) for worker_log in worker_logs]
    spy = None
    if profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))  # the venv's own
        spy = subprocess.Popen([py_spy, "record", "--pid", str(workers[0].pid), "--rate", "100", "--format", "raw",
                                "--nonblocking", *(["--gil"] if profile_gil else []), "-o", profile],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    samples, statuses, progress = [], {}, []
    try:
        while True:
            time.sleep(0.5)
            done, statuses = done_of()
            now = time.perf_counter() - started
            samples.append((done, round(sum(rss_mib(w.pid) for w in workers), 1), now))
            progress.append((done, now, sum(cpu_seconds(w.pid) for w in workers)))
            for worker, path in zip(workers, logs):
                if worker.poll() is not None:
                    raise SystemExit("worker exited: " + path.read_text()[-3000:])
            if done >= total:
                break
        elapsed = time.perf_counter() - started
        worker_cpu_each = [cpu_seconds(w.pid) for w in workers]
        busy_after, total_after = machine_cpu()
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        huey.flush()
        errors = []
        for worker_log in worker_logs:
            worker_log.seek(0)
            errors += [line for line in worker_log if "ERROR" in line or '"level": "error"' in line]
            worker_log.close()
    return {"elapsed": elapsed, "worker_cpu": sum(worker_cpu_each), "worker_cpu_each": worker_cpu_each,
            "machine_cpu_busy": (busy_after - busy_before) / max(total_after - total_before, 1e-9),
            "samples": samples, "progress": progress, "statuses": statuses, "errors": errors}


def worker_figures(run: dict, total: int) -> dict:
    """The figures of a :func:`run_worker` run of ``total`` messages."""
    elapsed, worker_cpu, samples, progress = run["elapsed"], run["worker_cpu"], run["samples"], run["progress"]
    step = max(1, len(samples) // 20)
    # Steady state: from the first sample with deliveries (the worker has started: imports,
    # keys, connections) to the end.
    first = next(s for s in samples if s[0] > 0)
    steady = (total - first[0]) / max(elapsed - first[2], 1e-9)
    rss = [(done, mib) for done, mib, _ in samples]
    first_cpu = next(p for p in progress if p[0] > 0)
    steady_cpu = (worker_cpu - first_cpu[2]) / max(total - first_cpu[0], 1)
    return {
        "messages": total, "seconds": round(elapsed, 2), "messages_per_second": round(total / elapsed, 1),
        "worker_cpu_seconds": round(worker_cpu, 2),
        "worker_cpu_ms_per_message": round(1000 * worker_cpu / total, 3),
        "steady_worker_cpu_ms_per_message": round(1000 * steady_cpu, 3),
        "messages_per_worker_cpu_second": round(total / worker_cpu, 1) if worker_cpu else None,
        "deciles": deciles(progress, total),
        "steady_messages_per_second": round(steady, 1), "worker_start_seconds": round(first[2], 1),
        "worker_rss_mib": rss[::step] + ([rss[-1]] if rss and rss[-1] not in rss[::step] else []),
    }


def transactional(count: int, tmp_path: Path, env: dict[str, str], threads: int, *, domain: str = "bar.example",
                  profile: str | None = None, processes: int = 1,
                  profile_gil: bool = False) -> tuple[str, list[str], float, dict]:
    """The transactional measurement: ``count`` messages accepted (untimed), queued, delivered by
    ``processes`` workers (:func:`run_worker`). Returns (organization id, message ids, accept seconds, run)."""
    from carepost.delivery.tasks import enqueue_delivery, refresh_statistics

    org_id, ids, accept_seconds = accept(count, domain=domain)
    # As the worker's periodic task does once the tables have grown (statistics for SQLite's planner).
    refresh_statistics.call_local()
    enqueue_delivery(ids)

    def done_of():
        statuses = count_statuses(org_id)
        return finished(statuses), statuses

    run = run_worker(env, tmp_path / f"worker-{domain}.log", threads, len(ids), done_of, profile=profile,
                     processes=processes, profile_gil=profile_gil)
    return org_id, ids, accept_seconds, run


def sink_arrivals(org_id: str, arrived: list[str]) -> dict:
    """Every message of ``org_id`` counted by its Message-ID among the lines the sink recorded
    (``smtp_sink.py --record``): how many are missing, arrived twice, are flagged
    ``possible_duplicate``, and arrived twice without the flag."""
    from collections import Counter

    from sqlalchemy import select

    from carepost.core.database import read_only_session
    from carepost.delivery.models import Message, MessageRecipient

    with read_only_session(org_id) as session:
        headers = dict(session.execute(select(Message.id, Message.message_id_header)
                                       .where(Message.org_id == org_id)).all())
        flagged = {headers[m].strip() for m, in session.execute(
            select(MessageRecipient.message_id).where(MessageRecipient.org_id == org_id,
                                                      MessageRecipient.possible_duplicate.is_(True)))}
    expected = {h.strip() for h in headers.values()}
    counts = Counter(a for a in arrived if a in expected)
    twice = {h for h, n in counts.items() if n > 1}
    return {"messages": len(expected), "missing": len(expected - set(counts)), "arrived_twice": len(twice),
            "flagged_possible_duplicate": len(flagged), "duplicates_not_flagged": len(twice - flagged)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=4, help="task threads of the one worker process")
    parser.add_argument("--batch-size", type=int, default=500, help="CAREPOST_DELIVERY_BATCH_SIZE")
    parser.add_argument("--concurrency", type=int, default=64, help="CAREPOST_DELIVERY_CONCURRENCY")
    parser.add_argument("--pool-size", type=int, default=16, help="CAREPOST_SMTP_POOL_SIZE (connections to the sink)")
    parser.add_argument("--database-url", default=None, help="PostgreSQL instead of the embedded SQLCipher file")
    parser.add_argument("--queue-url", default=None, help="redis://... instead of the SQLite queue")
    parser.add_argument("--out", default=None, help="write the JSON here too (default bench/results/...)")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="sample the worker with py-spy (all threads, idle excluded) into FILE (folded stacks) "
                             "and add its top costs to the JSON")
    args = parser.parse_args()
    rsa_signs = openssl_rsa2048_signs_per_second()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sink, port, ca_file = start_sink(tmp_path)
        try:
            env = bench_env(tmp_path / "data", port, ca_file, batch_size=args.batch_size, concurrency=args.concurrency,
                            pool_size=args.pool_size, database_url=args.database_url, queue_url=args.queue_url)
            start_carepost(env)
            _org, ids, accept_seconds, run = transactional(args.count, tmp_path, env, args.threads,
                                                           profile=args.profile)
        finally:
            received = stop_sink(sink)
    figures = worker_figures(run, len(ids))
    rate = len(ids) / run["elapsed"]
    result = {
        **{k: figures[k] for k in ("messages", "seconds", "messages_per_second", "worker_cpu_seconds",
                                   "worker_cpu_ms_per_message", "steady_worker_cpu_ms_per_message",
                                   "messages_per_worker_cpu_second", "deciles")},
        "openssl_rsa2048_signs_per_second": rsa_signs,
        "ratio_to_openssl_rsa2048_signing": round(rate / rsa_signs, 3) if rsa_signs else None,
        "load_average_at_end": os.getloadavg(),
        "steady_messages_per_second": figures["steady_messages_per_second"],
        "worker_start_seconds": figures["worker_start_seconds"],
        "statuses": run["statuses"], "worker_threads": args.threads, "batch_size": args.batch_size,
        "concurrency": args.concurrency, "pool_size": args.pool_size,
        "database": "postgresql" if args.database_url else "sqlcipher", "queue": "redis" if args.queue_url else "sqlite",
        "accept_seconds": round(accept_seconds, 1), "accept_messages_per_second": round(len(ids) / accept_seconds, 1),
        "worker_rss_mib": figures["worker_rss_mib"],
        "sink_received": received,
        "worker_errors": len(run["errors"]),
    }
    if args.profile:
        result["profile"] = summarize_profile(Path(args.profile))
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / (
        f"delivery_worker_{result['database']}_{len(ids)}_{time.strftime('%Y%m%dT%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
