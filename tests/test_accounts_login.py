"""Sign-in with password and TOTP, sessions, lockout and throttling, logout, CSRF."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from carepost.accounts.models import User, WebSession
from carepost.audit.models import AuditEvent
from carepost.core import clock
from tests.fixtures.accounts import csrf_from, fresh_totp_code, login_client


def test_login_with_password_and_totp(client, org, make_user, session):
    user = make_user(org)
    csrf = login_client(client, user)
    assert csrf
    r = client.get("/app")
    assert r.status_code == 200
    assert user.email in r.text
    session.rollback()
    actions = [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id).order_by(AuditEvent.seq))]
    assert "auth.password" in actions and "auth.mfa" in actions
