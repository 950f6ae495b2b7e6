"""Issue 9 item 11: a recipient domain whose MX or ``mta-sts`` host points at internal
addresses cannot make CarePost connect there — not for delivery, not for the MTA-STS fetch,
not for the security preview. The guard is the one webhooks use (core/netguard.py).

Real listeners on 127.0.0.2 count the connections they get: a refused address gets none.
The delivery_env fixture allows 127.0.0.1 only (where the other test servers listen), as an
operator of a private installation would; 127.0.0.2 stays refused until it is allowed too.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading

import pytest

from carepost.core import netguard
from carepost.core.config import reset_settings
from carepost.delivery import tlsprobe
from carepost.delivery.smtp import DeliveryClient, Envelope
from carepost.tracking import webhooks
from tests.fixtures.accounts import csrf_from, login_client

INTERNAL = "127.0.0.2"


def run(coro):
    return asyncio.run(coro)


class Listener:
    """A TCP listener that counts accepted connections and closes them at once."""

    def __init__(self, host: str, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def internal_smtp():
    listener = Listener(INTERNAL)
    yield listener
    listener.close()


@pytest.fixture
def internal_https():
    listener = Listener(INTERNAL, 443)  # fetch_mta_sts connects to port 443 of mta-sts.<domain>
    yield listener
    listener.close()


@pytest.fixture
def internal_domain(delivery_env, monkeypatch, internal_smtp):
    """``internal.test``: MX -> mx.internal.test -> 127.0.0.2, no override."""
    dns = delivery_env.dns
    dns.add("internal.test", "MX", "10 mx.internal.test.")
    dns.add("mx.internal.test", "A", INTERNAL)
    monkeypatch.setenv("CAREPOST_MX_OVERRIDES", "")
    monkeypatch.setenv("CAREPOST_SMTP_PORT", str(internal_smtp.port))
    reset_settings()
    return delivery_env


@pytest.mark.parametrize("address,reason", [
    ("127.0.0.2", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"), ("172.16.5.5", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "non-public"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("fd00::1", "private"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
])
def test_shared_guard_refuses_non_public_addresses(address, reason):
    assert reason in netguard.non_public_reason(address)
    with pytest.raises(netguard.Refused, match=reason):
        netguard.check_address("mx.example.org", address)
    netguard.check_address("mx.example.org", address, allowed="mx.example.org")  # allowed by name
    netguard.check_address("mx.example.org", address, allowed="0.0.0.0/0,::/0")  # or by network
    assert netguard.non_public_reason("93.184.216.34") is None
    # Webhooks use the very same guard (moved down to core so delivery reaches it too).
    assert webhooks.Refused is netguard.Refused and webhooks.non_public_reason is netguard.non_public_reason


def test_delivery_to_an_mx_on_an_internal_address_never_connects(internal_domain, internal_smtp, monkeypatch):
    envelope = Envelope("b@bar.example", ["pat@internal.test"], b"Subject: x\r\n\r\nbody\r\n", require_verified_tls=False)

    async def deliver():
        async with DeliveryClient() as client:
            return await client.deliver(envelope)

    [result] = run(deliver())
    assert result.status == "bounced"
    assert "no MX host with a public address" in result.reason and "loopback" in result.reason
    assert internal_smtp.accepted == 0
    # The guard sits on the connect itself too (the last place before a socket opens).
    from carepost.delivery import dns as cpdns
    from carepost.core.config import get_settings

    with pytest.raises(tlsprobe.NonPublicAddress):
        run(tlsprobe.connect(cpdns.MxTarget("mx.internal.test", 10, internal_smtp.port), INTERNAL, get_settings()))
    assert internal_smtp.accepted == 0
    # An operator can allow the host explicitly: then CarePost does connect.
    monkeypatch.setenv("CAREPOST_DELIVERY_ALLOWED_HOSTS", "127.0.0.1,mx.internal.test")
    reset_settings()
    [result] = run(deliver())
    assert result.status == "deferred" and internal_smtp.accepted >= 1


def test_security_probe_does_not_scan_internal_addresses(internal_domain, internal_smtp):
    result = run(tlsprobe.probe_domain("internal.test", use_cache=False))
    [finding] = result.mx
    assert not finding.reachable and finding.error.startswith("refused") and "loopback" in finding.error
    assert result.reason == "mx.internal.test: refused: the host resolves to a loopback address (127.0.0.2)"
    assert internal_smtp.accepted == 0


def test_mta_sts_fetch_from_an_internal_address_is_refused(internal_domain, internal_https):
    dns = internal_domain.dns
    dns.add("_mta-sts.internal.test", "TXT", '"v=STSv1; id=1;"')
    dns.add("mta-sts.internal.test", "A", INTERNAL)
    with pytest.raises(tlsprobe.MtaStsError, match="policy host refused: .*loopback"):
        run(tlsprobe.fetch_mta_sts("internal.test"))
    result = run(tlsprobe.probe_domain("internal.test", use_cache=False))
    assert result.mta_sts is None and "refused" in result.mta_sts_error
    assert internal_https.accepted == 0


def test_link_local_metadata_address_is_refused_for_delivery(delivery_env, monkeypatch):
    delivery_env.dns.add("meta.test", "MX", "10 mx.meta.test.")
    delivery_env.dns.add("mx.meta.test", "A", "169.254.169.254")
    delivery_env.dns.add("mx.meta.test", "AAAA", "fd00::5")
    monkeypatch.setenv("CAREPOST_MX_OVERRIDES", "")
    reset_settings()
    envelope = Envelope("b@bar.example", ["pat@meta.test"], b"Subject: x\r\n\r\nbody\r\n")

    async def deliver():
        async with DeliveryClient() as client:
            return await client.deliver(envelope)

    [result] = run(deliver())
    assert result.status == "bounced" and "link-local" in result.reason


def test_security_preview_page_shows_the_refusal(client, org, make_user, internal_domain, internal_smtp):
    user = make_user(org, role="owner")
    login_client(client, user)
    page = client.get("/app/security-preview")
    r = client.post("/app/security-preview", data={
        "addresses": "someone@internal.test", "security": "", "contains_phi": "yes", "csrf_token": csrf_from(page.text)})
    assert r.status_code == 200, r.text
    rows = re.findall(r"<tr><td>([^<]+)</td><td><span class=\"badge method\">(\w+)</span></td><td>([^<]+)</td>", r.text)
    [(address, method, why)] = rows
    assert address == "someone@internal.test" and method != "tls"
    assert "refused" in why and "loopback" in why
    assert internal_smtp.accepted == 0
