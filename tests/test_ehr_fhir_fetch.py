"""FHIR Subscription id-only notifications read back from the organization's FHIR server (issue 15
item 3, docs/ehr.md): CarePost holds the server's base URL and a SMART Backend Services
registration (client id, token endpoint, its own signing key encrypted, the public key shown as a
JWKS); the notification queues a task with ids only; a real ``carepost worker`` obtains a token
with ``client_credentials`` + ``private_key_jwt`` and GETs the resource, which is recorded as a
full-resource notification would be. Failures (404, a refused assertion, a refused token, a
resource that does not validate) wait in the error queue with the reason and are retried.

The EHR peer is a small FastAPI app served by uvicorn in a thread: a token endpoint that verifies
the client assertion's signature with the JWKS CarePost showed, and FHIR reads that want its
bearer token."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from urllib.parse import parse_qs

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from carepost.core.database import read_only_session
from carepost.ehr.models import EhrMessage, FhirServer
from tests.fixtures.accounts import login_client
from tests.fixtures.delivery import free_port
from tests.test_ehr_fhir import (
    FHIR,
    _backport_status,
    _events,
    _notification,
    _patient,
    appointment,
    encounter,
)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_key(jwk: dict):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    number = (lambda name: int.from_bytes(_unb64(jwk[name]), "big"))
    if jwk["kty"] == "EC":
        assert jwk["crv"] == "P-384"
        return ec.EllipticCurvePublicNumbers(number("x"), number("y"), ec.SECP384R1()).public_key()
    return rsa.RSAPublicNumbers(number("e"), number("n")).public_key()


class EhrPeer:
    """The EHR: ``POST /token`` (SMART Backend Services) and ``GET /fhir/<type>/<id>``."""

    def __init__(self, client_id: str = "carepost-app"):
        import uvicorn

        self.client_id = client_id
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.jwks: dict = {"keys": []}
        self.resources: dict[str, dict] = {}
        self.tokens: set[str] = set()
        self.jtis: set[str] = set()
        self.granted: list[str] = []  # verified assertions' algorithms
        self.reads: list[str] = []
        self.refuse_reads = False
        self.fail_reads: list[tuple[int, dict]] = []  # (HTTP status, headers) answered to the next reads
        app = FastAPI()

        @app.post("/token")
        async def token(request: Request):
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            if form.get("grant_type") != "client_credentials" or form.get("client_assertion_type") != ASSERTION_TYPE:
                return JSONResponse({"error": "invalid_request"}, status_code=400)
            if not self._verify(form.get("client_assertion", "")):
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            issued = secrets.token_urlsafe(24)
            self.tokens.add(issued)
            return {"access_token": issued, "token_type": "bearer", "expires_in": 300, "scope": form.get("scope")}

        @app.get("/fhir/{rtype}/{rid}")
        async def read(rtype: str, rid: str, request: Request):
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
            if self.refuse_reads or bearer not in self.tokens:
                return JSONResponse({"resourceType": "OperationOutcome"}, status_code=401)
            self.reads.append(f"{rtype}/{rid}")
            if self.fail_reads:
                status, headers = self.fail_reads.pop(0)
                return JSONResponse({"resourceType": "OperationOutcome"}, status_code=status, headers=headers)
            found = self.resources.get(f"{rtype}/{rid}")
            if found is None:
                return JSONResponse({"resourceType": "OperationOutcome"}, status_code=404)
            return JSONResponse(found, media_type="application/fhir+json")

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def _verify(self, assertion: str) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        try:
            head_b64, claims_b64, sig_b64 = assertion.split(".")
            header, claims = json.loads(_unb64(head_b64)), json.loads(_unb64(claims_b64))
            [jwk] = [k for k in self.jwks["keys"] if k["kid"] == header["kid"]]
            key, signed, signature = _public_key(jwk), f"{head_b64}.{claims_b64}".encode(), _unb64(sig_b64)
            if header["alg"] == "ES384":
                der = encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big"))
                key.verify(der, signed, ec.ECDSA(hashes.SHA384()))
            elif header["alg"] == "RS384":
                key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA384())
            else:
                return False
        except (ValueError, KeyError, TypeError, InvalidSignature):
            return False
        ok = (header.get("typ") == "JWT" and claims["iss"] == claims["sub"] == self.client_id
              and claims["aud"] == f"{self.base}/token" and time.time() < claims["exp"] <= time.time() + 300
              and claims["jti"] not in self.jtis)
        self.jtis.add(claims["jti"])
        if ok:
            self.granted.append(header["alg"])
        return ok

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the EHR peer did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def loopback_http(monkeypatch):
    """The explicit switch that lets a FHIR server live at http://127.0.0.1 (the peer here)."""
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_EHR_FHIR_ALLOW_LOOPBACK_HTTP", "true")
    reset_settings()
    yield
    monkeypatch.delenv("CAREPOST_EHR_FHIR_ALLOW_LOOPBACK_HTTP")
    reset_settings()


def _configure(org_id: str, peer: EhrPeer, *extra: str) -> dict:
    """``carepost ehr fhir-server`` sets the server; the JWKS it prints is registered with the EHR."""
    from typer.testing import CliRunner

    from carepost.cli import app

    result = CliRunner().invoke(app, ["ehr", "fhir-server", "--org", org_id, "--base-url", f"{peer.base}/fhir",
                                      "--token-url", f"{peer.base}/token", "--client-id", peer.client_id, *extra])
    assert result.exit_code == 0, result.output
    jwks = json.loads(result.output.strip().splitlines()[-1])
    peer.jwks = jwks
    return jwks


def _rows(org_id: str, status: str | None = None) -> list[EhrMessage]:
    with read_only_session(org_id) as s:
        q = select(EhrMessage).where(EhrMessage.org_id == org_id, EhrMessage.control_id.like("id-only:%"))
        if status:
            q = q.where(EhrMessage.status == status)
        return list(s.scalars(q.order_by(EhrMessage.received_at, EhrMessage.id)))


def _id_only(*focuses: str) -> dict:
    return _notification(_backport_status(events=[(str(n + 1), f) for n, f in enumerate(focuses)]))


def test_an_id_only_notification_is_read_back_by_the_worker(storage, db, org, sender, client, delivery_queue,
                                                            loopback_http, tmp_path):
    from tests.faults import start_worker, stop

    _patient(org.id, source="Patient/pat-77")
    key = {**FHIR, **sender.key("phi:write", "phi:read_masked")}
    with EhrPeer() as peer:
        jwks = _configure(org.id, peer)
        assert jwks["keys"][0]["kty"] == "EC" and "d" not in jwks["keys"][0]  # the public key only
        peer.resources["Appointment/apt-70"] = appointment(rid="apt-70")
        worker = start_worker(storage, tmp_path / "worker.log", periodic=False, ehr_fhir_allow_loopback_http="true")
        try:
            r = client.post("/api/v1/fhir/subscription-notification", headers=key,
                            json=_id_only(f"{peer.base}/fhir/Appointment/apt-70"))
            assert r.status_code == 200, r.text
            assert "queued as message" in r.json()["issue"][0]["diagnostics"]
            assert _events(org.id) == []  # nothing fetched in the request
            deadline = time.monotonic() + 180
            while [m.status for m in _rows(org.id)] in ([], ["queued"]):
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(0.2)
        finally:
            stop(worker)
    assert peer.granted == ["ES384"] and peer.reads == ["Appointment/apt-70"]
    [row] = _rows(org.id)
    assert row.status == "recorded", (row.reason_code, row.reason)
    assert row.reason_code == "id_only_fetched" and row.event_name == "appointment.booked"
    [event] = _events(org.id)
    assert event.name == "appointment.booked" and event.id == row.event_id
    with read_only_session(org.id) as s:  # the fetched resource is recorded under its own id and version
        assert s.scalar(select(EhrMessage.status).where(EhrMessage.control_id == "Appointment/apt-70/_history/1")) \
            == "recorded"
        server = s.scalar(select(FhirServer))
        assert b"PRIVATE KEY" not in server.private_key_enc  # held encrypted


def test_fetch_failures_wait_in_the_error_queue_and_are_retried(db, org, sender, client, delivery_queue,
                                                                loopback_http):
    from carepost.ehr.fhir_fetch import run_fetch

    _patient(org.id, source="Patient/pat-77")
    key = {**FHIR, **sender.key("phi:write", "phi:read_masked")}
    with EhrPeer() as peer:
        _configure(org.id, peer, "--algorithm", "RS384")
        broken = appointment(rid="apt-82")
        del broken["status"]
        peer.resources["Appointment/apt-82"] = broken
        peer.resources["Encounter/enc-83"] = encounter(rid="enc-83")
        r = client.post("/api/v1/fhir/subscription-notification", headers=key,
                        json=_id_only("Appointment/apt-81", "Appointment/apt-82"))
        assert r.status_code == 200, r.text
        queued = _rows(org.id, "queued")
        assert [run_fetch(org.id, m.id) for m in queued] == ["error", "error"]
        assert peer.granted and set(peer.granted) == {"RS384"}
        missing, invalid = _rows(org.id)
        assert (missing.reason_code, missing.error_field) == ("fhir_fetch_not_found", "Appointment.id")
        assert "HTTP 404" in missing.reason
        assert invalid.reason_code == "fhir_fetch_invalid" and invalid.error_field == "Appointment.status"
        # The token endpoint refuses an assertion signed with a key it does not hold (another JWKS registered).
        from cryptography.hazmat.primitives.asymmetric import rsa

        from carepost.ehr.fhir_fetch import _tokens, public_jwk

        real = peer.jwks
        peer.jwks = {"keys": [{**public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS384"),
                               "kid": real["keys"][0]["kid"]}]}
        _tokens.clear()
        client.post("/api/v1/fhir/subscription-notification", headers=key, json=_id_only("Encounter/enc-83"))
        [refused] = _rows(org.id, "queued")
        assert run_fetch(org.id, refused.id) == "error"
        refused = _rows(org.id)[-1]
        assert (refused.reason_code, refused.error_field) == ("fhir_token_refused", "client_id")
        assert "HTTP 401" in refused.reason
        # The FHIR server refuses the token it gave (a scope withdrawn).
        peer.jwks = real
        peer.refuse_reads = True
        retried = client.post(f"/api/v1/ehr/messages/{refused.id}/retry", headers=key)
        assert retried.status_code == 200 and retried.json()["messages"][0]["status"] == "queued", retried.text
        assert run_fetch(org.id, refused.id) == "error"
        assert _rows(org.id)[-1].reason_code == "fhir_fetch_unauthorized"
        # Fixed at the EHR: a retry from the queue reads it again, in the worker's task.
        peer.refuse_reads = False
        peer.resources["Appointment/apt-81"] = appointment(rid="apt-81")
        again = client.post("/api/v1/ehr/messages/retry", headers=key)
        assert again.status_code == 200 and again.json()["retried"] == 3
        assert sorted(run_fetch(org.id, m.id) for m in _rows(org.id, "queued")) == ["error", "recorded", "recorded"]
    assert sorted(e.name for e in _events(org.id)) == ["appointment.booked", "patient.discharged"]
    listed = client.get("/api/v1/ehr/messages", headers=key, params={"status": "error"}).json()
    assert [m["reason_code"] for m in listed] == ["fhir_fetch_invalid"]


def test_a_fetch_that_fails_transiently_is_retried_with_backoff_until_the_server_recovers(
        db, org, sender, client, app, make_user, delivery_queue, loopback_http):
    """The EHR is down (nothing listens), then overloaded (503 with Retry-After), then back: the
    reference stays ``queued`` with the reason, the attempt and its next time (API and page), each
    failed attempt is audited and scheduled again in the queue (ids only) on the backoff, a task
    lost on the way is queued again by the sweep, and the resource is recorded once it can be
    read. A server that never recovers ends in the error queue after FETCH_ATTEMPTS attempts."""
    from datetime import datetime, timedelta

    from carepost.audit.models import AuditEvent
    from carepost.core import clock
    from carepost.core.queue import huey
    from carepost.ehr.fhir_fetch import FETCH_ATTEMPTS, due_fetches, run_fetch
    from carepost.ehr.tasks import fetch_due

    _patient(org.id, source="Patient/pat-77")
    key = {**FHIR, **sender.key("phi:write", "phi:read_masked")}
    peer = EhrPeer()  # not started yet: the EHR is down
    _configure(org.id, peer)
    peer.resources["Appointment/apt-90"] = appointment(rid="apt-90")
    assert client.post("/api/v1/fhir/subscription-notification", headers=key,
                       json=_id_only("Appointment/apt-90")).status_code == 200
    [row] = _rows(org.id, "queued")
    huey.flush()  # the notification's task, as if lost; the sweep must find the row again

    def listed() -> dict:
        [out] = [m for m in client.get("/api/v1/ehr/messages", headers=key, params={"status": "queued"}).json()
                 if m["id"] == row.id]
        return out

    def scheduled() -> list[tuple]:  # a task scheduled ahead waits in the queue with its eta
        return [(t.name.rsplit(".", 1)[-1], t.args, t.eta is not None) for t in huey.pending() + huey.scheduled()]

    assert run_fetch(org.id, row.id) == "queued"
    first = listed()
    assert (first["reason_code"], first["field"], first["attempts"]) == ("fhir_token_unreachable", "token_url", 2)
    assert "Attempt 1 of 8 failed" in first["reason"]
    due = datetime.fromisoformat(first["next_attempt_at"])
    assert timedelta(seconds=26) < due - clock.now() < timedelta(seconds=34)  # 30 s ± 10 %
    assert scheduled() == [("fetch_id_only", (org.id, row.id), True)]  # ids only, not before it is due
    assert run_fetch(org.id, row.id) == "queued" and listed()["attempts"] == 2  # not due yet: left alone
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://localhost:8000") as browser:  # the error queue page, signed in
        login_client(browser, make_user(org, role="care_team"))
        page = browser.get("/app/ehr/messages", params={"status": "queued"})
        assert page.status_code == 200 and "fhir_token_unreachable" in page.text, page.text
        assert "next attempt" in page.text and "Attempt 1 of 8 failed" in page.text
    with peer:
        peer.fail_reads = [(503, {"Retry-After": "600"})]
        clock.advance(timedelta(seconds=35))
        assert run_fetch(org.id, row.id) == "queued"
        second = listed()
        assert (second["reason_code"], second["attempts"]) == ("fhir_fetch_failed", 3)
        assert "HTTP 503" in second["reason"] and "Attempt 2 of 8" in second["reason"]
        due = datetime.fromisoformat(second["next_attempt_at"])
        assert timedelta(seconds=599) < due - clock.now() <= timedelta(seconds=601)  # Retry-After beats 60 s
        huey.flush()  # lost again
        assert due_fetches_now(due_fetches) == []  # not overdue yet
        clock.advance(timedelta(minutes=13))
        assert due_fetches_now(due_fetches) == [(org.id, row.id)]
        fetch_due.call_local()  # the sweep queues it again
        assert [t.args for t in huey.pending() if t.name.endswith("fetch_id_only")] == [(org.id, row.id)]
        assert run_fetch(org.id, row.id) == "recorded"
        assert peer.reads == ["Appointment/apt-90", "Appointment/apt-90"]
        # A server that does not recover: FETCH_ATTEMPTS attempts, then the error queue.
        peer.resources["Encounter/enc-91"] = encounter(rid="enc-91")
        client.post("/api/v1/fhir/subscription-notification", headers=key, json=_id_only("Encounter/enc-91"))
        [stuck] = _rows(org.id, "queued")
        peer.fail_reads = [(500, {})] * FETCH_ATTEMPTS
        statuses = []
        for _ in range(FETCH_ATTEMPTS):
            statuses.append(run_fetch(org.id, stuck.id))
            clock.advance(timedelta(hours=2))
        assert statuses == ["queued"] * (FETCH_ATTEMPTS - 1) + ["error"]
        [gave_up] = [m for m in client.get("/api/v1/ehr/messages", headers=key).json() if m["id"] == stuck.id]
        assert gave_up["reason_code"] == "fhir_fetch_failed" and gave_up["next_attempt_at"] is None
        assert f"Gave up after {FETCH_ATTEMPTS} attempts" in gave_up["reason"]
        # Retried by hand once the EHR is fixed: a new round, recorded.
        assert client.post(f"/api/v1/ehr/messages/{stuck.id}/retry", headers=key).json()["messages"][0]["attempts"] == 1
        assert run_fetch(org.id, stuck.id) == "recorded"
    assert sorted(e.name for e in _events(org.id)) == ["appointment.booked", "patient.discharged"]
    with read_only_session(org.id) as s:
        trail = s.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id,
                                                   AuditEvent.action == "ehr_message.fetch_failed")
                          .order_by(AuditEvent.occurred_at)).all()
    assert [(a.target_id, a.details["reason"], a.details["attempt"]) for a in trail[:2]] == [
        (row.id, "fhir_token_unreachable", 1), (row.id, "fhir_fetch_failed", 2)]
    assert len(trail) == 2 + FETCH_ATTEMPTS - 1 and all(a.outcome == "failure" for a in trail)
    assert all("apt-90" not in str(a.details) and "pat-77" not in str(a.details) for a in trail)


def due_fetches_now(due_fetches) -> list[tuple[str, str]]:
    from carepost.core.database import system_session

    with system_session() as session:
        return due_fetches(session)


def test_fhir_server_settings_bad_input(db, org, client, make_user, sender, loopback_http):
    from typer.testing import CliRunner

    from carepost.cli import app

    admin = {"X-CSRF-Token": login_client(client, make_user(org, role="developer"))}
    good = {"base_url": "https://ehr.example/fhir/", "token_url": "https://ehr.example/oauth2/token",
            "client_id": "carepost-app"}
    assert client.get("/api/v1/ehr/fhir-server", headers=admin).status_code == 404
    for field, value in (("base_url", "http://ehr.example/fhir"), ("token_url", "ftp://ehr.example/token"),
                         ("base_url", "https://user:pw@ehr.example/fhir"), ("client_id", " ")):
        r = client.put("/api/v1/ehr/fhir-server", headers=admin, json={**good, field: value})
        assert r.status_code == 422 and field in r.text, (field, r.text)
    r = client.put("/api/v1/ehr/fhir-server", headers=admin, json={**good, "algorithm": "HS256"})
    assert r.status_code == 422 and "algorithm" in r.text
    r = client.put("/api/v1/ehr/fhir-server", headers=admin, json=good)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["base_url"] == "https://ehr.example/fhir" and out["algorithm"] == "ES384"
    assert set(out["jwks"]["keys"][0]) >= {"kty", "crv", "x", "y", "kid"} and "d" not in out["jwks"]["keys"][0]
    assert "PRIVATE" not in r.text
    kid = out["key_id"]
    same = client.put("/api/v1/ehr/fhir-server", headers=admin, json={**good, "client_id": "renamed"}).json()
    assert same["key_id"] == kid  # the key stays unless asked
    rsa = client.put("/api/v1/ehr/fhir-server", headers=admin, json={**good, "algorithm": "RS384"}).json()
    assert rsa["jwks"]["keys"][0]["kty"] == "RSA" and rsa["key_id"] != kid
    # A malformed id-only notification is refused naming the element; nothing is queued.
    key = {**FHIR, **sender.key("phi:write")}
    bad = client.post("/api/v1/fhir/subscription-notification", headers=key,
                      json=_notification(_backport_status(), {"fullUrl": "not a reference"}))
    assert bad.status_code == 422 and bad.json()["issue"][0]["expression"] == ["Bundle.entry[1].fullUrl"]
    assert _rows(org.id) == []
    # http to a loopback address only with the explicit setting.
    from carepost.core.config import reset_settings

    loop = {**good, "base_url": "http://127.0.0.1:9/fhir"}
    assert client.put("/api/v1/ehr/fhir-server", headers=admin, json=loop).status_code == 200
    import os

    os.environ.pop("CAREPOST_EHR_FHIR_ALLOW_LOOPBACK_HTTP")
    reset_settings()
    try:
        r = client.put("/api/v1/ehr/fhir-server", headers=admin, json=loop)
        assert r.status_code == 422 and "base_url" in r.text and "https" in r.text
        wrong = CliRunner().invoke(app, ["ehr", "fhir-server", "--org", org.id, "--base-url", "http://ehr.example",
                                         "--token-url", "https://ehr.example/token", "--client-id", "x"])
        assert wrong.exit_code == 2 and "base_url" in wrong.output
    finally:
        os.environ["CAREPOST_EHR_FHIR_ALLOW_LOOPBACK_HTTP"] = "true"
        reset_settings()
    assert client.delete("/api/v1/ehr/fhir-server", headers=admin).status_code == 204
    assert client.get("/api/v1/ehr/fhir-server", headers=admin).status_code == 404
