"""kill -9 of the /t/ journal's ingester process (issue 13; tracking.journal_ingester): a real
``carepost serve`` answers concurrent opens and clicks while its ingester child is killed with
SIGKILL again and again (mid-batch, as often as not). The serve keeps answering, starts a new
ingester each time, and every answered open and click reaches the database **exactly once**,
with the counters agreeing. Then the serve itself is killed: its ingester child dies with it, and
the next serve drains what was left.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.faults import stop
from tests.faults.test_server_kill import _serve
from tests.faults.test_tracking_journal_kill import _events, _tracked_message, _traffic
from tests.fixtures.ui import free_port

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


def _ingester(server_pid: int) -> int | None:
    """The serve's ingester child (its pid), if one runs now."""
    for task in Path(f"/proc/{server_pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"carepost.tracking.journal_ingester" in cmdline and _alive(int(child)):
                return int(child)
    return None


def _wait_for_ingester(server, other_than: int | None) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server died"
        pid = _ingester(server.pid)
        if pid is not None and pid != other_than:
            return pid
        time.sleep(0.05)
    raise AssertionError("no ingester process under the server")


def test_kill_9_of_the_ingester_process_loses_and_doubles_nothing(storage, session, tmp_path):
    from carepost.tracking.models import EngagementCount

    message_id, paths = _tracked_message(session, 3000)
    port = free_port()
    base = f"http://localhost:{port}"
    log = tmp_path / "server.log"
    server = _serve(storage, port, log)
    answered, lock, stopping, threads = _traffic(base, paths)
    killed: list[int] = []
    try:
        pid = _wait_for_ingester(server, None)
        for t in threads:
            t.start()
        for round_ in range(4):
            # Traffic since the last kill (journaled, its ingestion under way), then SIGKILL.
            goal = 300 * (round_ + 1)
            deadline = time.monotonic() + 60
            while len(answered) < goal and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(answered) >= goal, f"only {len(answered)} answered"
            pid = _wait_for_ingester(server, killed[-1] if killed else None)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        assert server.poll() is None  # the serve survived its ingester's deaths
        replacement = _wait_for_ingester(server, killed[-1])  # and started a new one
        assert replacement not in killed

        # Everything answered so far reaches the database through the restarted ingester, once.
        with lock:
            so_far = set(answered)
        deadline = time.monotonic() + 120
        while not so_far <= set(_events(session, message_id)) and time.monotonic() < deadline:
            time.sleep(0.3)
        found = _events(session, message_id)
        assert not so_far - set(found), f"{len(so_far - set(found))} answered events not in the database"
        assert not {rid: n for rid, n in found.items() if n != 1}

        # kill -9 of the serve mid-traffic: its ingester child dies too (PR_SET_PDEATHSIG) …
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        stopping.set()
        for t in threads:
            t.join(30)
        deadline = time.monotonic() + 30
        while _alive(replacement) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(replacement), "the ingester outlived its serve"

        # … and the next serve drains the journal the killed one left.
        server = _serve(storage, port, log)
        deadline = time.monotonic() + 120
        while not answered <= set(_events(session, message_id)) and time.monotonic() < deadline:
            time.sleep(0.3)
        found = _events(session, message_id)
        missing = answered - set(found)
        assert not missing, f"{len(missing)} answered opens/clicks never reached the database"
        assert set(found) <= {rid for rid, _p in paths}
        doubled = {rid: n for rid, n in found.items() if n != 1}
        assert not doubled, f"{len(doubled)} recipients with their event more than once"
        session.rollback()
        counted = session.scalar(select(func.sum(EngagementCount.count))
                                 .where(EngagementCount.message_id == message_id))
        assert counted == sum(found.values())

        # A clean stop drains the journal (its segments left empty) and stops the ingester too.
        last = _wait_for_ingester(server, None)
        stop(server)
        segments = list((storage.data_dir / "engagement-journal").glob("*/*.journal"))
        assert segments and not any(p.stat().st_size for p in segments)
        deadline = time.monotonic() + 30
        while _alive(last) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(last)
    finally:
        stopping.set()
        stop(server)
        for t in threads:
            t.join(30)
    assert b"engagement_ingester_exited" in log.read_bytes()  # each kill was seen (and the child restarted)
