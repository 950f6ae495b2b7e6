"""S/MIME: CarePost signs and encrypts (asn1crypto + cryptography), Debian's openssl decrypts and
verifies; certificates checked."""

from __future__ import annotations

import email
from datetime import timedelta
from email import policy

import dkim as dkimpy
import pytest

from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.delivery import dkim, smime
from carepost.delivery.mime import Attachment, compose


@pytest.fixture(autouse=True)
def _clock():
    clock.reset()
    yield
    clock.reset()


@pytest.fixture(scope="module")
def pat(smime_ca):
    return smime_ca.issue("pat@example.org")


def message(**kw) -> bytes:
    args = dict(
        sender="Bar Clinic <news@bar.example>", to=["Pat Doe <pat@example.org>"], subject="Your results",
        text="Your HbA1c is 6.1 %.\n", html="<p>Your HbA1c is 6.1 %.</p>",
        attachments=[Attachment(filename="results.pdf", content=b"%PDF-1.4 lab results", content_type="application/pdf")],
    ) | kw
    return compose(**args).as_bytes()


@pytest.fixture(scope="module")
def signing_key():
    return smime.generate_signing_key()


CBC_ONLY = ["2.16.840.1.101.3.4.1.42", "1.2.840.113549.3.7"]  # AES-256-CBC, 3DES: a pre-GCM client
GCM_256 = ["2.16.840.1.101.3.4.1.46", "2.16.840.1.101.3.4.1.42"]


def test_default_is_signed_then_aes_gcm_auth_enveloped_with_oaep(smime_ca, pat, signing_key):
    """Issue 9 item 19: RSAES-OAEP + AES-GCM AuthEnvelopedData (RFC 5083/5084) around an RFC 8551
    signature; openssl cms decrypts it and verifies the signature."""
    raw = message()
    encrypted = smime.encrypt_message(raw, pat.pem, signing_key=signing_key)
    assert b"HbA1c" not in encrypted and b"lab results" not in encrypted
    outer = email.message_from_bytes(encrypted, policy=policy.default)
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert outer.get_param("smime-type") == "authEnveloped-data"
    original = email.message_from_bytes(raw, policy=policy.default)
    for header in ("Date", "Message-ID"):
        assert outer[header] == original[header]
    # Header protection (issue 9 item 9): neutral Subject and bare addresses outside, the real ones inside.
    assert outer["Subject"] == "Secure message" and outer["To"] == "pat@example.org" and outer["From"] == "news@bar.example"
    assert b"Pat Doe" not in encrypted and b"Your results" not in encrypted and b"Bar Clinic" not in encrypted
    info = smime_ca.cms_info(encrypted)
    assert "id-smime-ct-authEnvelopedData" in info and "rsaesOaep" in info and "aes-128-gcm" in info
    assert "sha256" in info and "rsaEncryption" not in info  # OAEP with SHA-256, never PKCS#1 v1.5
    signed = smime_ca.decrypt(encrypted, pat)
    assert email.message_from_bytes(signed, policy=policy.default).get_content_type() == "multipart/signed"
    inner = email.message_from_bytes(smime_ca.verify(signed), policy=policy.default)
    assert inner["Subject"] == "Your results" and inner["To"] == "Pat Doe <pat@example.org>"
    assert inner.get_param("hp") == "cipher" and "Subject: Secure message" in inner.get_all("HP-Outer")
    assert "HbA1c is 6.1" in inner.get_body(("plain",)).get_content()
    [attachment] = list(inner.iter_attachments())
    assert attachment.get_content() == b"%PDF-1.4 lab results"


def test_signature_names_the_sender_and_breaks_when_content_changes(smime_ca, pat, signing_key):
    signed = smime_ca.decrypt(smime.encrypt_message(message(), pat.pem, signing_key=signing_key), pat)
    smime_ca.verify(signed)
    signer = (smime_ca.dir / "signer.pem").read_text()
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(signer.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["news@bar.example"]
    with pytest.raises(RuntimeError):
        smime_ca.verify(signed.replace(b"HbA1c is 6.1", b"HbA1c is 9.1"))


def test_gcm_ciphertext_is_authenticated(smime_ca, pat, signing_key):
    """Unlike CBC, a changed byte of the AES-GCM ciphertext makes decryption fail outright."""
    import base64

    encrypted = smime.encrypt_message(message(), pat.pem, signing_key=signing_key)
    head, _, b64 = encrypted.partition(b"\r\n\r\n")
    der = bytearray(base64.b64decode(b64))
    der[-40] ^= 0x01  # inside the encrypted content, before the 16-byte tag
    tampered = head + b"\r\n\r\n" + base64.encodebytes(bytes(der)).replace(b"\n", b"\r\n")
    with pytest.raises(RuntimeError):
        smime_ca.decrypt(tampered, pat)


def test_aes256_gcm_when_the_certificate_advertises_it(smime_ca, signing_key):
    cert = smime_ca.issue("pat@example.org", capabilities=GCM_256)
    assert smime.capabilities_for(cert.pem) == smime.GCM_256
    encrypted = smime.encrypt_message(message(), cert.pem, signing_key=signing_key)
    assert "aes-256-gcm" in smime_ca.cms_info(encrypted)
    assert b"HbA1c is 6.1" in smime_ca.open(encrypted, cert)


def test_cbc_only_when_the_recipient_capabilities_require_it(smime_ca, signing_key):
    legacy = smime_ca.issue("old@example.org", capabilities=CBC_ONLY)
    assert smime.capabilities_for(legacy.pem) == smime.CBC_256
    encrypted = smime.encrypt_message(message(to=["old@example.org"]), legacy.pem, signing_key=signing_key)
    outer = email.message_from_bytes(encrypted, policy=policy.default)
    assert outer.get_param("smime-type") == "enveloped-data"
    info = smime_ca.cms_info(encrypted)
    assert "pkcs7-envelopedData" in info and "aes-256-cbc" in info and "rsaesOaep" in info
    # openssl cms (the legacy `openssl smime` reads PKCS#1 v1.5 key transport only, which we no longer send)
    assert b"HbA1c is 6.1" in smime_ca.open(encrypted, legacy)
    # A certificate without capabilities gets the RFC 8551 default; the explicit flag forces CBC.
    modern = smime_ca.issue("pat@example.org")
    assert smime.capabilities_for(modern.pem) == smime.GCM_128
    assert smime.capabilities_for(modern.pem, legacy_cbc=True) == smime.CBC_256


def test_wrong_key_cannot_decrypt(smime_ca, pat, signing_key):
    other = smime_ca.issue("other@example.org")
    encrypted = smime.encrypt_message(message(), pat.pem, signing_key=signing_key)
    with pytest.raises(RuntimeError):
        smime_ca.decrypt(encrypted, other)


def test_encrypted_message_dkim_signs(pat):
    key = dkim.DkimKey("bar.example", "s1", dkim.generate_rsa_key())
    signed = dkim.sign(smime.encrypt_message(message(), pat.pem), [key])
    assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: key.record.encode())


def test_certificate_accepted_with_details(pat):
    info = smime.load_certificate(pat.pem, "Pat@Example.org")
    assert len(info.fingerprint) == 64
    assert "CarePost Test S-MIME CA" in info.issuer
    assert info.not_after > clock.now() + timedelta(days=20)
    assert info.pem.startswith("-----BEGIN CERTIFICATE-----")
    # DER is accepted too.
    der = __import__("base64").b64decode("".join(pat.pem.strip().splitlines()[1:-1]))
    assert smime.load_certificate(der, "pat@example.org").fingerprint == info.fingerprint


@pytest.mark.parametrize(
    "kwargs,address,reason",
    [
        ({"key": "ec"}, "pat@example.org", "RSA key"),
        ({"key": "rsa:1024"}, "pat@example.org", "at least 2048 bits"),
        ({"eku": None}, "pat@example.org", "emailProtection"),
        ({"eku": "serverAuth,clientAuth"}, "pat@example.org", "emailProtection"),
        ({"san": None}, "pat@example.org", "does not name this address"),
        ({"san": "email:someone@example.org"}, "pat@example.org", "does not name this address"),
        ({"san": "DNS:example.org"}, "pat@example.org", "does not name this address"),
        ({"key_usage": "digitalSignature"}, "pat@example.org", "key encipherment"),
    ],
    ids=["ec-key", "rsa-1024", "no-eku", "server-eku", "no-san", "other-address", "dns-san", "sign-only"],
)
def test_certificate_refused_with_reason(smime_ca, kwargs, address, reason):
    cert = smime_ca.issue("pat@example.org", **kwargs)
    with pytest.raises(ValidationFailed) as err:
        smime.load_certificate(cert.pem, address)
    assert reason in err.value.message
    assert err.value.field == "key" and err.value.status_code == 422


def test_expired_certificate_refused(smime_ca):
    cert = smime_ca.issue("pat@example.org", days=1)
    assert smime.load_certificate(cert.pem, "pat@example.org")
    clock.advance(timedelta(days=2))
    with pytest.raises(ValidationFailed) as err:
        smime.load_certificate(cert.pem, "pat@example.org")
    assert "expired" in err.value.message


def test_unreadable_inputs_refused(smime_ca, pat):
    for data, reason in [
        ("", "empty"),
        ("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", "could not be read"),
        (b"\x30\x03\x02\x01\x00", "could not be read"),
        (pat.pem + smime_ca.cert.read_text(), "exactly one"),
        (pat.key_path.read_text(), "private key"),
    ]:
        with pytest.raises(ValidationFailed) as err:
            smime.load_certificate(data, "pat@example.org")
        assert reason in err.value.message
