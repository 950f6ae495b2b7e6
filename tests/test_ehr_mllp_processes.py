"""``carepost mllp --processes 2``: two real listener processes share one port (SO_REUSEPORT);
messages sent over many connections are each recorded once and answered AA after their commit,
the same messages sent again are answered as replays (the control id is unique per organization
across processes), and SIGTERM stops the parent and both listeners."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.ehr_messages import MllpClient, adt, siu
from tests.fixtures.delivery import free_port
from tests.test_ehr_mllp import _connection, _events, _patient, _start, _stop, _wait_for_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


def _listening_children(pid: int, port: int) -> set[int]:
    """The child processes holding a listening socket on ``port`` (from /proc/net/tcp{,6})."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    holders = set()
    for child in _children(pid):
        for fd in Path(f"/proc/{child}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                holders.add(child)
    return holders


def test_two_listener_processes_share_the_port(db, org, storage):
    mrns = [f"MRN-P{i}" for i in range(4)]
    for i, mrn in enumerate(mrns):
        _patient(org.id, mrn, email=f"p{i}@valid.test")
    token = _connection(org.id)
    port = free_port()
    proc = _start(storage, port, args=("--processes", "2"))
    try:
        _wait_for_port(proc, port)
        deadline = time.monotonic() + 120
        while len(_listening_children(proc.pid, port)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "two listener processes did not start"
            time.sleep(0.2)
        assert len(_children(proc.pid)) == 2
        messages = [(siu if n % 2 else adt)(token, "S12" if n % 2 else "A04", f"P-{n}", mrns[n % 4]) for n in range(48)]
        answers: list[str] = []

        def send(part: list[str]) -> None:
            with MllpClient(port) as client:
                for message in part:
                    answers.append(client.exchange(message)["code"])

        def send_all() -> None:
            threads = [threading.Thread(target=send, args=(messages[i::8],)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        send_all()
        assert answers == ["AA"] * 48
        events = _events(org.id)
        assert len(events) == 48 and len({e.idempotency_key for e in events}) == 48
        answers.clear()
        send_all()  # again, over new connections (spread over both processes): replays, nothing new
        assert answers == ["AA"] * 48
        assert len(_events(org.id)) == 48
        listeners = _children(proc.pid)
    finally:
        code = _stop(proc)
    assert code == 0, proc.stdout.read().decode()[-3000:]
    for child in listeners:
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_processes_check_the_address_before_starting(storage):
    import subprocess

    env = {**os.environ, **storage.env}
    result = subprocess.run([sys.executable, "-m", "carepost.cli", "mllp", "--host", "0.0.0.0", "--port",
                             str(free_port()), "--processes", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "MLLP without TLS listens only on a loopback address" in result.stdout + result.stderr
