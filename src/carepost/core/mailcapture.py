"""Local mail capture for ``carepost run``: an SMTP server on loopback that writes every message
it receives as an ``.eml`` file into the capture dir, so nothing leaves the machine.

Captured mail may hold PHI (issue 9 item 16): each message is encrypted at rest (AES-256-GCM
under a key derived from the master key, bound to its file name) into ``<time>-<id>.eml.enc``,
0600 in a 0700 directory; nothing is ever written in clear. Captures older than
``CAREPOST_CAPTURE_RETENTION_HOURS`` (default 24) are deleted when the capture starts and every
minute after. ``carepost capture list`` and ``carepost capture show NAME`` read them. The server
refuses to listen anywhere but a loopback address.

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
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from carepost.core import clock
from carepost.core.ids import new_id
from carepost.core.logging import get_logger
from carepost.core.masterkeys import DecryptionFailed, KeyUnavailable, MasterKey, hkdf, load_master_keys

log = get_logger("carepost.mailcapture")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- encryption at rest

SUFFIX = ".eml.enc"
MAGIC = b"CAREPOST-CAPTURE-1\n"
_KEY_INFO = "carepost mail capture v1"


class CaptureKeys:
    """The capture's keys, derived from the master keys (current one for writing; every
    available one, current and pending rotation, for reading)."""

    def __init__(self, current: str, masters: dict[str, MasterKey]):
        self.current = current
        self._keys = {mid: hkdf(m.key, _KEY_INFO) for mid, m in masters.items()}

    @classmethod
    def load(cls, settings=None) -> "CaptureKeys":
        return cls(*load_master_keys(settings))

    def seal(self, name: str, data: bytes) -> bytes:
        nonce = os.urandom(12)
        mid = self.current.encode()
        return MAGIC + mid + b"\n" + nonce + AESGCM(self._keys[self.current]).encrypt(nonce, data, _aad(mid, name))

    def open(self, name: str, blob: bytes) -> bytes:
        if not blob.startswith(MAGIC):
            raise DecryptionFailed(f"{name} is not a CarePost mail capture")
        mid, _, rest = blob[len(MAGIC):].partition(b"\n")
        key = self._keys.get(mid.decode("ascii", "replace"))
        if key is None:
            raise KeyUnavailable(f"{name} was encrypted under master key {mid.decode('ascii', 'replace')}, which is not available")
        try:
            return AESGCM(key).decrypt(rest[:12], rest[12:], _aad(mid, name))
        except InvalidTag:
            raise DecryptionFailed(f"{name} does not decrypt (altered, or renamed from another capture)") from None


def _aad(mid: bytes, name: str) -> bytes:
    return b"carepost-capture|" + mid + b"|" + name.encode()


def capture_files(directory: Path) -> list[Path]:
    """The captured messages, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))


def read_capture(path: Path, keys: CaptureKeys | None = None) -> bytes:
    """The captured message in clear (for ``carepost capture show`` and tests)."""
    return (keys or CaptureKeys.load()).open(path.name, path.read_bytes())


def _captured_at(path: Path):
    from datetime import datetime, timezone

    try:
        return datetime.strptime(path.name[:15], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def purge_captures(directory: Path, retention: timedelta, now=None) -> int:
    """Delete captures (and leftovers of interrupted writes) older than ``retention``; returns
    how many files went."""
    now = now or clock.now()
    removed = 0
    if not directory.is_dir():
        return 0
    for path in directory.iterdir():
        if not (path.name.endswith(SUFFIX) or path.name.endswith(".tmp") or path.name.endswith(".eml")):
            continue
        try:
            if now - _captured_at(path) >= retention:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def seal_plaintext_captures(directory: Path, keys: CaptureKeys) -> int:
    """Captures an older CarePost wrote in clear (``*.eml``): encrypted in place, the clear file
    removed."""
    sealed = 0
    if not directory.is_dir():
        return 0
    for path in sorted(directory.glob("*.eml")):
        target = path.with_name(path.name[: -len(".eml")] + SUFFIX)
        _write(target, keys.seal(target.name, path.read_bytes()))
        path.unlink()
        sealed += 1
    return sealed


class CaptureHandler:
    """aiosmtpd handler: one encrypted file per accepted message, written atomically."""

    def __init__(self, directory: Path, keys: CaptureKeys | None = None):
        self.directory = directory
        self.keys = keys or CaptureKeys.load()
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
        name = f"{clock.now().strftime('%Y%m%dT%H%M%S')}-{new_id()}{SUFFIX}"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.keys.seal(name, data))
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
PURGE_INTERVAL_SECONDS = 60


def start_capture(directory: Path, host: str, port: int, tls: CaptureTls | None = None,
                  keys: CaptureKeys | None = None) -> Controller:
    if not is_loopback(host):
        raise ValueError(f"CAREPOST_CAPTURE_HOST must be a loopback address, not {host!r}: captured mail may hold PHI")
    controller = Controller(
        CaptureHandler(directory, keys),
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
    keys = CaptureKeys.load(settings)
    retention = timedelta(hours=settings.capture_retention_hours)
    controller = start_capture(directory, settings.capture_host, settings.capture_port, tls, keys)
    sealed = seal_plaintext_captures(directory, keys)
    log.info("mail_capture_started", host=settings.capture_host, port=settings.capture_port,
             retention_hours=settings.capture_retention_hours, sealed_count=sealed)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    next_purge = 0.0
    while not stop.wait(0.5):
        if time.monotonic() >= next_purge:
            removed = purge_captures(directory, retention)
            if removed:
                log.info("mail_capture_purged", removed_count=removed)
            next_purge = time.monotonic() + PURGE_INTERVAL_SECONDS
    controller.stop()
    log.info("mail_capture_stopped")


if __name__ == "__main__":
    main()
