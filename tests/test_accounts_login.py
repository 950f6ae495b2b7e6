"""Sign-in with password and TOTP, sessions, lockout and throttling, logout, CSRF."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select
from starlette.requests import Request

from carepost.accounts import mfa
from carepost.accounts.models import User, WebSession
from carepost.accounts.sessions import COOKIE_NAME, GENERIC_LOGIN_ERROR, hash_session_token, principal_from_cookie
from carepost.audit.models import AuditEvent
from carepost.core import clock
from carepost.core.config import reset_settings
from carepost.core.database import session_factory
from tests.fixtures.accounts import csrf_from, fresh_totp_code, login_client


def password_step(client, email, password):
    page = client.get("/app/login")
    return client.post("/app/login", data={"email": email, "password": password, "csrf_token": csrf_from(page.text)},
                       follow_redirects=False)


def events(session, chain, action=None):
    session.rollback()
    q = select(AuditEvent).where(AuditEvent.chain == chain).order_by(AuditEvent.seq)
    if action:
        q = q.where(AuditEvent.action == action)
    return list(session.scalars(q))


def cookie_principal(token):
    """principal_from_cookie exactly as the access layer calls it: a request and an unscoped session."""
    scope = {"type": "http", "method": "GET", "path": "/app", "headers": [(b"cookie", f"{COOKIE_NAME}={token}".encode())],
             "client": ("127.0.0.1", 5000), "query_string": b""}
    with session_factory()() as s:
        return principal_from_cookie(Request(scope), s)


def test_login_with_password_and_totp(client, org, make_user, session):
    user = make_user(org)
    csrf = login_client(client, user)
    r = client.get("/app")
    assert r.status_code == 200 and user.email in r.text
    assert f'data-csrf-token="{csrf}"' in r.text
    password_events = events(session, org.id, "auth.password")
    mfa_events = events(session, org.id, "auth.mfa")
    assert password_events[-1].outcome == "success" and password_events[-1].actor_id == user.id
    assert mfa_events[-1].outcome == "success" and mfa_events[-1].details == {"method": "totp"}
    p = cookie_principal(client.cookies.get(COOKIE_NAME))
    assert p.kind == "user" and p.org_id == org.id and p.user_id == user.id and p.actor_id == user.id
    assert p.mfa_verified and p.via_cookie and p.csrf_token == csrf and p.role == "owner"
    assert p.extra["email"] == user.email and p.extra["org_name"] == "Bar Clinic"
    assert p.extra["orgs"] == [{"id": org.id, "name": "Bar Clinic"}]
    assert "users:manage" in p.permissions


def test_session_cookie_attributes_and_token_stored_hashed(client, org, make_user, session):
    user = make_user(org)
    r = password_step(client, user.email, user.password)
    set_cookie = r.headers["set-cookie"]
    assert f"{COOKIE_NAME}=" in set_cookie
    assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie.replace("Lax", "lax") and "Path=/" in set_cookie
    assert "Secure" not in set_cookie  # base URL is http://localhost here
    token = client.cookies.get(COOKIE_NAME)
    session.rollback()
    assert session.get(WebSession, token) is None
    assert session.get(WebSession, hash_session_token(token)) is not None


def test_new_session_id_on_login_and_after_mfa(client, org, make_user, session):
    user = make_user(org)
    client.cookies.set(COOKIE_NAME, "attacker-chosen-token-value-aaaaaaaaaaaaaaaaaaaa", domain="localhost.local")
    r = password_step(client, user.email, user.password)
    assert r.status_code == 303 and r.headers["location"] == "/app/mfa"
    after_password = client.cookies.get(COOKIE_NAME)
    assert after_password != "attacker-chosen-token-value-aaaaaaaaaaaaaaaaaaaa"
    challenge = client.get("/app/mfa")
    r = client.post("/app/mfa", data={"code": fresh_totp_code(user), "csrf_token": csrf_from(challenge.text)},
                    follow_redirects=False)
    assert r.status_code == 303
    after_mfa = client.cookies.get(COOKIE_NAME)
    assert after_mfa != after_password
    session.rollback()
    assert session.get(WebSession, hash_session_token(after_password)).revoked_at is not None
    assert cookie_principal(after_password) is None
    assert cookie_principal(after_mfa).mfa_verified


def test_session_without_mfa_is_refused_permissioned_routes(client, org, make_user, session):
    user = make_user(org)
    password_step(client, user.email, user.password)
    r = client.get("/api/v1/users")
    assert r.status_code == 403 and r.json()["error"]["code"] == "mfa_required"
    assert client.get("/app", headers={"accept": "application/json"}).status_code == 403
    denied = events(session, org.id, "access.denied")
    assert denied and denied[-1].actor_id == user.id


def test_generic_error_for_unknown_user_wrong_password_and_locked(client, org, make_user, session, monkeypatch):
    monkeypatch.setenv("CAREPOST_LOGIN_MAX_FAILURES", "3")
    reset_settings()
    user = make_user(org)
    unknown = password_step(client, "nobody@example.test", "Whatever-password-123")
    wrong = password_step(client, user.email, "Not-the-password-123")
    assert unknown.status_code == wrong.status_code == 401
    assert GENERIC_LOGIN_ERROR in unknown.text and GENERIC_LOGIN_ERROR in wrong.text
    password_step(client, user.email, "Not-the-password-123")
    password_step(client, user.email, "Not-the-password-123")  # third failure locks
    locked = password_step(client, user.email, user.password)  # even the right password
    assert locked.status_code == 401 and GENERIC_LOGIN_ERROR in locked.text
    assert COOKIE_NAME not in locked.headers.get("set-cookie", "")
    # Audited: the unknown email on the system chain without the typed value; the rest on the org chain.
    system = events(session, "system", "auth.login")
    assert system[-1].actor_type == "anonymous" and system[-1].outcome == "failure"
    assert "nobody@example.test" not in json.dumps(system[-1].details)
    outcomes = [(e.outcome, e.details.get("reason")) for e in events(session, org.id, "auth.login")]
    assert outcomes == [("failure", "bad_password")] * 3 + [("denied", "locked")]
    assert events(session, org.id, "auth.lockout")
    # After the lockout period the right password works again.
    clock.advance(timedelta(seconds=901))
    assert password_step(client, user.email, user.password).status_code == 303


def test_password_never_in_audit_or_response(client, org, make_user, session):
    user = make_user(org)
    r = password_step(client, user.email, "My-Secret-Typo-Password-9")
    assert "My-Secret-Typo-Password-9" not in r.text
    for e in events(session, org.id):
        assert "My-Secret-Typo-Password-9" not in json.dumps(e.details)


def test_per_ip_throttling_returns_429_with_retry_after(client, org, make_user, session, monkeypatch):
    monkeypatch.setenv("CAREPOST_LOGIN_IP_MAX_FAILURES", "4")
    reset_settings()
    user = make_user(org)
    for i in range(4):
        assert password_step(client, f"someone{i}@example.test", "Whatever-password-123").status_code == 401
    r = password_step(client, user.email, user.password)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    throttled = events(session, "system", "auth.login")[-1]
    assert throttled.outcome == "denied" and throttled.details == {"reason": "ip_throttled"}
    clock.advance(timedelta(seconds=901))
    assert password_step(client, user.email, user.password).status_code == 303


def test_login_form_needs_its_csrf_token(client, org, make_user):
    user = make_user(org)
    client.get("/app/login")
    r = client.post("/app/login", data={"email": user.email, "password": user.password, "csrf_token": "forged"},
                    follow_redirects=False)
    assert r.status_code == 403 and COOKIE_NAME not in r.headers.get("set-cookie", "")


def test_csrf_required_on_cookie_posts(client, org, make_user, session):
    user = make_user(org)
    csrf = login_client(client, user)
    assert client.post("/app/logout", follow_redirects=False).status_code == 403
    assert client.post("/app/logout", data={"csrf_token": "0" * 64}, follow_redirects=False).status_code == 403
    assert client.post("/api/v1/api-credentials", json={"name": "k", "scopes": []}).status_code == 403
    assert events(session, org.id, "access.denied")[-1].details["reason"] == "csrf"
    r = client.post("/api/v1/api-credentials", json={"name": "k", "scopes": []}, headers={"x-csrf-token": csrf})
    assert r.status_code == 201


def test_idle_timeout_and_activity_keeps_session_alive(client, org, make_user):
    user = make_user(org)
    login_client(client, user)
    for _ in range(3):
        clock.advance(timedelta(minutes=14))
        assert client.get("/app").status_code == 200
    clock.advance(timedelta(minutes=15, seconds=1))
    r = client.get("/app", follow_redirects=False, headers={"accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"] == "/app/login"
    assert client.get("/api/v1/users").status_code == 401


def test_absolute_lifetime(client, org, make_user, monkeypatch):
    monkeypatch.setenv("CAREPOST_SESSION_MAX_LIFETIME", "3600")
    reset_settings()
    user = make_user(org)
    login_client(client, user)
    for _ in range(4):
        clock.advance(timedelta(minutes=14))
        assert client.get("/app").status_code == 200
    clock.advance(timedelta(minutes=5))  # 61 minutes after sign-in, active all along
    assert client.get("/api/v1/users").status_code == 401


def test_logout_revokes_the_session(client, org, make_user, session):
    user = make_user(org)
    csrf = login_client(client, user)
    token = client.cookies.get(COOKIE_NAME)
    r = client.post("/app/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/app/login")
    assert cookie_principal(token) is None
    client.cookies.set(COOKIE_NAME, token, domain="localhost.local")  # replaying the old cookie does not work
    assert client.get("/api/v1/users").status_code == 401
    assert events(session, org.id, "auth.logout")


def test_totp_code_accepted_once(client, org, make_user, session):
    user = make_user(org)
    password_step(client, user.email, user.password)
    code = fresh_totp_code(user)
    csrf = csrf_from(client.get("/app/mfa").text)
    assert client.post("/app/mfa", data={"code": code, "csrf_token": csrf}, follow_redirects=False).status_code == 303
    # Same code, second sign-in within the same 30-second step: refused.
    other = type(client)(client.app, base_url="http://localhost:8000")
    password_step(other, user.email, user.password)
    csrf2 = csrf_from(other.get("/app/mfa").text)
    r = other.post("/app/mfa", data={"code": code, "csrf_token": csrf2}, follow_redirects=False)
    assert r.status_code == 401 and "not valid" in r.text
    failures = [e for e in events(session, org.id, "auth.mfa") if e.outcome == "failure"]
    assert failures


def test_totp_drift_one_step_only(db, org, make_user):
    user = make_user(org, mfa=True)
    # Start just after a step boundary, so the current step stays the same while the checks run
    # (a boundary crossed under load made step + 2 the next step, which is accepted).
    clock.advance(timedelta(seconds=mfa.TOTP_STEP - clock.now().timestamp() % mfa.TOTP_STEP + 0.5))
    with session_factory()() as s:
        s.info["scope"] = "system"
        row = s.get(User, user.id)
        step = mfa.current_step()
        assert not mfa.verify_totp(s, row, mfa.totp_code(user.totp_secret, step - 2))
        assert not mfa.verify_totp(s, row, mfa.totp_code(user.totp_secret, step + 2))
        assert mfa.verify_totp(s, row, mfa.totp_code(user.totp_secret, step - 1))
        assert mfa.verify_totp(s, row, mfa.totp_code(user.totp_secret, step + 1))
        # Once step+1 was used, the earlier steps' codes no longer work (no replay, no going back).
        assert not mfa.verify_totp(s, row, mfa.totp_code(user.totp_secret, step))
        assert not mfa.verify_totp(s, row, "12345") and not mfa.verify_totp(s, row, "abcdef")
        s.rollback()


def test_totp_uses_the_application_clock(db, org, make_user):
    user = make_user(org)
    clock.advance(timedelta(hours=5))
    with session_factory()() as s:
        row = s.get(User, user.id)
        real_step_code = mfa.totp_code(user.totp_secret, mfa.current_step() - 600)
        assert not mfa.verify_totp(s, row, real_step_code)
        assert mfa.verify_totp(s, row, mfa.totp_code(user.totp_secret, mfa.current_step()))
        s.rollback()


def test_wrong_totp_codes_lock_the_account(client, org, make_user, monkeypatch):
    monkeypatch.setenv("CAREPOST_LOGIN_MAX_FAILURES", "3")
    reset_settings()
    user = make_user(org)
    password_step(client, user.email, user.password)
    csrf = csrf_from(client.get("/app/mfa").text)
    for _ in range(2):
        assert client.post("/app/mfa", data={"code": "000000", "csrf_token": csrf}, follow_redirects=False).status_code == 401
    r = client.post("/app/mfa", data={"code": "000000", "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app/login?m=locked"
    assert password_step(client, user.email, user.password).status_code == 401


def test_recovery_code_signs_in_once(client, org, make_user):
    user = make_user(org)
    with session_factory()() as s:
        s.info["scope"] = "system"
        codes = mfa.new_recovery_codes(s, s.get(User, user.id))
        s.commit()
    password_step(client, user.email, user.password)
    csrf = csrf_from(client.get("/app/mfa").text)
    r = client.post("/app/mfa", data={"code": codes[0].upper(), "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app"
    other = type(client)(client.app, base_url="http://localhost:8000")
    password_step(other, user.email, user.password)
    csrf = csrf_from(other.get("/app/mfa").text)
    assert other.post("/app/mfa", data={"code": codes[0], "csrf_token": csrf}, follow_redirects=False).status_code == 401
    assert other.post("/app/mfa", data={"code": codes[1], "csrf_token": csrf}, follow_redirects=False).status_code == 303


def test_password_rehashed_at_login_when_parameters_change(client, org, make_user, session, monkeypatch):
    user = make_user(org)
    session.rollback()
    before = session.get(User, user.id).password_hash
    monkeypatch.setenv("CAREPOST_ARGON2_TIME_COST", "2")
    reset_settings()
    assert password_step(client, user.email, user.password).status_code == 303
    session.rollback()
    session.expire_all()
    after = session.get(User, user.id).password_hash
    assert after != before and "t=2" in after


def test_deactivated_user_cannot_sign_in(client, org, make_user, session):
    user = make_user(org)
    with session_factory()() as s:
        s.get(User, user.id).is_active = False
        s.commit()
    r = password_step(client, user.email, user.password)
    assert r.status_code == 401 and GENERIC_LOGIN_ERROR in r.text


@pytest.fixture(autouse=True)
def _settings_restored():
    yield
    reset_settings()


def test_an_attacker_cannot_lock_staff_out_from_elsewhere(app, org, make_user, session, monkeypatch):
    """Issue 9 item 15: failures lock the account for the source they came from only; the
    person signs in from their own address meanwhile."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("CAREPOST_LOGIN_MAX_FAILURES", "3")
    reset_settings()
    user = make_user(org)
    attacker = TestClient(app, base_url="http://localhost:8000", client=("203.0.113.66", 4000))
    staff = TestClient(app, base_url="http://localhost:8000", client=("198.51.100.7", 4000))
    for _ in range(3):
        assert password_step(attacker, user.email, "Not-the-password-123").status_code == 401
    assert password_step(attacker, user.email, user.password).status_code == 401  # locked from there
    assert events(session, org.id, "auth.lockout")
    ok = password_step(staff, user.email, user.password)  # not from here
    assert ok.status_code == 303 and ok.headers["location"] == "/app/mfa"
