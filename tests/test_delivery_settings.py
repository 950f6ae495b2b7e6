"""The organization's delivery settings (issue 10 item 9): the staff page (owners and
administrators, validation naming the field, audit, CSRF) and the ``org:manage`` API scope that
only an owner may grant, accepted by the organization's settings routes."""

from __future__ import annotations

import json

from sqlalchemy import select

from carepost.accounts.models import ApiCredential
from carepost.audit.models import AuditEvent
from tests.fixtures.accounts import csrf_from, login_client


def _login(client, user) -> None:
    """Sign in as ``user`` (signing out whoever was signed in first)."""
    client.cookies.clear()
    client.headers.pop("X-CSRF-Token", None)
    client.headers["X-CSRF-Token"] = login_client(client, user)


def _events(session, action: str) -> list[AuditEvent]:
    session.expire_all()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


# --------------------------------------------------------------------------- the org:manage scope


def test_an_owner_grants_org_manage_and_the_key_changes_the_delivery_settings(client, session, org, make_user):
    owner = make_user(org, role="owner")
    _login(client, owner)
    r = client.post("/api/v1/api-credentials", json={"name": "Setup automation", "scopes": ["org:manage", "messages:read"]})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["scopes"] == ["messages:read", "org:manage"]
    key = {"Authorization": f"Bearer {created['token']}"}
    r = client.patch("/api/v1/delivery-settings", json={"security_mode": "secure", "default_purpose": "treatment"}, headers=key)
    assert r.status_code == 200, r.text
    assert r.json() == {"security_mode": "secure", "default_purpose": "treatment", "relay": None, "engagement_privacy": False}
    assert client.get("/api/v1/delivery-settings", headers=key).json()["security_mode"] == "secure"
    # The other organization settings routes accept it too.
    assert client.get("/api/v1/portal-settings", headers=key).status_code == 200
    [event] = _events(session, "delivery_settings.update")
    assert event.actor_type == "api_credential" and event.org_id == org.id
    assert event.details["after"]["security_mode"] == "secure"
    # A bad value names the field and changes nothing.
    r = client.patch("/api/v1/delivery-settings", json={"default_purpose": "sales"}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "default_purpose"
    assert client.get("/api/v1/delivery-settings", headers=key).json()["default_purpose"] == "treatment"


def test_only_an_owner_may_grant_org_manage(client, session, org, make_user):
    for role in ("admin", "developer"):
        person = make_user(org, role=role)
        _login(client, person)
        r = client.post("/api/v1/api-credentials", json={"name": "x", "scopes": ["org:manage"]})
        assert r.status_code == 403, (role, r.text)
        assert r.json()["error"]["field"] == "scopes" and "org:manage" in r.json()["error"]["message"]
    assert session.scalars(select(ApiCredential).where(ApiCredential.org_id == org.id)).all() == []


def test_a_key_cannot_mint_an_org_manage_key(client, org, make_user):
    """An API credential is not an owner, whatever its scopes: it cannot grant org:manage."""
    owner = make_user(org, role="owner")
    _login(client, owner)
    token = client.post("/api/v1/api-credentials", json={"name": "keys", "scopes": ["org:manage"]}).json()["token"]
    client.cookies.clear()
    client.headers.pop("X-CSRF-Token", None)
    r = client.post("/api/v1/api-credentials", json={"name": "y", "scopes": ["org:manage"]},
                    headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403  # no apikeys:manage, and never the owner's grant


def test_without_the_scope_a_key_cannot_change_settings(client, org, make_user):
    owner = make_user(org, role="owner")
    _login(client, owner)
    token = client.post("/api/v1/api-credentials", json={"name": "reader", "scopes": ["messages:read"]}).json()["token"]
    key = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/delivery-settings", headers=key).status_code == 200
    r = client.patch("/api/v1/delivery-settings", json={"security_mode": "opportunistic"}, headers=key)
    assert r.status_code == 403


def test_the_key_is_suspended_when_its_owner_becomes_an_administrator(client, session, org, make_user):
    from carepost.accounts.service import change_role

    owner = make_user(org, role="owner")
    make_user(org, role="owner")  # a second owner, so the first may step down
    _login(client, owner)
    created = client.post("/api/v1/api-credentials", json={"name": "setup", "scopes": ["org:manage"]}).json()
    key = {"Authorization": f"Bearer {created['token']}"}
    session.info["org_id"] = org.id
    change_role(session, org.id, owner.id, "admin", actor_role="owner",
                audit={"actor_type": "user", "actor_id": owner.id})
    session.commit()
    assert client.patch("/api/v1/delivery-settings", json={"security_mode": "secure"}, headers=key).status_code in (401, 403)
    cred = session.get(ApiCredential, created["id"])
    session.refresh(cred)
    assert cred.suspended_at is not None
    assert [e.target_id for e in _events(session, "api_credential.suspend")] == [created["id"]]
    change_role(session, org.id, owner.id, "owner", actor_role="owner")
    session.commit()
    session.refresh(cred)
    assert cred.suspended_at is None


def test_the_credentials_page_offers_org_manage_to_owners_only(client, org, make_user):
    owner = make_user(org, role="owner")
    _login(client, owner)
    html = client.get("/app/api-credentials").text
    box = html[html.index('value="org:manage"') - 200: html.index('value="org:manage"') + 80]
    assert "disabled" not in box and "owner only" in html
    _login(client, make_user(org, role="admin"))
    html = client.get("/app/api-credentials").text
    box = html[html.index('value="org:manage"'): html.index('value="org:manage"') + 80]
    assert "disabled" in box
    # Posted anyway (a tampered form): refused next to the field, nothing created.
    page = client.get("/app/api-credentials")
    r = client.post("/app/api-credentials", data={"name": "x", "scopes": ["org:manage"], "csrf_token": csrf_from(page.text)})
    assert r.status_code == 403 and "Only an owner can grant" in r.text


# --------------------------------------------------------------------------- the settings page


def test_settings_page_changes_mode_and_purpose_and_audits(client, session, org, make_user):
    admin = make_user(org, role="admin")
    _login(client, admin)
    page = client.get("/app/delivery-settings")
    assert page.status_code == 200 and "tls_required" in page.text and 'href="/app/delivery-settings"' in page.text
    r = client.post("/app/delivery-settings", data={"security_mode": "tls_exclusive", "default_purpose": "treatment",
                                                    "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app/delivery-settings?saved=1"
    assert client.get("/api/v1/delivery-settings").json() == {"security_mode": "tls_exclusive", "default_purpose": "treatment",
                                                              "relay": None, "engagement_privacy": False}
    [event] = _events(session, "delivery_settings.update")
    assert event.actor_id == admin.id and event.details["via"] == "ui"
    assert event.details["before"]["security_mode"] == "tls_required" and event.details["after"]["security_mode"] == "tls_exclusive"
    # Clearing the default purpose.
    r = client.post("/app/delivery-settings", data={"security_mode": "tls_exclusive", "default_purpose": "",
                                                    "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and client.get("/api/v1/delivery-settings").json()["default_purpose"] is None


def test_settings_page_bad_input_names_the_field_and_keeps_the_settings(client, org, make_user):
    _login(client, make_user(org, role="owner"))
    csrf = csrf_from(client.get("/app/delivery-settings").text)
    for data, field in (({"security_mode": "plaintext"}, "security_mode"),
                        ({"security_mode": "secure", "default_purpose": "sales"}, "default_purpose"),
                        ({"security_mode": ""}, "security_mode"),
                        ({"security_mode": "opportunistic"}, "confirm_opportunistic")):
        r = client.post("/app/delivery-settings", data={**data, "csrf_token": csrf})
        assert r.status_code == 422, (data, r.text)
        assert f'data-testid="error-{field}"' in r.text
    assert client.get("/api/v1/delivery-settings").json() == {"security_mode": "tls_required", "default_purpose": None,
                                                              "relay": None, "engagement_privacy": False}
    r = client.post("/app/delivery-settings", data={"security_mode": "opportunistic", "confirm_opportunistic": "yes",
                                                    "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and client.get("/api/v1/delivery-settings").json()["security_mode"] == "opportunistic"


def test_settings_page_needs_org_manage_and_csrf(client, org, make_user):
    for role in ("marketer", "compliance_officer", "developer"):
        _login(client, make_user(org, role=role))
        assert client.get("/app/delivery-settings").status_code == 403, role
    _login(client, make_user(org, role="owner"))
    client.headers.pop("X-CSRF-Token")
    r = client.post("/app/delivery-settings", data={"security_mode": "secure"})
    assert r.status_code == 403
    assert client.get("/api/v1/delivery-settings").json()["security_mode"] == "tls_required"


def test_settings_page_shows_the_relay_without_its_password(client, org, make_user, monkeypatch):
    from carepost.core.config import get_settings

    settings = get_settings()
    monkeypatch.setattr(settings, "smtp_relay", "smtp.relay.example:2587")
    monkeypatch.setattr(settings, "smtp_relay_username", "clinic-relay")
    from pydantic import SecretStr

    monkeypatch.setattr(settings, "smtp_relay_password", SecretStr("hunter2-relay-secret"))
    _login(client, make_user(org, role="owner"))
    html = client.get("/app/delivery-settings").text
    assert "smtp.relay.example" in html and "2587" in html and "clinic-relay" in html
    assert "hunter2-relay-secret" not in html and "set (never shown)" in html


# --------------------------------------------------------------------------- the organization's relay


RELAY_SECRET = "s3cret-org-relay-pw-41d0"


def _owner_key(session, org_id) -> dict:
    from carepost.accounts.credentials import create_credential

    cred, secret = create_credential(session, org_id, name="relay", scopes=["org:manage", "messages:read"])
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def test_the_relay_api_validates_names_the_field_and_never_returns_the_password(client, session, org):
    key = _owner_key(session, org.id)
    for relay, field in (({"host": ""}, "relay.host"), ({"host": "relay .example"}, "relay.host"),
                         ({"host": "relay.example:99999"}, "relay.host"), ({"host": "relay.example:smtp"}, "relay.host"),
                         ({"host": "relay.example@not-an-ip:587"}, "relay.host"), ({"host": "-bad-.example"}, "relay.host"),
                         ({"host": "relay.example", "password": "pw"}, "relay.username"),
                         ({"host": "relay.example", "username": "a\nb"}, "relay.username")):
        r = client.patch("/api/v1/delivery-settings", json={"relay": relay}, headers=key)
        assert r.status_code == 422, (relay, r.text)
        assert field in r.text, (relay, r.text)
    assert client.get("/api/v1/delivery-settings", headers=key).json()["relay"] is None

    r = client.patch("/api/v1/delivery-settings", headers=key, json={
        "relay": {"host": "Smtp.Relay.Example:2525", "username": "clinic", "password": RELAY_SECRET}})
    assert r.status_code == 200, r.text
    assert r.json()["relay"] == {"host": "smtp.relay.example:2525", "port": 2525, "username": "clinic",
                                 "password_set": True, "enforces_tls": False}
    got = client.get("/api/v1/delivery-settings", headers=key)
    assert got.json()["relay"]["password_set"] is True and RELAY_SECRET not in got.text
    # Stored encrypted: not in the organization's settings as written.
    from carepost.accounts.models import Organization

    session.expire_all()
    assert RELAY_SECRET not in str(session.get(Organization, org.id).settings)
    session.rollback()  # end the read: later rows are seen
    # Omitted password: kept while host and user name stay; a new host needs it again.
    r = client.patch("/api/v1/delivery-settings", headers=key,
                     json={"relay": {"host": "smtp.relay.example:2525", "username": "clinic", "enforces_tls": True}})
    assert r.status_code == 200 and r.json()["relay"]["password_set"] is True and r.json()["relay"]["enforces_tls"]
    r = client.patch("/api/v1/delivery-settings", headers=key,
                     json={"relay": {"host": "elsewhere.example", "username": "clinic"}})
    assert r.status_code == 422 and "relay.password" in r.text
    r = client.patch("/api/v1/delivery-settings", headers=key, json={"relay": None})
    assert r.status_code == 200 and r.json()["relay"] is None
    rows = _events(session, "delivery_settings.update")
    assert len(rows) == 3 and RELAY_SECRET not in json.dumps([e.details for e in rows], default=str)
    assert [e.details.get("relay_password_changed") for e in rows] == [True, False, False]


def test_the_page_sets_the_relay_with_errors_per_field_and_never_shows_the_password(client, session, org, make_user):
    _login(client, make_user(org, role="owner"))
    page = client.get("/app/delivery-settings")
    assert 'name="relay_host"' in page.text and "No password set" in page.text
    csrf = csrf_from(page.text)
    base = {"security_mode": "tls_required", "csrf_token": csrf}
    r = client.post("/app/delivery-settings", data={**base, "relay_host": "relay example", "relay_username": "clinic",
                                                    "relay_password": RELAY_SECRET})
    assert r.status_code == 422 and 'data-testid="error-relay_host"' in r.text and RELAY_SECRET not in r.text
    r = client.post("/app/delivery-settings", data={**base, "relay_host": "smtp.relay.example:2525",
                                                    "relay_username": "clinic", "relay_password": RELAY_SECRET,
                                                    "relay_enforces_tls": "yes"}, follow_redirects=False)
    assert r.status_code == 303
    html = client.get("/app/delivery-settings").text
    assert "smtp.relay.example:2525" in html and "Password set (never shown)" in html and RELAY_SECRET not in html
    assert 'id="relay_password" name="relay_password" value=""' in html
    # Blank keeps the password; a changed host without it is refused next to the password field.
    r = client.post("/app/delivery-settings", data={**base, "relay_host": "smtp.relay.example:2525",
                                                    "relay_username": "clinic"}, follow_redirects=False)
    assert r.status_code == 303 and client.get("/api/v1/delivery-settings").json()["relay"]["password_set"] is True
    r = client.post("/app/delivery-settings", data={**base, "relay_host": "other.example", "relay_username": "clinic"})
    assert r.status_code == 422 and 'data-testid="error-relay_password"' in r.text
    # An empty host removes the organization's relay.
    r = client.post("/app/delivery-settings", data=base, follow_redirects=False)
    assert r.status_code == 303 and client.get("/api/v1/delivery-settings").json()["relay"] is None
    rows = _events(session, "delivery_settings.update")
    assert RELAY_SECRET not in json.dumps([e.details for e in rows], default=str)
    assert any(e.details.get("relay_password_changed") for e in rows)
