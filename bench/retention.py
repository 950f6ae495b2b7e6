"""The retention purge (issue 16 speed goal): purge N expired messages — each with one recipient,
two events and encrypted-size bodies under the messages key of their month — while a concurrent
sender keeps accepting messages, and compare the sender's rate during the purge with its rate
alone, measured in the same run.

    .venv/bin/python bench/retention.py --count 100000 --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/retention.py --count 1000000 --runs 1 --database-url postgresql://postgres@127.0.0.1:5432/postgres

Per run, on a scratch database (created and dropped; ``bench/_scratch.py``):

1. one organization with a proven sending domain; ``--count`` messages created 14 months ago
   (one calendar month), with recipients and events, inserted set-based by the server
   (``generate_series``; bodies are ciphertext-sized blobs carrying the month's period-key
   prefix — the purge never opens them); a messages schedule of 365 days;
2. the sender — a separate process calling ``delivery.service.accept_batch`` (the API's batch
   accept: checks, encryption, recipients, events) in batches of ``--send-batch`` and committing
   each — runs alone for ``--baseline`` seconds (its rate alone), then keeps running while
3. ``retention.purge.run_purge`` deletes every expired message in chunks of ``--chunk`` and
   destroys the month's key; its wall time and this process's CPU time are recorded, and the
   sender's rate over exactly the purge's interval is compared with its rate alone.

Prints and writes one JSON document (``--out``, default ``bench/results/retention_<db>.json``);
median of ``--runs`` runs. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _scratch


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def seed(org_id: str, count: int, when: datetime) -> int:
    """``count`` messages created in ``when``'s month, one recipient and two events each."""
    from sqlalchemy import text

    from carepost.core.crypto import PERIOD_CIPHERTEXT_FORMAT, get_keyring
    from carepost.core.database import org_session

    with org_session(org_id) as s:
        version, _key = get_keyring().period_key(s, org_id, "messages", when)
        s.commit()
    prefix = bytes([PERIOD_CIPHERTEXT_FORMAT]) + version.to_bytes(4, "big")
    step = 100_000
    with org_session(org_id) as s:
        for lo in range(1, count + 1, step):
            conn = s.connection()  # each chunk commits, which hands the connection back
            hi = min(count, lo + step - 1)
            p = {"org": org_id, "lo": lo, "hi": hi, "prefix": prefix, "base": when}
            conn.execute(text("""
                INSERT INTO messages (id, org_id, source, from_address, subject_enc, text_enc, html_enc, contains_phi,
                                      security, tags, sandbox, created_at, track_opens, track_clicks)
                SELECT 'm' || lpad(to_hex(g), 31, '0'), :org, 'api', 'care@bar.example',
                       CAST(:prefix AS bytea) || decode(md5(g::text) || md5('s' || g), 'hex'),
                       CAST(:prefix AS bytea) || decode(repeat(md5(g::text), 12), 'hex'),
                       CAST(:prefix AS bytea) || decode(repeat(md5('h' || g), 24), 'hex'),
                       true, 'tls_required', '[]'::json, false,
                       CAST(:base AS timestamptz) + ((g % 2000000) * interval '1 second'), false, false
                FROM generate_series(CAST(:lo AS integer), CAST(:hi AS integer)) g"""), p)
            conn.execute(text("""
                INSERT INTO message_recipients (id, org_id, message_id, kind, address_enc, address_index, domain_index,
                                                status, method, possible_duplicate, attempts, evidence, updated_at)
                SELECT 'r' || lpad(to_hex(g), 31, '0'), :org, 'm' || lpad(to_hex(g), 31, '0'), 'to',
                       CAST(:prefix AS bytea) || decode(md5('a' || g) || md5('b' || g), 'hex'), md5('i' || g) || md5('j' || g),
                       md5('d'), 'delivered', 'tls', false, 1, '{}'::json, CAST(:base AS timestamptz)
                FROM generate_series(CAST(:lo AS integer), CAST(:hi AS integer)) g"""), p)
            conn.execute(text("""
                INSERT INTO message_events (id, org_id, message_id, recipient_id, type, details, created_at)
                SELECT e || lpad(to_hex(g), 31, '0'), :org, 'm' || lpad(to_hex(g), 31, '0'),
                       'r' || lpad(to_hex(g), 31, '0'), t, '{}'::json, CAST(:base AS timestamptz)
                FROM generate_series(CAST(:lo AS integer), CAST(:hi AS integer)) g, (VALUES ('e', 'queued'), ('f', 'delivered')) AS v(e, t)"""), p)
            s.commit()
        conn = s.connection()
        conn.exec_driver_sql("ANALYZE messages; ANALYZE message_recipients; ANALYZE message_events")
        s.commit()
    return count


def sender(env: dict, org_id: str, batch: int, stop, out) -> None:
    """Accept messages in batches until ``stop`` is set; send (time, accepted) after each commit."""
    os.environ.update(env)
    from carepost.assembly import assemble
    from carepost.core.database import org_session
    from carepost.core.logging import configure_logging
    from carepost.delivery import service

    configure_logging("WARNING", True)
    assemble()
    from accept_batch import batches

    offset = 0
    while not stop.is_set():
        msgs = next(batches(batch, batch, offset))
        offset += batch
        with org_session(org_id) as s:
            n = len(service.accept_batch(s, org_id, msgs, source="api", created_by="bench"))
            s.commit()
        out.put((time.time(), n))
    out.put(None)


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _purge_backends(org_id: str) -> dict[int, float]:
    """CPU seconds so far of the server backends serving this process's (the purge's) connections."""
    from sqlalchemy import text

    from carepost.core.database import org_session

    with org_session(org_id) as s:
        pids = s.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                              "AND application_name = 'retention-purge'")).scalars().all()
    return {pid: _proc_cpu(pid) for pid in pids}


def _rate(points: list[tuple[float, int]], t0: float, t1: float) -> float:
    inside = sum(n for t, n in points if t0 < t <= t1)
    return inside / (t1 - t0) if t1 > t0 else 0.0


def run_once(args, database_url: str | None) -> dict:
    with _scratch.scratch_storage(database_url, prefix="carepost-bench-retention-"):
        from accept_batch import setup_org

        from carepost.core.config import reset_settings
        from carepost.core.crypto import reset_keyring
        from carepost.core.database import dispose_engine

        reset_settings()  # a run after the first: new data dir, master key and database
        reset_keyring()
        dispose_engine()

        _scratch.bench_organization("Retention Bench Owner")  # assemble + initialize storage
        org_id = setup_org()
        from carepost.core import clock
        from carepost.core.database import org_session
        from carepost.retention import purge, service

        now = clock.now()
        y, m = now.year, now.month - 14
        while m < 1:
            y, m = y - 1, m + 12
        month = datetime(y, m, 1, tzinfo=UTC)
        t = time.perf_counter()
        seed(org_id, args.count, month)
        seed_s = time.perf_counter() - t
        with org_session(org_id) as s:
            service.set_schedule(s, org_id, "messages", min_days=30, max_days=365, actor=service.Actor("system", "bench"))
            s.commit()
        dispose_engine()
        env = {k: v for k, v in os.environ.items() if k.startswith("CAREPOST_")}
        # The purge's own connections are named, so their server CPU can be told from the sender's.
        url = os.environ["CAREPOST_DATABASE_URL"]
        os.environ["CAREPOST_DATABASE_URL"] = url + ("&" if "?" in url else "?") + "application_name=retention-purge"
        from carepost.core.config import reset_settings

        reset_settings()
        dispose_engine()
        ctx = mp.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=sender, args=(env, org_id, args.send_batch, stop, out))
        proc.start()
        points: list[tuple[float, int]] = []

        def drain(until: float | None = None) -> None:
            while True:
                try:
                    item = out.get(timeout=0.2)
                except Exception:  # noqa: BLE001 - queue.Empty
                    if until is None or time.time() >= until:
                        return
                    continue
                if item is None:
                    return
                points.append(item)
                if until is not None and time.time() >= until and until is not None:
                    return

        # the sender's start (spawn, imports, assembly) and first batches are not counted
        first = out.get(timeout=600)
        if first is None:
            raise SystemExit("the sender stopped before sending")
        drain(time.time() + 5)
        base_t0 = time.time()
        drain(base_t0 + args.baseline)
        base_t1 = time.time()
        load_before = _loadavg()
        backends_before = _purge_backends(org_id)
        cpu, wall0 = _self_cpu(), time.perf_counter()
        p_t0 = time.time()
        import threading

        collector_stop = threading.Event()

        def collect():
            while not collector_stop.is_set():
                drain(time.time() + 0.5)

        th = threading.Thread(target=collect, daemon=True)
        th.start()
        run = purge.run_purge(org_id, service.Actor("system", "bench"), chunk=args.chunk, duty=args.duty)
        p_t1 = time.time()
        wall, cpu = time.perf_counter() - wall0, _self_cpu() - cpu
        backends_after = _purge_backends(org_id)
        server_cpu = sum(c - backends_before.get(pid, 0.0) for pid, c in backends_after.items())
        load_after = _loadavg()
        collector_stop.set()
        th.join()
        stop.set()
        drain(time.time() + 30)
        proc.join(timeout=60)
        base_rate = _rate(points, base_t0, base_t1)
        during = _rate(points, p_t0, p_t1)
        deleted = run["progress"]["messages"]["count"]
        from sqlalchemy import func, select

        from carepost.core.config import get_settings
        from carepost.delivery.models import Message

        with org_session(org_id) as s:
            left_old = s.scalar(select(func.count()).select_from(Message).where(Message.created_at < month + timedelta(days=40)))
        return {
            "count": args.count, "deleted": deleted, "left_expired": left_old, "keys_destroyed": run["progress"]["messages"]["keys"],
            "seed_seconds": round(seed_s, 1), "purge_wall_seconds": round(wall, 1), "purge_cpu_seconds": round(cpu, 1),
            "purge_server_cpu_seconds": round(server_cpu, 1), "purge_backends": len(backends_after),
            "messages_per_second": round(deleted / wall), "chunk": args.chunk,
            "duty": args.duty if args.duty is not None else get_settings().retention_purge_duty,
            "sender_rate_alone": round(base_rate, 1), "sender_rate_during_purge": round(during, 1),
            "sender_ratio": round(during / base_rate, 3) if base_rate else None,
            "load_before": load_before, "load_after": load_after,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=2000)
    ap.add_argument("--duty", type=float, default=None,
                    help="The purge's share of wall time (default: CAREPOST_RETENTION_PURGE_DUTY, 0.5; 1 = no rest).")
    ap.add_argument("--send-batch", type=int, default=100)
    ap.add_argument("--baseline", type=float, default=30.0, help="Seconds the sender runs alone (after a 5 s warm-up).")
    ap.add_argument("--database-url", default=None, help="Administrator URL of a PostgreSQL server (scratch database).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.database_url:
        ap.error("--database-url is required: the seeding is PostgreSQL SQL (the goal is on PostgreSQL)")
    _scratch.repeat(args.runs, lambda: run_once(args, args.database_url), (
        "purge_wall_seconds", "purge_cpu_seconds", "purge_server_cpu_seconds", "messages_per_second", "sender_rate_alone",
        "sender_rate_during_purge", "sender_ratio"),
        Path(args.out or HERE / "results" / f"retention_postgresql_{args.count}.json"))

if __name__ == "__main__":
    main()
