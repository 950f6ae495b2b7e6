"""Managing API credentials: REST API, web pages (TestClient) and the ``carepost apikey`` CLI."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from carepost.accounts.models import ApiCredential
from carepost.audit.models import AuditEvent
from tests.fixtures.accounts import csrf_from, login_client
from tests.test_accounts_credentials import audit_events, bearer, fresh


@pytest.fixture
def owner_client(client, org, make_user):
    user = make_user(org, role="owner")
    csrf = login_client(client, user)
    client.headers["X-CSRF-Token"] = csrf
    client.user = user
    return client


# --------------------------------------------------------------------------- REST API


def test_create_list_get_revoke_via_api(owner_client, session, org):
    client = owner_client
    r = client.post("/api/v1/api-credentials", json={"name": "Billing sync", "scopes": ["messages:read", "phi:write"],
                                                     "expires_in_days": 30, "sandbox": True})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["key_id"].startswith("cpk_") and created["secret"].startswith("cp_sk_")
    assert created["token"] == f"{created['key_id']}.{created['secret']}"
    assert created["scopes"] == ["messages:read", "phi:write"] and created["sandbox"] is True
    assert created["status"] == "active" and created["expires_at"] and created["created_by"] == client.user.id

    # The secret works, once shown it is never shown again.
    api = {"Authorization": f"Bearer {created['token']}"}
    me = client.get("/api/v1/me", headers=api)
    assert me.status_code == 200 and me.json()["sandbox"] is True
    listing = client.get("/api/v1/api-credentials")
    assert listing.status_code == 200
    assert [c["key_id"] for c in listing.json()["items"]] == [created["key_id"]]
    assert created["secret"] not in listing.text and "secret" not in listing.json()["items"][0]
    one = client.get(f"/api/v1/api-credentials/{created['id']}")
    assert one.status_code == 200 and one.json()["last_used_at"] is not None and created["secret"] not in one.text

    r = client.delete(f"/api/v1/api-credentials/{created['id']}")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert client.get("/api/v1/me", headers=api).status_code == 401

    created_event = audit_events(session, "api_credential.create")
    revoked_event = audit_events(session, "api_credential.revoke")
    assert len(created_event) == 1 and len(revoked_event) == 1
    for event in created_event + revoked_event:
        assert event.actor_type == "user" and event.actor_id == client.user.id
        assert event.target_id == created["id"] and event.org_id == org.id
        assert created["secret"] not in str(event.details)


def test_scopes_never_exceed_the_creator(client, org, make_user):
    developer = make_user(org, role="developer")  # holds apikeys:manage but not audit:read
    client.headers["X-CSRF-Token"] = login_client(client, developer)
    r = client.post("/api/v1/api-credentials", json={"name": "x", "scopes": ["messages:send", "audit:read"]})
    assert r.status_code == 403
    assert r.json()["error"]["field"] == "scopes" and "audit:read" in r.json()["error"]["message"]
    r = client.post("/api/v1/api-credentials", json={"name": "x", "scopes": ["messages:send"]})
    assert r.status_code == 201


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "x", "scopes": ["not:a-scope"]}, "scopes"),
        ({"name": "x", "scopes": ["users:manage"]}, "scopes"),  # a permission, but never an API scope
        ({"name": "", "scopes": []}, "name"),
        ({"name": "x", "expires_in_days": 0}, "expires_in_days"),
        ({"name": "x", "rate_limit_per_minute": -1}, "rate_limit_per_minute"),
        ({"name": "x", "unexpected": 1}, "unexpected"),
        ({"scopes": []}, "name"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(owner_client, session, body, field):
    r = owner_client.post("/api/v1/api-credentials", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert fresh(session).scalars(select(ApiCredential)).all() == []


def test_malformed_json_is_a_clear_422(owner_client):
    r = owner_client.post("/api/v1/api-credentials", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert "{not json" not in r.text


def test_unknown_credential_is_404(owner_client):
    assert owner_client.get("/api/v1/api-credentials/" + "0" * 32).status_code == 404
    assert owner_client.delete("/api/v1/api-credentials/" + "0" * 32).status_code == 404


def test_managing_needs_the_permission(client, org, make_user):
    analyst = make_user(org, role="analyst")
    client.headers["X-CSRF-Token"] = login_client(client, analyst)
    assert client.get("/api/v1/api-credentials").status_code == 403
    assert client.post("/api/v1/api-credentials", json={"name": "x"}).status_code == 403
    assert client.get("/app/api-credentials", headers={"Accept": "text/html"}).status_code == 403


def test_cookie_requests_need_csrf(owner_client, session):
    del owner_client.headers["X-CSRF-Token"]
    r = owner_client.post("/api/v1/api-credentials", json={"name": "x"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    assert fresh(session).scalars(select(ApiCredential)).all() == []


def test_anonymous_is_401(client, db):
    assert client.get("/api/v1/api-credentials").status_code == 401
    assert client.get("/api/v1/me").status_code == 401


def test_me_for_a_signed_in_person(owner_client, org):
    body = owner_client.get("/api/v1/me").json()
    assert body["kind"] == "user" and body["user_id"] == owner_client.user.id and body["org_slug"] == org.slug
    assert "apikeys:manage" in body["scopes"] and body["auth_method"] == "session"


def test_openapi_documents_the_routes(client, db):
    doc = client.get("/api/v1/openapi.json").json()
    for path in ("/api/v1/me", "/api/v1/api-credentials", "/api/v1/api-credentials/{credential_id}",
                 "/api/v1/oauth/token", "/api/v1/oauth/revoke"):
        assert path in doc["paths"], path
    token_body = doc["paths"]["/api/v1/oauth/token"]["post"]["requestBody"]["content"]
    assert "application/x-www-form-urlencoded" in token_body


# --------------------------------------------------------------------------- web pages


def test_ui_create_shows_secret_once_and_revokes(owner_client, session):
    client = owner_client
    page = client.get("/app/api-credentials", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "Create a credential" in page.text
    csrf = csrf_from(page.text)
    r = client.post("/app/api-credentials", data={"csrf_token": csrf, "name": "Portal sync", "scopes": ["messages:read", "phi:read_masked"],
                                                  "expires_in_days": "90", "sandbox": "1"}, headers={"Accept": "text/html"})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    secret = re.search(r'id="created-secret"[^>]*>(cp_sk_[A-Za-z0-9_\-]+)<', r.text).group(1)
    cred = fresh(session).scalars(select(ApiCredential)).one()
    assert cred.sandbox and cred.scopes == ["messages:read", "phi:read_masked"] and cred.expires_at is not None
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
    again = client.get("/app/api-credentials", headers={"Accept": "text/html"})
    assert secret not in again.text and cred.key_id in again.text
    assert 'data-confirm="Revoke' in again.text
    r = client.post(f"/app/api-credentials/{cred.id}/revoke", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app/api-credentials"
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 401
    assert ">revoked<" in client.get("/app/api-credentials", headers={"Accept": "text/html"}).text


def test_ui_errors_are_shown_next_to_the_field(owner_client, session):
    page = owner_client.get("/app/api-credentials", headers={"Accept": "text/html"})
    r = owner_client.post("/app/api-credentials", data={"csrf_token": csrf_from(page.text), "name": "", "scopes": ["messages:read"]},
                          headers={"Accept": "text/html"})
    assert r.status_code == 422
    assert 'id="name-error"' in r.text
    assert fresh(session).scalars(select(ApiCredential)).all() == []


def test_ui_revoke_needs_csrf(owner_client, session, org):
    from carepost.accounts import credentials as creds

    cred, _ = creds.create_credential(session, org.id, name="k", scopes=[])
    session.commit()
    del owner_client.headers["X-CSRF-Token"]
    r = owner_client.post(f"/app/api-credentials/{cred.id}/revoke", data={}, follow_redirects=False)
    assert r.status_code == 403
    assert fresh(session).get(ApiCredential, cred.id).revoked_at is None


# --------------------------------------------------------------------------- CLI


class _Runner:
    """The CLI in-process. Its logging setup binds the runner's stderr, which is closed after
    each invocation, so logging is put back after every call."""

    def invoke(self, app, args):
        from carepost.core.logging import configure_logging

        try:
            return CliRunner().invoke(app, args)
        finally:
            configure_logging("INFO", True)


@pytest.fixture
def runner():
    return _Runner()


def test_cli_create_list_revoke(client, session, org, runner):
    from carepost.cli import app as cli_app

    session.rollback()
    result = runner.invoke(cli_app, ["apikey", "create", "--org", org.slug, "--name", "Lab feed", "--scope", "messages:read",
                                     "--scope", "phi:write", "--expires-days", "7", "--sandbox"])
    assert result.exit_code == 0, result.output
    secret = re.search(r"secret:\s+(cp_sk_\S+)", result.output).group(1)
    key_id = re.search(r"key id:\s+(cpk_\S+)", result.output).group(1)
    cred = fresh(session).scalars(select(ApiCredential)).one()
    assert cred.key_id == key_id and cred.scopes == ["messages:read", "phi:write"] and cred.sandbox and cred.created_by == "cli"
    session.rollback()
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200

    listing = runner.invoke(cli_app, ["apikey", "list", "--org", org.slug])
    assert listing.exit_code == 0 and key_id in listing.output and secret not in listing.output

    revoked = runner.invoke(cli_app, ["apikey", "revoke", "--org", org.slug, key_id])
    assert revoked.exit_code == 0, revoked.output
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 401
    events = fresh(session).scalars(select(AuditEvent).where(AuditEvent.action.like("api_credential.%"))).all()
    assert {e.action for e in events} >= {"api_credential.create", "api_credential.revoke"}
    assert all(e.actor_id == "cli" for e in events if e.action != "api_credential.auth_failed")


def test_cli_errors(session, org, runner):
    from carepost.cli import app as cli_app

    session.rollback()
    bad_scope = runner.invoke(cli_app, ["apikey", "create", "--org", org.slug, "--name", "x", "--scope", "nope"])
    assert bad_scope.exit_code == 1 and "scopes" in bad_scope.output
    no_org = runner.invoke(cli_app, ["apikey", "list", "--org", "no-such-org"])
    assert no_org.exit_code == 1
    unknown = runner.invoke(cli_app, ["apikey", "revoke", "--org", org.slug, "cpk_000000000000000000000000"])
    assert unknown.exit_code == 1
    assert fresh(session).scalars(select(ApiCredential)).all() == []
