"""Backup and restore time of the embedded database (issue 17 item 5).

    python bench/backup.py --recipients 100000 --runs 3 [--out bench/results/backup-sqlcipher-100k.json]

Fills a scratch data dir with ``--recipients`` campaign messages (one ``messages`` row and one
``message_recipients`` row each, with ciphertext columns of the sizes a real campaign message
has: random bytes, since only their size matters to a page copy), plus the audit events of the
organization's set-up; then runs ``carepost backup`` and ``carepost restore`` (into a fresh data
dir, the master key copied in) as real processes, ``--runs`` times, and reports wall and CPU
seconds (the child's user + system time, which tolerates a loaded machine), the database and
archive sizes, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _scratch  # noqa: E402


def _cli(args: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "carepost.cli", *args], env=env, capture_output=True, check=False)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"carepost {args[0]} failed: {done.stderr.decode()[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fill(recipients: int) -> None:
    from sqlalchemy import insert

    from carepost.accounts.service import create_organization
    from carepost.assembly import assemble
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.database import get_engine, system_session
    from carepost.core.ids import new_id
    from carepost.delivery.models import Message, MessageRecipient

    assemble()
    initialize_storage()
    with system_session() as s:
        org = create_organization(s, "Backup Bench Clinic")
        s.commit()
        org_id = org.id
    now = datetime.now(timezone.utc)
    engine = get_engine()
    chunk = 5000
    for start in range(0, recipients, chunk):
        messages, rcpts = [], []
        for _ in range(min(chunk, recipients - start)):
            mid = new_id()
            messages.append({"id": mid, "org_id": org_id, "source": "campaign", "from_address": "care@bench.example",
                             "subject_enc": secrets.token_bytes(96), "text_enc": secrets.token_bytes(900),
                             "html_enc": secrets.token_bytes(1800), "security": "tls", "purpose": "treatment",
                             "tags": [], "contains_phi": True, "sandbox": False, "created_at": now,
                             "message_id_header": f"<{mid}@bench.example>", "track_opens": True, "track_clicks": True})
            rcpts.append({"id": new_id(), "org_id": org_id, "message_id": mid, "kind": "to",
                          "address_enc": secrets.token_bytes(72), "address_index": secrets.token_hex(32),
                          "domain_index": secrets.token_hex(32), "status": "delivered", "method": "tls",
                          "possible_duplicate": False, "attempts": 1, "evidence": {"tls": "TLSv1.3"},
                          "updated_at": now})
        with engine.begin() as conn:
            conn.execute(insert(Message), messages)
            conn.execute(insert(MessageRecipient), rcpts)
    from carepost.core.database import dispose_engine

    dispose_engine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with _scratch.scratch_storage(None, prefix="carepost-bench-backup-") as work:
        t0 = time.monotonic()
        fill(args.recipients)
        fill_s = time.monotonic() - t0
        data = Path(os.environ["CAREPOST_DATA_DIR"])
        db_bytes = (data / "carepost.db").stat().st_size
        env = {**os.environ, "CAREPOST_LOG_JSON": "true"}
        runs = []
        for n in range(args.runs):
            archive = work / f"b{n}.backup"
            b_wall, b_cpu = _cli(["backup", str(archive)], env)
            fresh = work / f"restored-{n}"
            fresh.mkdir()
            shutil.copy2(data / "master.key", fresh / "master.key")
            r_wall, r_cpu = _cli(["restore", str(archive)], {**env, "CAREPOST_DATA_DIR": str(fresh)})
            # The same work in this process, without a CLI process's start-up (imports, assembly),
            # which is constant: this part is what grows with the database.
            from carepost.core.backup import create_backup, restore_backup
            from carepost.core.config import Settings, get_settings

            fn_archive = work / f"f{n}.backup"
            c0, w0 = time.process_time(), time.monotonic()
            create_backup(get_settings(), fn_archive)
            fb_wall, fb_cpu = time.monotonic() - w0, time.process_time() - c0
            fn_fresh = work / f"fn-restored-{n}"
            fn_fresh.mkdir()
            shutil.copy2(data / "master.key", fn_fresh / "master.key")
            c0, w0 = time.process_time(), time.monotonic()
            restore_backup(Settings(data_dir=fn_fresh), fn_archive)
            fr_wall, fr_cpu = time.monotonic() - w0, time.process_time() - c0
            shutil.rmtree(fn_fresh)
            fn_archive.unlink()
            runs.append({"backup_wall_s": round(b_wall, 2), "backup_cpu_s": round(b_cpu, 2),
                         "restore_wall_s": round(r_wall, 2), "restore_cpu_s": round(r_cpu, 2),
                         "backup_fn_wall_s": round(fb_wall, 2), "backup_fn_cpu_s": round(fb_cpu, 2),
                         "restore_fn_wall_s": round(fr_wall, 2), "restore_fn_cpu_s": round(fr_cpu, 2),
                         "archive_bytes": archive.stat().st_size})
            print(json.dumps(runs[-1]), flush=True)
            shutil.rmtree(fresh)
            archive.unlink()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "recipients": args.recipients, "database_bytes": db_bytes, "fill_s": round(fill_s, 1), "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(["python", "bench/backup.py", *sys.argv[1:]]),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
