"""Crash safety of delivery, measured: one ``carepost worker`` killed with SIGKILL mid-send, a second
one started, and every message counted by Message-ID at a local TLS sink.

    .venv/bin/python bench/delivery_crash.py --count 6000
    .venv/bin/python bench/delivery_crash.py --count 6000 --database-url postgresql+psycopg://postgres@127.0.0.1/bench

Reports (JSON, also written under bench/results/): how many had arrived at the kill, how many
arrived twice, how many recipients are flagged ``possible_duplicate`` and whether every
duplicate is among them, what is missing (must be nothing), and how long after the kill the
last message was delivered (the lease plus at most one sweep, every minute).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _scratch  # noqa: E402
from delivery_throughput import make_certificates  # noqa: E402
from delivery_worker import accept, count_statuses, free_port, sink_arrivals  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=6000)
    parser.add_argument("--lease-seconds", type=int, default=20, help="CAREPOST_DELIVERY_LEASE_SECONDS")
    parser.add_argument("--concurrency", type=int, default=64, help="CAREPOST_DELIVERY_CONCURRENCY")
    parser.add_argument("--batch-size", type=int, default=500, help="CAREPOST_DELIVERY_BATCH_SIZE")
    parser.add_argument("--kill-at", type=float, default=1 / 3, help="kill when this share has arrived")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ca_file, cert_file, key_file = make_certificates(tmp_path)
        record = tmp_path / "arrived.txt"
        record.touch()
        port = free_port()
        sink = subprocess.Popen([sys.executable, str(HERE / "smtp_sink.py"), "--port", str(port), "--cert", str(cert_file),
                                 "--key", str(key_file), "--record", str(record)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert sink.stdout.readline().strip() == "ready"
        env = {
            "CAREPOST_DATA_DIR": str(tmp_path / "data"),
            "CAREPOST_MX_OVERRIDES": f"sink.test=mx.sink.test@127.0.0.1:{port}",
            "CAREPOST_EXTRA_CA_FILE": str(ca_file),
            "CAREPOST_SMTP_HELO_NAME": "bench.carepost.example",
            "CAREPOST_LOG_LEVEL": "WARNING",
            "CAREPOST_QUEUE_NAME": f"crash{os.getpid()}",
            "CAREPOST_DELIVERY_LEASE_SECONDS": str(args.lease_seconds),
            "CAREPOST_DELIVERY_CONCURRENCY": str(args.concurrency),
            "CAREPOST_DELIVERY_BATCH_SIZE": str(args.batch_size),
        }
        if args.database_url:
            env["CAREPOST_DATABASE_URL"] = args.database_url
        os.environ.update(env)
        from carepost.assembly import assemble
        from carepost.core.bootstrap import initialize_storage
        from carepost.core.config import reset_settings
        from carepost.core.database import dispose_engine
        from carepost.core.logging import configure_logging
        from carepost.core.queue import huey
        from carepost.delivery.tasks import enqueue_delivery

        reset_settings()
        configure_logging("WARNING", True)
        assemble()  # the one composition root, as every entry point
        initialize_storage()
        org_id, ids, _ = accept(args.count)
        enqueue_delivery(ids)
        dispose_engine()

        def worker(name: str, periodic: bool) -> subprocess.Popen:
            log = open(tmp_path / f"{name}.log", "w")
            cmd = [sys.executable, "-m", "carepost.cli", "worker", "--threads", "4"] + ([] if periodic else ["--no-periodic"])
            return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)

        def arrived() -> list[str]:
            return record.read_text().splitlines()

        first = worker("worker-1", periodic=False)
        second = None
        try:
            while len(arrived()) < args.count * args.kill_at:
                if first.poll() is not None:
                    raise SystemExit("worker exited: " + (tmp_path / "worker-1.log").read_text()[-3000:])
                time.sleep(0.005)
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed = time.perf_counter()
            at_kill = len(arrived())
            second = worker("worker-2", periodic=True)
            while True:
                statuses = count_statuses(org_id)
                if statuses.get("delivered", 0) >= len(ids):
                    break
                if time.perf_counter() - killed > args.lease_seconds + 600:
                    raise SystemExit(f"not delivered 10 minutes after the lease: {statuses}")
                time.sleep(0.25)
            recovered = time.perf_counter() - killed
        finally:
            for proc in (first, second):
                _scratch.stop(proc, timeout=60)
            sink.terminate()
            sink.communicate(timeout=10)
            huey.flush()

        check = sink_arrivals(org_id, arrived())
        result = {
            "messages": len(ids), "arrived_at_kill": at_kill, "missing": check["missing"],
            "arrived_twice": check["arrived_twice"], "flagged_possible_duplicate": check["flagged_possible_duplicate"],
            "duplicates_not_flagged": check["duplicates_not_flagged"],
            "recovered_seconds_after_kill": round(recovered, 1), "lease_seconds": args.lease_seconds,
            "concurrency": args.concurrency, "database": "postgresql" if args.database_url else "sqlcipher",
            "load_average_at_end": os.getloadavg(),
        }
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / (
        f"delivery_crash_{result['database']}_{len(ids)}_{time.strftime('%Y%m%dT%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
