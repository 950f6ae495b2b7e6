"""The delivery pipeline against real peers: the method per recipient matches the policy, nothing
protected travels in clear, retries and bounces, leases (never sent twice), sandbox capture,
eligibility at delivery time; and a real ``carepost worker`` process delivering end to end."""

from __future__ import annotations

import email
import json
import threading
from datetime import timedelta
from email import policy as email_policy

import dkim as dkimpy
import pytest
from sqlalchemy import select

from carepost.core import clock
from carepost.delivery import pipeline
from carepost.delivery.models import Message, MessageEvent, MessageRecipient, SandboxCapture, SendingDomain

PHI = "Your HbA1c is 7.9 %; please call about your insulin dose."


def body(**over) -> dict:
    data = {"from": "Bar Clinic <care@bar.example>", "to": ["Pat Doe <pat@valid.test>"], "subject": "From your care team",
            "text": PHI, "html": f"<p>{PHI}</p>"}
    data.update(over)
    return data


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client, scripted_smtp):
    """Everything a delivery test needs: local DNS/MX peers, a sending org, a key, the app."""
    e = Env(delivery_env, sender, sender.key(), client)
    yield e
    for finalize in e.finalizers:
        finalize()


class Env:
    def __init__(self, peers, sender, key, client):
        self.peers, self.sender, self.key, self.client = peers, sender, key, client
        self.finalizers = []

    def send(self, headers=None, **over) -> str:
        r = self.client.post("/api/v1/messages", json=body(**over), headers=headers or self.key)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def read(self, message_id: str) -> dict:
        r = self.client.get(f"/api/v1/messages/{message_id}", headers=self.key)
        assert r.status_code == 200, r.text
        return r.json()

    def one(self, message_id: str) -> dict:
        [recipient] = self.read(message_id)["recipients"]
        return recipient

    def received(self, name: str):
        return self.peers.mx[name].recorder.messages

    def dkim_verifies(self, raw: bytes) -> list[bool]:
        from carepost.core.database import org_session
        from carepost.delivery import service

        with org_session(self.sender.org_id) as s:
            keys = service.dkim_keys(s, s.get(SendingDomain, self.sender.domain_id))
        records = {f"{k.record_name}.".encode(): k.record.encode() for k in keys}
        d = dkimpy.DKIM(raw)
        return [d.verify(idx=i, dnsfunc=lambda n, timeout=5: records.get(n if isinstance(n, bytes) else n.encode()))
                for i in range(len(keys))]


def recipients(session, message_id):
    session.rollback()
    return session.scalars(select(MessageRecipient).where(MessageRecipient.message_id == message_id)).all()


# --------------------------------------------------------------------------- methods and evidence


def test_verified_tls_delivery_with_evidence_and_dkim(env):
    message_id = env.send(cc=["lee@valid.test"], bcc=["audit@valid.test"])
    report = pipeline.deliver([message_id])
    assert report.claimed == 3 and report.statuses == {"delivered": 3}
    received = env.received("valid")
    assert len(received) == 3 and all(m.tls and m.tls_version in ("TLSv1.2", "TLSv1.3") for m in received)
    assert sorted(r for m in received for r in m.rcpt_tos) == ["audit@valid.test", "lee@valid.test", "pat@valid.test"]
    for m in received:
        assert m.mail_from.startswith("b+") and m.mail_from.endswith("@bounces.bar.example")  # VERP, not the address
        parsed = email.message_from_bytes(m.data, policy=email_policy.default)
        assert "audit@" not in str(parsed["To"]) + str(parsed["Cc"]) and parsed["Bcc"] is None
        assert env.dkim_verifies(m.data) == [True, True]
    assert len({email.message_from_bytes(m.data)["Message-ID"] for m in received}) == 1

    data = env.read(message_id)
    pat = next(r for r in data["recipients"] if r["address"] == "pat@valid.test")
    assert pat["status"] == "delivered" and pat["method"] == "tls" and pat["reason"] == "accepted: 250"
    ev = pat["evidence"]
    assert ev["mx_host"] == "mx.valid.test" and ev["cert_verified"] and ev["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert len(ev["cert_fingerprint"]) == 64 and ev["reply_code"] == 250 and ev["cipher"]
    assert [e["type"] for e in pat["events"]] == ["queued", "delivered"]
    # Running again sends nothing twice.
    assert pipeline.deliver([message_id]).claimed == 0
    assert len(env.received("valid")) == 3


def test_evidence_names_the_mx_address_and_port(env):
    """docs/delivery.md: evidence per recipient names the MX host, address and port it was handed
    to — recorded by the pipeline and shown by the message view."""
    message_id = env.send()
    assert pipeline.deliver([message_id]).statuses == {"delivered": 1}
    [received] = env.received("valid")
    assert received.tls
    ev = env.one(message_id)["evidence"]
    assert ev["mx_host"] == "mx.valid.test"
    assert ev["address"] == "127.0.0.1" and ev["port"] == env.peers.mx["valid"].port


@pytest.mark.parametrize("name", ["plain", "selfsigned", "expired", "wronghost"])
def test_no_verified_tls_means_the_portal_and_a_notification_without_phi(env, session, name):
    from carepost.portal.models import PortalMessage

    message_id = env.send(to=[f"Pat Doe <pat@{name}.test>"])
    pipeline.deliver([message_id])
    pat = env.one(message_id)
    assert pat["method"] == "portal" and pat["status"] == "sent", pat
    assert pat["evidence"]["portal_message_id"]
    assert [e["type"] for e in pat["events"]] == ["queued", "fallback", "sent"]
    [notification] = env.received(name)
    for text in ("HbA1c", "insulin", "Pat Doe", "From your care team"):
        assert text.encode() not in notification.data
    assert b"/p/" in notification.data.replace(b"=\r\n", b"")
    session.rollback()
    assert session.get(PortalMessage, pat["evidence"]["portal_message_id"]) is not None


def test_secure_mode_goes_to_the_portal_without_trying_tls(env):
    message_id = env.send(security="secure")
    pipeline.deliver([message_id])
    pat = env.one(message_id)
    assert pat["method"] == "portal" and pat["status"] == "sent"
    assert [e["type"] for e in pat["events"]] == ["queued", "sent"]  # no TLS attempt, no fallback
    [notification] = env.received("valid")
    assert PHI.encode() not in notification.data.replace(b"=\r\n", b"")


def test_tls_exclusive_without_verified_tls_sends_nothing(env):
    message_id = env.send(to=["pat@plain.test"], security="tls_exclusive")
    pipeline.deliver([message_id])
    pat = env.one(message_id)
    assert pat["status"] == "failed" and pat["method"] == "none" and "verified TLS unavailable" in pat["reason"]
    assert env.received("plain") == []


def test_pgp_key_on_file_encrypts_even_over_a_plain_connection(env, gpg):
    cert = gpg.gen_key("Pat Doe <pat@plain.test>")
    r = env.client.post("/api/v1/recipient-keys", json={"address": "pat@plain.test", "kind": "pgp", "key": cert}, headers=env.key)
    assert r.status_code == 201, r.text
    message_id = env.send(to=["pat@plain.test"])
    pipeline.deliver([message_id])
    pat = env.one(message_id)
    assert pat["method"] == "pgp" and pat["status"] == "delivered" and pat["evidence"]["key_fingerprint"] == r.json()["fingerprint"]
    [received] = env.received("plain")
    assert not received.tls and b"HbA1c" not in received.data
    assert env.dkim_verifies(received.data) == [True, True]
    part = email.message_from_bytes(received.data, policy=email_policy.default).get_payload()[1]
    inner = email.message_from_bytes(gpg.decrypt(part.get_payload(decode=True)), policy=email_policy.default)
    assert PHI in inner.get_body(("plain",)).get_content()


def test_smime_key_on_file(env, smime_ca):
    cert = smime_ca.issue("pat@selfsigned.test")
    r = env.client.post("/api/v1/recipient-keys", json={"address": "pat@selfsigned.test", "kind": "smime", "key": cert.pem},
                        headers=env.key)
    assert r.status_code == 201, r.text
    assert r.json()["smime_capabilities"] == "aes128-gcm"
    message_id = env.send(to=["pat@selfsigned.test"])
    pipeline.deliver([message_id])
    assert env.one(message_id)["method"] == "smime"
    [received] = env.received("selfsigned")
    assert b"smime-type=authEnveloped-data" in received.data
    # Decrypted with openssl cms, the signature (the sending domain's key) verifies with openssl cms -verify.
    inner = email.message_from_bytes(smime_ca.open(received.data, cert), policy=email_policy.default)
    assert PHI in inner.get_body(("plain",)).get_content()


def test_smime_legacy_flag_on_upload_sends_signed_cbc(env, smime_ca):
    """Issue 9 item 19: CBC only when the recipient's capabilities require it — here the explicit
    flag on upload, recorded with the key."""
    cert = smime_ca.issue("pat@selfsigned.test")
    r = env.client.post("/api/v1/recipient-keys", json={"address": "pat@selfsigned.test", "kind": "smime", "key": cert.pem,
                                                        "legacy_cbc": True}, headers=env.key)
    assert r.status_code == 201 and r.json()["smime_capabilities"] == "aes256-cbc", r.text
    message_id = env.send(to=["pat@selfsigned.test"])
    pipeline.deliver([message_id])
    [received] = env.received("selfsigned")
    assert b"smime-type=enveloped-data" in received.data
    assert "aes-256-cbc" in smime_ca.cms_info(received.data) and "rsaesOaep" in smime_ca.cms_info(received.data)
    inner = email.message_from_bytes(smime_ca.open(received.data, cert), policy=email_policy.default)
    assert PHI in inner.get_body(("plain",)).get_content()


def test_opportunistic_without_phi_may_go_in_clear(env, make_user):
    from tests.fixtures.accounts import login_client

    owner = make_user(env.sender.org_id, role="owner")
    csrf = login_client(env.client, owner)
    env.client.patch("/api/v1/delivery-settings", json={"security_mode": "opportunistic"}, headers={"X-CSRF-Token": csrf})
    env.client.cookies.clear()
    message_id = env.send(to=["news@plain.test"], contains_phi=False, subject="Our new opening hours", text="Open on Saturdays.",
                          html=None)
    pipeline.deliver([message_id])
    rec = env.one(message_id)
    assert rec["status"] == "delivered" and rec["method"] == "none" and rec["evidence"]["tls_version"] is None
    # The same organization's PHI message to the same server: portal, never clear text.
    message_id = env.send(to=["pat@plain.test"])
    pipeline.deliver([message_id])
    assert env.one(message_id)["method"] == "portal"
    assert b"HbA1c" not in b"".join(m.data for m in env.received("plain")).replace(b"=\r\n", b"")


# --------------------------------------------------------------------------- failures and retries


def scripted(env, monkeypatch, make, behaviour: str):
    from carepost.core.config import reset_settings

    server = make(behaviour)
    env.finalizers.append(pipeline.reset)  # close pooled connections before the server stops
    overrides = [s.override for s in env.peers.mx.values()] + [server.override]
    monkeypatch.setenv("CAREPOST_MX_OVERRIDES", ",".join(overrides))
    monkeypatch.setenv("CAREPOST_SMTP_TIMEOUT", "2")
    reset_settings()
    return server


def test_tempfail_is_retried_with_backoff_then_fails(env, monkeypatch, scripted_smtp, session):
    server = scripted(env, monkeypatch, scripted_smtp, "tempfail")
    # scripted.test offers no STARTTLS: a PHI message would go to the portal, so a message
    # without PHI under an opportunistic organization exercises the SMTP path itself.
    _opportunistic(env)
    message_id = env.send(to=["pat@scripted.test"], contains_phi=False, text="Opening hours", html=None, subject="Hours")
    pipeline.deliver([message_id])
    rec = env.one(message_id)
    assert rec["status"] == "deferred" and rec["reason"] == "recipient refused: 451"
    [row] = recipients(session, message_id)
    first_retry = clock.aware(row.next_attempt_at) - clock.now()
    assert timedelta(minutes=4) < first_retry < timedelta(minutes=6)
    assert pipeline.deliver([message_id]).claimed == 0  # not due yet
    clock.advance(timedelta(minutes=6))
    assert pipeline.deliver([message_id]).claimed == 1
    [row] = recipients(session, message_id)
    assert row.attempts == 2 and timedelta(minutes=9) < clock.aware(row.next_attempt_at) - clock.now() < timedelta(minutes=11)
    clock.advance(timedelta(hours=73))
    pipeline.deliver([message_id])
    rec = env.one(message_id)
    assert rec["status"] == "failed" and rec["reason"].startswith("gave up after retrying")
    assert [e["type"] for e in rec["events"]] == ["queued", "deferred", "deferred", "failed"]
    assert server.received == []


def _opportunistic(env):
    from carepost.core.database import org_session
    from carepost.delivery import service

    with org_session(env.sender.org_id) as s:
        service.update_delivery_settings(s, env.sender.org_id, {"security_mode": "opportunistic"})
        s.commit()


def test_permanent_refusal_is_a_bounce(env, monkeypatch, scripted_smtp):
    scripted(env, monkeypatch, scripted_smtp, "reject")
    _opportunistic(env)
    message_id = env.send(to=["gone@scripted.test"], contains_phi=False, text="Hours", html=None, subject="Hours")
    pipeline.deliver([message_id])
    rec = env.one(message_id)
    assert rec["status"] == "bounced" and rec["reason"] == "recipient refused: 550" and rec["evidence"]["reply_code"] == 550


@pytest.mark.parametrize("behaviour", ["drop_after_dot", "drop_mid_data", "garbage", "stall"])
def test_broken_servers_defer_and_a_lost_reply_is_a_possible_duplicate(env, monkeypatch, scripted_smtp, behaviour, session):
    server = scripted(env, monkeypatch, scripted_smtp, behaviour)
    _opportunistic(env)
    message_id = env.send(to=["pat@scripted.test"], contains_phi=False, text="Hours", html=None, subject="Hours")
    pipeline.deliver([message_id])
    rec = env.one(message_id)
    assert rec["status"] == "deferred", rec
    assert rec["possible_duplicate"] is (behaviour in ("drop_after_dot", "drop_mid_data", "stall"))
    [row] = recipients(session, message_id)
    assert row.next_attempt_at is not None and row.lease_owner is None
    if behaviour == "drop_after_dot":
        # The retry goes to a server that behaves; the recipient stays marked.
        server.behaviour = "ok"
        clock.advance(timedelta(minutes=6))
        pipeline.deliver([message_id])
        rec = env.one(message_id)
        assert rec["status"] == "delivered" and rec["possible_duplicate"] is True
        assert len(server.received) == 2


def test_a_stripped_starttls_never_leaks_phi(env, monkeypatch, scripted_smtp):
    """A server that advertises STARTTLS and then refuses it (a downgrade): the PHI message goes
    to the portal; the server sees only the notification."""
    server = scripted(env, monkeypatch, scripted_smtp, "starttls_refused")
    message_id = env.send(to=["pat@scripted.test"])
    pipeline.deliver([message_id])
    rec = env.one(message_id)
    assert rec["method"] == "portal" and rec["status"] == "sent"
    assert all(b"HbA1c" not in data.replace(b"=\r\n", b"") for data in server.received)


# --------------------------------------------------------------------------- leases, eligibility, sandbox


def test_two_workers_at_once_send_each_recipient_once(env, session):
    ids = [env.send(to=[f"p{i}@valid.test"]) for i in range(6)]
    reports = []

    def work():
        reports.append(pipeline.deliver(ids))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(r.claimed for r in reports) == 6
    assert sorted(r for m in env.received("valid") for r in m.rcpt_tos) == sorted(f"p{i}@valid.test" for i in range(6))


def test_a_lease_held_by_another_worker_is_respected_until_it_expires(env, session):
    from carepost.core.database import system_session

    message_id = env.send()
    with system_session() as s:
        row = s.scalars(select(MessageRecipient).where(MessageRecipient.message_id == message_id)).one()
        row.lease_owner, row.lease_until = "another-worker", clock.now() + timedelta(minutes=15)
        s.commit()
    assert pipeline.deliver([message_id]).claimed == 0
    with system_session() as s:
        assert pipeline.due_message_ids(s) == []
        s.commit()
    clock.advance(timedelta(minutes=16))  # that worker died: its lease ran out
    with system_session() as s:
        assert pipeline.due_message_ids(s) == [message_id]
        assert pipeline.due_message_ids(s) == []  # queued again once, not every minute
        s.commit()
    assert pipeline.deliver([message_id]).statuses == {"delivered": 1}


def test_the_sweep_finds_due_retries(env, monkeypatch, scripted_smtp):
    from carepost.core.database import system_session

    scripted(env, monkeypatch, scripted_smtp, "tempfail")
    _opportunistic(env)
    message_id = env.send(to=["pat@scripted.test"], contains_phi=False, text="Hours", html=None, subject="Hours")
    pipeline.deliver([message_id])
    with system_session() as s:
        assert pipeline.due_message_ids(s) == []
        s.commit()
    clock.advance(timedelta(minutes=6))
    with system_session() as s:
        assert pipeline.due_message_ids(s) == [message_id]
        s.commit()


@pytest.fixture
def refill():
    """Fill a pipeline port with a test's function; the assembled one comes back afterwards."""
    saved = []

    def fill(port, impl):
        saved.append((port, port.impl))
        port.fill(impl)

    yield fill
    for port, impl in reversed(saved):
        port.fill(impl)


def test_eligibility_is_checked_again_at_delivery(env, refill):
    message_id = env.send(cc=["lee@valid.test"])

    def check(session, candidates):
        assert all(c.purpose == "treatment" and c.org_id == env.sender.org_id for c in candidates)
        return {c.recipient_id: "authorization_revoked" for c in candidates if c.address.startswith("lee@")}

    refill(pipeline.eligibility, check)
    pipeline.deliver([message_id])
    data = {r["address"]: r for r in env.read(message_id)["recipients"]}
    assert data["lee@valid.test"]["status"] == "excluded" and data["lee@valid.test"]["reason"] == "authorization_revoked"
    assert data["pat@valid.test"]["status"] == "delivered"
    assert [r for m in env.received("valid") for r in m.rcpt_tos] == ["pat@valid.test"]


def test_suppressed_addresses_are_excluded(env):
    """By consent's check, which the composition root supplies to the pipeline."""
    from carepost.consent import service as consent
    from carepost.core.database import org_session

    message_id = env.send()
    with org_session(env.sender.org_id) as s:
        consent.add_suppression(s, env.sender.org_id, "pat@valid.test", reason="bounce_hard")
        s.commit()
    pipeline.deliver([message_id])
    rec = env.one(message_id)
    assert rec["status"] == "excluded" and rec["method"] is None and rec["reason"].startswith("suppressed")
    assert env.received("valid") == []


def test_unsubscribe_headers_step_is_dkim_signed(env, refill):
    refill(pipeline.list_unsubscribe,
           lambda session, candidates: {c.recipient_id: ["https://bar.example/t/u/abc"] for c in candidates})
    pipeline.deliver([env.send()])
    [received] = env.received("valid")
    parsed = email.message_from_bytes(received.data, policy=email_policy.default)
    # the step's link first; the pipeline adds the mailto: opt-out of the return path after it
    assert parsed["List-Unsubscribe"].startswith("<https://bar.example/t/u/abc>")
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "list-unsubscribe-post" in parsed["DKIM-Signature"].lower().replace(" ", "").replace("\n", "")
    assert env.dkim_verifies(received.data) == [True, True]


def test_sandbox_runs_the_pipeline_but_captures(env, session, gpg):
    from carepost.core.database import org_session
    from carepost.delivery import service

    sandbox = env.sender.key(sandbox=True)
    cert = gpg.gen_key("Lee <lee@valid.test>")
    env.client.post("/api/v1/recipient-keys", json={"address": "lee@valid.test", "kind": "pgp", "key": cert}, headers=env.key)
    message_id = env.send(headers=sandbox, cc=["lee@valid.test"])
    pipeline.deliver([message_id])
    data = {r["address"]: r for r in env.read(message_id)["recipients"]}
    assert data["pat@valid.test"]["status"] == "delivered" and data["pat@valid.test"]["evidence"]["sandbox"] is True
    assert data["pat@valid.test"]["method"] == "tls" and data["lee@valid.test"]["method"] == "pgp"
    assert env.received("valid") == []
    with org_session(env.sender.org_id) as s:
        captured = {method: raw for _, method, raw in service.sandbox_captures(s, message_id)}
    assert PHI.encode() in captured["tls"].replace(b"=\r\n", b"") and b"HbA1c" not in captured["pgp"]
    assert env.dkim_verifies(captured["tls"]) == [True, True]
    session.rollback()
    assert all(PHI.encode() not in c.raw_enc for c in session.scalars(select(SandboxCapture)))


def test_a_removed_sending_domain_fails_the_message_with_a_reason(env):
    message_id = env.send()
    r = env.client.delete(f"/api/v1/domains/{env.sender.domain_id}", headers=env.key)
    assert r.status_code == 204
    pipeline.deliver([message_id])
    rec = env.one(message_id)
    assert rec["status"] == "failed" and rec["reason"].startswith("sending_domain_missing")
    assert env.received("valid") == []


def test_no_database_transaction_is_open_while_smtp_runs(env, monkeypatch, capfd):
    """SQLite takes its write lock at BEGIN: a transaction open across the network would stall
    every other writer (API, other workers) for as long as the recipients' servers take."""
    seen = []
    real = pipeline.send

    def checking(run, copies):
        seen.append(run.session.in_transaction())
        return real(run, copies)

    monkeypatch.setattr(pipeline, "send", checking)
    pipeline.deliver([env.send(), env.send(to=["pat@plain.test"])])  # plain.test: TLS fails, portal, send again
    assert seen == [False, False]
    out, err = capfd.readouterr()
    assert "transaction_open_before_send" not in out + err


def test_planner_statistics_are_refreshed_as_the_tables_grow(env, storage):
    from sqlalchemy import text

    from carepost.core.database import get_engine
    from carepost.delivery.tasks import refresh_statistics

    batch = [body(to=[f"p{i}@valid.test"], html=None) for i in range(1000)]
    ids = env.client.post("/api/v1/messages/batch", json={"messages": batch}, headers=env.key).json()["ids"]
    refresh_statistics.call_local()
    with get_engine().connect() as conn:
        if storage.backend != "sqlite":  # PostgreSQL keeps its own statistics: nothing was created
            assert conn.execute(text("SELECT to_regclass('sqlite_stat1')")).scalar() is None
            return
        stat = conn.execute(text("SELECT stat FROM sqlite_stat1 WHERE tbl = 'message_recipients'")).scalar()
        assert int(stat.split()[0]) == 1000
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE org_id = ? AND id IN (?, ?)",
            (env.sender.org_id, ids[0], ids[1])).all()
        assert "sqlite_autoindex_messages_1" in str(plan) or "PRIMARY" in str(plan), plan


def test_nothing_identifying_is_logged(env, capfd):
    pipeline.deliver([env.send(), env.send(to=["pat@plain.test"])])
    out, err = capfd.readouterr()
    assert "delivery_run" in out + err
    for text in ("pat@", "Pat Doe", "HbA1c", "insulin"):
        assert text not in out + err


def test_events_and_evidence_hold_no_addresses(env, session):
    message_id = env.send()
    pipeline.deliver([message_id])
    session.rollback()
    for event in session.scalars(select(MessageEvent).where(MessageEvent.message_id == message_id)):
        assert "pat@" not in json.dumps(event.details)
    [row] = recipients(session, message_id)
    assert "pat@" not in json.dumps(row.evidence) and b"pat@" not in (row.reply_enc or b"")
    assert session.get(Message, message_id).sandbox is False


# --------------------------------------------------------------------------- a real worker process


def test_a_real_worker_process_delivers_what_the_api_accepted(storage, env, session, tmp_path):
    """``carepost worker`` in its own process, consuming the queue the API filled, delivering to
    the local MX servers (it gets the DNS and MX settings through its environment)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "worker", "--threads", "2", "--no-periodic"],
                                env={**os.environ, **storage.env, "CAREPOST_LOG_JSON": "true"}, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        batch = [body(to=[f"patient{i}@valid.test"], text=f"Dear patient {i}: {PHI}") for i in range(20)]
        r = env.client.post("/api/v1/messages/batch", json={"messages": batch}, headers=env.key)
        assert r.status_code == 202, r.text
        ids = r.json()["ids"] + [env.send(to=["pat@plain.test"])]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            session.rollback()
            statuses = session.scalars(select(MessageRecipient.status).where(MessageRecipient.message_id.in_(ids))).all()
            if len(statuses) == 21 and all(s in ("delivered", "sent") for s in statuses):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"not delivered: {statuses}\n" + log_path.read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    received = env.received("valid")
    assert sorted(r for m in received for r in m.rcpt_tos) == sorted(f"patient{i}@valid.test" for i in range(20))
    assert all(m.tls for m in received)
    assert env.one(ids[-1])["method"] == "portal"
    [notification] = env.received("plain")
    assert b"HbA1c" not in notification.data.replace(b"=\r\n", b"")
    output = log_path.read_text()
    assert "delivery_run" in output
    for text in ("patient1@", "pat@", "HbA1c"):
        assert text not in output


def test_smime_signing_key_is_made_for_a_domain_older_than_signing(env, smime_ca):
    """A sending domain created before S/MIME was signed gets its signing key at its first S/MIME
    message, stored encrypted; the message is signed with it."""
    from carepost.core.database import org_session
    from carepost.delivery.models import SendingDomain

    with org_session(env.sender.org_id) as s:
        s.get(SendingDomain, env.sender.domain_id).smime_signing_private_enc = None
        s.commit()
    cert = smime_ca.issue("pat@selfsigned.test")
    r = env.client.post("/api/v1/recipient-keys", json={"address": "pat@selfsigned.test", "kind": "smime", "key": cert.pem},
                        headers=env.key)
    assert r.status_code == 201, r.text
    message_id = env.send(to=["pat@selfsigned.test"])
    pipeline.deliver([message_id])
    [received] = env.received("selfsigned")
    inner = email.message_from_bytes(smime_ca.open(received.data, cert), policy=email_policy.default)
    assert PHI in inner.get_body(("plain",)).get_content()
    with org_session(env.sender.org_id) as s:
        stored = s.get(SendingDomain, env.sender.domain_id).smime_signing_private_enc
        assert stored and b"PRIVATE KEY" not in stored
