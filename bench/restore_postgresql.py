"""Restore time of a PostgreSQL installation by docs/backup.md's procedures (issue 17 item 5).

    python bench/restore_postgresql.py --database carepost_segbench_1a2b3c4d \\
        --data-dir /tmp/carepost-segbench-xyz/data --runs 3 \\
        [--method logical|physical] [--admin-url postgresql://postgres@127.0.0.1:5432/postgres] \\
        [--jobs 1] [--compress zstd] [--os-user postgres] [--out FILE]

Made for the database ``bench/campaign_million.py --keep`` leaves behind (a 1,000,000-recipient
campaign sent: contacts, clinical facts, messages, recipients, events, audit), but it takes any
CarePost database and its data dir. Nothing of the source is changed — unless ``--drop-source``
asks for the source database to be dropped once it is backed up and counted (a disk that cannot
hold the source, its backup and a restored copy at once; the counts and digests to compare with are taken
before).

Once: ``carepost backup`` of the data dir's files (checkpoints, TLS keys; the master key is never
in it), then the database's backup. Then ``--runs`` times, into fresh places, exactly what
docs/backup.md tells an operator to do. ``--method logical`` (the default):

0. backup: ``pg_dump -Fc --no-owner`` of the database to a file;
1. ``createdb`` and ``pg_restore --no-owner --exit-on-error [-j N] -d NEW dump``;
2. a fresh data dir, the master key copied in (0600), ``carepost restore ARCHIVE``;
3. ``carepost audit verify`` (every chain against the restored checkpoints).

``--method physical`` (the base backup; the whole cluster the database lives in):

0. backup: ``pg_basebackup -Ft -Z METHOD -X stream -c fast`` (needs a role with REPLICATION and a
   ``replication`` line in pg_hba.conf);
1. unpack ``base.tar.*`` into an empty directory and ``pg_wal.tar.*`` into its ``pg_wal/``, owned
   by ``--os-user`` (PostgreSQL does not run as root), a ``postgresql.conf`` naming a free port;
2. ``pg_ctl start -w``: a second PostgreSQL on that directory, which replays the WAL the backup
   carries and opens once consistent — the restore to the backup's end (no archived WAL after it
   is replayed: how long that takes depends on how much was written since the backup);
3. and 4. as 2 and 3 above, against the database in that second server. It is stopped and its
   directory removed after the run.

Between restoring the database and ``carepost restore``, untimed, a check in a child process: the row counts of the main tables equal
the source's (counted after the backup), and message bodies (the first, the middle and the last by
id) decrypt in the restored installation to the same text as in the source (compared as SHA-256
digests; no text printed).

Reported per step: wall seconds and the CPU seconds of the client processes (``pg_restore``,
``tar``, ``pg_ctl`` and ``carepost``; PostgreSQL's own backends are not counted), the database and
backup sizes, the load average before and after. The restore time is every step after 0: the time
from the backup and the archive in hand to an installation whose audit log is verified. Every
restored database, cluster and data dir is removed after its run; a run is not started when the
disk has less free space than a restored copy needs and 2 GiB (``"stopped"`` says so). The result file is written after the backup and
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

from campaign_million import machine, server_settings

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
    """A scratch directory for the archive and the backup, removed at the end — but kept, and named,
    when a run fails after ``--drop-source`` dropped the source (the backup is then its only copy)."""
    work = Path(tempfile.mkdtemp(prefix="carepost-restore-bench-"))
    try:
        yield work
    except BaseException:
        if result.get("source_dropped"):
            print(f"the source database was dropped; its backup is kept in {work}", file=sys.stderr)
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


STEPS = {"logical": ("pg_restore", "carepost_restore", "audit_verify"),
         "physical": ("unpack", "start", "carepost_restore", "audit_verify")}
UNPACK = {".gz": "gzip", ".lz4": "lz4", ".zst": "zstd", ".tar": None}


def _as_user(cmd: list[str], user: str | None) -> list[str]:
    """``cmd`` run as ``user`` (``runuser``; this process is root then), or as this process's user."""
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_bytes(admin: str) -> int:
    import psycopg

    with psycopg.connect(admin, autocommit=True) as c:
        return int(c.execute("SELECT sum(pg_database_size(datname)) FROM pg_database").fetchone()[0])


def _pg_program(server: dict, name: str) -> str:
    """``name`` (``pg_ctl``, ``pg_basebackup``) on PATH, else Debian's for the server's major version
    (``server``: :func:`server_settings`)."""
    found = shutil.which(name)
    if found:
        return found
    major = int(server["server_version_num"]) // 10000
    debian = Path(f"/usr/lib/postgresql/{major}/bin/{name}")
    if not debian.is_file():
        raise SystemExit(f"{name} not found on PATH nor in {debian.parent}")
    return str(debian)


def _logical_backup(args, work: Path) -> dict:
    dump = work / "carepost.dump"
    wall, cpu, _ = _timed(["pg_dump", "-Fc", "--no-owner", "-f", str(dump), "-d", _dsn(args.admin_url, args.database)])
    return {"pg_dump": {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "bytes": dump.stat().st_size}}


def _physical_backup(args, work: Path) -> dict:
    base, admin = work / "base", _dsn(args.admin_url, "postgres")
    wall, cpu, _ = _timed([args.pg_basebackup, "-D", str(base), "-Ft", "-Z", args.compress, "-X", "stream",
                           "-c", "fast", "-d", admin])
    files = sorted(base.iterdir())
    return {"pg_basebackup": {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "compress": args.compress,
                              "bytes": sum(f.stat().st_size for f in files), "files": [f.name for f in files]},
            "cluster_bytes": _cluster_bytes(admin)}


def _unpack(archive: Path, into: Path) -> list[str]:
    program = UNPACK[archive.suffix]
    return ["tar", "-x", "-f", str(archive), "-C", str(into), *([f"--use-compress-program={program}"] if program else [])]


@contextlib.contextmanager
def _logical_restore(args, work: Path, run: dict):
    """Step 1 of the logical procedure; yields the restored database's CarePost URL."""
    target = f"carepost_restored_{uuid.uuid4().hex[:8]}"
    admin = _dsn(args.admin_url, "postgres")
    try:
        _admin_sql(admin, f'CREATE DATABASE "{target}"')
        restore = ["pg_restore", "--no-owner", "--exit-on-error", "-d", _dsn(args.admin_url, target), str(work / "carepost.dump")]
        if args.jobs > 1:
            restore[1:1] = ["-j", str(args.jobs)]
        wall, cpu, _ = _timed(restore)
        run["pg_restore"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        yield _dsn(args.admin_url, target, "postgresql+psycopg")
    finally:
        _admin_sql(admin, f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')


@contextlib.contextmanager
def _physical_restore(args, work: Path, run: dict, n: int):
    """Steps 1 and 2 of the physical procedure; yields the database's CarePost URL in the second server."""
    from sqlalchemy.engine import make_url

    cluster = work / f"cluster-{n}"
    user = args.os_user
    port = _free_port()
    started = False
    try:
        t0 = time.monotonic()
        cluster.mkdir(mode=0o700)
        archives = {p.name.split(".")[0]: p for p in (work / "base").iterdir()}
        cpu = _timed(_unpack(archives["base"], cluster))[1]
        if "pg_wal" in archives:
            cpu += _timed(_unpack(archives["pg_wal"], cluster / "pg_wal"))[1]
        # Only this server's own settings; the rest are PostgreSQL's defaults but shared_buffers,
        # which is the source server's (a fair comparison with it).
        (cluster / "postgresql.conf").write_text(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{cluster}'\n"
            f"shared_buffers = '{args.shared_buffers}'\narchive_mode = off\nhba_file = '{cluster}/restore_hba.conf'\n"
            "logging_collector = off\n")
        (cluster / "restore_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        if user:
            cpu += _timed(["chown", "-R", f"{user}:", str(cluster)])[1]
        run["unpack"] = {"wall_s": round(time.monotonic() - t0, 2), "cpu_s": round(cpu, 2)}
        wall, cpu, _ = _timed(_as_user([args.pg_ctl, "start", "-w", "-t", "86400", "-D", str(cluster),
                                        "-l", str(cluster / "server.log")], user))
        started = True
        run["start"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        url = make_url(args.admin_url).set(host="127.0.0.1", port=port)
        yield _dsn(url.render_as_string(hide_password=False), args.database, "postgresql+psycopg")
    finally:
        if started:
            subprocess.run(_as_user([args.pg_ctl, "stop", "-m", "fast", "-D", str(cluster)], user), capture_output=True, check=False)
        shutil.rmtree(cluster, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database", help="the source database's name")
    p.add_argument("--data-dir", help="the source installation's data dir (holds master.key)")
    p.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--method", choices=sorted(STEPS), default="logical",
                   help="logical: pg_dump / pg_restore; physical: pg_basebackup, a second server started on it")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="pg_restore -j (1: the documented command; logical only)")
    p.add_argument("--compress", default="zstd", help="pg_basebackup -Z (physical only; docs/backup.md: zstd)")
    p.add_argument("--os-user", default="postgres" if os.geteuid() == 0 else None,
                   help="the user the second server runs as (physical only; default postgres when run as root)")
    p.add_argument("--out", default=None)
    p.add_argument("--drop-source", action="store_true",
                   help="drop the source database once backed up and counted (a disk that cannot hold it, its backup "
                        "and a restored copy at once); its backup is kept if a run then fails")
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
    server = server_settings(admin)
    args.shared_buffers = server["shared_buffers"]
    if args.method == "physical":
        args.pg_ctl, args.pg_basebackup = _pg_program(server, "pg_ctl"), _pg_program(server, "pg_basebackup")
    source_env = {"CAREPOST_DATA_DIR": str(data_dir), "CAREPOST_DATABASE_URL": _dsn(args.admin_url, args.database, "postgresql+psycopg")}
    result: dict = {"command": " ".join(["bench/restore_postgresql.py", *sys.argv[1:]]), "machine": machine(),
                    "load_average": {"start": list(os.getloadavg())}, "method": args.method,
                    "database_bytes": _size(admin, args.database), "postgresql": server}
    if args.method == "logical":
        result["jobs"] = args.jobs
    out = Path(args.out) if args.out else HERE / "results" / f"restore_postgresql_{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = STEPS[args.method]

    def write(complete: bool) -> None:
        # Written after the backup and after every run, so a session cut short keeps what was
        # measured ("complete": false, the runs so far); the medians only once every run is done.
        out.write_text(json.dumps({**result, "complete": complete}, indent=2) + "\n")

    with _work_dir(result) as work:
        if args.os_user:
            os.chmod(work, 0o711)  # the second server's user passes through to its own directory only
        archive = work / "files.backup"
        wall, cpu, _ = _carepost(["backup", str(archive)], source_env)
        result["backup_files"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "bytes": archive.stat().st_size}
        result.update((_logical_backup if args.method == "logical" else _physical_backup)(args, work))
        result["load_average"]["after_backup"] = list(os.getloadavg())
        # After the backup (the files backup's own audit event included); the source is not written meanwhile.
        source = _fingerprint(source_env, None)
        result["rows"] = source["rows"]
        result["messages_total"] = source["messages_total"]
        sample = sorted(source["bodies"])
        if args.drop_source:
            _admin_sql(admin, f'DROP DATABASE "{args.database}" WITH (FORCE)')
            result["source_dropped"] = True
        # What one restored copy needs on disk: the database (logical) or the whole cluster (physical).
        needed = result.get("cluster_bytes", result["database_bytes"])

        runs: list[dict] = []
        result["runs"] = runs
        write(False)
        print(json.dumps({k: result[k] for k in ("backup_files", "pg_dump", "pg_basebackup", "rows") if k in result}),
              flush=True)
        for n in range(args.runs):
            free = shutil.disk_usage(work).free
            if free < needed + 2 * 1024**3:
                # A restored copy is at most about the source's size (its pages packed afresh):
                # rather than fill the disk PostgreSQL writes to, stop with what was measured.
                result["stopped"] = f"run {n + 1} not started: {free} bytes free, a restored copy needs {needed}"
                break
            fresh = work / f"restored-{n}" / "data"
            run: dict = {"load_before": list(os.getloadavg())}
            restored_db = _logical_restore(args, work, run) if args.method == "logical" else _physical_restore(args, work, run, n)
            try:
                with restored_db as url:
                    fresh.mkdir(parents=True)
                    shutil.copyfile(master, fresh / "master.key")
                    os.chmod(fresh / "master.key", 0o600)
                    env = {"CAREPOST_DATA_DIR": str(fresh), "CAREPOST_DATABASE_URL": url}
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
            finally:
                shutil.rmtree(fresh.parent, ignore_errors=True)
            run["verified"] = run["audit_verify"]["ok"] and run["rows_equal"] and run["bodies_equal"]
            run["restore_wall_s"] = round(sum(run[k]["wall_s"] for k in steps), 2)
            run["restore_cpu_s"] = round(sum(run[k]["cpu_s"] for k in steps), 2)
            run["load_after"] = list(os.getloadavg())
            print(json.dumps({"run": n + 1, **run}), flush=True)
            runs.append(run)
            write(False)
    if runs:
        for key in ("restore_wall_s", "restore_cpu_s"):
            result[f"median_{key}"] = statistics.median(r[key] for r in runs)
        for step in steps:
            result[f"median_{step}_wall_s"] = statistics.median(r[step]["wall_s"] for r in runs)
    result["all_verified"] = bool(runs) and all(r["verified"] for r in runs)
    result["load_average"]["end"] = list(os.getloadavg())
    write(len(runs) == args.runs)
    print(out.read_text(), end="")


if __name__ == "__main__":
    main()
