"""Outbound webhooks: Standard Webhooks signatures checked by an independent implementation, the
retry schedule (by the stored next attempt and the queue's eta), 410 disabling the endpoint,
replay, SSRF refusals (at save and at connect time) and no PHI in payloads unless asked for.

A real HTTP receiver runs on 127.0.0.1, so these tests allow private targets explicitly
(``CAREPOST_WEBHOOK_ALLOW_PRIVATE`` or ``CAREPOST_WEBHOOK_ALLOWED_HOSTS``) — the refusals are tested
with the setting off."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from carepost.core import clock
from carepost.tracking import webhooks

PATIENT = "pat.doe@gmail.example"


# --------------------------------------------------------------------------- a real receiver


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    scheme: str = "http"
    host: str = "127.0.0.1"
    requests: list = field(default_factory=list)
    statuses: list = field(default_factory=list)  # answers to give, in order; then 204

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str = "/hooks") -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def wait(self, count: int, timeout: float = 5.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.requests

    def reset(self) -> None:
        self.requests.clear()
        self.statuses.clear()


def _start(context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> Receiver:
    holder: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            receiver = holder["r"]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            status = receiver.statuses.pop(0) if receiver.statuses else 204
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", receiver.url("/elsewhere"))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    receiver = holder["r"] = Receiver(server, "https" if context else "http")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver


@pytest.fixture(scope="session")
def _receiver():
    receiver = _start()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture
def receiver(_receiver):
    _receiver.reset()
    return _receiver


@pytest.fixture(scope="session")
def _tls_receiver(tls_ca):
    context = tls_ca.server_context(["localhost"])
    receiver = _start(context)
    receiver.host = "localhost"
    yield receiver
    receiver.server.shutdown()


@pytest.fixture
def tls_receiver(_tls_receiver, monkeypatch, tls_ca):
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_EXTRA_CA_FILE", str(tls_ca.ca_file))
    reset_settings()
    _tls_receiver.reset()
    yield _tls_receiver
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def allow_private(monkeypatch):
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings()
    yield
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def immediate():
    """Run queued tasks at once (scheduled ones stay in the in-memory schedule for inspection)."""
    from carepost.core.queue import huey

    huey.immediate = True
    yield huey
    huey.immediate = False


# --------------------------------------------------------------------------- an independent verifier


def independent_verify(secret: str, headers: dict, body: bytes, tolerance: int = 300) -> dict:
    """Standard Webhooks verification written from the specification, not from CarePost's code."""
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_"):])
    assert len(key) >= 24
    msg_id, stamp, signatures = headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
    assert abs(time.time() - int(stamp)) <= tolerance
    signed = f"{msg_id}.{stamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = dict(s.split(",", 1) for s in signatures.split(" "))
    assert hmac.compare_digest(versions["v1"], expected)
    return json.loads(body)


# --------------------------------------------------------------------------- helpers


def make_endpoint(session, org_id, url, *, event_types=("*",), include_phi=False, allow_phi=False, baa=True):
    """An endpoint; one receiving PHI gets a BAA on record too (``baa=False``: none; PHI is then
    refused, issue 16 item 9)."""
    from carepost.tracking.service import create_endpoint

    row, secret = create_endpoint(session, org_id, url=url, event_types=list(event_types), include_phi=include_phi,
                                  allow_phi=allow_phi)
    session.commit()
    if include_phi and baa:
        record_baa(session, org_id, "webhook", row.id)
    return row, secret


def record_baa(session, org_id, kind, ref, name="Test associate"):
    """A signed BAA on record for a relay host or a PHI webhook endpoint (compliance.associates)."""
    from datetime import date, timedelta

    from carepost.compliance import associates
    from carepost.core.database import org_session

    with org_session(org_id) as s:
        row = associates.create(s, org_id, {"name": name, "kind": kind, "ref": ref, "scope": "PHI in events",
                                            "baa_signed_on": date.today() - timedelta(days=30)},
                                {"actor_type": "system", "actor_id": None})
        s.commit()
        return row.id


def deliveries(session, endpoint_id=None):
    from carepost.tracking.models import WebhookDelivery

    session.rollback()
    q = select(WebhookDelivery).order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    if endpoint_id:
        q = q.where(WebhookDelivery.endpoint_id == endpoint_id)
    return list(session.scalars(q.execution_options(populate_existing=True)))


def emit_test(org_id: str, endpoint_id: str) -> str:
    from carepost.core.database import org_session
    from carepost.tracking.service import send_test_event

    with org_session(org_id) as work:
        delivery = send_test_event(work, org_id, endpoint_id)
        work.commit()
        return delivery.id


# --------------------------------------------------------------------------- signing


def test_signature_matches_the_specification_example():
    """The example of the Standard Webhooks specification (its reference test vector)."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert webhooks.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_new_secrets_are_whsec_and_long_enough():
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    assert webhooks.new_secret() != secret


def test_verify_refuses_old_timestamps_and_wrong_signatures():
    secret = webhooks.new_secret()
    now = int(time.time())
    headers = {"webhook-id": "m1", "webhook-timestamp": str(now), "webhook-signature": webhooks.sign(secret, "m1", now, b"{}")}
    assert webhooks.verify(secret, headers, b"{}")
    assert not webhooks.verify(secret, headers, b"{ }")
    assert not webhooks.verify(webhooks.new_secret(), headers, b"{}")
    old = now - 301
    stale = {**headers, "webhook-timestamp": str(old), "webhook-signature": webhooks.sign(secret, "m1", old, b"{}")}
    assert not webhooks.verify(secret, stale, b"{}")


def test_delivery_is_signed_and_carries_no_phi(session, org, receiver, allow_private, immediate):
    endpoint, secret = make_endpoint(session, org.id, receiver.url())
    delivery_id = emit_test(org.id, endpoint.id)
    [request] = receiver.wait(1)
    payload = independent_verify(secret, request.headers, request.body)
    assert payload["type"] == "webhook.test" and payload["data"]["endpoint_id"] == endpoint.id
    assert payload["timestamp"].endswith("Z")
    assert request.headers["content-type"] == "application/json"
    [delivery] = deliveries(session)
    assert delivery.id == delivery_id and delivery.status == "succeeded" and delivery.attempts == 1
    from carepost.tracking.models import WebhookEvent

    assert request.headers["webhook-id"] == delivery.event_id
    assert session.get(WebhookEvent, delivery.event_id).type == "webhook.test"


# --------------------------------------------------------------------------- message events


def test_message_events_go_to_subscribed_endpoints_without_phi(session, org, receiver, allow_private, immediate):
    from carepost.core.database import org_session
    from carepost.delivery.models import MessageRecipient
    from carepost.delivery.service import add_event
    from tests.test_bounces import make_sent

    sent = make_sent(session, org.id, PATIENT)
    everything, secret = make_endpoint(session, org.id, receiver.url("/all"), event_types=["message.delivered",
                                                                                          "message.bounced"])
    make_endpoint(session, org.id, receiver.url("/complaints"), event_types=["message.complained"])
    with org_session(org.id) as work:
        recipient = work.get(MessageRecipient, sent.recipient_id)
        add_event(work, recipient, "delivered", method="tls", reply_code=250, possible_duplicate=False)
        work.commit()
    [request] = receiver.wait(1)
    assert request.path == "/all"
    payload = independent_verify(secret, request.headers, request.body)
    assert payload["type"] == "message.delivered"
    data = payload["data"]
    assert data["message_id"] == sent.message_id and data["recipient_id"] == sent.recipient_id
    assert data["details"] == {"reply_code": 250, "possible_duplicate": False}
    assert "address" not in data
    assert PATIENT not in request.body.decode() and "appointment" not in request.body.decode().lower()


def test_rolled_back_events_are_never_sent(session, org, receiver, allow_private, immediate):
    from carepost.core.database import org_session
    from carepost.delivery.models import MessageRecipient
    from carepost.delivery.service import add_event
    from tests.test_bounces import make_sent

    sent = make_sent(session, org.id, PATIENT)
    make_endpoint(session, org.id, receiver.url())
    with org_session(org.id) as work:
        add_event(work, work.get(MessageRecipient, sent.recipient_id), "delivered", method="tls")
        work.rollback()
        work.commit()
    assert deliveries(session) == []
    assert receiver.requests == []


def test_bounce_and_complaint_events_reach_webhooks(session, org, receiver, allow_private, immediate):
    from carepost.core.database import org_session
    from carepost.delivery import bounces
    from tests.test_bounces import make_sent, sample

    sent = make_sent(session, org.id, PATIENT)
    _, secret = make_endpoint(session, org.id, receiver.url(), event_types=["message.bounced", "message.complained"])
    for name, envelope in (("gmail_hard.eml", [sent.verp]), ("yahoo_arf.eml", [])):
        with org_session(org.id) as work:
            bounces.apply_report(work, org.id, bounces.parse_report(sample(name, sent.verp)), envelope)
            work.commit()
    requests = receiver.wait(2)
    payloads = [independent_verify(secret, r.headers, r.body) for r in requests]
    assert [p["type"] for p in payloads] == ["message.bounced", "message.complained"]
    assert payloads[0]["data"]["details"]["bounce_type"] == "hard"
    assert payloads[0]["data"]["reason"].startswith("hard bounce: 5.1.1")
    assert payloads[1]["data"]["details"]["feedback_type"] == "abuse"
    assert all(PATIENT not in r.body.decode() for r in requests)


def test_include_phi_needs_permission_and_https(session, org, allow_private):
    from carepost.core.errors import ValidationFailed
    from carepost.tracking.service import create_endpoint

    with pytest.raises(ValidationFailed) as exc:
        create_endpoint(session, org.id, url="https://localhost:9/x", event_types=["*"], include_phi=True)
    assert exc.value.field == "include_phi"
    with pytest.raises(ValidationFailed) as exc:
        create_endpoint(session, org.id, url="http://localhost:9/x", event_types=["*"], include_phi=True, allow_phi=True)
    assert exc.value.field == "url"
    session.rollback()


def test_include_phi_endpoint_gets_the_address_and_the_disclosure_is_audited(session, org, tls_receiver,
                                                                              allow_private, immediate):
    from carepost.audit.models import AuditEvent
    from carepost.core.database import org_session
    from carepost.delivery.models import MessageRecipient
    from carepost.delivery.service import add_event
    from tests.test_bounces import make_sent

    sent = make_sent(session, org.id, PATIENT)
    phi_endpoint, secret = make_endpoint(session, org.id, tls_receiver.url("/phi"), event_types=["message.delivered"],
                                         include_phi=True, allow_phi=True)
    make_endpoint(session, org.id, tls_receiver.url("/plain"), event_types=["message.delivered"])
    with org_session(org.id) as work:
        add_event(work, work.get(MessageRecipient, sent.recipient_id), "delivered", method="tls")
        work.commit()
    requests = {r.path: r for r in tls_receiver.wait(2)}
    assert independent_verify(secret, requests["/phi"].headers, requests["/phi"].body)["data"]["address"] == PATIENT
    assert PATIENT not in requests["/plain"].body.decode()
    session.rollback()
    audits = session.scalars(select(AuditEvent).where(AuditEvent.action == "webhook.phi_disclosed")).all()
    assert [a.target_id for a in audits] == [phi_endpoint.id]
    assert PATIENT not in json.dumps(audits[0].details)


# --------------------------------------------------------------------------- retries, 410, replay


def test_failures_are_retried_on_the_backoff_schedule(session, org, receiver, allow_private, immediate):
    from carepost.tracking.models import WebhookAttempt
    from carepost.tracking.service import attempt_delivery

    endpoint, _ = make_endpoint(session, org.id, receiver.url())
    receiver.statuses.extend([500] * 20)
    delivery_id = emit_test(org.id, endpoint.id)
    [delivery] = deliveries(session)
    assert delivery.status == "pending" and delivery.attempts == 1 and delivery.last_status_code == 500
    assert clock.aware(delivery.next_attempt_at) - clock.now() <= timedelta(seconds=5)
    [scheduled] = [t for t in immediate.scheduled() if t.args == (delivery_id,)]
    assert 3 <= (scheduled.eta - _utcnow()).total_seconds() <= 6

    # Not due yet: nothing happens.
    assert attempt_delivery(delivery_id) is None
    # After attempt n fails, attempt n + 1 is due RETRY_SCHEDULE[n - 1] later.
    for wait in webhooks.RETRY_SCHEDULE:
        [delivery] = deliveries(session)
        assert delivery.status == "pending"
        assert abs((clock.aware(delivery.next_attempt_at) - clock.now()) - wait) < timedelta(seconds=2)
        clock.advance(wait)
        assert attempt_delivery(delivery_id) == "failed"
    [delivery] = deliveries(session)
    assert delivery.status == "failed" and delivery.attempts == 10 and delivery.next_attempt_at is None
    attempts = session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
                               .order_by(WebhookAttempt.attempt)).all()
    assert [a.attempt for a in attempts] == list(range(1, 11))
    assert all(a.status_code == 500 and a.error == "HTTP 500" and a.duration_ms is not None for a in attempts)
    assert len(receiver.requests) == 10
    # The same webhook-id on every attempt; a fresh timestamp on each.
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert attempt_delivery(delivery_id) is None  # finished: nothing more


def _utcnow():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).replace(tzinfo=None)


def test_a_success_after_failures_ends_the_retries(session, org, receiver, allow_private, immediate):
    from carepost.tracking.service import attempt_delivery

    endpoint, _ = make_endpoint(session, org.id, receiver.url())
    receiver.statuses.extend([503, 200])
    delivery_id = emit_test(org.id, endpoint.id)
    clock.advance(timedelta(seconds=6))
    assert attempt_delivery(delivery_id) == "succeeded"
    [delivery] = deliveries(session)
    assert delivery.status == "succeeded" and delivery.attempts == 2 and delivery.finished_at is not None


def test_410_gone_disables_the_endpoint(session, org, receiver, allow_private, immediate):
    from carepost.audit.models import AuditEvent
    from carepost.tracking.models import WebhookEndpoint
    from carepost.tracking.service import attempt_delivery, emit

    endpoint, _ = make_endpoint(session, org.id, receiver.url())
    receiver.statuses.extend([500, 410])
    first = emit_test(org.id, endpoint.id)
    # A second event waits while the first is retried.
    from carepost.core.database import org_session

    immediate.immediate = False
    with org_session(org.id) as work:
        [second] = emit(work, org.id, "webhook.test", {"n": 2})
        work.commit()
    immediate.immediate = True
    clock.advance(timedelta(seconds=6))
    assert attempt_delivery(first) == "gone"
    session.rollback()
    row = session.get(WebhookEndpoint, endpoint.id, populate_existing=True)
    assert row.enabled is False and "410" in row.disabled_reason
    by_id = {d.id: d for d in deliveries(session)}
    assert by_id[first].status == "failed" and by_id[second].status == "cancelled"
    assert session.scalars(select(AuditEvent).where(AuditEvent.action == "webhook.endpoint_disabled")).all()
    # A disabled endpoint gets nothing more.
    assert attempt_delivery(second) is None
    with org_session(org.id) as work:
        assert emit(work, org.id, "webhook.test", {"n": 3}) == []
        work.commit()
    assert len(receiver.requests) == 2


def test_redirects_are_not_followed(session, org, receiver, allow_private, immediate):
    endpoint, _ = make_endpoint(session, org.id, receiver.url())
    receiver.statuses.append(302)
    emit_test(org.id, endpoint.id)
    [delivery] = deliveries(session)
    assert delivery.status == "pending" and "redirects are not followed" in delivery.last_error
    assert [r.path for r in receiver.requests] == ["/hooks"]


def test_replay_sends_the_same_event_again(session, org, receiver, allow_private, immediate):
    from carepost.core.database import org_session
    from carepost.tracking.service import replay

    endpoint, secret = make_endpoint(session, org.id, receiver.url())
    first = emit_test(org.id, endpoint.id)
    with org_session(org.id) as work:
        again = replay(work, org.id, endpoint.id, first)
        work.commit()
    requests = receiver.wait(2)
    assert len(requests) == 2
    assert requests[0].headers["webhook-id"] == requests[1].headers["webhook-id"]
    assert requests[0].body == requests[1].body
    independent_verify(secret, requests[1].headers, requests[1].body)
    by_id = {d.id: d for d in deliveries(session)}
    assert by_id[again.id].replay_of == first and by_id[again.id].status == "succeeded"


def test_lost_deliveries_are_found_by_the_sweep(session, org, receiver, allow_private, monkeypatch):
    """The queue is unreachable when the event is emitted: the delivery waits in the database and
    the sweep finds it once it is overdue."""
    from carepost.core.database import read_only_session
    from carepost.tracking import tasks
    from carepost.tracking.service import attempt_delivery, due_deliveries

    endpoint, _ = make_endpoint(session, org.id, receiver.url())

    def queue_down(*args, **kwargs):
        raise ConnectionError("queue unreachable")

    monkeypatch.setattr(tasks, "deliver_webhook", queue_down)
    delivery_id = emit_test(org.id, endpoint.id)
    monkeypatch.undo()
    assert receiver.requests == []
    with read_only_session() as s:
        assert due_deliveries(s) == []  # not overdue yet
    clock.advance(timedelta(minutes=2))
    with read_only_session() as s:
        assert due_deliveries(s) == [delivery_id]
    assert attempt_delivery(delivery_id) == "succeeded"
    with read_only_session() as s:
        assert due_deliveries(s) == []


# --------------------------------------------------------------------------- SSRF


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.9", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("::1", "loopback"), ("fe80::1", "link-local"), ("fd00::1", "private"),
    ("::ffff:127.0.0.1", "loopback"), ("100.64.0.1", "non-public"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
])
def test_non_public_addresses(address, reason):
    assert reason in webhooks.non_public_reason(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "8.8.8.8"])
def test_public_addresses(address):
    assert webhooks.non_public_reason(address) is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://10.0.0.5/hook", "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/hook", "http://localhost/hook", "https://localhost./hook", "http://0x7f000001/hook",
])
def test_saving_an_endpoint_on_a_private_address_is_refused(session, org, url):
    from carepost.core.errors import ValidationFailed
    from carepost.tracking.service import create_endpoint

    with pytest.raises(ValidationFailed) as exc:
        create_endpoint(session, org.id, url=url, event_types=["*"])
    assert exc.value.field == "url" and "not allowed" in exc.value.message
    session.rollback()


@pytest.mark.parametrize("url, message", [
    ("ftp://example.org/x", "https://"), ("https://user:pw@example.org/x", "user name or password"),
    ("https://example.org/x#frag", "fragment"), ("https:///x", "no host"), ("https://exa mple.org/", "spaces"),
    ("", "Enter the endpoint URL"), ("https://example.org:99999/", "not valid"),
])
def test_bad_urls_are_refused_with_the_reason(url, message):
    from carepost.core.errors import ValidationFailed

    with pytest.raises(ValidationFailed) as exc:
        webhooks.parse_url(url)
    assert message in exc.value.message and exc.value.field == "url"


def test_allowed_hosts_setting_allows_only_those(session, org, monkeypatch, receiver, immediate):
    from carepost.core.config import reset_settings
    from carepost.core.errors import ValidationFailed
    from carepost.tracking.service import create_endpoint

    monkeypatch.setenv("CAREPOST_WEBHOOK_ALLOWED_HOSTS", "127.0.0.0/8, hooks.internal.example")
    reset_settings()
    try:
        endpoint, secret = make_endpoint(session, org.id, receiver.url())
        with pytest.raises(ValidationFailed):
            create_endpoint(session, org.id, url="http://10.0.0.5/hook", event_types=["*"])
        session.rollback()
        emit_test(org.id, endpoint.id)
        assert len(receiver.wait(1)) == 1
    finally:
        monkeypatch.undo()
        reset_settings()


def test_the_address_is_checked_again_at_connect_time(session, org, receiver, monkeypatch, immediate):
    """The endpoint was saved while private targets were allowed (or its name resolved to a
    public address then): at the attempt, it resolves to loopback and nothing is sent."""
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings()
    endpoint, _ = make_endpoint(session, org.id, receiver.url())
    monkeypatch.delenv("CAREPOST_WEBHOOK_ALLOW_PRIVATE")
    reset_settings()
    emit_test(org.id, endpoint.id)
    [delivery] = deliveries(session)
    assert delivery.status == "failed" and "loopback" in delivery.last_error
    assert receiver.requests == []


def test_peer_address_is_checked_on_the_open_socket(monkeypatch, receiver):
    """DNS rebinding: the check and the connection use one answer, and the connected peer is
    checked again — a resolver that answers "public" first cannot smuggle in a private peer."""
    from carepost.core.config import get_settings

    settings = get_settings().model_copy(update={"webhook_allow_private": False})
    monkeypatch.setattr(webhooks, "resolve", lambda target, s=None: ["127.0.0.1"])
    result = webhooks.post(receiver.url(), b"{}", {}, settings)
    assert result.outcome == "refused" and "loopback" in result.error
    assert receiver.requests == []


def test_unreachable_endpoint_is_a_retryable_failure(session, org, allow_private, immediate):
    from tests.fixtures.delivery import free_port

    endpoint, _ = make_endpoint(session, org.id, f"http://127.0.0.1:{free_port()}/gone")
    emit_test(org.id, endpoint.id)
    [delivery] = deliveries(session)
    assert delivery.status == "pending" and delivery.last_error == "connection refused"


def test_the_delivery_log_is_purged_after_its_retention(session, org, receiver, allow_private, immediate, monkeypatch):
    from carepost.core.config import reset_settings
    from carepost.core.database import system_session
    from carepost.tracking.models import WebhookAttempt, WebhookEvent
    from carepost.tracking.service import purge_log

    monkeypatch.setenv("CAREPOST_WEBHOOK_LOG_RETENTION_DAYS", "30")
    reset_settings()
    endpoint, _ = make_endpoint(session, org.id, receiver.url())
    emit_test(org.id, endpoint.id)  # succeeds
    receiver.statuses.append(500)
    emit_test(org.id, endpoint.id)  # pending, waiting for its retry
    clock.advance(timedelta(days=31))
    with system_session() as s:
        assert purge_log(s) == {"attempts": 1, "deliveries": 1, "events": 1}
        s.commit()
    [left] = deliveries(session)
    assert left.status == "pending"
    assert len(session.scalars(select(WebhookEvent)).all()) == 1
    assert len(session.scalars(select(WebhookAttempt)).all()) == 1
