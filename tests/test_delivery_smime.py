"""S/MIME: CarePost encrypts with cryptography, Debian's openssl decrypts; certificates checked."""

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


def test_decrypts_with_openssl_cms_and_smime(smime_ca, pat):
    raw = message()
    encrypted = smime.encrypt_message(raw, pat.pem)
    assert b"HbA1c" not in encrypted and b"lab results" not in encrypted
    outer = email.message_from_bytes(encrypted, policy=policy.default)
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert outer.get_param("smime-type") == "enveloped-data"
    original = email.message_from_bytes(raw, policy=policy.default)
    for header in ("From", "To", "Subject", "Date", "Message-ID"):
        assert outer[header] == original[header]
    for decrypt in (smime_ca.decrypt, smime_ca.decrypt_smime):
        plaintext = decrypt(encrypted, pat)
        inner = email.message_from_bytes(plaintext, policy=policy.default)
        assert "HbA1c is 6.1" in inner.get_body(("plain",)).get_content()
        [attachment] = list(inner.iter_attachments())
        assert attachment.get_content() == b"%PDF-1.4 lab results"


def test_aes256_cbc_and_rsa_key_transport(smime_ca, pat):
    info = smime_ca.cms_info(smime.encrypt_message(message(), pat.pem))
    assert "aes-256-cbc" in info
    assert "rsaEncryption" in info


def test_wrong_key_cannot_decrypt(smime_ca, pat):
    other = smime_ca.issue("other@example.org")
    encrypted = smime.encrypt_message(message(), pat.pem)
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
