"""HMAC-signed requests: signature over method, path, query, body hash, timestamp and nonce."""

from __future__ import annotations

import json
import os
import secrets
from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.accounts import credentials as creds
from carepost.accounts.models import RequestNonce
from carepost.core import clock
from tests.test_accounts_credentials import audit_events, fresh, make_credential  # noqa: F401  (fixture)


def signed(cred, secret, method, path, query="", body=b"", **kw):
    return {"Authorization": creds.sign_request(cred.key_id, secret, method, path, query, body, **kw)}


def test_signed_get_is_accepted(client, make_credential):
    cred, secret = make_credential(scopes=["messages:read"])
    r = client.get("/api/v1/me", headers=signed(cred, secret, "GET", "/api/v1/me"))
    assert r.status_code == 200, r.text
    assert r.json()["auth_method"] == "hmac" and r.json()["credential_id"] == cred.id


def test_signed_request_with_query_and_body(client, session, org, make_user, make_credential):
    """A signed POST with a JSON body and a query string reaches the route intact."""
    cred, secret = make_credential(scopes=["messages:read"])
    body = json.dumps({"name": "x"}).encode()
    query = "b=2&a=1&a=0&empty="
    r = client.post(f"/api/v1/api-credentials?{query}", content=body,
                    headers={**signed(cred, secret, "POST", "/api/v1/api-credentials", query, body), "Content-Type": "application/json"})
    # Authenticated (the signature covered the body) but credentials cannot manage credentials.
    assert r.status_code == 403, r.text


def test_canonical_query_is_order_independent():
    assert creds.canonical_query("b=2&a=1&a=0") == creds.canonical_query("a=0&b=2&a=1") == "a=0&a=1&b=2"
    assert creds.canonical_query("q=a%20b&x=") == "q=a%20b&x="
    assert creds.canonical_query("q=a+b") == "q=a%20b"
    assert creds.canonical_path("/api/v1/x%2Fy") == "/api/v1/x/y"


@pytest.mark.parametrize("tamper", [None, "body", "path", "query", "method", "signature", "other_secret", "timestamp", "nonce"])
def test_tampered_requests_are_refused(client, session, make_credential, tamper):
    """POST /api/v1/api-credentials answers 403 to an authenticated credential (it cannot manage
    credentials) and 401 when the signature does not match what was sent."""
    cred, secret = make_credential()
    body = b'{"name": "x"}'
    ts = int(clock.now().timestamp())
    header = creds.sign_request(cred.key_id, secret, "POST", "/api/v1/api-credentials", "x=1", body, timestamp=ts,
                                nonce="n" * 20)
    method, path, query, sent_body = "POST", "/api/v1/api-credentials", "x=1", body
    if tamper == "body":
        sent_body = b'{"name": "y"}'
    elif tamper == "path":
        path = "/api/v1/users"
    elif tamper == "query":
        query = "x=2"
    elif tamper == "method":
        method = "GET"
    elif tamper == "signature":
        header = header[:-6] + ("AAAA==" if not header.endswith("AAAA==") else "BBBB==")
    elif tamper == "other_secret":
        header = creds.sign_request(cred.key_id, creds.generate_secret(), method, path, query, body, timestamp=ts)
    elif tamper == "timestamp":
        header = header.replace(f"Timestamp={ts}", f"Timestamp={ts + 1}")
    elif tamper == "nonce":
        header = header.replace("Nonce=" + "n" * 20, "Nonce=" + "m" * 20)
    r = client.request(method, f"{path}?{query}", content=sent_body,
                       headers={"Authorization": header, "Content-Type": "application/json"})
    if tamper is None:
        assert r.status_code == 403, r.text  # authenticated; refused for want of the permission
        assert audit_events(session, "api_credential.auth_failed") == []
        return
    assert r.status_code == 401, r.text
    events = audit_events(session, "api_credential.auth_failed")
    assert [e.details["reason"] for e in events] == ["bad_signature"]
    assert events[0].actor_id == cred.id


def test_signed_request_to_the_web_ui_is_refused(client, session, make_credential):
    """The web UI (/app) is for people: a credential, even correctly signed, is not accepted there."""
    cred, secret = make_credential()
    body = b"name=x"
    header = creds.sign_request(cred.key_id, secret, "POST", "/app/api-credentials", "", body)
    r = client.post("/app/api-credentials", content=body,
                    headers={"Authorization": header, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 401
    denied = audit_events(session, "access.denied")
    assert [e.details["reason"] for e in denied] == ["unauthenticated"]


def test_tampered_body_on_a_real_route(client, session, make_credential):
    """The body of a route that parses JSON is the same bytes the signature covers."""
    cred, secret = make_credential()
    body = b'{"name": "x"}'
    header = creds.sign_request(cred.key_id, secret, "POST", "/api/v1/api-credentials", "", body)
    r = client.post("/api/v1/api-credentials", content=b'{"name": "y"}',
                    headers={"Authorization": header, "Content-Type": "application/json"})
    assert r.status_code == 401
    assert [e.details["reason"] for e in audit_events(session, "api_credential.auth_failed")] == ["bad_signature"]


@pytest.mark.parametrize("offset", [-301, 301, 3600])
def test_stale_timestamp_is_refused(client, session, make_credential, offset):
    cred, secret = make_credential()
    ts = int(clock.now().timestamp()) + offset
    r = client.get("/api/v1/me", headers=signed(cred, secret, "GET", "/api/v1/me", timestamp=ts))
    assert r.status_code == 401
    assert [e.details["reason"] for e in audit_events(session, "api_credential.auth_failed")] == ["stale_timestamp"]


def test_timestamp_within_tolerance_is_accepted(client, make_credential):
    cred, secret = make_credential()
    ts = int(clock.now().timestamp()) - 290
    assert client.get("/api/v1/me", headers=signed(cred, secret, "GET", "/api/v1/me", timestamp=ts)).status_code == 200


def test_replayed_nonce_is_refused(client, session, make_credential):
    cred, secret = make_credential()
    headers = signed(cred, secret, "GET", "/api/v1/me")
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    r = client.get("/api/v1/me", headers=headers)
    assert r.status_code == 401
    assert [e.details["reason"] for e in audit_events(session, "api_credential.auth_failed")] == ["replayed_nonce"]
    # The same nonce with a new timestamp (a fresh signature) is still a replay.
    nonce = headers["Authorization"].split("Nonce=")[1].split(",")[0]
    again = signed(cred, secret, "GET", "/api/v1/me", timestamp=int(clock.now().timestamp()) + 1, nonce=nonce)
    assert client.get("/api/v1/me", headers=again).status_code == 401
    # A fresh nonce works.
    assert client.get("/api/v1/me", headers=signed(cred, secret, "GET", "/api/v1/me")).status_code == 200
    # Nonces are remembered in the database (no Redis configured here) and forgotten after the window.
    assert len(fresh(session).scalars(select(RequestNonce)).all()) == 2
    clock.advance(timedelta(seconds=700))
    assert client.get("/api/v1/me", headers=signed(cred, secret, "GET", "/api/v1/me")).status_code == 200
    assert len(fresh(session).scalars(select(RequestNonce)).all()) == 1


def test_nonce_replay_with_redis(client, session, make_credential, monkeypatch):
    import redis

    from carepost.accounts.ratelimit import reset_limiter
    from carepost.core.config import reset_settings

    url = os.environ.get("CAREPOST_TEST_REDIS_URL", "redis://127.0.0.1:6379/1")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        if os.environ.get("CAREPOST_TEST_REDIS_URL"):
            raise
        pytest.skip("Redis not reachable and CAREPOST_TEST_REDIS_URL not set")
    monkeypatch.setenv("CAREPOST_REDIS_URL", url)
    reset_settings()
    reset_limiter()
    try:
        cred, secret = make_credential()
        headers = signed(cred, secret, "GET", "/api/v1/me", nonce=secrets.token_urlsafe(18))
        assert client.get("/api/v1/me", headers=headers).status_code == 200
        assert client.get("/api/v1/me", headers=headers).status_code == 401
        assert fresh(session).scalars(select(RequestNonce)).all() == []  # kept in Redis, not the database
        client_ = redis.Redis.from_url(url)
        assert client_.exists(f"carepost:nonce:{cred.id}:{headers['Authorization'].split('Nonce=')[1].split(',')[0]}")
        assert 0 < client_.pttl(f"carepost:nonce:{cred.id}:{headers['Authorization'].split('Nonce=')[1].split(',')[0]}") <= 302_000
    finally:
        monkeypatch.delenv("CAREPOST_REDIS_URL")
        reset_settings()
        reset_limiter()


@pytest.mark.parametrize(
    "header",
    [
        "CarePost-HMAC-SHA256 Credential=cpk_x, Timestamp=1, Nonce=abcdefghijklmnop, Signature=AAAA",
        "CarePost-HMAC-SHA256 Credential={key}, Timestamp=now, Nonce=abcdefghijklmnop, Signature=AAAA",
        "CarePost-HMAC-SHA256 Credential={key}, Timestamp=1, Nonce=short, Signature=AAAA",
        "CarePost-HMAC-SHA256 Credential={key}, Timestamp=1, Nonce=abcdefghijklmnop",
        "CarePost-HMAC-SHA256 Credential={key}, Credential={key}, Timestamp=1, Nonce=abcdefghijklmnop, Signature=AAAA",
        "CarePost-HMAC-SHA256 garbage",
    ],
)
def test_malformed_hmac_headers(client, session, make_credential, header):
    cred, _ = make_credential()
    r = client.get("/api/v1/me", headers={"Authorization": header.format(key=cred.key_id)})
    assert r.status_code == 401
    assert [e.details["reason"] for e in audit_events(session, "api_credential.auth_failed")] == ["malformed"]


def test_revoked_and_expired_credentials_cannot_sign(client, session, make_credential):
    from carepost.accounts.models import ApiCredential

    cred, secret = make_credential(expires_in_days=1)
    clock.advance(timedelta(days=2))
    assert client.get("/api/v1/me", headers=signed(cred, secret, "GET", "/api/v1/me")).status_code == 401
    clock.reset()
    creds.revoke_credential(session, fresh(session).get(ApiCredential, cred.id))
    session.commit()
    assert client.get("/api/v1/me", headers=signed(cred, secret, "GET", "/api/v1/me")).status_code == 401
    assert sorted(e.details["reason"] for e in audit_events(session, "api_credential.auth_failed")) == ["expired", "revoked"]
