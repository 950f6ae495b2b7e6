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

from carepost.core.config import Settings
from carepost.core.mailcapture import CaptureKeys, capture_files, read_capture
from carepost.core.masterkeys import read_master_key_file
from carepost.core.supervisor import default_children
from tests.fixtures.ui import free_port
from tests.test_cli import ROOT, fresh_env


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _read(data: Path, path: Path) -> str:
    """A captured message in clear: the capture encrypts under a key derived from the master key."""
    master = read_master_key_file(data / "master.key")
    return read_capture(path, CaptureKeys(master.id, {master.id: master})).decode("utf-8", "replace")


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
    def __init__(self, tmp_path: Path, prepare=None):
        self.data = tmp_path / "data"
        self.port = free_port()
        self.capture_port = free_port()
        self.url = f"http://localhost:{self.port}"
        self.env = fresh_env(
            self.data, CAREPOST_PORT=str(self.port), CAREPOST_BASE_URL=self.url, CAREPOST_CAPTURE_PORT=str(self.capture_port),
            CAREPOST_INBOUND_PORT=str(free_port()), CAREPOST_SMTP_SUBMISSION_PORT=str(free_port()),
        )
        if prepare is not None:
            prepare(self.env)  # CLI commands against the data dir before `run` starts
        self.log_path = tmp_path / "run.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "carepost.cli", "run"], env=self.env, cwd=str(ROOT), stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> list[int]:
        deadline = time.monotonic() + 180  # two shared cores: five Python processes start slowly
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    kids = _children(self.proc.pid)
                    if len(kids) == len(default_children(Settings())) and self._capture_listening():
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
    assert any("carepost.cli inbound" in c for c in roles)
    assert any("carepost.cli smtp --self-signed" in c for c in roles)
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
    while not capture_files(capture) and time.monotonic() < deadline:
        time.sleep(0.1)
    files = capture_files(capture)
    assert len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o600
    assert b"Tuesday" not in files[0].read_bytes()  # encrypted at rest (issue 9 item 16)
    content = _read(running.data, files[0])
    assert "Subject: Appointment reminder" in content and "See you on Tuesday." in content
    assert "X-CarePost-Capture-Rcpt-To: patient@example.test" in content

    deliver_through_carepost_relay(running, kids)

    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=60) == 0, running.output()[-3000:]
    deadline = time.monotonic() + 5
    while not all(_gone(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(k) for k in kids), "children left running"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def deliver_through_carepost_relay(running, kids) -> None:
    """The server and worker are pointed at the capture as their relay, over verified TLS: a
    message sent by CarePost's own delivery client with their settings lands in the capture."""
    import asyncio

    from carepost.core.config import Settings
    from carepost.delivery.smtp import DeliveryClient, Envelope

    worker = next(k for k in kids if "carepost.cli worker" in _cmdline(k))
    env = _environ(worker)
    assert env["CAREPOST_SMTP_RELAY"] == f"localhost@127.0.0.1:{running.capture_port}"
    ca_file = Path(env["CAREPOST_EXTRA_CA_FILE"])
    assert ca_file.is_file() and (ca_file.parent / "localhost.key").stat().st_mode & 0o777 == 0o600

    settings = Settings(smtp_relay=env["CAREPOST_SMTP_RELAY"], extra_ca_file=ca_file)
    message = (
        b"From: clinic@clinic.test\r\nTo: patient@example.test\r\nSubject: Portal message waiting\r\n"
        b"Message-ID: <relay-test@clinic.test>\r\n\r\nYou have a new message.\r\n"
    )

    async def send():
        async with DeliveryClient(settings) as client:
            return await client.deliver(Envelope("bounce@clinic.test", ["patient@example.test"], message, require_verified_tls=True))

    [result] = asyncio.run(send())
    assert result.status == "delivered", result.reason
    assert result.evidence.cert_verified and result.evidence.tls_version
    capture = running.data / "mail-capture"
    deadline = time.monotonic() + 10
    while not any("Portal message waiting" in _read(running.data, f) for f in capture_files(capture)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("Portal message waiting" in _read(running.data, f) for f in capture_files(capture))


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


def test_mail_capture_listens_on_loopback_only(tmp_path):
    from carepost.core.mailcapture import start_capture

    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(ValueError, match="loopback"):
            start_capture(tmp_path / "capture", host, free_port())


def test_capture_certificate_is_made_once_and_verifies_for_localhost(tmp_path):
    import ssl

    from carepost.core.mailcapture import CaptureKeys, ensure_capture_tls, start_capture
    from carepost.core.masterkeys import generate_master_key

    tls = ensure_capture_tls(tmp_path / "tls")
    again = ensure_capture_tls(tmp_path / "tls")
    assert again.cert_file.read_bytes() == tls.cert_file.read_bytes()
    assert tls.key_file.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "tls" / "ca.key").exists()  # the CA signs nothing else, ever

    port = free_port()
    master = generate_master_key()
    keys = CaptureKeys(master.id, {master.id: master})
    controller = start_capture(tmp_path / "capture", "127.0.0.1", port, tls, keys)
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file))
        with smtplib.SMTP("localhost", port, timeout=5) as smtp:
            smtp.starttls(context=context)  # raises unless the chain and host name verify
            smtp.sendmail("a@clinic.test", ["b@example.test"], b"Subject: t\r\n\r\nbody\r\n")
    finally:
        controller.stop()
    [eml] = capture_files(tmp_path / "capture")
    assert "Subject: t" in read_capture(eml, keys).decode()


def test_phi_message_under_run_goes_by_verified_tls_to_the_capture(tmp_path):
    """Issue 10 item 10: the capture is the final destination and declared as enforcing TLS, so a
    PHI message sent under `carepost run` ends with method `tls` (not a portal fallback)."""
    import re

    from tests.test_cli import cli

    secrets = {}

    def prepare(env):
        assert cli(env, "init").returncode == 0
        assert cli(env, "org", "create", "Run Clinic").returncode == 0
        created = cli(env, "apikey", "create", "--org", "run-clinic", "--name", "t", "--scope", "messages:send", "--scope", "messages:read")
        assert created.returncode == 0, created.stderr
        secrets["bearer"] = re.search(r"bearer:\s+(\S+)", created.stdout).group(1)
        added = cli(env, "domain", "add", "clinic.test", "--org", "run-clinic")
        assert added.returncode == 0, added.stderr + added.stdout

    running = Running(tmp_path, prepare=prepare)
    try:
        kids = running.wait_ready()
        worker = next(k for k in kids if "carepost.cli worker" in _cmdline(k))
        assert _environ(worker)["CAREPOST_SMTP_RELAY_ENFORCES_TLS"] == "true"
        headers = {"Authorization": f"Bearer {secrets['bearer']}"}
        r = httpx.post(running.url + "/api/v1/messages", headers=headers, timeout=30, json={
            "from": "Run Clinic <care@clinic.test>", "to": ["patient@example.test"], "subject": "Your results",
            "text": "Your HbA1c is 6.1%.", "contains_phi": True, "purpose": "treatment"})
        assert r.status_code == 202, r.text
        message_id = r.json()["id"]
        deadline = time.monotonic() + 60
        recipient = None
        while time.monotonic() < deadline:
            got = httpx.get(f"{running.url}/api/v1/messages/{message_id}", headers=headers, timeout=10).json()
            recipient = got["recipients"][0]
            if recipient["status"] not in ("queued", "sending", "deferred"):
                break
            time.sleep(0.5)
        assert recipient["status"] == "sent", recipient  # accepted by the relay (the capture)
        assert recipient["method"] == "tls", recipient
        assert recipient["evidence"]["relay"] is True
        captured = [_read(running.data, f) for f in capture_files(running.data / "mail-capture")]
        assert any("Your HbA1c is 6.1%" in c for c in captured)  # the message itself, not a portal notice
    finally:
        running.stop()
