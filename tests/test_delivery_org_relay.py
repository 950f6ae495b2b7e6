"""An organization's own relay (issue 10 item 9): set through the delivery settings API, used by
the real pipeline with AUTH over STARTTLS to a real aiosmtpd relay; another organization of the
same worker without a relay still goes directly to the recipient's MX; pooled connections are
kept apart per organization and login; the password is write-only (never in an API response, the
page or an audit row); the security decision follows the organization's "enforces TLS" flag."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.delivery import pipeline
from tests.fixtures.delivery import prove_ownership
from tests.test_delivery_worker import body, env  # noqa: F401 - the pipeline fixture (peers, sender, app)

RELAY_PASSWORD = "org-relay-secret-7f3a"


class _Relay:
    """A real relay: aiosmtpd with STARTTLS for relay.bar.example (the test CA) and AUTH
    (refused before TLS), recording messages and which login sent each."""

    def __init__(self, tls_ca, users: dict[bytes, bytes]):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        from tests.fixtures.delivery import Recorder, free_port

        self.logins: list[bytes] = []

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = users.get(auth_data.login) == auth_data.password
            if ok:
                self.logins.append(auth_data.login)
            return AuthResult(success=ok, handled=False)

        self.recorder, self.port = Recorder(), free_port()
        self.controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port,
                                     server_hostname="relay.bar.example",
                                     tls_context=tls_ca.server_context(["relay.bar.example"]),
                                     authenticator=authenticator, auth_require_tls=True)
        self.controller.start()

    @property
    def host(self) -> str:
        return f"relay.bar.example@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def relay(tls_ca):
    r = _Relay(tls_ca, {b"clinic": RELAY_PASSWORD.encode(), b"other": b"other-secret"})
    yield r
    r.stop()


def _second_org(session):
    """Another organization with its own proven sending domain and API key; no relay of its own."""
    from carepost.accounts.credentials import create_credential
    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session
    from carepost.delivery import service

    other = create_organization(session, "Baz Clinic")
    session.commit()
    with org_session(other.id) as s:
        row = service.create_sending_domain(s, other.id, "baz.example")
        prove_ownership(s, row)
        service.update_delivery_settings(s, other.id, {"default_purpose": "treatment"})
        s.commit()
    cred, secret = create_credential(session, other.id, name="relay test", scopes=["messages:send", "messages:read"])
    session.commit()
    return other.id, {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def _patch(env, payload):  # noqa: F811
    from carepost.accounts.credentials import create_credential

    cred, secret = create_credential(env.sender.session, env.sender.org_id, name="settings", scopes=["org:manage"])
    env.sender.session.commit()
    if (payload.get("relay") or {}).get("host"):  # PHI goes through a relay only under a BAA (issue 16 item 9)
        from tests.test_webhooks import record_baa

        record_baa(env.sender.session, env.sender.org_id, "smtp_relay", "relay.bar.example")
    return env.client.patch("/api/v1/delivery-settings", json=payload,
                            headers={"Authorization": f"Bearer {cred.key_id}.{secret}"})


def test_an_organization_relay_with_auth_over_starttls_carries_its_mail_and_no_one_elses(env, relay, session):  # noqa: F811
    r = _patch(env, {"relay": {"host": relay.host, "username": "clinic", "password": RELAY_PASSWORD,
                               "enforces_tls": True}})
    assert r.status_code == 200, r.text
    assert r.json()["relay"] == {"host": relay.host, "port": relay.port, "username": "clinic", "password_set": True,
                                 "enforces_tls": True}
    assert RELAY_PASSWORD not in r.text

    # This organization's message goes to its relay, logged in as its user, over verified TLS.
    first = env.send(to=["Pat Doe <pat@valid.test>"])
    pipeline.deliver([first])
    pat = env.one(first)
    assert pat["status"] == "sent" and pat["method"] == "tls", pat  # accepted by a relay: on its way
    assert pat["evidence"]["relay"] is True and pat["evidence"]["cert_verified"] is True
    assert pat["evidence"]["mx_host"] == "relay.bar.example"
    [relayed] = relay.recorder.messages
    assert relayed.rcpt_tos == ["pat@valid.test"] and relayed.tls
    assert relay.logins == [b"clinic"]
    assert env.received("valid") == []

    # Another organization of the same worker, without a relay: directly to the recipient's MX.
    _, other_key = _second_org(session)
    second = env.send(headers=other_key, **{"from": "Baz Clinic <care@baz.example>", "to": ["Lee <lee@valid.test>"]})
    pipeline.deliver([second])
    r = env.client.get(f"/api/v1/messages/{second}", headers=other_key)
    [lee] = r.json()["recipients"]
    assert lee["status"] == "delivered" and lee["evidence"]["relay"] is False, lee
    assert [m.rcpt_tos for m in env.received("valid")] == [["lee@valid.test"]]
    assert len(relay.recorder.messages) == 1 and relay.logins == [b"clinic"]

    # Cleared: the organization falls back to direct delivery (no installation relay here).
    r = _patch(env, {"relay": None})
    assert r.status_code == 200 and r.json()["relay"] is None
    third = env.send(to=["Pat Doe <pat@valid.test>"])
    pipeline.deliver([third])
    assert env.one(third)["evidence"]["relay"] is False
    assert len(relay.recorder.messages) == 1 and [m.rcpt_tos for m in env.received("valid")][-1] == ["pat@valid.test"]

    # The password is in no audit row.
    session.expire_all()
    rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "delivery_settings.update")))
    assert len(rows) >= 2
    dumped = json.dumps([row.details for row in rows], default=str)
    assert RELAY_PASSWORD not in dumped and '"password_set": true' in dumped
    assert any(row.details.get("relay_password_changed") is True for row in rows)


def test_a_wrong_organization_password_defers_and_the_password_is_not_in_the_reason(env, relay):  # noqa: F811
    assert _patch(env, {"relay": {"host": relay.host, "username": "clinic", "password": "not-it-9c1e"}}).status_code == 200
    message_id = env.send()
    pipeline.deliver([message_id])
    pat = env.one(message_id)
    assert pat["status"] == "deferred" and "relay login failed" in pat["reason"], pat
    assert "not-it-9c1e" not in json.dumps(pat) and relay.recorder.messages == []


def test_pooled_connections_are_never_shared_between_organizations_or_logins(delivery_env, relay):
    """One client, two organizations on the same relay with different logins: each message goes
    on a connection logged in for its own organization (one login each), connections are reused
    only within an organization."""
    from carepost.delivery.settings import parse_org_relay
    from carepost.delivery.smtp import DeliveryClient, Envelope, Relay

    _, target = parse_org_relay(relay.host)
    clinic = Relay(target, "clinic", RELAY_PASSWORD, owner="org-a")
    other = Relay(target, "other", "other-secret", owner="org-b")

    def envelope(route, n):
        return Envelope(sender="b@bounces.bar.example", recipients=[f"pat{n}@valid.test"],
                        message=b"Subject: hi\r\n\r\nhello\r\n", relay=route)

    async def go():
        async with DeliveryClient() as client:
            out = []
            for n, route in enumerate((clinic, other, clinic, other)):
                out.append(await client.deliver(envelope(route, n)))
            return out, client.pool.opened

    results, opened = asyncio.run(go())
    assert [r[0].status for r in results] == ["delivered"] * 4
    assert opened == 2 and sorted(relay.logins) == [b"clinic", b"other"]
    assert [m.rcpt_tos for m in relay.recorder.messages] == [[f"pat{n}@valid.test"] for n in range(4)]


def test_an_organization_relay_on_a_non_public_address_is_refused_unless_allowed(delivery_env, relay, monkeypatch):
    """An organization chose this relay, not the operator: its address goes through the SSRF guard."""
    from carepost.core.config import reset_settings
    from carepost.delivery.settings import parse_org_relay
    from carepost.delivery.smtp import DeliveryClient, Envelope, Relay

    monkeypatch.setenv("CAREPOST_DELIVERY_ALLOWED_HOSTS", "")
    reset_settings()
    _, target = parse_org_relay(relay.host)

    async def go():
        async with DeliveryClient() as client:
            return await client.deliver(Envelope(sender="b@bounces.bar.example", recipients=["pat@valid.test"],
                                                 message=b"Subject: hi\r\n\r\nhello\r\n",
                                                 relay=Relay(target, "clinic", RELAY_PASSWORD, owner="org-a")))

    [result] = asyncio.run(go())
    assert result.status != "delivered" and relay.recorder.messages == [] and relay.logins == []


def test_the_decision_and_preview_follow_the_organizations_relay_flag(env, relay):  # noqa: F811
    """A relay that does not promise verified TLS onward: a message with PHI is not sent by TLS
    (the policy takes the portal); the security preview says the same."""
    assert _patch(env, {"security_mode": "tls_required",
                        "relay": {"host": relay.host, "username": "clinic", "password": RELAY_PASSWORD,
                                  "enforces_tls": False}}).status_code == 200
    r = env.client.post("/api/v1/security-preview", json={"addresses": ["pat@valid.test"], "contains_phi": True},
                        headers=env.key)
    assert r.status_code == 200, r.text
    [row] = r.json()["recipients"]
    assert row["method"] != "tls" and "relay" in row["reason"], row
    assert _patch(env, {"relay": {"host": relay.host, "username": "clinic", "enforces_tls": True}}).status_code == 200
    [row] = env.client.post("/api/v1/security-preview", json={"addresses": ["pat@valid.test"], "contains_phi": True},
                            headers=env.key).json()["recipients"]
    assert row["method"] == "tls", row


def test_the_local_mail_capture_ignores_organization_relays(env, relay, monkeypatch):  # noqa: F811
    """Under ``carepost run`` (the capture flag with a loopback relay) nothing may leave the machine:
    the installation's relay (the capture) carries the organization's mail, not its own relay."""
    from carepost.core.config import reset_settings
    from tests.fixtures.delivery import Recorder, free_port

    assert _patch(env, {"relay": {"host": relay.host, "username": "clinic", "password": RELAY_PASSWORD}}).status_code == 200
    from aiosmtpd.controller import Controller

    capture, port = Recorder(), free_port()
    controller = Controller(capture, hostname="127.0.0.1", port=port, server_hostname="localhost",
                            tls_context=env.peers.ca.server_context(["localhost"]))
    controller.start()
    try:
        monkeypatch.setenv("CAREPOST_MAIL_CAPTURE", "true")
        monkeypatch.setenv("CAREPOST_SMTP_RELAY", f"localhost@127.0.0.1:{port}")
        reset_settings()
        pipeline.reset()
        message_id = env.send()
        pipeline.deliver([message_id])
        assert env.one(message_id)["evidence"]["relay"] is True
        assert [m.rcpt_tos for m in capture.messages] == [["pat@valid.test"]]
        assert relay.recorder.messages == [] and relay.logins == []
    finally:
        controller.stop()
