"""People management (UI and API), last-owner protection, organization switching, the user CLI."""

from __future__ import annotations

import re

from sqlalchemy import select
from typer.testing import CliRunner

from carepost.accounts.models import Membership, Organization, User
from carepost.accounts.service import create_organization
from carepost.audit.models import AuditEvent
from carepost.cli import app as cli_app
from tests.fixtures.accounts import login_client


def audit(session, chain, action):
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.chain == chain, AuditEvent.action == action).order_by(AuditEvent.seq)))


def test_api_people_lifecycle(client, org, make_user, session):
    owner = make_user(org)
    csrf = login_client(client, owner)
    h = {"x-csrf-token": csrf}
    # (Invitations through the API: tests/test_accounts_invitations.py.)
    uid = make_user(org, role="analyst", email="ana.lyst@example.test").id
    listed = client.get("/api/v1/users").json()
    assert {p["email"] for p in listed} == {owner.email, "ana.lyst@example.test"}
    assert all("enrollment_link" not in p for p in listed)
    r = client.patch(f"/api/v1/users/{uid}", json={"role": "marketer"}, headers=h)
    assert r.status_code == 200 and r.json()["role"] == "marketer"
    change = audit(session, org.id, "membership.role_change")[-1]
    assert change.actor_id == owner.id and change.target_id == uid and change.details == {"old_role": "analyst", "new_role": "marketer"}
    assert client.delete(f"/api/v1/users/{uid}", headers=h).status_code == 204
    assert client.get(f"/api/v1/users/{uid}").status_code == 404
    session.rollback()
    assert session.get(User, uid).is_active is False  # no organization left
    assert audit(session, org.id, "membership.remove")


def test_api_people_bad_input(client, org, make_user):
    csrf = login_client(client, make_user(org))
    h = {"x-csrf-token": csrf}
    r = client.post("/api/v1/users", json={"email": "x@example.test", "role": "emperor"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "role"
    r = client.post("/api/v1/users", json={"email": "nope", "role": "analyst"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "email"
    r = client.post("/api/v1/users", json={"email": "x@example.test", "role": "analyst", "is_admin": True}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "is_admin"
    client.post("/api/v1/users", json={"email": "dup@example.test", "role": "analyst"}, headers=h)
    r = client.post("/api/v1/users", json={"email": "dup@example.test", "role": "analyst"}, headers=h)
    assert r.status_code == 409 and r.json()["error"]["field"] == "email"


def test_last_owner_cannot_be_demoted_or_removed(client, org, make_user, session):
    owner = make_user(org)
    csrf = login_client(client, owner)
    h = {"x-csrf-token": csrf}
    r = client.patch(f"/api/v1/users/{owner.id}", json={"role": "admin"}, headers=h)
    assert r.status_code == 409 and r.json()["error"]["field"] == "role"
    r = client.delete(f"/api/v1/users/{owner.id}", headers=h)
    assert r.status_code == 409
    # With a second owner, the first may step down.
    second = make_user(org, role="owner")
    assert client.patch(f"/api/v1/users/{second.id}", json={"role": "owner"}, headers=h).status_code == 200
    assert client.patch(f"/api/v1/users/{owner.id}", json={"role": "admin"}, headers=h).status_code == 200
    session.rollback()
    roles = {m.user_id: m.role for m in session.scalars(select(Membership).where(Membership.org_id == org.id))}
    assert roles == {owner.id: "admin", second.id: "owner"}


def test_admin_cannot_touch_owners(client, org, make_user):
    owner = make_user(org)
    admin = make_user(org, role="admin")
    other = make_user(org, role="analyst")
    csrf = login_client(client, admin)
    h = {"x-csrf-token": csrf}
    assert client.patch(f"/api/v1/users/{other.id}", json={"role": "owner"}, headers=h).status_code == 403
    assert client.patch(f"/api/v1/users/{owner.id}", json={"role": "analyst"}, headers=h).status_code == 403
    assert client.delete(f"/api/v1/users/{owner.id}", headers=h).status_code == 403
    assert client.post("/api/v1/users", json={"email": "o2@example.test", "role": "owner"}, headers=h).status_code == 403
    assert client.patch(f"/api/v1/users/{other.id}", json={"role": "developer"}, headers=h).status_code == 200


def test_people_need_permissions(client, org, make_user, session):
    analyst = make_user(org, role="analyst")
    csrf = login_client(client, analyst)
    assert client.get("/api/v1/users").status_code == 403
    assert client.get("/app/users", headers={"accept": "text/html"}).status_code == 403
    assert client.post("/api/v1/users", json={"email": "z@example.test", "role": "analyst"},
                       headers={"x-csrf-token": csrf}).status_code == 403
    denied = audit(session, org.id, "access.denied")
    assert denied[-1].actor_id == analyst.id and denied[-1].outcome == "denied"
    compliance = make_user(org, role="compliance_officer")
    other = type(client)(client.app, base_url="http://localhost:8000")
    csrf2 = login_client(other, compliance)
    assert other.get("/api/v1/users").status_code == 200  # users:read
    page = other.get("/app/users")
    assert page.status_code == 200 and "Add a person" not in page.text
    assert other.delete(f"/api/v1/users/{analyst.id}", headers={"x-csrf-token": csrf2}).status_code == 403


def test_people_are_scoped_to_the_organization(client, org, make_user, session):
    other_org = create_organization(session, "Other Clinic")
    session.commit()
    stranger = make_user(other_org, role="analyst")
    csrf = login_client(client, make_user(org))
    h = {"x-csrf-token": csrf}
    assert stranger.email not in client.get("/api/v1/users").text
    assert client.get(f"/api/v1/users/{stranger.id}").status_code == 404
    assert client.patch(f"/api/v1/users/{stranger.id}", json={"role": "admin"}, headers=h).status_code == 404
    assert client.delete(f"/api/v1/users/{stranger.id}", headers=h).status_code == 404
    assert client.post(f"/app/users/{stranger.id}/remove", data={"csrf_token": csrf}).status_code == 404
    session.rollback()
    assert session.scalar(select(Membership.role).where(Membership.user_id == stranger.id)) == "analyst"


def test_users_page_create_role_change_and_remove(client, org, make_user, session):
    owner = make_user(org)
    member = make_user(org, role="analyst")
    csrf = login_client(client, owner)
    page = client.get("/app/users")
    assert page.status_code == 200 and member.email in page.text
    bad = client.post("/app/users", data={"email": "bad", "role": "analyst", "csrf_token": csrf})
    assert bad.status_code == 422 and 'id="email-error"' in bad.text
    r = client.post(f"/app/users/{member.id}/role", data={"role": "developer", "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    r = client.post(f"/app/users/{owner.id}/remove", data={"csrf_token": csrf})
    assert r.status_code == 409 and "last owner" in r.text
    # The removed person's session ends at once.
    member_client = type(client)(client.app, base_url="http://localhost:8000")
    login_client(member_client, member)
    assert member_client.get("/app").status_code == 200
    r = client.post(f"/app/users/{member.id}/remove", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert member_client.get("/app", headers={"accept": "application/json"}).status_code == 401


def test_existing_person_is_never_added_silently(client, org, make_user, session):
    other_org = create_organization(session, "Other Clinic")
    session.commit()
    person = make_user(other_org, role="marketer")
    csrf = login_client(client, make_user(org))
    r = client.post("/api/v1/users", json={"email": person.email, "role": "analyst"}, headers={"x-csrf-token": csrf})
    # Issue 9 item 1: never added silently; the invitation needs the organization's mail.
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_sending_domain"
    session.rollback()
    assert session.scalar(select(Membership).where(Membership.user_id == person.id, Membership.org_id == org.id)) is None


def test_switch_organization_without_signing_in_again(client, org, make_user, session):
    second = create_organization(session, "Zeta Health")
    session.commit()
    user = make_user(org, role="owner")
    make_user(second, role="analyst", email=user.email)
    csrf = login_client(client, user)
    page = client.get("/app")
    assert 'data-testid="current-org">Bar Clinic<' in page.text and "Zeta Health" in page.text
    r = client.post("/app/switch-org", data={"org_id": second.id, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get("/app")
    assert 'data-testid="current-org">Zeta Health<' in page.text
    assert client.get("/api/v1/users").status_code == 403  # analyst there: no users:read
    events_in = audit(session, second.id, "session.switch_org")
    assert events_in[-1].actor_id == user.id and events_in[-1].actor_type == "user"
    assert audit(session, org.id, "session.switch_org")[-1].actor_id == user.id
    # Events recorded in the new organization name the real person.
    client.get("/api/v1/users")
    assert audit(session, second.id, "access.denied")[-1].actor_id == user.id
    # And back.
    csrf = re.search(r'data-csrf-token="([^"]+)"', page.text).group(1)
    client.post("/app/switch-org", data={"org_id": org.id, "csrf_token": csrf})
    assert client.get("/api/v1/users").status_code == 200


def test_cannot_switch_into_a_foreign_organization(client, org, make_user, session):
    foreign = create_organization(session, "Foreign Clinic")
    session.commit()
    user = make_user(org)
    csrf = login_client(client, user)
    r = client.post("/app/switch-org", data={"org_id": foreign.id, "csrf_token": csrf})
    assert r.status_code == 403
    assert 'data-testid="current-org">Bar Clinic<' in client.get("/app").text
    denied = audit(session, org.id, "session.switch_org")[-1]
    assert denied.outcome == "denied" and denied.target_id == foreign.id and denied.actor_id == user.id
    assert client.post("/app/switch-org", data={"org_id": foreign.id}).status_code == 403  # no CSRF token


def test_cli_user_create_with_password_and_with_link(db, org, session, monkeypatch):
    from rich.console import Console

    import carepost.cli

    monkeypatch.setattr(carepost.cli, "console", Console(width=200))  # a wide table: no truncated emails
    runner = CliRunner()
    r = runner.invoke(cli_app, ["user", "create", "--org", "bar-clinic", "--email", "cli.person@example.test",
                                "--role", "developer", "--name", "Cli Person", "--password-stdin"],
                      input="Granite-Falcon-Meadow-7\n")
    assert r.exit_code == 0, r.output
    assert "enroll" not in r.output
    r = runner.invoke(cli_app, ["user", "create", "--org", "bar-clinic", "--email", "invited@example.test", "--role", "analyst"])
    assert r.exit_code == 0 and "http://localhost:8000/app/enroll/" in r.output
    r = runner.invoke(cli_app, ["user", "create", "--org", "bar-clinic", "--email", "weak@example.test", "--role", "analyst",
                                "--password-stdin"], input="password\n")
    assert r.exit_code == 1 and "password" in r.output
    r = runner.invoke(cli_app, ["user", "create", "--org", "nope", "--email", "x@example.test", "--role", "analyst"])
    assert r.exit_code == 1
    r = runner.invoke(cli_app, ["user", "list", "--org", "bar-clinic"])
    assert r.exit_code == 0 and "cli.person@example.test" in r.output and "invited" in r.output
    session.rollback()
    created = session.scalar(select(User).where(User.email == "cli.person@example.test"))
    assert created.password_hash.startswith("$argon2id$")
    assert session.scalar(select(User).where(User.email == "weak@example.test")) is None
    ev = audit(session, org.id, "user.create")
    assert {e.actor_id for e in ev} == {"cli"}
    assert session.get(Organization, org.id) is not None
