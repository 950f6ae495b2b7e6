"""DNS (MX, TXT), the TLS capability probe and MTA-STS, against real local servers."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from datetime import timedelta

import pytest

from carepost.core import clock
from carepost.core.config import get_settings, reset_settings
from carepost.delivery import dns as cpdns
from carepost.delivery import tlsprobe


def run(coro):
    return asyncio.run(coro)


def cert_sha256(port: int) -> str:
    """SHA-256 of the certificate a server presents, read independently of CarePost."""

    async def grab():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO probe.test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(b"STARTTLS\r\n")
        await reader.readline()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        await writer.start_tls(ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return hashlib.sha256(der).hexdigest()

    return run(grab())


# --- parsing -----------------------------------------------------------------------------------


def test_parse_settings_values():
    assert cpdns.parse_nameservers("127.0.0.1:5353, 10.0.0.2") == [("127.0.0.1", 5353), ("10.0.0.2", 53)]
    assert cpdns.parse_nameservers("[::1]:5300") == [("::1", 5300)]
    assert cpdns.parse_nameservers(None) == []
    with pytest.raises(ValueError):
        cpdns.parse_nameservers("dns.example:53")
    overrides = cpdns.parse_mx_overrides("example.test=mx.example.test@127.0.0.1:2525, b.test=mx.b.test", 25)
    assert overrides["example.test"] == cpdns.MxTarget("mx.example.test", 0, 2525, "127.0.0.1", True)
    assert overrides["b.test"] == cpdns.MxTarget("mx.b.test", 0, 25, None, True)
    for bad in ("example.test", "=x@127.0.0.1", "a.test=mx@notanip:25", "a.test=mx@127.0.0.1:port"):
        with pytest.raises(ValueError):
            cpdns.parse_mx_overrides(bad, 25)
    assert cpdns.parse_address_overrides("a.test=127.0.0.1:8443", 443) == {"a.test": ("127.0.0.1", 8443)}


def test_mta_sts_parsing():
    assert tlsprobe.parse_sts_txt(["v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert tlsprobe.parse_sts_txt(["v=spf1 -all"]) is None
    assert tlsprobe.parse_sts_txt(["v=STSv1; id=a;", "v=STSv1; id=b;"]) is None  # two records: none
    assert tlsprobe.parse_sts_txt(["v=STSv1; id=bad-id!;"]) is None
    policy = tlsprobe.parse_policy(
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.mx.example.net\r\nmax_age: 86400\r\n", "x"
    )
    assert policy.mode == "enforce" and policy.max_age == 86400
    assert policy.matches("mail.example.com") and policy.matches("MAIL.example.com.")
    assert policy.matches("a.mx.example.net")
    assert not policy.matches("a.b.mx.example.net") and not policy.matches("mx.example.net")
    assert not policy.matches("evil.example.com")
    for bad in ["version: STSv2\nmode: enforce\nmx: a\nmax_age: 1", "version: STSv1\nmode: maybe\nmx: a\nmax_age: 1",
                "version: STSv1\nmode: enforce\nmax_age: 1", "version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999999",
                "garbage line"]:
        with pytest.raises(tlsprobe.MtaStsError):
            tlsprobe.parse_policy(bad, "x")


# --- DNS ---------------------------------------------------------------------------------------


def test_mx_lookup_through_configured_nameserver(delivery_env):
    dns = delivery_env.dns
    dns.add("clinic.test", "MX", "20 backup.clinic.test.", "10 mx1.clinic.test.")
    dns.add("implicit.test", "A", "127.0.0.1")
    dns.add("nullmx.test", "MX", "0 .")
    dns.add("txt.test", "TXT", '"v=spf1 " "-all"')
    dns.servfail.add("broken.test.")
    mx = run(cpdns.lookup_mx("clinic.test"))
    assert [(m.host, m.preference, m.port) for m in mx] == [("mx1.clinic.test", 10, 25), ("backup.clinic.test", 20, 25)]
    assert run(cpdns.lookup_mx("implicit.test")) == [cpdns.MxTarget("implicit.test", 0, 25)]
    with pytest.raises(cpdns.DnsError) as err:
        run(cpdns.lookup_mx("nullmx.test"))
    assert not err.value.temporary and "null MX" in str(err.value)
    with pytest.raises(cpdns.DnsError) as err:
        run(cpdns.lookup_mx("nowhere.test"))
    assert not err.value.temporary
    with pytest.raises(cpdns.DnsError) as err:
        run(cpdns.lookup_mx("broken.test"))
    assert err.value.temporary
    assert run(cpdns.lookup_txt("txt.test")) == ["v=spf1 -all"]
    assert run(cpdns.lookup_txt("nowhere.test")) == []
    # Overrides bypass DNS entirely.
    before = len(dns.queries)
    [target] = run(cpdns.lookup_mx("valid.test"))
    assert target.overridden and target.host == "mx.valid.test" and target.address == "127.0.0.1"
    assert len(dns.queries) == before


def test_unreachable_nameserver_is_temporary(delivery_env, monkeypatch):
    monkeypatch.setenv("CAREPOST_DNS_NAMESERVERS", "127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("CAREPOST_DNS_TIMEOUT", "0.5")
    reset_settings()
    with pytest.raises(cpdns.DnsError) as err:
        run(cpdns.lookup_mx("clinic.test"))
    assert err.value.temporary


# --- TLS probe ---------------------------------------------------------------------------------


def test_valid_certificate_gives_verified_tls(delivery_env):
    result = run(tlsprobe.probe_domain("valid.test"))
    assert result.verified_tls and result.mx_overridden
    [m] = result.mx
    assert m.host == "mx.valid.test" and m.starttls and m.cert_verified and m.cert_error is None
    assert m.tls_version in ("TLSv1.2", "TLSv1.3") and m.cipher
    assert m.cert_fingerprint == cert_sha256(delivery_env.mx["valid"].port)
    assert "offers verified TLSv1" in result.reason


@pytest.mark.parametrize(
    "name,reason",
    [("selfsigned", "self-signed certificate"), ("expired", "certificate has expired"), ("wronghost", "Hostname mismatch")],
)
def test_invalid_certificates_are_found_and_explained(delivery_env, name, reason):
    result = run(tlsprobe.probe_domain(f"{name}.test"))
    assert not result.verified_tls
    [m] = result.mx
    assert m.reachable and m.starttls and not m.cert_verified
    assert reason in m.cert_error
    # What the server does offer is still recorded.
    assert m.tls_version in ("TLSv1.2", "TLSv1.3") and m.cert_fingerprint == cert_sha256(delivery_env.mx[name].port)
    assert reason in result.reason


def test_starttls_withheld(delivery_env):
    result = run(tlsprobe.probe_domain("plain.test"))
    [m] = result.mx
    assert m.reachable and not m.starttls and m.tls_version is None and not result.verified_tls
    assert result.reason == "mx.plain.test does not offer STARTTLS"


def test_trust_anchors_come_from_extra_ca_file(delivery_env, monkeypatch):
    monkeypatch.delenv("CAREPOST_EXTRA_CA_FILE")
    reset_settings()
    result = run(tlsprobe.probe_domain("valid.test"))
    assert not result.verified_tls and "unable to get local issuer certificate" in result.mx[0].cert_error


def test_unreachable_mx(delivery_env, monkeypatch):
    monkeypatch.setenv("CAREPOST_MX_OVERRIDES", "gone.test=mx.gone.test@127.0.0.1:9")
    reset_settings()
    result = run(tlsprobe.probe_domain("gone.test"))
    assert not result.mx[0].reachable and result.reason == "no MX host could be reached"


def test_mx_found_through_dns_and_certificate_checked_against_mx_name(delivery_env, monkeypatch):
    dns = delivery_env.dns
    dns.add("dnsmx.test", "MX", "10 mx.valid.test.", "20 mx.plain.test.")
    dns.add("mx.valid.test", "A", "127.0.0.1")
    dns.add("mx.plain.test", "A", "127.0.0.1")
    monkeypatch.setenv("CAREPOST_MX_OVERRIDES", "")
    monkeypatch.setenv("CAREPOST_SMTP_PORT", str(delivery_env.mx["valid"].port))
    reset_settings()
    result = run(tlsprobe.probe_domain("dnsmx.test"))
    first, second = result.mx
    assert (first.host, first.address, first.cert_verified) == ("mx.valid.test", "127.0.0.1", True)
    # Same server, but reached as mx.plain.test: its certificate does not name that host.
    assert second.host == "mx.plain.test" and not second.cert_verified and "Hostname mismatch" in second.cert_error
    assert result.verified_tls and not result.mx_overridden
    assert ("dnsmx.test.", "MX") in dns.queries and ("mx.valid.test.", "A") in dns.queries


def test_dns_failure_is_a_finding(delivery_env, monkeypatch):
    monkeypatch.setenv("CAREPOST_MX_OVERRIDES", "")
    reset_settings()
    delivery_env.dns.add("nullmx.test", "MX", "0 .")
    result = run(tlsprobe.probe_domain("nullmx.test"))
    assert result.dns_error and not result.dns_temporary and not result.verified_tls
    assert result.reason.startswith("MX look-up failed")


# --- MTA-STS -----------------------------------------------------------------------------------


def publish(env, domain: str, policy: str, *, status: int = 200, ctype: str = "text/plain", ident: str = "2026a"):
    env.dns.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={ident};"')
    env.mta_sts.policies[f"mta-sts.{domain}"] = (status, ctype, policy)


def test_enforced_policy_matching_mx(delivery_env):
    publish(delivery_env, "valid.test", "version: STSv1\nmode: enforce\nmx: mx.valid.test\nmax_age: 604800\n")
    result = run(tlsprobe.probe_domain("valid.test"))
    assert result.mta_sts.mode == "enforce" and result.mta_sts.id == "2026a"
    assert result.mx[0].mta_sts_match is True and result.verified_tls
    assert "MTA-STS enforce" in result.reason
    assert "mta-sts.valid.test/.well-known/mta-sts.txt" in delivery_env.mta_sts.requests


def test_enforced_policy_not_matching_mx_refuses_verified_tls(delivery_env):
    publish(delivery_env, "valid.test", "version: STSv1\nmode: enforce\nmx: *.elsewhere.test\nmax_age: 604800\n")
    result = run(tlsprobe.probe_domain("valid.test"))
    assert result.mx[0].verified_tls and result.mx[0].mta_sts_match is False
    assert not result.verified_tls
    assert result.reason == "no MX host matches the domain's enforced MTA-STS policy"


def test_testing_policy_does_not_block(delivery_env):
    publish(delivery_env, "valid.test", "version: STSv1\nmode: testing\nmx: *.elsewhere.test\nmax_age: 604800\n")
    result = run(tlsprobe.probe_domain("valid.test"))
    assert result.mta_sts.mode == "testing" and result.verified_tls


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"status": 404}, "HTTP 404"),
        ({"ctype": "text/html"}, "not text/plain"),
        ({"policy": "version: STSv1\nmode: enforce\n"}, "max_age"),
    ],
)
def test_broken_policy_is_reported(delivery_env, kwargs, error):
    args = {"policy": "version: STSv1\nmode: enforce\nmx: mx.valid.test\nmax_age: 600\n"} | kwargs
    publish(delivery_env, "valid.test", **args)
    result = run(tlsprobe.probe_domain("valid.test"))
    assert result.mta_sts is None and error in result.mta_sts_error


def test_policy_host_certificate_is_verified(delivery_env, monkeypatch):
    publish(delivery_env, "valid.test", "version: STSv1\nmode: enforce\nmx: mx.valid.test\nmax_age: 600\n")
    monkeypatch.delenv("CAREPOST_EXTRA_CA_FILE")
    reset_settings()
    result = run(tlsprobe.probe_domain("valid.test"))
    assert result.mta_sts is None and "certificate" in result.mta_sts_error


def test_no_policy_published(delivery_env):
    result = run(tlsprobe.probe_domain("valid.test"))
    assert result.mta_sts is None and result.mta_sts_error is None
    assert ("_mta-sts.valid.test.", "TXT") in delivery_env.dns.queries


# --- cache -------------------------------------------------------------------------------------


def test_findings_cached_with_ttl(delivery_env):
    first = run(tlsprobe.probe_domain("valid.test"))
    assert run(tlsprobe.probe_domain("valid.test")) is first
    assert run(tlsprobe.probe_domain("VALID.test.")) is first
    clock.advance(timedelta(seconds=get_settings().tls_probe_cache_seconds + 1))
    try:
        again = run(tlsprobe.probe_domain("valid.test"))
    finally:
        clock.reset()
    assert again is not first and again.verified_tls
    assert run(tlsprobe.probe_domain("valid.test", use_cache=False)) is not again


def test_policy_max_age_shortens_cache(delivery_env):
    publish(delivery_env, "valid.test", "version: STSv1\nmode: enforce\nmx: mx.valid.test\nmax_age: 30\n")
    first = run(tlsprobe.probe_domain("valid.test"))
    clock.advance(timedelta(seconds=31))
    try:
        assert run(tlsprobe.probe_domain("valid.test")) is not first
    finally:
        clock.reset()
