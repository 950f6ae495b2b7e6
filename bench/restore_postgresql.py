"""Restore time of a PostgreSQL installation by docs/backup.md's logical procedure (issue 17 item 5).

    python bench/restore_postgresql.py --database carepost_segbench_1a2b3c4d \\
        --data-dir /tmp/carepost-segbench-xyz/data --runs 3 \\
        [--admin-url postgresql://postgres@127.0.0.1:5432/postgres] [--jobs 1] [--out FILE]

Made for the database ``bench/campaign_million.py --keep`` leaves behind (a 1,000,000-recipient
campaign sent: contacts, clinical facts, messages, recipients, events, audit), but it takes any
CarePost database and its data dir. Nothing of the source is changed — unless ``--drop-source``
asks for the source database to be dropped once it is dumped and counted (a disk that cannot hold
the source, its dump and a restored copy at once; the counts and digests to compare with are taken
before).

Once: ``carepost backup`` of the data dir's files (checkpoints, TLS keys; the master key is never
in it) and ``pg_dump -Fc --no-owner`` of the database to a file. Then ``--runs`` times, into fresh
places, exactly what docs/backup.md tells an operator to do:

1. ``createdb`` and ``pg_restore --no-owner --exit-on-error [-j N] -d NEW dump``;
2. a fresh data dir, the master key copied in (0600), ``carepost restore ARCHIVE``;
3. ``carepost audit verify`` (every chain against the restored checkpoints).

Between steps 1 and 2, untimed, a check in a child process: the row counts of the main tables equal
the source's (counted after the dump), and message bodies (the first, the middle and the last by
id) decrypt in the restored installation to the same text as in the source (compared as SHA-256
digests; no text printed).

Reported per step: wall seconds and the CPU seconds of the client processes (``pg_restore`` and
``carepost``; PostgreSQL's own backends are not counted), the database and dump sizes, the load
average before and after. The restore time is steps 1-3: the time from the dump and archive in
hand to an installation whose audit log is verified. Every restored database and data dir is
removed after its run; a run is not started when the disk has less free space than the source
database's size and 2 GiB (``"stopped"`` says so). The result file is written after the dump and
after every run (``"complete": false`` until every run is done), so a session cut short keeps what
it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from campaign_million import machine

TABLES = ("contacts", "observations", "authorizations", "messages", "message_recipients", "message_events", "audit_events")


def _timed(cmd: list[str], env: dict | None = None, stdin=None) -> tuple[float, float, bytes]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, stdin=stdin, capture_output=True, check=False)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stdout


def _carepost(args: list[str], env: dict) -> tuple[float, float, bytes]:
    return _timed([sys.executable, "-m", "carepost.cli", *args], env={**os.environ, **env})


def _dsn(admin: str, database: str, driver: str = "postgresql") -> str:
    """``admin``'s server, ``database``: a libpq URL, or CarePost's with ``driver="postgresql+psycopg"``."""
    from sqlalchemy.engine import make_url

    return make_url(admin).set(drivername=driver, database=database).render_as_string(hide_password=False)


def _fingerprint_child(sample: list[str] | None) -> dict:
    """In the installation the environment names: row counts, and the SHA-256 of the decrypted text
    of the sampled messages (chosen here when ``sample`` is None)."""
    from sqlalchemy import func, select, text

    from carepost.assembly import assemble
    from carepost.core.crypto import get_keyring
    from carepost.core.database import read_only_session
    from carepost.delivery.models import Message

    assemble()
    out: dict = {"rows": {}, "bodies": {}}
    with read_only_session() as s:
        for table in TABLES:
            exists = s.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar()
            out["rows"][table] = s.execute(text(f'SELECT count(*) FROM "{table}"')).scalar() if exists else None
        if sample is None:
            ids = s.scalars(select(Message.id).where(Message.text_enc.is_not(None)).order_by(Message.id)).all()
            sample = sorted({ids[0], ids[len(ids) // 2], ids[-1]}) if ids else []
        for row in s.execute(select(Message).where(Message.id.in_(sample))).scalars():
            body = get_keyring().decrypt_text(s, row.org_id, Message.__tablename__, "text", row.id, row.text_enc)
            out["bodies"][row.id] = hashlib.sha256(body.encode()).hexdigest()
        out["messages_total"] = s.execute(select(func.count()).select_from(Message)).scalar()
    return out


def _fingerprint(env: dict, sample: list[str] | None) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--fingerprint", json.dumps(sample)],
                          env={**os.environ, **env}, capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fingerprint failed: {done.stderr.decode()[-2000:]}")
    return json.loads(done.stdout)


@contextlib.contextmanager
def _work_dir(result: dict):
    """A scratch directory for the archive and the dump, removed at the end — but kept, and named,
    when a run fails after ``--drop-source`` dropped the source (the dump is then its only copy)."""
    work = Path(tempfile.mkdtemp(prefix="carepost-restore-bench-"))
    try:
        yield work
    except BaseException:
        if result.get("source_dropped"):
            print(f"the source database was dropped; its dump is kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)


def _size(admin: str, database: str) -> int:
    import psycopg

    with psycopg.connect(admin, autocommit=True) as c:
        return c.execute("SELECT pg_database_size(%s)", (database,)).fetchone()[0]


def _admin_sql(admin: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database", help="the source database's name")
    p.add_argument("--data-dir", help="the source installation's data dir (holds master.key)")
    p.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="pg_restore -j (1: the documented command)")
    p.add_argument("--out", default=None)
    p.add_argument("--drop-source", action="store_true",
                   help="drop the source database once dumped and counted (a disk that cannot hold it, its dump "
                        "and a restored copy at once); its dump is kept if a run then fails")
    p.add_argument("--fingerprint", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.fingerprint is not None:
        print(json.dumps(_fingerprint_child(json.loads(args.fingerprint))))
        return
    if not args.database or not args.data_dir:
        p.error("--database and --data-dir are required")

    admin = _dsn(args.admin_url, "postgres")
    data_dir = Path(args.data_dir)
    master = data_dir / "master.key"
    if not master.is_file():
        raise SystemExit(f"--data-dir: no master.key in {data_dir}")
    source_env = {"CAREPOST_DATA_DIR": str(data_dir), "CAREPOST_DATABASE_URL": _dsn(args.admin_url, args.database, "postgresql+psycopg")}
    result: dict = {"command": " ".join(["bench/restore_postgresql.py", *sys.argv[1:]]), "machine": machine(),
                    "load_average": {"start": list(os.getloadavg())}, "jobs": args.jobs,
                    "database_bytes": _size(admin, args.database)}
    out = Path(args.out) if args.out else HERE / "results" / f"restore_postgresql_{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(complete: bool) -> None:
        # Written after the dump and after every run, so a session cut short keeps what was measured
        # ("complete": false, the runs so far); the medians only once every run is done.
        out.write_text(json.dumps({**result, "complete": complete}, indent=2) + "\n")

    with _work_dir(result) as work:
        archive, dump = work / "files.backup", work / "carepost.dump"
        wall, cpu, _ = _carepost(["backup", str(archive)], source_env)
        result["backup_files"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "bytes": archive.stat().st_size}
        wall, cpu, _ = _timed(["pg_dump", "-Fc", "--no-owner", "-f", str(dump), "-d", _dsn(args.admin_url, args.database)])
        result["pg_dump"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "bytes": dump.stat().st_size}
        result["load_average"]["after_dump"] = list(os.getloadavg())
        # After the dump (the backup's own audit event included); the source is not written meanwhile.
        source = _fingerprint(source_env, None)
        result["rows"] = source["rows"]
        result["messages_total"] = source["messages_total"]
        sample = sorted(source["bodies"])
        if args.drop_source:
            _admin_sql(admin, f'DROP DATABASE "{args.database}" WITH (FORCE)')
            result["source_dropped"] = True

        runs: list[dict] = []
        result["runs"] = runs
        write(False)
        print(json.dumps({"dump": result["pg_dump"], "backup_files": result["backup_files"], "rows": result["rows"]}),
              flush=True)
        for n in range(args.runs):
            free = shutil.disk_usage(work).free
            if free < result["database_bytes"] + 2 * 1024**3:
                # A restored copy is at most about the source's size (its pages packed afresh):
                # rather than fill the disk PostgreSQL writes to, stop with what was measured.
                result["stopped"] = f"run {n + 1} not started: {free} bytes free, the database is {result['database_bytes']}"
                break
            target = f"carepost_restored_{uuid.uuid4().hex[:8]}"
            fresh = work / f"restored-{n}" / "data"
            run: dict = {"load_before": list(os.getloadavg())}
            try:
                _admin_sql(admin, f'CREATE DATABASE "{target}"')
                restore = ["pg_restore", "--no-owner", "--exit-on-error", "-d", _dsn(args.admin_url, target), str(dump)]
                if args.jobs > 1:
                    restore[1:1] = ["-j", str(args.jobs)]
                wall, cpu, _ = _timed(restore)
                run["pg_restore"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
                fresh.mkdir(parents=True)
                shutil.copyfile(master, fresh / "master.key")
                os.chmod(fresh / "master.key", 0o600)
                env = {"CAREPOST_DATA_DIR": str(fresh), "CAREPOST_DATABASE_URL": _dsn(args.admin_url, target, "postgresql+psycopg")}
                # The database as restored (untimed; before `carepost restore` and `audit verify`
                # record their own audit events).
                restored = _fingerprint(env, sample)
                run["rows_equal"] = restored["rows"] == source["rows"]
                if not run["rows_equal"]:
                    run["rows_restored"] = restored["rows"]
                run["bodies_equal"] = restored["bodies"] == source["bodies"] and len(sample) > 0
                wall, cpu, _ = _carepost(["restore", str(archive)], env)
                run["carepost_restore"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
                wall, cpu, said = _carepost(["audit", "verify"], env)
                run["audit_verify"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "ok": b"intact" in said}
                run["verified"] = run["audit_verify"]["ok"] and run["rows_equal"] and run["bodies_equal"]
                run["restore_wall_s"] = round(sum(run[k]["wall_s"] for k in ("pg_restore", "carepost_restore", "audit_verify")), 2)
                run["restore_cpu_s"] = round(sum(run[k]["cpu_s"] for k in ("pg_restore", "carepost_restore", "audit_verify")), 2)
                run["load_after"] = list(os.getloadavg())
            finally:
                _admin_sql(admin, f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
                shutil.rmtree(fresh.parent, ignore_errors=True)
            print(json.dumps({"run": n + 1, **run}), flush=True)
            runs.append(run)
            write(False)
    if runs:
        for key in ("restore_wall_s", "restore_cpu_s"):
            result[f"median_{key}"] = statistics.median(r[key] for r in runs)
        for step in ("pg_restore", "carepost_restore", "audit_verify"):
            result[f"median_{step}_wall_s"] = statistics.median(r[step]["wall_s"] for r in runs)
    result["all_verified"] = bool(runs) and all(r["verified"] for r in runs)
    result["load_average"]["end"] = list(os.getloadavg())
    write(len(runs) == args.runs)
    print(out.read_text(), end="")


if __name__ == "__main__":
    main()
