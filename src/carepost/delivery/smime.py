"""S/MIME (RFC 8551) enveloped data with ``cryptography``.

What the library supports, and therefore what CarePost sends: RSA key transport (PKCS#1 v1.5)
and AES-256-CBC content encryption, set explicitly (the library's default is AES-128-CBC).
The MIME entity (Content-* headers and body, CRLF line ends) is encrypted whole; the envelope
headers stay outside so the result can be DKIM-signed like any other message.

A certificate is checked when it is uploaded, and refused with the reason: it must parse (PEM
or DER, exactly one certificate), carry an RSA key of at least 2048 bits (the only key
transport the library can encrypt to), allow emailProtection in its extended key usage, name
the address in a subjectAltName rfc822Name (RFC 8550 3), allow key encipherment when it
restricts key usage, and be valid now.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.delivery.pgp import mime_entity

MAX_CERTIFICATE_BYTES = 64 * 1024
MIN_RSA_BITS = 2048
CONTENT_ENCRYPTION = algorithms.AES256


@dataclass(frozen=True)
class SmimeCertificate:
    fingerprint: str  # SHA-256 of the DER certificate, upper-case hex
    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    pem: str


def _load(data: str | bytes, field: str) -> x509.Certificate:
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
    if not raw.strip():
        raise ValidationFailed("The S/MIME certificate is empty.", field=field)
    if len(raw) > MAX_CERTIFICATE_BYTES:
        raise ValidationFailed("The S/MIME certificate is too large.", field=field)
    if b"PRIVATE KEY" in raw:
        raise ValidationFailed("This is a private key; upload the certificate only.", field=field)
    try:
        if b"-----BEGIN" in raw:
            certs = x509.load_pem_x509_certificates(raw)
        else:
            certs = [x509.load_der_x509_certificate(raw)]
    except ValueError:
        raise ValidationFailed("The S/MIME certificate could not be read (PEM or DER expected).", field=field) from None
    if len(certs) != 1:
        raise ValidationFailed("Upload exactly one S/MIME certificate (without its chain).", field=field)
    return certs[0]


def _ext(cert: x509.Certificate, oid_class):
    try:
        return cert.extensions.get_extension_for_class(oid_class).value
    except x509.ExtensionNotFound:
        return None


def load_certificate(data: str | bytes, address: str, *, field: str = "key") -> SmimeCertificate:
    """Validate an uploaded S/MIME certificate for ``address``; ValidationFailed says why not."""
    cert = _load(data, field)
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValidationFailed(
            "The S/MIME certificate must have an RSA key (the only key transport CarePost can encrypt to).",
            field=field,
        )
    if key.key_size < MIN_RSA_BITS:
        raise ValidationFailed(f"The S/MIME certificate's RSA key must have at least {MIN_RSA_BITS} bits.", field=field)
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is None or ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku:
        raise ValidationFailed("The S/MIME certificate lacks the emailProtection extended key usage.", field=field)
    key_usage = _ext(cert, x509.KeyUsage)
    if key_usage is not None and not key_usage.key_encipherment:
        raise ValidationFailed("The S/MIME certificate does not allow key encipherment.", field=field)
    san = _ext(cert, x509.SubjectAlternativeName)
    names = [n.lower() for n in san.get_values_for_type(x509.RFC822Name)] if san else []
    if address.strip().lower() not in names:
        raise ValidationFailed(
            "The S/MIME certificate does not name this address in its subjectAltName.", field=field
        )
    now = clock.now()
    if cert.not_valid_after_utc <= now:
        raise ValidationFailed("The S/MIME certificate has expired.", field=field)
    if cert.not_valid_before_utc > now:
        raise ValidationFailed("The S/MIME certificate is not valid yet.", field=field)
    der = cert.public_bytes(serialization.Encoding.DER)
    return SmimeCertificate(
        fingerprint=hashlib.sha256(der).hexdigest().upper(),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    )


def encrypt_message(message: bytes, certificate: str | bytes) -> bytes:
    """The message as ``application/pkcs7-mime; smime-type=enveloped-data`` for the holder."""
    raw = certificate.encode() if isinstance(certificate, str) else certificate
    cert = x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw else x509.load_der_x509_certificate(raw)
    outer, entity = mime_entity(message)
    der = (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(entity)
        .add_recipient(cert)
        .set_content_encryption_algorithm(CONTENT_ENCRYPTION)
        # Binary: the entity is already canonical (CRLF); no text-mode conversion.
        .encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )
    b64 = base64.encodebytes(der).replace(b"\n", b"\r\n")
    head = b"".join(n + b":" + v for n, v in outer)
    head += (
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7m"\r\n'
        b"Content-Description: S/MIME Encrypted Message\r\n"
    )
    return head + b"\r\n" + b64
