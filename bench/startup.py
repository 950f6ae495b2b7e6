"""Benchmark: what one CarePost process costs to start — the price every ``carepost`` command,
every ``carepost worker`` and ``carepost serve`` pays, hundreds of times in the test suite.

    .venv/bin/python bench/startup.py                       # this tree
    .venv/bin/python bench/startup.py --src /tmp/before/src --label before   # another checkout's src/

Measured, each in a fresh process, ``--runs`` times (3), median reported:

* ``assemble``: ``from carepost.assembly import assemble; assemble()`` — the composition root with
  the router modules, as ``carepost serve`` and the test fixtures assemble — wall and CPU inside
  the process, and the whole process's wall time from the outside (interpreter start included);
* ``assemble_no_http``: the same with ``assemble(http=False)``, as the worker and every CLI command
  but ``serve`` assemble (absent before that option existed: recorded as null);
* ``worker``: ``carepost worker --threads 1`` until it has run a task queued before it started
  (``reencrypt_data_keys``, which logs ``data_keys_reencrypted``): wall time and the worker's CPU
  (``/proc``) at that moment;
* ``serve``: ``carepost serve`` until ``GET /healthz`` answers 200 (polled every 20 ms).

A fresh data dir with the embedded SQLCipher database (``carepost init``). The load average is
recorded before and after each run (the machine is shared). Prints and writes one JSON document
(``--out``, default ``bench/results/startup_<label>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import _scratch

ROOT = Path(__file__).resolve().parent.parent

ASSEMBLE = """
import json, time
w, c = time.perf_counter(), time.process_time()
from carepost.assembly import assemble
{call}
print(json.dumps({{"wall": time.perf_counter() - w, "cpu": time.process_time() - c}}))
"""

ENQUEUE = """
from carepost.assembly import assemble
assemble()
from carepost.core.tasks import reencrypt_data_keys
reencrypt_data_keys()
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assemble(env: dict, call: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", ASSEMBLE.format(call=call)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    inside = json.loads(out.stdout.strip().splitlines()[-1])
    return {"process_wall": round(time.perf_counter() - start, 3), "wall": round(inside["wall"], 3),
            "cpu": round(inside["cpu"], 3)}


def _worker(env: dict, work: Path) -> dict:
    subprocess.run([sys.executable, "-c", ENQUEUE], env=env, cwd=ROOT, check=True, capture_output=True)
    log_path = work / "worker.log"
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "worker", "--threads", "1"],
                                env={**env, "CAREPOST_LOG_JSON": "true"}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        while "data_keys_reencrypted" not in log_path.read_text():
            if proc.poll() is not None or time.perf_counter() - start > 120:
                raise SystemExit("the worker did not run its task:\n" + log_path.read_text())
            time.sleep(0.01)
        wall, cpu = time.perf_counter() - start, _cpu_seconds(proc.pid)
    finally:
        _scratch.stop(proc)
    return {"wall": round(wall, 3), "cpu": round(cpu, 3)}


def _serve(env: dict, work: Path) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    with open(work / "serve.log", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "serve", "--port", str(port)],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None or time.perf_counter() - start > 120:
                raise SystemExit("the server did not answer:\n" + (work / "serve.log").read_text())
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.02)
        wall, cpu = time.perf_counter() - start, _cpu_seconds(proc.pid)
    finally:
        _scratch.stop(proc)
    return {"wall": round(wall, 3), "cpu": round(cpu, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--src", help="Import carepost from this src/ directory (another checkout) instead of this tree's.")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="carepost-bench-startup-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREPOST_")}
    env["CAREPOST_DATA_DIR"] = str(work / "data")
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    try:
        subprocess.run([sys.executable, "-m", "carepost.cli", "init"], env=env, cwd=ROOT, check=True, capture_output=True)
        has_http_option = "http" in subprocess.run(
            [sys.executable, "-c", "import inspect, carepost.assembly as a; print(inspect.signature(a.assemble))"],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        runs = []
        for _ in range(args.runs):
            run = {"load_before": os.getloadavg()[0]}
            run["assemble"] = _assemble(env, "assemble()")
            run["assemble_no_http"] = _assemble(env, "assemble(http=False)") if has_http_option else None
            run["worker"] = _worker(env, work)
            run["serve"] = _serve(env, work)
            run["load_after"] = os.getloadavg()[0]
            runs.append(run)
            print(json.dumps(run), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(kind: str, key: str) -> float | None:
        values = [r[kind][key] for r in runs if r[kind] is not None]
        return round(statistics.median(values), 3) if values else None

    result = {
        "benchmark": "startup",
        "label": args.label,
        "src": args.src or str(ROOT / "src"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=Path(args.src or ROOT),
                                 capture_output=True, text=True).stdout.strip(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "median": {f"{kind}.{key}": median(kind, key)
                   for kind, keys in (("assemble", ("process_wall", "wall", "cpu")),
                                      ("assemble_no_http", ("process_wall", "wall", "cpu")),
                                      ("worker", ("wall", "cpu")), ("serve", ("wall", "cpu")))
                   for key in keys},
        "runs": runs,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"startup_{args.label}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"], indent=2))


if __name__ == "__main__":
    main()
