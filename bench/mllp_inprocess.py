"""Benchmark: the MLLP listener's group handling in process, without sockets (issue 15, speed).

    .venv/bin/python bench/mllp_inprocess.py [--groups 8,50] [--per-group-messages 350] [--database-url postgresql://...]

Sets up the organization, 500 patients and the MLLP connection exactly as ``bench/mllp.py`` does
(its ``setup``, which calls ``assemble()``), builds the same SIU/ADT messages, then calls
``ehr.service.ingest_batch`` with groups of each fixed size and prints, per group size, the
process CPU time (``time.process_time``; on SQLCipher the database works inside this process) and
the wall time per message. Every answer must be an AA acknowledgement.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import mllp as bench_mllp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="8,50", help="group sizes, comma-separated")
    p.add_argument("--per-group-messages", type=int, default=350)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    args = p.parse_args()
    sizes = [int(x) for x in args.groups.split(",")]
    env = {"CAREPOST_DATA_DIR": tempfile.mkdtemp(prefix="carepost-bench-mllp-"), "CAREPOST_LOG_LEVEL": "WARNING"}
    scratch = None
    if args.database_url:
        env["CAREPOST_DATABASE_URL"], scratch = bench_mllp._pg_database(args.database_url)
    try:
        _org, token, mrns = bench_mllp.setup(env, 500)  # assembles the application
        from carepost.ehr.service import ingest_batch

        rng = random.Random(1)
        total = sum(size + args.per_group_messages for size in sizes)
        frames = [(bench_mllp._message(token, n, 0, rng.choice(mrns)), "127.0.0.1") for n in range(total)]
        pos = 0
        for size in sizes:
            ingest_batch(frames[pos:pos + size])  # warm-up group
            pos += size
            cpu, wall, n = time.process_time(), time.perf_counter(), 0
            for i in range(pos, pos + args.per_group_messages, size):
                answers = ingest_batch(frames[i:min(i + size, pos + args.per_group_messages)])
                assert all(b"MSA|AA" in a for a in answers), answers[0]
                n += len(answers)
            pos += args.per_group_messages
            print(f"group {size}: {(time.process_time() - cpu) * 1000 / n:.2f} ms CPU per message, "
                  f"{(time.perf_counter() - wall) * 1000 / n:.2f} ms wall per message ({n} messages, "
                  f"load {os.getloadavg()[0]:.1f})")
    finally:
        if scratch:
            bench_mllp._drop_pg(args.database_url, scratch)


if __name__ == "__main__":
    main()
