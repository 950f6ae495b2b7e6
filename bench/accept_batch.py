"""Accepting messages in batches: ``delivery.service.accept_batch`` (the API's
``POST /api/v1/messages/batch``, up to 1,000 messages per call) measured by CPU (issue 11 item 7).

    .venv/bin/python bench/accept_batch.py --count 20000
    .venv/bin/python bench/accept_batch.py --count 20000 --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/accept_batch.py --count 5000 --runs 1 --profile /tmp/accept.pstats

A fresh data dir (and, with ``--database-url``, a scratch PostgreSQL database, created and
dropped), one organization with a proven sending domain, and personalized messages marked as
carrying PHI (name, date and a token in text and html, one recipient each, as the worker bench
sends), accepted in batches of ``--chunk`` through ``accept_batch`` and committed, each batch in
its own session, as the API route does. Per run it reports accepted messages per second and per
CPU-second: the CPU of this process (user + system, the kernel's accounting — on SQLCipher the
database works inside it) and, on PostgreSQL, also the CPU of the server backends that served the
batches (``/proc/<pid>/stat`` of ``pg_backend_pid()``; the server runs on this machine), and the
split between checking (``prepare_message``) and storing (``store_messages``). ``--runs`` runs
(median reported), all into the same database, so later runs see larger tables. With
``--profile FILE`` one more run is profiled (cProfile, CPU clock) and its top functions listed.
Prints and writes one JSON document (``--out``, default ``bench/results/accept_batch_<db>.json``).
Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from delivery_throughput import HTML, TEXT


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def setup_org() -> str:
    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session, system_session
    from carepost.delivery import service

    with system_session() as session:
        org = create_organization(session, f"Bench Clinic {time.time_ns()}")
        session.commit()
        org_id = org.id
    with org_session(org_id) as session:
        row = service.create_sending_domain(session, org_id, "bar.example")
        service.confirm_ownership(session, row)  # the bench's own name: ownership taken as proven
        service.update_delivery_settings(session, org_id, {"default_purpose": "treatment"})
        session.commit()
    return org_id


def batches(count: int, chunk: int, offset: int):
    from carepost.delivery.schemas import MessageIn

    for start in range(0, count, chunk):
        batch = []
        for i in range(offset + start, offset + min(count, start + chunk)):
            name = f"Patient {i}"
            batch.append(MessageIn.model_validate({
                "from": "Bar Clinic <care@bar.example>", "to": [f"{name} <patient{i}@sink.test>"],
                "subject": "Your appointment", "text": TEXT.format(name=name, doctor="Dr. Lee", date="March 3"),
                "html": HTML.format(name=name, doctor="Dr. Lee", date="March 3", token=f"{i:032x}"),
                "contains_phi": True,
            }))
        yield batch


def run_once(org_id: str, count: int, chunk: int, offset: int, postgres: bool, profile: cProfile.Profile | None) -> dict:
    from carepost.core.database import org_session
    from carepost.delivery import messages as accepting
    from carepost.delivery import service

    # Time the two halves of accept_batch without changing it: wrap the module functions it calls.
    split = {"prepare": 0.0, "store": 0.0}
    original_prepare, original_store = accepting.prepare_message, accepting.store_messages

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = _self_cpu()
            try:
                return fn(*a, **kw)
            finally:
                split[key] += _self_cpu() - t
        return wrapper

    accepting.prepare_message = timed(original_prepare, "prepare")
    accepting.store_messages = timed(original_store, "store")
    inputs = list(batches(count, chunk, offset))  # built before the clock: that is the client's work
    backends: dict[int, float] = {}
    backend_cpu = 0.0
    accepted = 0
    try:
        wall, cpu = time.perf_counter(), _self_cpu()
        if profile:
            profile.enable()
        for batch in inputs:
            with org_session(org_id) as session:
                pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar() if postgres else None
                before = _proc_cpu(pid) if pid else 0.0
                accepted += len(service.accept_batch(session, org_id, batch, source="api", created_by="bench"))
                session.commit()
                if pid:
                    backend_cpu += _proc_cpu(pid) - before
                    backends[pid] = backends.get(pid, 0.0)
        if profile:
            profile.disable()
        cpu, wall = _self_cpu() - cpu, time.perf_counter() - wall
    finally:
        accepting.prepare_message, accepting.store_messages = original_prepare, original_store
    result = {
        "messages": accepted, "seconds": round(wall, 2), "messages_per_second": round(accepted / wall, 1),
        "process_cpu_seconds": round(cpu, 2),
        "messages_per_process_cpu_second": round(accepted / cpu, 1) if cpu else None,
        "process_cpu_ms_per_message": round(1000 * cpu / accepted, 3),
        "prepare_cpu_ms_per_message": round(1000 * split["prepare"] / accepted, 3),
        "store_cpu_ms_per_message": round(1000 * split["store"] / accepted, 3),
    }
    if postgres:
        total = cpu + backend_cpu
        result.update({
            "postgres_backend_cpu_seconds": round(backend_cpu, 2), "postgres_backends": len(backends),
            "messages_per_cpu_second_with_postgres": round(accepted / total, 1) if total else None,
        })
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20000, help="messages per run")
    p.add_argument("--chunk", type=int, default=1000, help="messages per accept_batch call (the API allows 1,000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    p.add_argument("--profile", default=None, metavar="FILE", help="profile one more run (cProfile stats into FILE)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    work = Path(tempfile.mkdtemp(prefix="carepost-bench-accept-"))
    env = {"CAREPOST_DATA_DIR": str(work / "data"), "CAREPOST_LOG_LEVEL": "WARNING",
           "CAREPOST_QUEUE_NAME": f"bench{os.getpid()}"}
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
    os.environ.update(env)
    try:
        from carepost.assembly import assemble
        from carepost.core.bootstrap import initialize_storage
        from carepost.core.config import reset_settings
        from carepost.core.logging import configure_logging

        reset_settings()
        configure_logging("WARNING", True)  # stdout carries the JSON result only
        assemble()
        initialize_storage()
        org_id = setup_org()
        run_once(org_id, min(args.chunk, 200), args.chunk, 10_000_000, bool(scratch), None)  # warm-up: imports, keys
        runs = [run_once(org_id, args.count, args.chunk, i * args.count, bool(scratch), None) for i in range(args.runs)]
        profile_top = None
        if args.profile:
            prof = cProfile.Profile(time.process_time)
            run_once(org_id, args.count, args.chunk, args.runs * args.count, bool(scratch), prof)
            prof.dump_stats(args.profile)
            stats = pstats.Stats(prof)
            total = stats.total_tt or 1
            rows = sorted(((fn, st) for fn, st in stats.stats.items()), key=lambda kv: -kv[1][3])
            profile_top = [{"function": f"{fn[2]} ({Path(fn[0]).name}:{fn[1]})", "inclusive_share": round(st[3] / total, 3),
                            "self_share": round(st[2] / total, 3)} for fn, st in rows[:40]]

        def med(key):
            vals = [r[key] for r in runs if r.get(key) is not None]
            return round(statistics.median(vals), 3) if vals else None

        result = {
            "database": "postgresql" if scratch else "sqlcipher",
            "command": " ".join([".venv/bin/python", "bench/accept_batch.py", *sys.argv[1:]]),
            "median": {k: med(k) for k in runs[0]},
            "runs": runs,
            "profile_top": profile_top,
            "loadavg_before": loadavg_before,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "cpus": os.cpu_count(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        text = json.dumps(result, indent=2)
        out = Path(args.out or HERE / "results" / f"accept_batch_{result['database']}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(text)
    finally:
        from carepost.core.database import dispose_engine

        dispose_engine()
        if scratch:
            import psycopg

            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
