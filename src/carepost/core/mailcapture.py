"""Local mail capture for ``carepost run``: an SMTP server on loopback that writes every message
it receives as an ``.eml`` file into the capture dir, so nothing leaves the machine.

Captured mail may hold PHI: files are created with mode 0600 in a 0700 directory, and the
server refuses to listen anywhere but a loopback address.

CarePost delivers only over verified TLS to a relay, so the capture offers STARTTLS with a
certificate for ``localhost`` issued by a local CA made on first start (``capture-tls/`` in the
data dir). ``carepost run`` points the server and worker at it: ``CAREPOST_SMTP_RELAY`` is the
capture and ``CAREPOST_EXTRA_CA_FILE`` the local CA, so every message CarePost sends lands here.
The capture is declared a final, TLS-enforcing destination (``CAREPOST_SMTP_RELAY_ENFORCES_TLS``):
messages that need verified TLS show ``tls`` as in production.

Run on its own: ``python -m carepost.core.mailcapture`` (``carepost run`` does this).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import ssl
import threading
from dataclasses import dataclass
from datetime import timedelta
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


# --------------------------------------------------------------------------- STARTTLS


@dataclass(frozen=True)
class CaptureTls:
    ca_file: Path
    cert_file: Path
    key_file: Path


CERT_DAYS = 825


def capture_tls_dir(settings) -> Path:
    return settings.data_dir / "capture-tls"


def ensure_capture_tls(directory: Path) -> CaptureTls:
    """A local CA and a ``localhost`` certificate it signed, made once (keys 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    tls = CaptureTls(directory / "ca.pem", directory / "localhost.pem", directory / "localhost.key")
    if tls.ca_file.exists() and tls.cert_file.exists() and tls.key_file.exists():
        cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
        if cert.not_valid_after_utc > clock.now() + timedelta(days=7):
            return tls
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = clock.now() - timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CarePost local mail capture CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(tls.key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write(tls.cert_file, cert.public_bytes(serialization.Encoding.PEM))
    _write(tls.ca_file, ca.public_bytes(serialization.Encoding.PEM))
    return tls  # the CA key is not kept: nothing else can ever be signed with it


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def server_tls_context(tls: CaptureTls) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def relay_environment(settings) -> dict[str, str]:
    """What ``carepost run`` gives the server and worker so their mail goes to the capture.

    The capture is the final destination, not a path onward: nothing leaves it, and the hop to
    it is verified TLS (STARTTLS with the local CA's ``localhost`` certificate, which the worker
    trusts through ``CAREPOST_EXTRA_CA_FILE``). So the relay is declared as enforcing TLS and
    messages show ``tls`` as they would in production, not a portal fallback. Notices of an
    organization with no sending domain yet come from ``no-reply@carepost.localhost``, and a
    sending domain may send before its ownership is proven (``CAREPOST_MAIL_CAPTURE``)."""
    tls = ensure_capture_tls(capture_tls_dir(settings))
    return {
        "CAREPOST_SMTP_RELAY": f"localhost@{settings.capture_host}:{settings.capture_port}",
        "CAREPOST_EXTRA_CA_FILE": str(tls.ca_file),
        "CAREPOST_SMTP_RELAY_ENFORCES_TLS": "true",
        "CAREPOST_NOTICE_SENDER_DOMAIN": CAPTURE_NOTICE_DOMAIN,
        # Sending domains need no proven ownership here: nothing leaves the machine.
        "CAREPOST_MAIL_CAPTURE": "true",
    }


CAPTURE_NOTICE_DOMAIN = "carepost.localhost"


def start_capture(directory: Path, host: str, port: int, tls: CaptureTls | None = None) -> Controller:
    if not is_loopback(host):
        raise ValueError(f"CAREPOST_CAPTURE_HOST must be a loopback address, not {host!r}: captured mail may hold PHI")
    controller = Controller(
        CaptureHandler(directory),
        hostname=host,
        port=port,
        server_hostname="localhost",
        data_size_limit=50 * 1024 * 1024,
        tls_context=server_tls_context(tls) if tls else None,
        require_starttls=False,
    )
    controller.start()
    return controller


def main() -> None:
    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every peer and command
    directory = settings.resolved_capture_dir
    tls = ensure_capture_tls(capture_tls_dir(settings))
    controller = start_capture(directory, settings.capture_host, settings.capture_port, tls)
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
