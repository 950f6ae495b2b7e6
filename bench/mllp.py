"""Benchmark: HL7 v2 messages per second through one ``carepost mllp`` listener, with ACKs
(issue 15, speed: at least 500 messages per second).

    .venv/bin/python bench/mllp.py
    .venv/bin/python bench/mllp.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

A fresh data dir (embedded SQLCipher, or a scratch PostgreSQL database made and dropped here); an
organization with ``--patients`` patients (MRNs, emails) and one MLLP connection. Then the real
``carepost mllp`` process (plain TCP on loopback) and ``--connections`` concurrent MLLP
connections (asyncio, one process) each sending its share of ``--messages`` messages in original
mode (send, wait for the ACK, send the next): SIU^S12 and ADT^A04 alternately, a different
control id and a random patient each. Every message is fully processed before its ACK: parsed,
sender authenticated, patient found by the MRN blind index, event recorded with encrypted
properties, the message row and the audit event written, the group's transaction committed.

Reported per run: messages per second from the first send to the last ACK, the listener's CPU
time per message (from /proc, with ``--processes N`` its children's summed: what one message
costs, whatever else loads the machine; 1000 / that is the rate one free core would sustain),
and the counts of AA;
the events in the database are counted afterwards and must equal the AAs (durability). The
sending client runs on the same machine: its own CPU per message is reported too
(``client_cpu_ms_per_message``), as it takes from the same two cores. ``--runs``
runs (3), median reported, with the load average before and after each run (the machine is
shared). Prints and writes one JSON document (``--out``, default ``bench/results/mllp_<db>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = b"\x0b", b"\x1c\r"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """CPU (user + system) a process and its live child processes (``--processes``) have used: the
    listener's cost per message, whatever the load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _cpu_seconds(int(child))
    return total


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _memory_gb() -> float:
    kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
    return round(kib / 1024 / 1024, 1)


def _pg_database(admin_url: str) -> tuple[str, str]:
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    name = f"carepost_bench_mllp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin.set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False), name


def _drop_pg(admin_url: str, name: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup(env: dict, patients: int) -> tuple[str, str, list[str]]:
    """An organization, its patients (MRN-00001...) and one MLLP connection; (org id, credential, MRNs)."""
    os.environ.update(env)
    from carepost.assembly import assemble

    assemble()
    from carepost.accounts.service import create_organization
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.database import dispose_engine, org_session, system_session
    from carepost.ehr import service as ehr
    from carepost.patients import service as patients_service

    initialize_storage()
    with system_session() as s:
        org = create_organization(s, "Bench Clinic")
        s.commit()
        org_id = org.id
    mrns = [f"MRN-{i:05d}" for i in range(patients)]
    with org_session(org_id) as s:
        for i, mrn in enumerate(mrns):
            patients_service.save_contact(s, org_id, {"given_name": "Pat", "email": f"p{i}@bench.example", "mrn": mrn})
        _, token = ehr.create_connection(s, org_id, name="bench feed", sending_facilities=["BENCHCLINIC"])
        s.commit()
    dispose_engine()
    return org_id, token, mrns


def _message(token: str, n: int, run: int, mrn: str) -> bytes:
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%d%H%M%S") + "+0000"
    control = f"R{run}-{n:07d}"
    if n % 2:
        return ("\r".join([
            f"MSH|^~\\&|EPICADT|BENCHCLINIC|CAREPOST|CAREPOST|{stamp}|{token}|ADT^A04^ADT_A01|{control}|P|2.5.1",
            f"EVN|A04|{stamp}",
            f"PID|1||{mrn}^^^BENCH^MR||Pat^Bench||19700101|F",
            "PV1|1|O|CLINIC1^101^^BENCH||||1234567^Carter^Maya|||MED",
        ]) + "\r").encode()
    start = (now + timedelta(days=3)).strftime("%Y%m%d%H%M%S") + "+0000"
    return ("\r".join([
        f"MSH|^~\\&|EPICADT|BENCHCLINIC|CAREPOST|CAREPOST|{stamp}|{token}|SIU^S12^SIU_S12|{control}|P|2.5.1",
        f"SCH|PL{n}|A{run}-{n}|||||ROUTINE|FOLLOWUP^Follow-up|20|min|^^20^{start}",
        f"TQ1|1||||||{start}",
        f"PID|1||{mrn}^^^BENCH^MR||Pat^Bench||19700101|F",
        "RGS|1|A",
        f"AIS|1|A|99213^Office visit^CPT|{start}",
        "AIL|1|A|CLINIC2^205^^BENCH",
        "AIP|1|A|1234567^Carter^Maya|ATT",
    ]) + "\r").encode()


async def _client(port: int, frames: list[bytes], codes: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in frames:
            writer.write(START + data + END)
            answer = await reader.readuntil(END)
            text = answer.decode()
            codes.append(text.split("MSA|", 1)[1][:2])
    finally:
        writer.close()
        await writer.wait_closed()


async def _load(port: int, per_connection: list[list[bytes]]) -> tuple[float, list[str]]:
    codes: list[str] = []
    began = time.perf_counter()
    await asyncio.gather(*(_client(port, frames, codes) for frames in per_connection))
    return time.perf_counter() - began, codes


def _count_events(env: dict, org_id: str) -> int:
    code = ("import os,json;os.environ.update(json.loads(os.environ['BENCH_ENV']));"
            "from carepost.assembly import assemble;assemble();"
            "from sqlalchemy import select,func;from carepost.core.database import read_only_session;"
            "from carepost.tracking.conversions import ContactEvent;"
            f"s=read_only_session('{org_id}').__enter__();"
            f"print(s.scalar(select(func.count()).select_from(ContactEvent).where(ContactEvent.org_id=='{org_id}')))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "BENCH_ENV": json.dumps(env)},
                         capture_output=True, text=True, cwd=str(ROOT), check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="PostgreSQL admin URL (a scratch database is made); default SQLCipher")
    parser.add_argument("--messages", type=int, default=3000, help="messages per run (3000)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent MLLP connections (8)")
    parser.add_argument("--patients", type=int, default=500, help="patients to match (500)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="carepost mllp --processes (1)")
    parser.add_argument("--out", help="JSON result file")
    args = parser.parse_args()

    db = "postgresql" if args.database_url else "sqlcipher"
    data_dir = Path(tempfile.mkdtemp(prefix="carepost-bench-mllp-"))
    env = {"CAREPOST_DATA_DIR": str(data_dir), "CAREPOST_LOG_LEVEL": "WARNING"}
    pg_name = None
    if args.database_url:
        url, pg_name = _pg_database(args.database_url)
        env["CAREPOST_DATABASE_URL"] = url
    proc = None
    try:
        org_id, token, mrns = setup(env, args.patients)
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "mllp", "--host", "127.0.0.1", "--port",
                                 str(port), *(["--processes", str(args.processes)] if args.processes > 1 else [])],
                                env={**os.environ, **env}, cwd=str(ROOT),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 600  # a loaded, shared machine: starting may take minutes
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    if proc.poll() is None:
                        proc.kill()  # read its stderr only once it ended (else the read waits forever)
                    raise SystemExit("carepost mllp did not start: " + proc.communicate()[1].decode()[-2000:]) from None
                time.sleep(0.2)
        rng = random.Random(15)
        runs = []
        recorded_before = 0
        for run in range(args.runs):
            frames = [_message(token, n, run, rng.choice(mrns)) for n in range(args.messages)]
            per_connection = [frames[i::args.connections] for i in range(args.connections)]
            load_before = os.getloadavg()
            cpu_before, client_before = _cpu_seconds(proc.pid), time.process_time()
            seconds, codes = asyncio.run(_load(port, per_connection))
            cpu = _cpu_seconds(proc.pid) - cpu_before
            client_cpu = time.process_time() - client_before
            load_after = os.getloadavg()
            recorded = _count_events(env, org_id)
            aa = codes.count("AA")
            runs.append({"messages": len(codes), "seconds": round(seconds, 3),
                         "messages_per_second": round(len(codes) / seconds, 1), "aa": aa,
                         "listener_cpu_ms_per_message": round(cpu * 1000 / max(len(codes), 1), 2),
                         "messages_per_listener_cpu_second": round(len(codes) / cpu, 1) if cpu else None,
                         "client_cpu_ms_per_message": round(client_cpu * 1000 / max(len(codes), 1), 2),
                         "other_answers": len(codes) - aa, "events_recorded": recorded - recorded_before,
                         "load_before": [round(x, 2) for x in load_before],
                         "load_after": [round(x, 2) for x in load_after]})
            recorded_before = recorded
            print(json.dumps(runs[-1]), flush=True)
            if aa != runs[-1]["events_recorded"]:
                print("durability check failed: AAs and events differ", file=sys.stderr)
        rates = [r["messages_per_second"] for r in runs]
        result = {
            "bench": "mllp", "database": db, "command": " ".join([".venv/bin/python", "bench/mllp.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()} {os.cpu_count()} vCPU", "messages_per_run": args.messages,
            "connections": args.connections, "processes": args.processes, "patients": args.patients,
            "cpu": _cpu_model(), "memory_gb": _memory_gb(), "runs": runs,
            "median_messages_per_second": statistics.median(rates),
            "median_listener_cpu_ms_per_message": statistics.median(r["listener_cpu_ms_per_message"] for r in runs),
            "median_client_cpu_ms_per_message": statistics.median(r["client_cpu_ms_per_message"] for r in runs),
            "durable": all(r["aa"] == r["events_recorded"] for r in runs),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        out = Path(args.out or ROOT / "bench" / "results" / f"mllp_{db}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if pg_name:
            _drop_pg(args.database_url, pg_name)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
