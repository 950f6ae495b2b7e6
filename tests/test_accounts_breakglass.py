"""Break-glass emergency access: reason, time limit, banner, permissions, audit, review."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import select
from starlette.requests import Request

from carepost.accounts import emergency
from carepost.accounts.models import BreakGlassGrant, InAppNotice
from carepost.accounts.sessions import COOKIE_NAME, principal_from_cookie
from carepost.audit.models import AuditEvent
from carepost.core import clock
from carepost.core.database import session_factory
from tests.fixtures.accounts import login_client
from tests.fixtures.delivery import prove_ownership

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
    marketer = make_user(org, role="care_team")
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
    assert emergency.reason_of(session, grant) == REASON and grant.user_id == marketer.id
    assert REASON.encode() not in grant.reason_enc  # stored encrypted
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
    marketer = make_user(org, role="care_team")
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
    marketer = make_user(org, role="care_team")
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
    marketer = make_user(org, role="care_team")
    make_user(second, role="care_team", email=marketer.email)
    csrf = login_client(client, marketer)
    client.post("/app/break-glass", data={"reason": REASON, "minutes": "30", "csrf_token": csrf})
    assert principal_of(client).break_glass_grant_id
    home = client.get("/app")
    csrf = re.search(r'data-csrf-token="([^"]+)"', home.text).group(1)
    client.post("/app/switch-org", data={"org_id": second.id, "csrf_token": csrf})
    p = principal_of(client)
    assert p.org_id == second.id and p.break_glass_grant_id is None and "phi:read_unmasked" not in p.permissions


# --------------------------------------------------------------------------- issue 9 item 8


def test_only_care_and_compliance_duties_may_break_the_glass(client, org, make_user, session, app):
    """A marketer (or analyst, developer, read-only) cannot grant itself unmasked access, even
    if a permission were added to its role: the role itself is checked."""
    from fastapi.testclient import TestClient

    from carepost.accounts.permissions import ROLES, Permission

    for role in ("marketer", "analyst", "developer", "read_only"):
        person = make_user(org, role=role)
        c = TestClient(app)
        csrf = login_client(c, person)
        assert Permission.BREAKGLASS_USE not in ROLES[role]
        r = c.post("/app/break-glass", data={"reason": REASON, "minutes": "5", "csrf_token": csrf})
        assert r.status_code == 403, role
    for role in ("care_team", "admin"):
        person = make_user(org, role=role)
        c = TestClient(app)
        csrf = login_client(c, person)
        r = c.post("/app/break-glass", data={"reason": REASON, "minutes": "5", "csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 303, role
    session.rollback()
    assert len(list(session.scalars(select(BreakGlassGrant)))) == 2
    # Defence in depth: the role check holds even for a principal that carries the permission.
    from carepost.accounts.access import Principal
    from carepost.core.errors import PermissionDenied

    fake = Principal(kind="user", org_id=org.id, actor_id="x", user_id="x", role="marketer",
                     permissions=frozenset({Permission.BREAKGLASS_USE}))
    try:
        emergency.check_role(fake)
        raise AssertionError("a marketer passed the break-glass role check")
    except PermissionDenied:
        pass


def test_every_use_alerts_compliance_users_at_once_by_email_and_in_app(client, org, make_user, session, app,
                                                                       delivery_env, delivery_queue):
    import email as email_lib
    import email.policy

    from fastapi.testclient import TestClient

    from carepost.core.database import org_session
    from carepost.delivery import pipeline
    from carepost.delivery import service as delivery
    from carepost.delivery.models import Message

    with org_session(org.id) as s:
        prove_ownership(s, delivery.create_sending_domain(s, org.id, "bar.example"))
        s.commit()
    officer = make_user(org, role="compliance_officer", email="privacy@valid.test")
    owner = make_user(org, role="owner", email="boss@valid.test")
    nurse = make_user(org, role="care_team")
    csrf = login_client(client, nurse)
    for _ in range(3):
        r = client.post("/app/break-glass", data={"reason": REASON, "minutes": "5", "csrf_token": csrf},
                        follow_redirects=False)
        assert r.status_code == 303
        clock.advance(timedelta(minutes=6))
        client.get("/app/break-glass")
    session.rollback()
    session.expire_all()
    notices = list(session.scalars(select(InAppNotice).where(InAppNotice.kind == "break_glass")))
    assert sorted({n.user_id for n in notices}) == sorted({officer.id, owner.id}) and len(notices) == 6
    ids = list(session.scalars(select(Message.id).where(Message.created_by == "system:account.break_glass")))
    assert len(ids) == 6
    pipeline.deliver(ids)
    received = delivery_env.mx["valid"].recorder.messages
    assert sorted({m.rcpt_tos[0] for m in received}) == ["boss@valid.test", "privacy@valid.test"]
    for m in received:
        assert REASON.encode() not in m.data and b"4411" not in m.data  # no reason, no case, no patient
        parsed = email_lib.message_from_bytes(m.data, policy=email.policy.default)
        assert parsed["Subject"] == "Emergency access used in Bar Clinic"
    # The compliance view: new alerts, the decrypted reason, repeated use flagged.
    oc = TestClient(app)
    login_client(oc, officer)
    page = oc.get("/app/break-glass")
    assert 'data-testid="break-glass-alerts"' in page.text and "3 new uses" in page.text
    assert REASON in page.text and page.text.count("repeated") >= 3
    assert 'data-testid="break-glass-alerts"' not in oc.get("/app/break-glass").text  # read once seen
