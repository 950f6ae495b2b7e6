"""DKIM: every signature CarePost makes verifies with dkimpy, the reference implementation."""

from __future__ import annotations

import re

import dkim as dkimpy
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from carepost.delivery import dkim
from carepost.delivery.mime import Attachment, compose


@pytest.fixture(scope="module")
def rsa_key():
    return dkim.DkimKey("bar.example", "cp2026", dkim.generate_rsa_key())


@pytest.fixture(scope="module")
def ed_key():
    return dkim.DkimKey("bar.example", "cp2026e", dkim.generate_ed25519_key())


def dns_for(*keys):
    records = {f"{k.record_name}.".encode(): k.record.encode() for k in keys}

    def dnsfunc(name, timeout=5):
        if isinstance(name, str):
            name = name.encode()
        return records.get(name if name.endswith(b".") else name + b".")

    return dnsfunc


def sample(**kw) -> bytes:
    args = dict(
        sender="Bar Clinic <news@bar.example>", to=["pat@example.org"], cc=["care@example.org"],
        subject="Your appointment", text="See you soon.  \n\n\n", html="<p>See you soon.</p>",
        attachments=[Attachment(filename="prep.pdf", content=b"%PDF-1.4 " * 50, content_type="application/pdf")],
    ) | kw
    return compose(**args).as_bytes()


def h_tag(signed: bytes, index: int = 0) -> list[str]:
    headers, _ = dkim.split_message(signed)
    sigs = [v for n, v in headers if n.lower() == b"dkim-signature"]
    value = re.sub(rb"\s+", b"", sigs[index]).decode()
    return re.search(r"(?:^|;)h=([^;]+)", value).group(1).split(":")


def verify_all(signed: bytes, dnsfunc) -> list[bool]:
    d = dkimpy.DKIM(signed)
    headers, _ = dkim.split_message(signed)
    count = sum(1 for n, _ in headers if n.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            results.append(d.verify(idx=i, dnsfunc=dnsfunc))
        except dkimpy.DKIMException:  # e.g. body hash mismatch
            results.append(False)
    return results


def test_rsa_signature_verifies_with_dkimpy(rsa_key):
    signed = dkim.sign(sample(), [rsa_key])
    assert dkimpy.verify(signed, dnsfunc=dns_for(rsa_key))
    names = h_tag(signed)
    assert names.count("from") == 2  # over-signed
    for header in ("to", "cc", "subject", "date", "message-id", "mime-version", "content-type"):
        assert header in names
    # Over-signed even when absent, so a relay cannot add one-click unsubscribe to our mail.
    assert names.count("list-unsubscribe") == 1 and names.count("cc") == 2
    assert b"a=rsa-sha256" in signed and b"c=relaxed/relaxed" in signed and b"d=bar.example" in signed


def test_rsa_and_ed25519_signatures_both_verify(rsa_key, ed_key):
    signed = dkim.sign(sample(), [ed_key, rsa_key])
    assert verify_all(signed, dns_for(rsa_key, ed_key)) == [True, True]
    first, second = [v for n, v in dkim.split_message(signed)[0] if n.lower() == b"dkim-signature"]
    assert b"a=rsa-sha256" in first and b"a=ed25519-sha256" in second
    assert ed_key.record.startswith("v=DKIM1; k=ed25519; p=")


def test_ed25519_alone_verifies(ed_key):
    signed = dkim.sign(sample(), [ed_key])
    assert dkimpy.verify(signed, dnsfunc=dns_for(ed_key))


def test_list_unsubscribe_headers_are_signed(rsa_key, ed_key):
    raw = sample(list_unsubscribe=["https://bar.example/t/u/tok"], list_unsubscribe_post=True)
    signed = dkim.sign(raw, [rsa_key, ed_key])
    assert verify_all(signed, dns_for(rsa_key, ed_key)) == [True, True]
    for i in (0, 1):
        assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(h_tag(signed, i))
    # Removing the one-click header breaks the signature (a relay cannot disable one-click).
    stripped = signed.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"")
    assert verify_all(stripped, dns_for(rsa_key, ed_key)) == [False, False]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.replace(b"See you soon.", b"See you later"),
        lambda m: m.replace(b"Subject: Your appointment", b"Subject: Your appointmenT"),
        lambda m: m.replace(b"To: pat@example.org", b"To: eve@example.org"),
        lambda m: m.replace(b"From: Bar Clinic", b"From: Evil <evil@evil.example>\r\nFrom: Bar Clinic"),
        lambda m: m.replace(b"Cc: care@example.org\r\n", b""),
    ],
    ids=["body", "subject", "to", "second-from", "dropped-cc"],
)
def test_tampering_fails(rsa_key, ed_key, tamper):
    signed = dkim.sign(sample(), [rsa_key, ed_key])
    tampered = tamper(signed)
    assert tampered != signed
    assert verify_all(tampered, dns_for(rsa_key, ed_key)) == [False, False]


OVERSIGNED = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "List-Unsubscribe",
              "List-Unsubscribe-Post", "MIME-Version", "Content-Type", "Content-Transfer-Encoding")


@pytest.mark.parametrize("header", OVERSIGNED)
def test_header_added_after_signing_breaks_verification(rsa_key, ed_key, header):
    """Issue 9 item 18: every listed header is over-signed, present or not, so one ADDED in
    transit (on top, where readers look first) fails dkimpy's verification for both keys."""
    signed = dkim.sign(sample(reply_to="desk@bar.example"), [rsa_key, ed_key])
    assert verify_all(signed, dns_for(rsa_key, ed_key)) == [True, True]
    for i in (0, 1):
        names = h_tag(signed, i)
        present = sum(1 for n, _ in dkim.split_message(signed)[0] if n.decode().lower() == header.lower())
        assert names.count(header.lower()) == present + 1, header
    added = f"{header}: injected@evil.example\r\n".encode() + signed
    assert verify_all(added, dns_for(rsa_key, ed_key)) == [False, False]
    # Added below the signatures (after the original headers), it breaks verification too.
    head, _, body = signed.partition(b"\r\n\r\n")
    appended = head + f"\r\n{header}: injected@evil.example".encode() + b"\r\n\r\n" + body
    assert verify_all(appended, dns_for(rsa_key, ed_key)) == [False, False]


def test_wrong_key_fails(rsa_key):
    other = dkim.DkimKey("bar.example", "cp2026", dkim.generate_rsa_key())
    assert not dkimpy.verify(dkim.sign(sample(), [rsa_key]), dnsfunc=dns_for(other))


def test_relaxed_canonicalization_survives_refolding_and_whitespace(rsa_key):
    signed = dkim.sign(sample(), [rsa_key])
    refolded = signed.replace(b"Subject: Your appointment", b"Subject:   Your\r\n  appointment  ")
    assert refolded.endswith(b"--\r\n")
    refolded = refolded[:-2] + b" \t \r\n\r\n\r\n"  # trailing whitespace and blank lines
    assert dkimpy.verify(refolded, dnsfunc=dns_for(rsa_key))


def test_lf_input_is_signed_as_crlf(rsa_key):
    raw = sample().replace(b"\r\n", b"\n")
    signed = dkim.sign(raw, [rsa_key])
    assert b"\n" not in signed.replace(b"\r\n", b"")
    assert dkimpy.verify(signed, dnsfunc=dns_for(rsa_key))


def test_smtputf8_message_verifies(rsa_key):
    raw = compose(sender="Bar <news@bar.example>", to=["jürgen@example.de"], subject="Grüße", text="x").as_bytes()
    assert dkimpy.verify(dkim.sign(raw, [rsa_key]), dnsfunc=dns_for(rsa_key))


def test_key_helpers(rsa_key):
    pem = dkim.private_key_pem(rsa_key.private_key)
    again = dkim.load_private_key(pem)
    assert again.key_size == 2048
    assert rsa_key.record_name == "cp2026._domainkey.bar.example"
    assert rsa_key.record.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    with pytest.raises(dkim.DkimError):
        dkim.DkimKey("bar.example", "bad selector", rsa_key.private_key)
    with pytest.raises(dkim.DkimError):
        dkim.sign(b"Subject: x\r\n\r\nbody\r\n", [rsa_key])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=" \tab.=\u00e9", max_size=12), max_size=8), st.integers(0, 3))
def test_relaxed_body_matches_dkimpy(lines, trailing_blank):
    body = "\r\n".join(lines).encode() + b"\r\n" * trailing_blank
    assert dkim.relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=" \tab:=\u00e9", max_size=30), st.booleans())
def test_relaxed_header_matches_dkimpy(value, folded):
    raw = (" " + value).encode()
    if folded:
        raw = raw.replace(b" ", b"\r\n ", 1)
    raw += b"\r\n"
    [(name, canon)] = Relaxed.canonicalize_headers([(b"Subject", raw)])
    assert dkim.relaxed_header(b"Subject", raw) == name + b":" + canon


def test_long_html_line_with_soft_breaks_verifies():
    """Quoted-printable soft line breaks must be CRLF too, or the body hash breaks on the wire."""
    import dkim as dkimpy

    from carepost.delivery import dkim as cdkim
    from carepost.delivery.mime import compose

    key = cdkim.DkimKey("bar.example", "s1", cdkim.generate_rsa_key())
    record = cdkim.public_key_record(key.private_key).encode()
    composed = compose(sender="care@bar.example", to=["pat@valid.test"], subject="s",
                       text="word " * 60, html="<p>" + "word " * 60 + "</p>")
    assert b"\n" not in composed.raw.replace(b"\r\n", b"")
    signed = cdkim.sign(composed.raw, [key])
    assert dkimpy.DKIM(signed).verify(dnsfunc=lambda name, timeout=5: record)
