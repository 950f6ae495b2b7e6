"""Issue 9 item 6: API keys no longer outlive their creator or live forever.

* keys of a person removed from the organization are revoked;
* keys whose scopes exceed a demoted creator's role are suspended (and resume when the role
  covers them again);
* new keys expire by default (CAREPOST_API_KEY_EXPIRY_DAYS, one year) with a warning 30 days
  before: ``expires_soon`` in the API, a badge in the UI and a ``doctor`` finding.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.core import clock
from tests.fixtures.accounts import login_client


def _key(client, csrf, scopes, **extra):
    r = client.post("/api/v1/api-credentials", json={"name": "Integration", "scopes": scopes, **extra},
                    headers={"x-csrf-token": csrf})
    assert r.status_code == 201, r.text
    return r.json()


def _bearer(body):
    return {"Authorization": f"Bearer {body['token']}"}


def _actions(session, org_id, action):
    session.rollback()
    session.expire_all()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.action == action)
                                .order_by(AuditEvent.seq)))


def test_keys_of_a_removed_person_are_revoked(client, app, org, make_user, session):
    from fastapi.testclient import TestClient

    owner = make_user(org, role="owner")
    developer = make_user(org, role="developer")
    dev_client = TestClient(app)
    key = _key(dev_client, login_client(dev_client, developer), ["messages:read"])
    api = TestClient(app)
    assert api.get("/api/v1/me", headers=_bearer(key)).status_code == 200
    owner_csrf = login_client(client, owner)
    assert client.delete(f"/api/v1/users/{developer.id}", headers={"x-csrf-token": owner_csrf}).status_code == 204
    assert api.get("/api/v1/me", headers=_bearer(key)).status_code == 401
    assert client.get(f"/api/v1/api-credentials/{key['id']}").json()["status"] == "revoked"
    [event] = _actions(session, org.id, "api_credential.revoke")
    assert event.target_id == key["id"] and event.details == {"reason": "creator_removed"}


def test_keys_beyond_a_demoted_creators_role_are_suspended_then_resumed(client, app, org, make_user, session):
    from fastapi.testclient import TestClient

    owner = make_user(org, role="owner")
    admin = make_user(org, role="admin")
    admin_client = TestClient(app)
    csrf = login_client(admin_client, admin)
    wide = _key(admin_client, csrf, ["phi:read_unmasked", "messages:read"])
    narrow = _key(admin_client, csrf, ["messages:read"])
    api = TestClient(app)
    owner_csrf = login_client(client, owner)
    r = client.patch(f"/api/v1/users/{admin.id}", json={"role": "analyst"}, headers={"x-csrf-token": owner_csrf})
    assert r.status_code == 200
    assert api.get("/api/v1/me", headers=_bearer(wide)).status_code == 401  # analysts may not read unmasked PHI
    assert api.get("/api/v1/me", headers=_bearer(narrow)).status_code == 200  # within the analyst role
    view = client.get(f"/api/v1/api-credentials/{wide['id']}").json()
    assert view["status"] == "suspended" and view["suspended_at"]
    [event] = _actions(session, org.id, "api_credential.suspend")
    assert event.target_id == wide["id"] and event.details == {"reason": "creator_role_narrowed"}
    # Promoted again: the suspension lifts.
    client.patch(f"/api/v1/users/{admin.id}", json={"role": "admin"}, headers={"x-csrf-token": owner_csrf})
    assert api.get("/api/v1/me", headers=_bearer(wide)).status_code == 200
    assert _actions(session, org.id, "api_credential.resume")


def test_new_keys_expire_by_default_with_a_warning(client, org, make_user, session, monkeypatch):
    from carepost.core.config import reset_settings

    csrf = login_client(client, make_user(org, role="owner"))
    key = _key(client, csrf, ["messages:read"])
    from datetime import datetime

    expires = datetime.fromisoformat(key["expires_at"])
    assert timedelta(days=364) < expires - clock.now() <= timedelta(days=365)
    assert key["expires_soon"] is False
    monkeypatch.setenv("CAREPOST_API_KEY_EXPIRY_DAYS", "20")
    reset_settings()
    try:
        short = _key(client, csrf, ["messages:read"])
        assert short["expires_soon"] is True
        assert timedelta(days=19) < datetime.fromisoformat(short["expires_at"]) - clock.now() <= timedelta(days=20)
        page = client.get("/app/api-credentials")
        assert page.text.count('data-testid="expires-soon"') == 1
        # doctor warns about it
        from carepost.core.config import get_settings
        from carepost.doctor import check_api_credentials

        [finding] = check_api_credentials(get_settings())
        assert finding.level == "warn" and short["key_id"] in finding.message and key["key_id"] not in finding.message
        # An explicit expiry still works, within bounds; "never" is no longer offered.
        assert "never" not in page.text.split('id="cred-expiry"')[1].split("</select>")[0]
        r = client.post("/api/v1/api-credentials", json={"name": "x", "scopes": [], "expires_in_days": 0},
                        headers={"x-csrf-token": csrf})
        assert r.status_code == 422
    finally:
        monkeypatch.delenv("CAREPOST_API_KEY_EXPIRY_DAYS")
        reset_settings()
    clock.advance(timedelta(days=346))
    from carepost.core.config import get_settings
    from carepost.doctor import check_api_credentials

    [finding] = check_api_credentials(get_settings())
    assert key["key_id"] in finding.message
