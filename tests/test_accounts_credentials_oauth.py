"""OAuth 2.0 client credentials (RFC 6749 section 4.4) and token revocation (RFC 7009)."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from carepost.accounts import credentials as creds
from carepost.accounts.models import ApiCredential, OAuthToken
from carepost.core import clock
from tests.test_accounts_credentials import audit_events, fresh, make_credential  # noqa: F401  (fixture)

TOKEN = "/api/v1/oauth/token"
REVOKE = "/api/v1/oauth/revoke"


def basic(key_id, secret):
    return {"Authorization": "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()}


def get_token(client, cred, secret, **form):
    r = client.post(TOKEN, data={"grant_type": "client_credentials", **form}, headers=basic(cred.key_id, secret))
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def test_token_happy_path_with_basic(client, session, org, make_credential):
    cred, secret = make_credential(scopes=["messages:read", "messages:send"])
    r = client.post(TOKEN, data={"grant_type": "client_credentials"}, headers=basic(cred.key_id, secret))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store" and r.headers["pragma"] == "no-cache"
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert body["scope"] == "messages:read messages:send"
    assert body["access_token"].startswith("cp_at_")
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200, me.text
    assert me.json()["auth_method"] == "oauth_token" and me.json()["credential_id"] == cred.id
    assert me.json()["scopes"] == ["messages:read", "messages:send"]
    # Stored hashed only.
    rows = fresh(session).execute(text("SELECT * FROM oauth_tokens")).mappings().all()
    assert len(rows) == 1 and body["access_token"] not in str(dict(rows[0]))
    assert rows[0]["token_hash"] == creds.hash_access_token(body["access_token"])
    issued = audit_events(session, "oauth.token_issue")
    assert len(issued) == 1 and issued[0].actor_id == cred.id and issued[0].org_id == org.id


def test_token_with_form_client_auth_and_narrowed_scope(client, make_credential):
    cred, secret = make_credential(scopes=["messages:read", "messages:send"])
    r = client.post(TOKEN, data={"grant_type": "client_credentials", "client_id": cred.key_id, "client_secret": secret,
                                 "scope": "messages:read"})
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "messages:read"
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {r.json()['access_token']}"}).json()
    assert me["scopes"] == ["messages:read"]


def _error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    assert isinstance(body["error_description"], str)
    assert r.headers["cache-control"] == "no-store"
    return body


def test_invalid_client_wrong_secret_unknown_key_and_missing(client, session, org, make_credential):
    cred, secret = make_credential()
    r = client.post(TOKEN, data={"grant_type": "client_credentials"}, headers=basic(cred.key_id, creds.generate_secret()))
    _error(r, 401, "invalid_client")
    assert r.headers["www-authenticate"].startswith("Basic")
    r = client.post(TOKEN, data={"grant_type": "client_credentials"}, headers=basic(creds.generate_key_id(), secret))
    _error(r, 401, "invalid_client")
    r = client.post(TOKEN, data={"grant_type": "client_credentials"})
    _error(r, 401, "invalid_client")
    assert "www-authenticate" in r.headers
    r = client.post(TOKEN, data={"grant_type": "client_credentials", "client_id": cred.key_id})
    _error(r, 401, "invalid_client")
    r = client.post(TOKEN, data={"grant_type": "client_credentials"}, headers={"Authorization": "Basic %%%"})
    _error(r, 401, "invalid_client")
    failures = audit_events(session, "oauth.client_auth_failed")
    reasons = sorted(e.details["reason"] for e in failures)
    assert reasons == ["unknown_key", "wrong_secret"]
    wrong = next(e for e in failures if e.details["reason"] == "wrong_secret")
    assert wrong.org_id == org.id and wrong.actor_id == cred.id
    assert fresh(session).scalars(select(OAuthToken)).all() == []


def test_invalid_request_cases(client, make_credential):
    cred, secret = make_credential()
    # grant_type missing
    _error(client.post(TOKEN, data={}, headers=basic(cred.key_id, secret)), 400, "invalid_request")
    # a parameter repeated
    r = client.post(TOKEN, content="grant_type=client_credentials&grant_type=client_credentials",
                    headers={**basic(cred.key_id, secret), "Content-Type": "application/x-www-form-urlencoded"})
    _error(r, 400, "invalid_request")
    # two client authentication methods at once
    r = client.post(TOKEN, data={"grant_type": "client_credentials", "client_secret": secret}, headers=basic(cred.key_id, secret))
    _error(r, 400, "invalid_request")
    # not form-encoded
    r = client.post(TOKEN, json={"grant_type": "client_credentials"}, headers=basic(cred.key_id, secret))
    _error(r, 400, "invalid_request")


def test_unsupported_grant_type(client, make_credential):
    cred, secret = make_credential()
    r = client.post(TOKEN, data={"grant_type": "password", "username": "x", "password": "y"}, headers=basic(cred.key_id, secret))
    _error(r, 400, "unsupported_grant_type")


def test_invalid_scope(client, make_credential):
    cred, secret = make_credential(scopes=["messages:read"])
    r = client.post(TOKEN, data={"grant_type": "client_credentials", "scope": "messages:read phi:read_unmasked"},
                    headers=basic(cred.key_id, secret))
    _error(r, 400, "invalid_scope")
    r = client.post(TOKEN, data={"grant_type": "client_credentials", "scope": "messages:read  "},
                    headers=basic(cred.key_id, secret))
    assert r.status_code == 200  # trailing whitespace is not a scope
    r = client.post(TOKEN, data={"grant_type": "client_credentials", "scope": "a\"b"}, headers=basic(cred.key_id, secret))
    _error(r, 400, "invalid_scope")


@pytest.mark.parametrize("state", ["expired", "revoked"])
def test_invalid_grant_for_expired_or_revoked_credential(client, session, make_credential, state):
    cred, secret = make_credential(expires_in_days=1)
    if state == "expired":
        clock.advance(timedelta(days=2))
    else:
        creds.revoke_credential(session, session.get(ApiCredential, cred.id))
        session.commit()
    r = client.post(TOKEN, data={"grant_type": "client_credentials"}, headers=basic(cred.key_id, secret))
    _error(r, 400, "invalid_grant")
    assert [e.details["reason"] for e in audit_events(session, "oauth.client_auth_failed")] == [state]


def test_token_expires(client, make_credential):
    cred, secret = make_credential()
    token = get_token(client, cred, secret)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    clock.advance(timedelta(seconds=901))
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def test_token_revocation_rfc7009(client, session, make_credential):
    cred, secret = make_credential()
    other, other_secret = make_credential(name="Other")
    token = get_token(client, cred, secret)
    headers = {"Authorization": f"Bearer {token}"}
    # Another client cannot revoke it; the answer does not tell.
    r = client.post(REVOKE, data={"token": token}, headers=basic(other.key_id, other_secret))
    assert r.status_code == 200
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    # Unknown tokens: 200, nothing happens.
    assert client.post(REVOKE, data={"token": "cp_at_" + "x" * 43}, headers=basic(cred.key_id, secret)).status_code == 200
    # Missing token, bad client, API secret offered as a token.
    _error(client.post(REVOKE, data={}, headers=basic(cred.key_id, secret)), 400, "invalid_request")
    _error(client.post(REVOKE, data={"token": token}, headers=basic(cred.key_id, other_secret)), 401, "invalid_client")
    _error(client.post(REVOKE, data={"token": secret}, headers=basic(cred.key_id, secret)), 400, "unsupported_token_type")
    # The owner revokes it (an unknown hint is ignored).
    r = client.post(REVOKE, data={"token": token, "token_type_hint": "whatever"}, headers=basic(cred.key_id, secret))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert client.get("/api/v1/me", headers=headers).status_code == 401
    assert len(audit_events(session, "oauth.token_revoke")) == 1


def test_revoking_the_credential_revokes_its_tokens(client, session, make_credential):
    cred, secret = make_credential()
    token = get_token(client, cred, secret)
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    fresh(session)
    assert creds.revoke_credential(session, session.get(ApiCredential, cred.id)) == 1
    session.commit()
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    row = fresh(session).scalars(select(OAuthToken)).one()
    assert row.revoked_at is not None


def test_token_scopes_follow_a_narrowed_credential(client, session, make_credential):
    cred, secret = make_credential(scopes=["messages:read", "messages:send"])
    token = get_token(client, cred, secret)
    fresh(session).get(ApiCredential, cred.id).scopes = ["messages:read"]
    session.commit()
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me["scopes"] == ["messages:read"]


def test_malformed_and_unknown_bearer_tokens(client, session, make_credential):
    make_credential()
    for value in ("Bearer cp_at_short", "Bearer cp_at_" + "y" * 43, "Bearer ", "Bearer a.b.c"):
        r = client.get("/api/v1/me", headers={"Authorization": value})
        assert r.status_code == 401, value
    reasons = sorted(e.details["reason"] for e in audit_events(session, "api_credential.auth_failed"))
    assert reasons == ["malformed", "malformed", "malformed", "unknown_token"]
