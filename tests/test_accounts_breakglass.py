"""Break-glass emergency access: reason, time limit, banner, permissions, audit, review."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import select
from starlette.requests import Request

from carepost.accounts.models import BreakGlassGrant
from carepost.accounts.sessions import COOKIE_NAME, principal_from_cookie
from carepost.audit.models import AuditEvent
from carepost.core import clock
from carepost.core.database import session_factory
from tests.fixtures.accounts import login_client

REASON = "Patient in ED, attending requested chart review for case 4411"


def principal_of(client):
    scope = {"type": "http", "method": "GET", "path": "/app", "query_string": b"", "client": ("127.0.0.1", 1),
             "headers": [(b"cookie", f"{COOKIE_NAME}={client.cookies.get(COOKIE_NAME)}".encode())]}
    with session_factory()() as s:
        return principal_from_cookie(Request(scope), s)


def actions(session, org_id):
    session.rollback()
    return [(e.action, e.actor_type, e.actor_id) for e in
            session.scalars(select(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.action.like("breakglass.%")).order_by(AuditEvent.seq))]


def test_break_glass_lifecycle(client, org, make_user, session):
    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    assert "phi:read_unmasked" not in principal_of(client).permissions
    page = client.get("/app/break-glass")
    assert page.status_code == 200 and "Start emergency access" in page.text
    r = client.post("/app/break-glass", data={"reason": REASON, "minutes": "30", "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    p = principal_of(client)
    assert {"phi:read_unmasked", "phi:read_masked"} <= p.permissions and p.break_glass_grant_id
    assert "Emergency access active" in client.get("/app").text  # banner on every page
    # The reason is kept on the grant, not copied into the audit log.
    session.rollback()
    grant = session.scalar(select(BreakGlassGrant))
    assert grant.reason == REASON and grant.user_id == marketer.id
    start = session.scalar(select(AuditEvent).where(AuditEvent.action == "breakglass.start"))
    assert start.target_id == grant.id and start.actor_id == marketer.id and REASON not in str(start.details)
    # Time runs out: permissions go, the end is audited once.
    for minutes in (14, 14, 3):  # stay active so the session itself does not idle out
        clock.advance(timedelta(minutes=minutes))
        client.get("/app/break-glass")
    p = principal_of(client)
    assert "phi:read_unmasked" not in p.permissions and p.break_glass_grant_id is None
    assert "Emergency access active" not in client.get("/app").text
    principal_of(client)
    assert actions(session, org.id) == [("breakglass.start", "user", marketer.id), ("breakglass.expire", "system", "breakglass")]


def test_end_early_and_compliance_review(client, org, make_user, session):
    marketer = make_user(org, role="marketer")
    officer = make_user(org, role="compliance_officer")
    csrf = login_client(client, marketer)
    client.post("/app/break-glass", data={"reason": REASON, "minutes": "60", "csrf_token": csrf})
    session.rollback()
    grant = session.scalar(select(BreakGlassGrant))

    reviewer = type(client)(client.app, base_url="http://localhost:8000")
    rcsrf = login_client(reviewer, officer)
    page = reviewer.get("/app/break-glass")
    assert marketer.email in page.text and REASON in page.text and "active" in page.text
    assert "Start emergency access" not in page.text  # compliance officers review, they don't use it
    r = reviewer.post(f"/app/break-glass/{grant.id}/review", data={"csrf_token": rcsrf})
    assert r.status_code == 409  # still active
    assert client.post(f"/app/break-glass/{grant.id}/review", data={"csrf_token": csrf}).status_code == 403  # no permission

    assert client.post(f"/app/break-glass/{grant.id}/end", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert "phi:read_unmasked" not in principal_of(client).permissions
    assert client.post(f"/app/break-glass/{grant.id}/end", data={"csrf_token": csrf}).status_code == 409
    assert reviewer.post(f"/app/break-glass/{grant.id}/end", data={"csrf_token": rcsrf}).status_code == 404  # not theirs

    r = reviewer.post(f"/app/break-glass/{grant.id}/review", data={"csrf_token": rcsrf}, follow_redirects=False)
    assert r.status_code == 303
    assert "reviewed" in reviewer.get("/app/break-glass").text
    session.rollback()
    session.expire_all()
    assert session.get(BreakGlassGrant, grant.id).reviewed_by == officer.id
    assert [a[0] for a in actions(session, org.id)] == ["breakglass.start", "breakglass.end", "breakglass.review"]


def test_break_glass_bad_input_and_permission(client, org, make_user, session, monkeypatch):
    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    r = client.post("/app/break-glass", data={"reason": "need it", "minutes": "30", "csrf_token": csrf})
    assert r.status_code == 422 and 'id="reason-error"' in r.text
    r = client.post("/app/break-glass", data={"reason": REASON, "minutes": "61", "csrf_token": csrf})
    assert r.status_code == 422 and 'id="minutes-error"' in r.text
    r = client.post("/app/break-glass", data={"reason": REASON, "minutes": "soon", "csrf_token": csrf})
    assert r.status_code == 422 and 'id="minutes-error"' in r.text
    client.post("/app/break-glass", data={"reason": REASON, "minutes": "5", "csrf_token": csrf})
    r = client.post("/app/break-glass", data={"reason": REASON, "minutes": "5", "csrf_token": csrf})
    assert r.status_code == 409
    session.rollback()
    assert len(list(session.scalars(select(BreakGlassGrant)))) == 1

    analyst = make_user(org, role="analyst")
    other = type(client)(client.app, base_url="http://localhost:8000")
    acsrf = login_client(other, analyst)
    assert "cannot start emergency access" in other.get("/app/break-glass").text
    assert other.post("/app/break-glass", data={"reason": REASON, "minutes": "5", "csrf_token": acsrf}).status_code == 403


def test_grant_is_per_organization(client, org, make_user, session):
    from carepost.accounts.service import create_organization

    second = create_organization(session, "Zeta Health")
    session.commit()
    marketer = make_user(org, role="marketer")
    make_user(second, role="marketer", email=marketer.email)
    csrf = login_client(client, marketer)
    client.post("/app/break-glass", data={"reason": REASON, "minutes": "30", "csrf_token": csrf})
    assert principal_of(client).break_glass_grant_id
    home = client.get("/app")
    csrf = re.search(r'data-csrf-token="([^"]+)"', home.text).group(1)
    client.post("/app/switch-org", data={"org_id": second.id, "csrf_token": csrf})
    p = principal_of(client)
    assert p.org_id == second.id and p.break_glass_grant_id is None and "phi:read_unmasked" not in p.permissions
