"""Local mail capture for ``carepost run``: an SMTP server on loopback that writes every message
it receives as an ``.eml`` file into the capture dir, so nothing leaves the machine.

Captured mail may hold PHI: files are created with mode 0600 in a 0700 directory, and the
server refuses to listen anywhere but a loopback address.

Run on its own: ``python -m carepost.core.mailcapture`` (``carepost run`` does this).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

from carepost.core import clock
from carepost.core.ids import new_id
from carepost.core.logging import get_logger

log = get_logger("carepost.mailcapture")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class CaptureHandler:
    """aiosmtpd handler: one file per accepted message, written atomically."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)

    async def handle_DATA(self, server, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or envelope.content or b""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        header = "".join(
            [f"X-CarePost-Capture-Mail-From: {envelope.mail_from}\r\n"]
            + [f"X-CarePost-Capture-Rcpt-To: {rcpt}\r\n" for rcpt in envelope.rcpt_tos]
        ).encode()
        path = self.write(header + data)
        log.info("mail_captured", capture_file=path.name, recipients_count=len(envelope.rcpt_tos), size_bytes=len(data))
        return "250 Message captured"

    def write(self, data: bytes) -> Path:
        name = f"{clock.now().strftime('%Y%m%dT%H%M%S')}-{new_id()}.eml"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final


def start_capture(directory: Path, host: str, port: int) -> Controller:
    if not is_loopback(host):
        raise ValueError(f"CAREPOST_CAPTURE_HOST must be a loopback address, not {host!r}: captured mail may hold PHI")
    controller = Controller(CaptureHandler(directory), hostname=host, port=port, data_size_limit=50 * 1024 * 1024)
    controller.start()
    return controller


def main() -> None:
    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every peer and command
    directory = settings.resolved_capture_dir
    controller = start_capture(directory, settings.capture_host, settings.capture_port)
    log.info("mail_capture_started", host=settings.capture_host, port=settings.capture_port)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    controller.stop()
    log.info("mail_capture_stopped")


if __name__ == "__main__":
    main()
