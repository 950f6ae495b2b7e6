"""PGP/MIME: CarePost encrypts with Sequoia, Debian's gpg decrypts; certificates checked at upload."""

from __future__ import annotations

import email
from datetime import timedelta
from email import policy

import dkim as dkimpy
import pytest

from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.delivery import dkim, pgp
from carepost.delivery.mime import Attachment, compose


@pytest.fixture(scope="module")
def pat_cert(gpg):
    return gpg.gen_key("Pat Doe <pat@example.org>")


@pytest.fixture(autouse=True)
def _clock():
    clock.reset()
    yield
    clock.reset()


def message(**kw) -> bytes:
    args = dict(
        sender="Bar Clinic <news@bar.example>", to=["Pat Doe <pat@example.org>"], subject="Your results",
        text="Your HbA1c is 6.1 %.\n", html="<p>Your HbA1c is 6.1 %.</p>",
        attachments=[Attachment(filename="results.pdf", content=b"%PDF-1.4 lab results", content_type="application/pdf")],
    ) | kw
    return compose(**args).as_bytes()


def test_pgp_mime_decrypts_with_gpg(gpg, pat_cert):
    raw = message()
    encrypted = pgp.encrypt_message(raw, pat_cert)
    assert b"HbA1c" not in encrypted and b"lab results" not in encrypted
    outer = email.message_from_bytes(encrypted, policy=policy.default)
    assert outer.get_content_type() == "multipart/encrypted"
    assert outer.get_param("protocol") == "application/pgp-encrypted"
    control, payload = outer.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted"
    assert control.get_payload(decode=True).strip() == b"Version: 1"
    assert payload.get_content_type() == "application/octet-stream"
    # Date and Message-ID stay outside unchanged; Subject and names are protected (see below).
    original = email.message_from_bytes(raw, policy=policy.default)
    for header in ("Date", "Message-ID"):
        assert outer[header] == original[header]

    armored = payload.get_payload(decode=True)
    assert armored.startswith(b"-----BEGIN PGP MESSAGE-----")
    plaintext = gpg.decrypt(armored)
    inner = email.message_from_bytes(plaintext, policy=policy.default)
    assert inner.get_content_type() == "multipart/mixed"
    assert "HbA1c is 6.1" in inner.get_body(("plain",)).get_content()
    [attachment] = list(inner.iter_attachments())
    assert attachment.get_filename() == "results.pdf" and attachment.get_content() == b"%PDF-1.4 lab results"
    # RFC 3156 section 3: the encrypted entity uses CRLF line endings.
    assert b"\r\n" in plaintext and b"\n" not in plaintext.replace(b"\r\n", b"")


def test_headers_are_protected_inside_and_neutral_outside(gpg, pat_cert):
    """Issue 9 item 9 (RFC 9788 header protection): the real Subject, the display names and custom
    headers travel only inside the encryption; outside: "Secure message" and bare addresses."""
    raw = message(cc=["Jordan Vale <jordan@example.org>"], reply_to="Dr. Quill <quill@bar.example>",
                  headers={"X-Clinic-Ref": "oncology-7731"}, subject="Your biopsy result")
    encrypted = pgp.encrypt_message(raw, pat_cert)
    outer_text = encrypted.split(b"\r\n\r\n", 1)[0]
    for leak in (b"Pat Doe", b"Jordan Vale", b"Quill", b"Bar Clinic", b"biopsy", b"X-Clinic-Ref", b"oncology"):
        assert leak not in outer_text, leak
    outer = email.message_from_bytes(encrypted, policy=policy.default)
    assert outer["Subject"] == "Secure message"
    assert (outer["From"], outer["To"], outer["Cc"], outer["Reply-To"]) == (
        "news@bar.example", "pat@example.org", "jordan@example.org", "quill@bar.example")
    inner = email.message_from_bytes(gpg.decrypt(outer.get_payload()[1].get_payload(decode=True)), policy=policy.default)
    assert inner["Subject"] == "Your biopsy result" and inner["To"] == "Pat Doe <pat@example.org>"
    assert inner["From"] == "Bar Clinic <news@bar.example>" and inner["X-Clinic-Ref"] == "oncology-7731"
    assert inner.get_param("hp") == "cipher" and inner.get_param("protected-headers") == "v1"
    assert "Subject: Secure message" in inner.get_all("HP-Outer") and "To: pat@example.org" in inner.get_all("HP-Outer")
    assert "HbA1c is 6.1" in inner.get_body(("plain",)).get_content()


def test_rsa_gpg_key_also_works(gpg):
    cert = gpg.gen_key("Sam Roe <sam@example.org>", algo="rsa2048", usage="default")
    # rsa2048 with "default" usage makes a sign+certify key with no encryption subkey...
    with pytest.raises(ValidationFailed) as err:
        pgp.load_certificate(cert, "sam@example.org")
    assert "encryption subkey" in err.value.message
    # ...adding an encryption subkey makes it usable.
    fpr = gpg.fingerprint("sam@example.org")
    gpg.gpg("--quick-add-key", fpr, "rsa2048", "encr", "1y")
    cert = gpg.gpg("--armor", "--export", fpr).decode()
    info = pgp.load_certificate(cert, "sam@example.org")
    assert info.fingerprint == fpr
    encrypted = pgp.encrypt_message(message(to=["sam@example.org"]), cert)
    part = email.message_from_bytes(encrypted, policy=policy.default).get_payload()[1]
    assert b"HbA1c is 6.1" in gpg.decrypt(part.get_payload(decode=True))


def test_encrypted_message_dkim_signs_and_verifies(pat_cert):
    key = dkim.DkimKey("bar.example", "s1", dkim.generate_rsa_key())
    signed = dkim.sign(pgp.encrypt_message(message(), pat_cert), [key])
    assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: key.record.encode())


def test_certificate_accepted_with_details(gpg, pat_cert):
    info = pgp.load_certificate(pat_cert, "PAT@example.org")
    assert info.fingerprint == gpg.fingerprint("pat@example.org")
    assert info.user_ids == ("Pat Doe <pat@example.org>",)
    assert info.expires_at is not None and info.expires_at > clock.now() + timedelta(days=300)
    assert info.armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")


def test_certificate_refusals(gpg, pat_cert):
    for data, reason in [("", "empty"), ("not a key at all", "could not be read"), (pat_cert[:200], "could not be read")]:
        with pytest.raises(ValidationFailed) as err:
            pgp.load_certificate(data, "pat@example.org")
        assert reason in err.value.message and err.value.field == "key"
    with pytest.raises(ValidationFailed) as err:
        pgp.load_certificate(pat_cert, "someone.else@example.org")
    assert "no User ID with this address" in err.value.message
    other = gpg.gen_key("Other <other@example.org>")
    with pytest.raises(ValidationFailed) as err:
        pgp.load_certificate(pat_cert + "\n" + other, "pat@example.org")
    assert "exactly one" in err.value.message
    with pytest.raises(ValidationFailed) as err:
        pgp.load_certificate(gpg.export_secret("pat@example.org"), "pat@example.org")
    assert "private key" in err.value.message
    clock.advance(timedelta(days=400))
    with pytest.raises(ValidationFailed) as err:
        pgp.load_certificate(pat_cert, "pat@example.org")
    assert "expired" in err.value.message


def test_revoked_certificate_refused(gpg):
    cert = gpg.gen_key("Rev Oked <revoked@example.org>")
    fpr = gpg.fingerprint("revoked@example.org")
    revocation = (gpg.home / "openpgp-revocs.d" / f"{fpr}.rev").read_bytes()
    # gpg guards the stored certificate with a ":" prefix on the armor line.
    gpg.gpg("--import", input=revocation.replace(b":-----BEGIN", b"-----BEGIN"))
    revoked = gpg.gpg("--armor", "--export", fpr).decode()
    assert revoked != cert
    with pytest.raises(ValidationFailed) as err:
        pgp.load_certificate(revoked, "revoked@example.org")
    assert "revoked" in err.value.message
