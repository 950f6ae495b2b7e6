"""PGP/MIME (RFC 3156) encryption with Sequoia (``pysequoia``).

The whole MIME body of the message (its ``Content-*`` headers and payload, CRLF line ends,
RFC 3156 section 3) is encrypted to the recipient's certificate, together with the real header
section (header protection, ``header_protection.py``: the real Subject, names and custom headers
only inside; outside a neutral "Secure message", bare addresses, Date, Message-ID and the
List-Unsubscribe pair), so the result can be DKIM signed and delivered like any other message.

A certificate is checked when it is uploaded, with the reason given when it is refused:
parseable, exactly one public certificate (never a secret key), not revoked, not expired, a
User ID naming the address, and an encryption-capable subkey valid now (checked by Sequoia's
own key selection, the same code that will encrypt later).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import pysequoia

from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.delivery import header_protection
from carepost.delivery.dkim import split_message

MAX_CERTIFICATE_BYTES = 256 * 1024
_EMAIL_IN_UID = re.compile(r"<([^<>\s]+@[^<>\s]+)>\s*$")
PREAMBLE = b"This is an OpenPGP/MIME encrypted message (RFC 3156)."


@dataclass(frozen=True)
class PgpCertificate:
    fingerprint: str  # upper-case hex, as gpg prints it
    expires_at: datetime | None
    user_ids: tuple[str, ...]
    armored: str  # the public certificate, ASCII-armored, as CarePost stores it


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _uid_addresses(uid: str) -> set[str]:
    m = _EMAIL_IN_UID.search(uid)
    if m:
        return {m.group(1).lower()}
    uid = uid.strip()
    return {uid.lower()} if "@" in uid and " " not in uid else set()


def load_certificate(data: str | bytes, address: str, *, field: str = "key") -> PgpCertificate:
    """Validate an uploaded OpenPGP certificate for ``address``; ValidationFailed says why not."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if not data.strip():
        raise ValidationFailed("The OpenPGP certificate is empty.", field=field)
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise ValidationFailed("The OpenPGP certificate is too large.", field=field)
    if b"PRIVATE KEY BLOCK" in data:
        raise ValidationFailed("This is a private key; upload the public certificate only.", field=field)
    try:
        certs = pysequoia.Cert.split_bytes(data)
    except Exception:  # Sequoia raises RuntimeError with a backtrace; never echo it
        raise ValidationFailed("The OpenPGP certificate could not be read.", field=field) from None
    if len(certs) != 1:
        raise ValidationFailed("Upload exactly one OpenPGP certificate.", field=field)
    cert = certs[0]
    if cert.has_secret_keys:
        raise ValidationFailed("This is a private key; upload the public certificate only.", field=field)
    if cert.is_revoked:
        raise ValidationFailed("The OpenPGP certificate is revoked.", field=field)
    expires = cert.expiration
    if expires is not None and expires <= clock.now():
        raise ValidationFailed("The OpenPGP certificate has expired.", field=field)
    uids = tuple(str(u) for u in cert.user_ids)
    wanted = address.strip().lower()
    if not any(wanted in _uid_addresses(u) for u in uids):
        raise ValidationFailed("The OpenPGP certificate has no User ID with this address.", field=field)
    try:
        pysequoia.encrypt(b"probe", recipients=[cert])
    except Exception:
        raise ValidationFailed(
            "The OpenPGP certificate has no valid encryption subkey.", field=field
        ) from None
    return PgpCertificate(fingerprint=cert.fingerprint.upper(), expires_at=expires, user_ids=uids, armored=str(cert))


def mime_entity(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Split a wire message into its envelope headers and its MIME entity (Content-* + body)."""
    headers, body = split_message(message)
    outer = [(n, v) for n, v in headers if not n.strip().lower().startswith(b"content-")
             and n.strip().lower() != b"mime-version"]
    content = [(n, v) for n, v in headers if n.strip().lower().startswith(b"content-")]
    if not content:
        content = [(b"Content-Type", b" text/plain; charset=us-ascii\r\n")]
    entity = b"".join(n + b":" + v for n, v in content) + b"\r\n" + body
    return outer, entity


def boundary() -> str:
    return f"=_cp_{secrets.token_hex(16)}"


def encrypt_message(message: bytes, certificate: str | bytes) -> bytes:
    """The message as PGP/MIME ``multipart/encrypted`` for the certificate's holder."""
    cert = pysequoia.Cert.from_bytes(certificate.encode() if isinstance(certificate, str) else certificate)
    outer, entity = header_protection.protect(message)
    armored = pysequoia.encrypt(entity, recipients=[cert], armor=True)
    if isinstance(armored, str):
        armored = armored.encode("ascii")
    armored = armored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    b = boundary().encode()
    head = b"".join(n + b":" + v for n, v in outer)
    head += b"MIME-Version: 1.0\r\n"
    head += b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n boundary="' + b + b'"\r\n'
    parts = [
        PREAMBLE + b"\r\n",
        b"--" + b + b"\r\n"
        b"Content-Type: application/pgp-encrypted\r\n"
        b"Content-Description: PGP/MIME version identification\r\n\r\n"
        b"Version: 1\r\n\r\n",
        b"--" + b + b"\r\n"
        b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
        b"Content-Description: OpenPGP encrypted message\r\n"
        b'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n'
        + armored.rstrip(b"\r\n") + b"\r\n\r\n",
        b"--" + b + b"--\r\n",
    ]
    return head + b"\r\n" + b"".join(parts)
