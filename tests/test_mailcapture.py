"""Issue 9 item 16: the local mail capture of ``carepost run`` keeps no PHI in clear on disk and
deletes what it captured after CAREPOST_CAPTURE_RETENTION_HOURS.

A real capture server (aiosmtpd) receives a real SMTP message; the files are read back from
disk byte for byte; the retention runs in the real ``python -m carepost.core.mailcapture``
process; the captures are read with the real ``carepost capture`` commands."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest

from carepost.core import clock
from carepost.core.mailcapture import (
    SUFFIX,
    CaptureHandler,
    CaptureKeys,
    capture_files,
    purge_captures,
    read_capture,
    seal_plaintext_captures,
    start_capture,
)
from carepost.core.masterkeys import DecryptionFailed, _b64, generate_master_key, parse_master_key_env
from tests.fixtures.delivery import free_port
from tests.test_cli import ROOT, cli, fresh_env

PATIENT = "jordan.vale@example.test"
PHI = ["Jordan Vale", "HbA1c 9.4", "MRN 88-4411", PATIENT, "Your lab results"]


def _phi_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "care@clinic.test"
    msg["To"] = f"Jordan Vale <{PATIENT}>"
    msg["Subject"] = "Your lab results"
    msg.set_content("Dear Jordan Vale, your HbA1c 9.4 (MRN 88-4411) needs a visit.")
    return msg


def _keys() -> tuple[CaptureKeys, str]:
    master = generate_master_key()
    env_value = f"{master.id}:{_b64(master.key)}"
    assert parse_master_key_env(env_value).key == master.key
    return CaptureKeys(master.id, {master.id: master}), env_value


def _assert_no_phi_on_disk(directory: Path) -> None:
    for path in directory.rglob("*"):
        assert not any(word.lower() in path.name.lower() for word in PHI), path.name
        if path.is_file():
            raw = path.read_bytes()
            for word in PHI + ["Subject:", "X-CarePost-Capture-Rcpt-To"]:
                assert word.encode() not in raw, (path.name, word)


def test_captured_mail_is_encrypted_at_rest_and_reads_back(tmp_path):
    keys, _ = _keys()
    directory = tmp_path / "capture"
    port = free_port()
    controller = start_capture(directory, "127.0.0.1", port, keys=keys)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
            smtp.send_message(_phi_message())
    finally:
        controller.stop()
    [path] = capture_files(directory)
    assert path.name.endswith(SUFFIX) and path.stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    assert list(directory.glob("*.eml")) == []
    _assert_no_phi_on_disk(directory)
    clear = read_capture(path, keys).decode()
    assert "Subject: Your lab results" in clear and "HbA1c 9.4" in clear
    assert f"X-CarePost-Capture-Rcpt-To: {PATIENT}" in clear
    # Bound to its name and its key: a renamed file, an altered byte or another key fail.
    renamed = path.with_name("20000101T000000-" + "0" * 32 + SUFFIX)
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(DecryptionFailed):
        read_capture(renamed, keys)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        keys.open(path.name, bytes(blob))
    other, _ = _keys()
    with pytest.raises(Exception):
        read_capture(path, other)


def test_captures_older_than_the_retention_are_purged(tmp_path):
    keys, _ = _keys()
    directory = tmp_path / "capture"
    handler = CaptureHandler(directory, keys)
    try:
        clock.advance(-timedelta(hours=30))
        old = handler.write(b"Subject: old\r\n\r\nold\r\n")
        clock.advance(timedelta(hours=25))
        middle = handler.write(b"Subject: middle\r\n\r\nmiddle\r\n")  # five hours old
    finally:
        clock.reset()
    new = handler.write(b"Subject: new\r\n\r\nnew\r\n")
    assert purge_captures(directory, timedelta(hours=24)) == 1
    assert capture_files(directory) == [middle, new] and not old.exists()
    assert purge_captures(directory, timedelta(hours=4)) == 1
    assert capture_files(directory) == [new]
    # Nothing left behind after the retention of the newest.
    assert purge_captures(directory, timedelta(hours=1), now=clock.now() + timedelta(hours=1, seconds=1)) == 1
    assert list(directory.iterdir()) == []


def test_plaintext_captures_of_an_older_carepost_are_sealed(tmp_path):
    keys, _ = _keys()
    directory = tmp_path / "capture"
    directory.mkdir()
    legacy = directory / "20261201T101010-0123456789abcdef0123456789abcdef.eml"
    legacy.write_bytes(bytes(_phi_message()))
    assert seal_plaintext_captures(directory, keys) == 1
    assert not legacy.exists()
    _assert_no_phi_on_disk(directory)
    [sealed] = capture_files(directory)
    assert b"HbA1c 9.4" in read_capture(sealed, keys)


def test_the_capture_process_purges_and_the_cli_reads(tmp_path):
    """``python -m carepost.core.mailcapture`` (what ``carepost run`` starts) deletes captures
    past CAREPOST_CAPTURE_RETENTION_HOURS when it starts; ``carepost capture list`` and ``show``
    read what it keeps."""
    keys, master_env = _keys()
    data = tmp_path / "data"
    directory = data / "mail-capture"
    try:
        clock.advance(-timedelta(hours=3))
        stale = CaptureHandler(directory, keys).write(b"Subject: stale\r\n\r\nstale\r\n")
    finally:
        clock.reset()
    port = free_port()
    env = fresh_env(data, CAREPOST_MASTER_KEY=master_env, CAREPOST_CAPTURE_PORT=str(port),
                    CAREPOST_CAPTURE_RETENTION_HOURS="2")
    proc = subprocess.Popen([sys.executable, "-m", "carepost.core.mailcapture"], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not stale.exists()
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                    smtp.send_message(_phi_message())
                break
            except OSError:
                time.sleep(0.2)
        while not capture_files(directory) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    assert "Jordan" not in output and "HbA1c" not in output  # its log names files, never content
    [path] = capture_files(directory)
    _assert_no_phi_on_disk(data)

    listed = cli(env, "capture", "list")
    assert listed.returncode == 0, listed.stderr
    assert path.name in listed.stdout and "Your lab results" in listed.stdout and PATIENT in listed.stdout
    shown = cli(env, "capture", "show", "last")
    assert shown.returncode == 0, shown.stderr
    assert "HbA1c 9.4" in shown.stdout and "Subject: Your lab results" in shown.stdout
    out = tmp_path / "out.eml"
    written = cli(env, "capture", "show", path.name, "--out", str(out))
    assert written.returncode == 0, written.stderr
    assert b"HbA1c 9.4" in out.read_bytes() and out.stat().st_mode & 0o777 == 0o600
    missing = cli(env, "capture", "show", "nothing-here")
    assert missing.returncode == 1 and "no captured message" in missing.stderr
    # Another master key reads nothing.
    _, other_env = _keys()
    refused = cli({**env, "CAREPOST_MASTER_KEY": other_env}, "capture", "show", path.name)
    assert refused.returncode == 1 and "HbA1c" not in refused.stdout
    assert os.listdir(directory) == [path.name]
