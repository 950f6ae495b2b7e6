"""Issue 9 item 10: DANE (RFC 7672) for MX hosts, against a real validating resolver.

The module starts Debian's ``nsd`` as the authoritative server of two zones and Debian's
``unbound`` as a validating resolver on 127.0.0.1 that trusts the signed one:

* ``dane.test`` — signed with ``ldns-signzone`` (ECDSA P-256, NSEC3), its DS in unbound's
  trust anchor file: answers come back with the AD bit.
  ``dane.test`` MX -> ``mx.dane.test`` with a TLSA 3 1 1 record matching the MX server's
  self-signed certificate (which the Web PKI does not accept); ``wrong.dane.test`` MX ->
  ``mx.wrong.dane.test`` with a TLSA record that matches nothing.
* ``nodnssec.test`` — unsigned, the same correct TLSA record: no AD bit, so no DANE.

CarePost is pointed at unbound (``CAREPOST_DNS_NAMESERVERS``); the SMTP server is an aiosmtpd
with the self-signed certificate. Processes started here are stopped by their own pid.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from carepost.core.config import reset_settings
from carepost.delivery import dns as cpdns
from carepost.delivery import tlsprobe
from carepost.delivery.mime import compose
from carepost.delivery.smtp import DeliveryClient, Envelope
from tests.fixtures.delivery import Recorder, free_port


def run(coro):
    return asyncio.run(coro)

pytestmark = pytest.mark.slow

for tool in ("nsd", "unbound", "ldns-keygen", "ldns-signzone"):
    if shutil.which(tool) is None:  # .ci/run installs them (nsd, unbound, ldnsutils)
        raise RuntimeError(f"{tool} is missing: apt-get install nsd unbound ldnsutils")


def _spki_sha256(cert_path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _wait_udp(port: int, name: str) -> None:
    import dns.message
    import dns.query

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            dns.query.udp(dns.message.make_query(name, "SOA"), "127.0.0.1", port=port, timeout=0.5)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError(f"no DNS answer on port {port}")


class DnssecWorld:
    def __init__(self, directory: Path, tls_ca):
        from aiosmtpd.controller import Controller

        self.dir = directory
        self.procs: list[subprocess.Popen] = []
        cert, key = tls_ca.issue(["mx.dane.test"], self_signed=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.recorder = Recorder()
        self.smtp_port = free_port()
        self.controller = Controller(self.recorder, hostname="127.0.0.1", port=self.smtp_port,
                                     server_hostname="mx.dane.test", tls_context=ctx)
        self.controller.start()
        spki = _spki_sha256(cert)
        p = self.smtp_port
        soa = "@ IN SOA ns.{z}. hostmaster.{z}. 1 3600 600 86400 300\n@ IN NS ns.{z}.\nns IN A 127.0.0.1\n"
        (directory / "dane.test.zone").write_text(
            "$ORIGIN dane.test.\n$TTL 300\n" + soa.format(z="dane.test")
            + f"@ IN MX 10 mx.dane.test.\nmx IN A 127.0.0.1\n_{p}._tcp.mx IN TLSA 3 1 1 {spki}\n"
            + f"wrong IN MX 10 mx.wrong.dane.test.\nmx.wrong IN A 127.0.0.1\n_{p}._tcp.mx.wrong IN TLSA 3 1 1 {'00' * 32}\n"
        )
        (directory / "nodnssec.test.zone").write_text(
            "$ORIGIN nodnssec.test.\n$TTL 300\n" + soa.format(z="nodnssec.test")
            + f"@ IN MX 10 mx.nodnssec.test.\nmx IN A 127.0.0.1\n_{p}._tcp.mx IN TLSA 3 1 1 {spki}\n"
        )

        def sh(*cmd: str) -> str:
            return subprocess.run(cmd, cwd=directory, check=True, capture_output=True, text=True, timeout=60).stdout.strip()

        ksk = sh("ldns-keygen", "-a", "ECDSAP256SHA256", "-k", "dane.test")
        zsk = sh("ldns-keygen", "-a", "ECDSAP256SHA256", "dane.test")
        sh("ldns-signzone", "-n", "dane.test.zone", ksk, zsk)
        (directory / "trust-anchor.ds").write_text((directory / f"{ksk}.ds").read_text())
        self.nsd_port, self.port = free_port(), free_port()
        d = str(directory)
        (directory / "nsd.conf").write_text(f"""server:
  ip-address: 127.0.0.1@{self.nsd_port}
  port: {self.nsd_port}
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  pidfile: "{d}/nsd.pid"
  xfrdfile: "{d}/xfrd.state"
  zonelistfile: "{d}/zone.list"
  logfile: "{d}/nsd.log"
  server-count: 1
remote-control:
  control-enable: no
zone:
  name: dane.test
  zonefile: dane.test.zone.signed
zone:
  name: nodnssec.test
  zonefile: nodnssec.test.zone
""")
        (directory / "unbound.conf").write_text(f"""server:
  interface: 127.0.0.1@{self.port}
  port: {self.port}
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: "{d}/unbound.pid"
  logfile: "{d}/unbound.log"
  use-syslog: no
  do-daemonize: no
  do-not-query-localhost: no
  do-ip6: no
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  module-config: "validator iterator"
  trust-anchor-file: "{d}/trust-anchor.ds"
  local-zone: "test." nodefault
  target-fetch-policy: "0 0 0 0 0"
remote-control:
  control-enable: no
stub-zone:
  name: "dane.test"
  stub-addr: 127.0.0.1@{self.nsd_port}
stub-zone:
  name: "nodnssec.test"
  stub-addr: 127.0.0.1@{self.nsd_port}
""")
        self.procs.append(subprocess.Popen(["nsd", "-d", "-c", str(directory / "nsd.conf")], cwd=directory,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_udp(self.nsd_port, "dane.test")
        self.procs.append(subprocess.Popen(["unbound", "-d", "-c", str(directory / "unbound.conf")], cwd=directory,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_udp(self.port, "dane.test")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.controller.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tls_ca):
    w = DnssecWorld(tmp_path_factory.mktemp("dnssec"), tls_ca)
    yield w
    w.close()


@pytest.fixture
def dane_env(delivery_env, world, monkeypatch):
    monkeypatch.setenv("CAREPOST_DNS_NAMESERVERS", f"127.0.0.1:{world.port}")
    monkeypatch.setenv("CAREPOST_MX_OVERRIDES", "")
    monkeypatch.setenv("CAREPOST_SMTP_PORT", str(world.smtp_port))
    reset_settings()
    cpdns.reset()
    world.recorder.reset()
    yield world
    cpdns.reset()


def envelope(domain: str, *, require: bool = True) -> Envelope:
    composed = compose(sender="Bar Clinic <news@bar.example>", to=[f"pat@{domain}"], subject="Message",
                       text="Your results are ready.")
    return Envelope(sender="b+0123@bounces.bar.example", recipients=composed.recipients, message=composed.as_bytes(),
                    require_verified_tls=require)


def deliver(env: Envelope):
    async def go():
        async with DeliveryClient() as client:
            return await client.deliver(env)

    return asyncio.run(go())[0]


def test_validating_resolver_answers_with_ad_and_tlsa_is_returned(dane_env):
    [target] = run(cpdns.lookup_mx("dane.test"))
    assert target.dnssec and target.host == "mx.dane.test"
    [record] = run(cpdns.lookup_tlsa(target))
    assert (record.usage, record.selector, record.mtype) == (3, 1, 1)
    [plain] = run(cpdns.lookup_mx("nodnssec.test"))
    assert not plain.dnssec and run(cpdns.lookup_tlsa(plain)) == []  # unsigned: no DANE


def test_dane_authenticates_a_certificate_the_web_pki_refuses(dane_env):
    result = deliver(envelope("dane.test"))
    assert result.status == "delivered", result.reason
    assert result.evidence.dane and result.evidence.cert_verified and result.evidence.mx_host == "mx.dane.test"
    assert len(dane_env.recorder.messages) == 1 and dane_env.recorder.messages[0].tls


def test_tlsa_mismatch_sends_nothing_even_when_tls_is_not_required(dane_env):
    result = deliver(envelope("wrong.dane.test"))
    assert result.status == "tls_unavailable" and "DANE" in result.reason
    # A message that would otherwise go opportunistically is not sent either (RFC 7672 2.2).
    result = deliver(envelope("wrong.dane.test", require=False))
    assert result.status == "deferred" and "DANE" in result.reason
    assert dane_env.recorder.messages == []


def test_unsigned_zone_gets_no_dane_and_the_web_pki_decides(dane_env):
    result = deliver(envelope("nodnssec.test"))
    assert result.status == "tls_unavailable" and "self-signed" in result.reason
    assert dane_env.recorder.messages == []


def test_security_probe_reports_dane(dane_env):
    found = run(tlsprobe.probe_domain("dane.test", use_cache=False))
    assert found.verified_tls and found.mx[0].dane == "verified" and "DANE" in found.reason
    wrong = run(tlsprobe.probe_domain("wrong.dane.test", use_cache=False))
    assert not wrong.verified_tls and wrong.mx[0].dane == "mismatch" and "DANE" in wrong.mx[0].cert_error


def test_ad_bit_is_believed_only_from_a_loopback_resolver(dane_env, monkeypatch):
    assert cpdns.ad_trusted()
    monkeypatch.setenv("CAREPOST_DNS_NAMESERVERS", "192.0.2.53")
    reset_settings()
    cpdns.reset()
    assert not cpdns.ad_trusted()
