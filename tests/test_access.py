"""Access control at the edges: the UI is for people, MFA gates every permissioned route."""

from __future__ import annotations

from carepost.accounts.credentials import create_credential


def test_api_credential_cannot_use_the_web_ui(client, session, org):
    cred, secret = create_credential(session, org.id, name="ci", scopes=["messages:read"])
    session.commit()
    headers = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    r = client.get("/app", headers={**headers, "accept": "application/json"}, follow_redirects=False)
    assert r.status_code == 401
    r = client.get("/app/mfa", headers={**headers, "accept": "text/html"}, follow_redirects=False)
    assert r.status_code in (303, 401)
    assert r.status_code != 500


def test_browser_without_mfa_is_sent_to_the_challenge(client, make_user, org):
    from tests.fixtures.accounts import csrf_from

    user = make_user(org, role="owner")
    page = client.get("/app/login")
    r = client.post(
        "/app/login",
        data={"email": user.email, "password": user.password, "csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    r = client.get("/app", headers={"accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app/mfa"
    r = client.get("/api/v1/users", follow_redirects=False)
    assert r.status_code == 403 and r.json()["error"]["code"] == "mfa_required"
