"""Benchmark: FHIR import speed (mapped resources per second per worker, validation included)
and memory as the file grows.

    .venv/bin/python bench/patients_import.py --patients 200              # embedded SQLCipher
    .venv/bin/python bench/patients_import.py --patients 200 --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/patients_import.py --patients 200 --format ndjson

Generates Synthea-like patients (``carepost.patients.demo``), writes them to one file, and imports
it the way ``carepost import`` does, in one process (one worker). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--format", choices=("fhir", "ndjson"), default="fhir")
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="run the import under cProfile; top functions in the JSON")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="carepost-bench-"))
    os.environ["CAREPOST_DATA_DIR"] = str(work / "data")
    os.environ["CAREPOST_LOG_LEVEL"] = "WARNING"
    scratch = None
    if args.database_url:
        import psycopg
        from sqlalchemy.engine import make_url

        admin = make_url(args.database_url)
        scratch = f"carepost_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{scratch}"')
        os.environ["CAREPOST_DATABASE_URL"] = admin.set(drivername="postgresql+psycopg", database=scratch).render_as_string(hide_password=False)
    try:
        print(json.dumps(run(args, work)))
    finally:
        if scratch:
            from carepost.core.database import dispose_engine

            dispose_engine()
            with psycopg.connect(admin.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')


def run(args, work: Path) -> dict:
    from carepost.accounts.service import create_organization
    from carepost.assembly import assemble
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.database import org_session, system_session
    from carepost.core.logging import configure_logging
    from carepost.patients import demo
    from carepost.patients.imports import import_local_file

    configure_logging("WARNING", True)
    assemble()  # the one composition root, as every entry point
    initialize_storage()
    with system_session() as s:
        org = create_organization(s, "Bench Clinic")
        s.commit()
        org_id = org.id
    path = work / ("population.ndjson" if args.format == "ndjson" else "population.json")
    t0 = time.perf_counter()
    if args.format == "ndjson":
        demo.write_ndjson(path, args.patients, args.seed)
    else:
        with open(path, "w") as f:
            f.write('{"resourceType":"Bundle","type":"collection","entry":[')
            for i, bundle in enumerate(demo.synthetic_bundles(args.patients, args.seed)):
                for j, entry in enumerate(bundle["entry"]):
                    f.write(("," if i or j else "") + json.dumps(entry, separators=(",", ":")))
            f.write("]}")
    generated = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    t0, c0 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    with org_session(org_id) as s:
        job = import_local_file(s, org_id, path, format=args.format)
        counts, status = job.counts, job.status
    if profiler:
        profiler.disable()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mapped = counts["created"] + counts["updated"]
    return {
        "database": "postgresql" if args.database_url else "sqlcipher",
        "format": args.format,
        "patients": counts["patients"],
        "file_mb": round(path.stat().st_size / 1e6, 2),
        "status": status,
        "mapped_resources": mapped,
        "skipped_resources": counts["skipped"],
        "failed": counts["failed"],
        "seconds": round(elapsed, 2),
        "resources_per_second": round(mapped / elapsed),
        # this process's CPU (user + system): on SQLCipher the database runs inside it, so this is
        # the whole cost; on PostgreSQL the server's own CPU is not included
        "cpu_seconds": round(cpu, 2),
        "resources_per_cpu_second": round(mapped / cpu) if cpu else None,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "patients_per_second": round(counts["patients"] / elapsed, 1),
        "max_rss_mb_before_import": round(rss_before / 1024),
        "max_rss_mb_after_import": round(rss_after / 1024),
        "generation_seconds": round(generated, 1),
        "python": sys.version.split()[0],
        "profile": _top(profiler) if profiler else None,
    }


def _top(profiler, n: int = 30) -> list[dict]:
    """The functions with the most time of their own (tottime), with cumulative time."""
    import pstats

    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [{"function": f"{fn} ({Path(file).name}:{line})", "own_s": round(tt, 3), "cumulative_s": round(ct, 3),
             "calls": nc} for (file, line, fn), (cc, nc, tt, ct, _) in rows]


if __name__ == "__main__":
    main()
