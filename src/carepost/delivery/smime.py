"""S/MIME (RFC 8551): signed, then encrypted with authenticated encryption.

What CarePost sends:

* a signature first (RFC 8551 3.5, ``multipart/signed`` with ``application/pkcs7-signature``,
  SHA-256, RSA PKCS#1 v1.5) with the sending domain's S/MIME signing key, under a certificate
  naming the From address, so the recipient can tell the content was not altered;
* then encryption: CMS **AuthEnvelopedData** (RFC 5083) with **AES-GCM** (RFC 5084) by
  default — AES-128-GCM, which RFC 8551 2.7 requires every receiving agent to read, or
  AES-256-GCM when the certificate advertises it — and **RSAES-OAEP** key transport (SHA-256,
  MGF1-SHA-256; RFC 8551 2.3 SHOULD+, RFC 4055). Unauthenticated AES-256-CBC EnvelopedData is
  used only when the recipient's capabilities require it: the certificate's SMIMECapabilities
  (RFC 4262) list algorithms but no AES-GCM, or the key was uploaded with the explicit legacy
  flag. The choice is recorded per recipient key (``recipient_keys.smime_capabilities``).

``cryptography``'s PKCS#7 builder does only PKCS#1 v1.5 and AES-CBC, so the CMS structures are
built with ``asn1crypto`` and encrypted with ``cryptography`` (AES-GCM, AES-CBC, RSA-OAEP).
``openssl cms -decrypt`` and ``-verify`` read both forms in the tests.

The MIME entity (Content-* headers and body, CRLF line ends) is signed and encrypted whole; the
envelope headers stay outside so the result can be DKIM-signed like any other message.

A certificate is checked when it is uploaded, and refused with the reason: it must parse (PEM
or DER, exactly one certificate), carry an RSA key of at least 2048 bits (the only key
transport the library can encrypt to), allow emailProtection in its extended key usage, name
the address in a subjectAltName rfc822Name (RFC 8550 3), allow key encipherment when it
restricts key usage, and be valid now.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from asn1crypto import algos as asn1_algos
from asn1crypto import cms as asn1_cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.delivery import header_protection
from carepost.delivery.pgp import boundary

MAX_CERTIFICATE_BYTES = 64 * 1024
MIN_RSA_BITS = 2048


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


# --- capabilities ---------------------------------------------------------------------------

GCM_128, GCM_256, CBC_256 = "aes128-gcm", "aes256-gcm", "aes256-cbc"
CAPABILITIES = (GCM_128, GCM_256, CBC_256)
_SMIME_CAPABILITIES_OID = x509.ObjectIdentifier("1.2.840.113549.1.9.15")
_GCM_OIDS = {"2.16.840.1.101.3.4.1.6": GCM_128, "2.16.840.1.101.3.4.1.46": GCM_256}


def capabilities_of(cert: x509.Certificate) -> str:
    """The content encryption a certificate's holder can read (RFC 4262 SMIMECapabilities).

    No extension: AES-128-GCM, which RFC 8551 2.7 makes mandatory for receiving agents. An
    extension that lists AES-GCM: the strongest listed. One that lists capabilities but no GCM:
    the holder's client predates RFC 5084, so AES-256-CBC (the only case CBC is used)."""
    try:
        raw = cert.extensions.get_extension_for_oid(_SMIME_CAPABILITIES_OID).value.value
    except (x509.ExtensionNotFound, AttributeError):
        return GCM_128
    try:
        listed = [c["capability_id"].dotted for c in asn1_cms.SMIMECapabilites.load(raw)]
    except Exception:  # noqa: BLE001 - an unreadable extension says nothing: use the default
        return GCM_128
    gcm = [_GCM_OIDS[o] for o in listed if o in _GCM_OIDS]
    if GCM_256 in gcm:
        return GCM_256
    if gcm:
        return GCM_128
    return CBC_256 if listed else GCM_128


def capabilities_for(certificate: str | bytes, *, legacy_cbc: bool = False) -> str:
    """What to record for an uploaded certificate: the explicit legacy flag wins."""
    return CBC_256 if legacy_cbc else capabilities_of(_parse(certificate))


# --- the signature (RFC 8551 3.5: multipart/signed, sign then encrypt) -------------------------


def generate_signing_key() -> rsa.RSAPrivateKey:
    """RSA-2048 with SHA-256 and PKCS#1 v1.5 signatures: what every S/MIME client verifies."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


_signer_certs: dict[tuple, x509.Certificate] = {}


def signer_certificate(key: rsa.RSAPrivateKey, address: str) -> x509.Certificate:
    """A certificate for the sending domain's signing key naming the From address (RFC 8550 3).
    Self-issued: it proves the message was not altered after CarePost signed it; recipients
    who want to pin it can (its key is stable per sending domain)."""
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    today = clock.now().date()
    cache_key = (hashlib.sha256(pub).digest(), address.lower(), today)
    cert = _signer_certs.get(cache_key)
    if cert is not None:
        return cert
    now = clock.now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address.rsplit("@", 1)[-1][:64]),
                      x509.NameAttribute(NameOID.EMAIL_ADDRESS, address[:255])])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(pub + address.lower().encode() + str(today).encode()).digest()[:16],
                                      "big") >> 1)
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(address)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    if len(_signer_certs) > 1000:
        _signer_certs.clear()
    _signer_certs[cache_key] = cert
    return cert


def sign_entity(entity: bytes, key: rsa.RSAPrivateKey, address: str) -> bytes:
    """``multipart/signed`` (application/pkcs7-signature, SHA-256) around a canonical entity."""
    cert = signer_certificate(key, address)
    der = (
        pkcs7.PKCS7SignatureBuilder().set_data(entity).add_signer(cert, key, hashes.SHA256())
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary])
    )
    b = boundary().encode()
    return (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;\r\n'
        b' boundary="' + b + b'"\r\n\r\n'
        b"This is a cryptographically signed message in MIME format.\r\n\r\n"
        b"--" + b + b"\r\n" + entity + b"\r\n--" + b + b"\r\n"
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n'
        + base64.encodebytes(der).replace(b"\n", b"\r\n") + b"\r\n--" + b + b"--\r\n"
    )


# --- encryption -------------------------------------------------------------------------------


def _parse(certificate: str | bytes) -> x509.Certificate:
    raw = certificate.encode() if isinstance(certificate, str) else certificate
    return x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw else x509.load_der_x509_certificate(raw)


def _recipient_info(cert: x509.Certificate, cek: bytes) -> asn1_cms.RecipientInfo:
    """KeyTransRecipientInfo with RSAES-OAEP, SHA-256 and MGF1-SHA-256 (RFC 8017, RFC 4055)."""
    encrypted_key = cert.public_key().encrypt(
        cek, padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    parsed = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return asn1_cms.RecipientInfo(name="ktri", value=asn1_cms.KeyTransRecipientInfo({
        "version": "v0",
        "rid": asn1_cms.RecipientIdentifier(name="issuer_and_serial_number", value=asn1_cms.IssuerAndSerialNumber({
            "issuer": parsed.issuer, "serial_number": parsed.serial_number})),
        "key_encryption_algorithm": {"algorithm": "rsaes_oaep", "parameters": asn1_algos.RSAESOAEPParams({
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
        })},
        "encrypted_key": encrypted_key,
    }))


def _auth_enveloped(content: bytes, cert: x509.Certificate, capability: str) -> bytes:
    """CMS AuthEnvelopedData (RFC 5083) with AES-GCM (RFC 5084): 12-byte nonce, 16-byte tag."""
    key_bytes = 32 if capability == GCM_256 else 16
    cek, nonce = secrets.token_bytes(key_bytes), secrets.token_bytes(12)
    sealed = AESGCM(cek).encrypt(nonce, content, None)  # no authAttrs: the AAD is empty
    ciphertext, tag = sealed[:-16], sealed[-16:]
    algorithm = asn1_algos.EncryptionAlgorithm({
        "algorithm": "aes256_gcm" if key_bytes == 32 else "aes128_gcm",
        # GCMParameters ::= SEQUENCE { aes-nonce OCTET STRING, aes-ICVlen INTEGER DEFAULT 12 },
        # the same shape as CCMParameters, which asn1crypto defines.
        "parameters": asn1_algos.CcmParams({"aes_nonce": nonce, "aes_icvlen": 16}),
    })
    data = asn1_cms.AuthEnvelopedData({
        "version": "v0",
        "recipient_infos": [_recipient_info(cert, cek)],
        "auth_encrypted_content_info": {"content_type": "data", "content_encryption_algorithm": algorithm,
                                        "encrypted_content": ciphertext},
        "mac": tag,
    })
    return asn1_cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": data}).dump()


def _enveloped_cbc(content: bytes, cert: x509.Certificate) -> bytes:
    """CMS EnvelopedData with AES-256-CBC, for clients that cannot read AES-GCM (still RSAES-OAEP;
    integrity comes from the signature inside)."""
    cek, iv = secrets.token_bytes(32), secrets.token_bytes(16)
    padder = sym_padding.PKCS7(128).padder()
    padded = padder.update(content) + padder.finalize()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    data = asn1_cms.EnvelopedData({
        "version": "v0",
        "recipient_infos": [_recipient_info(cert, cek)],
        "encrypted_content_info": {"content_type": "data",
                                   "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
                                   "encrypted_content": ciphertext},
    })
    return asn1_cms.ContentInfo({"content_type": "enveloped_data", "content": data}).dump()


def _from_address(outer: list[tuple[bytes, bytes]]) -> str:
    for name, value in outer:
        if name.strip().lower() == b"from":
            return email.utils.parseaddr(value.decode("utf-8", "replace").strip())[1]
    raise ValueError("a message without From cannot be S/MIME-signed")


def encrypt_message(message: bytes, certificate: str | bytes, *, signing_key: rsa.RSAPrivateKey | None = None,
                    capability: str | None = None) -> bytes:
    """The message signed (when ``signing_key`` is given: the sending domain's S/MIME key) and then
    encrypted for the certificate's holder: ``application/pkcs7-mime`` with
    ``smime-type=authEnveloped-data`` (AES-GCM), or ``enveloped-data`` (AES-256-CBC) only when
    ``capability`` (recorded per recipient key, else read from the certificate) says so."""
    cert = _parse(certificate)
    capability = capability if capability in CAPABILITIES else capabilities_of(cert)
    outer, entity = header_protection.protect(message)  # real Subject and names inside only
    inner = sign_entity(entity, signing_key, _from_address(outer)) if signing_key is not None else entity
    if capability == CBC_256:
        der, smime_type = _enveloped_cbc(inner, cert), b"enveloped-data"
    else:
        der, smime_type = _auth_enveloped(inner, cert, capability), b"authEnveloped-data"
    b64 = base64.encodebytes(der).replace(b"\n", b"\r\n")
    head = b"".join(n + b":" + v for n, v in outer)
    head += (
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: application/pkcs7-mime; smime-type=" + smime_type + b'; name="smime.p7m"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7m"\r\n'
        b"Content-Description: S/MIME Encrypted Message\r\n"
    )
    return head + b"\r\n" + b64
