"""``carepost run``: server, worker and mail capture as supervised child processes."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from tests.fixtures.ui import free_port
from tests.test_cli import ROOT, fresh_env


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _gone(pid: int) -> bool:
    """Not running (no such process, or a zombie waiting to be reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


class Running:
    def __init__(self, tmp_path: Path):
        self.data = tmp_path / "data"
        self.port = free_port()
        self.capture_port = free_port()
        self.url = f"http://localhost:{self.port}"
        self.env = fresh_env(
            self.data, CAREPOST_PORT=str(self.port), CAREPOST_BASE_URL=self.url, CAREPOST_CAPTURE_PORT=str(self.capture_port)
        )
        self.log_path = tmp_path / "run.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "carepost.cli", "run"], env=self.env, cwd=str(ROOT), stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> list[int]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    kids = _children(self.proc.pid)
                    if len(kids) == 3 and self._capture_listening():
                        return kids
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("carepost run did not come up: " + self.output()[-3000:])

    def _capture_listening(self) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", self.capture_port, timeout=2) as smtp:
                return smtp.noop()[0] == 250
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in _children(self.proc.pid):
            subprocess.run(["kill", "-9", str(pid)])
        self.log.close()


@pytest.fixture
def running(tmp_path):
    r = Running(tmp_path)
    yield r
    r.stop()


def test_run_starts_everything_captures_mail_and_stops_cleanly(running):
    kids = running.wait_ready()
    roles = sorted(_cmdline(k) for k in kids)
    assert any("carepost.cli serve" in c for c in roles)
    assert any("carepost.cli worker" in c for c in roles)
    assert any("carepost.core.mailcapture" in c for c in roles)
    # First start: run initialized the data dir and printed the one-time setup link.
    assert f"{running.url}/app/setup/" in running.output()

    msg = EmailMessage()
    msg["From"] = "reminders@clinic.test"
    msg["To"] = "patient@example.test"
    msg["Subject"] = "Appointment reminder"
    msg.set_content("See you on Tuesday.")
    with smtplib.SMTP("127.0.0.1", running.capture_port, timeout=5) as smtp:
        smtp.send_message(msg)
    capture = running.data / "mail-capture"
    deadline = time.monotonic() + 10
    while not list(capture.glob("*.eml")) and time.monotonic() < deadline:
        time.sleep(0.1)
    files = list(capture.glob("*.eml"))
    assert len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o600
    content = files[0].read_text()
    assert "Subject: Appointment reminder" in content and "See you on Tuesday." in content
    assert "X-CarePost-Capture-Rcpt-To: patient@example.test" in content

    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=60) == 0, running.output()[-3000:]
    deadline = time.monotonic() + 5
    while not all(_gone(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(k) for k in kids), "children left running"


def test_sigint_is_forwarded_too(running):
    kids = running.wait_ready()
    running.proc.send_signal(signal.SIGINT)
    assert running.proc.wait(timeout=60) == 0, running.output()[-3000:]
    assert all(_gone(k) for k in kids)


def test_when_one_child_dies_the_rest_stop_and_run_exits_non_zero(running):
    kids = running.wait_ready()
    capture = next(k for k in kids if "carepost.core.mailcapture" in _cmdline(k))
    subprocess.run(["kill", "-9", str(capture)], check=True)
    code = running.proc.wait(timeout=60)
    assert code != 0
    assert all(_gone(k) for k in kids)
    assert "child_died" in running.output()
