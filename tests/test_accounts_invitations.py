"""Issue 9 item 1: account takeover across organizations, and account recovery.

Accounts are global by email. Before the fix, org A's admin got the enrollment link of the person
they added, chose the password and second factor themselves, and when org B later added the same
address as admin, the membership appeared silently: A's admin signed in and worked in B as that
person. Now the invitation goes to the invitee's own mailbox (through the delivery pipeline), the
admin never sees a link, and each membership exists only once the person accepts it themselves.
"""

from __future__ import annotations

import email
import email.policy
import re

import pytest
from sqlalchemy import select

from carepost.accounts.models import Membership, OneTimeLink, User, WebAuthnCredential
from carepost.accounts.service import create_organization
from carepost.audit.models import AuditEvent
from carepost.delivery import pipeline
from carepost.delivery.models import Message
from tests.fixtures.accounts import TestUser, csrf_from, login_client, strong_password
from tests.fixtures.delivery import prove_ownership

LINK = re.compile(r"http://localhost:8000(/app/(?:invite|enroll|password-reset)/[\w-]+)")


@pytest.fixture
def two_orgs(session, org, delivery_env, delivery_queue):
    """Org A ("Bar Clinic", sending domain bar.example) and org B ("Baz Health", baz.example)."""
    from carepost.core.database import org_session
    from carepost.delivery import service

    org_b = create_organization(session, "Baz Health")
    session.commit()
    for o, domain in ((org, "bar.example"), (org_b, "baz.example")):
        with org_session(o.id) as s:
            prove_ownership(s, service.create_sending_domain(s, o.id, domain))
            s.commit()
    return org, org_b, delivery_env


def deliver_account_mail(session, mx) -> list:
    """Run the pipeline on the queued account notices; the emails the MX received, parsed."""
    session.rollback()
    session.expire_all()
    ids = list(session.scalars(select(Message.id).where(Message.created_by.like("system:account.%"))))
    pipeline.deliver(ids)
    return [email.message_from_bytes(m.data, policy=email.policy.default) for m in mx.messages]


def link_in(msg) -> str:
    return LINK.search(msg.get_body(("plain",)).get_content()).group(1)


def accept_as_new_person(client, path: str) -> TestUser:
    """Open the emailed invitation, choose a password, set up TOTP: what only the invitee can do."""
    from carepost.accounts import mfa
    from carepost.core.database import read_only_session

    page = client.get(path)
    assert page.status_code == 200 and "Choose a password" in page.text
    password = strong_password()
    r = client.post(path, data={"password": password, "display_name": "Dr Smith", "csrf_token": csrf_from(page.text)},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app/mfa/enroll", r.text
    enroll = client.get("/app/mfa/enroll")
    secret = re.search(r"secret=([A-Z2-7]+)", enroll.text).group(1)
    r = client.post("/app/mfa/enroll", data={"code": mfa.totp_code(secret, mfa.current_step()),
                                             "csrf_token": csrf_from(enroll.text)}, follow_redirects=False)
    assert r.status_code in (200, 303), r.text
    with read_only_session() as s:
        user = s.scalar(select(User).where(User.email == "dr.smith@valid.test"))
        m = s.scalar(select(Membership).where(Membership.user_id == user.id))
        return TestUser(user.id, user.email, password, secret, m.org_id, m.role)


def test_admin_of_one_organization_cannot_take_over_a_person_shared_with_another(two_orgs, client, make_user, session,
                                                                                  app):
    """The proven attack: A's admin invites dr.smith, B later adds dr.smith as admin; A's admin
    must not be able to act as dr.smith in B."""
    from fastapi.testclient import TestClient

    org_a, org_b, env = two_orgs
    mx = env.mx["valid"].recorder
    a_admin = make_user(org_a, role="admin")
    b_owner = make_user(org_b, role="owner")
    csrf = login_client(client, a_admin)
    r = client.post("/api/v1/users", json={"email": "Dr.Smith@valid.test", "role": "marketer"},
                    headers={"x-csrf-token": csrf})
    assert r.status_code == 202, r.text
    # A's admin learns nothing to sign in with: no link in the answer, the list or the page.
    assert "/app/" not in r.text and "link" not in r.text
    assert r.json() == {"id": r.json()["id"], "email": "dr.smith@valid.test", "role": "marketer", "status": "invited"}
    assert "/app/invite/" not in client.get("/app/users").text and "dr.smith@valid.test" in client.get("/app/users").text
    assert client.get(f"/api/v1/users/{r.json()['id']}").status_code == 404  # not a member until accepted
    # ... nor can A's admin set the password: the enrollment link is for the mailbox only.
    session.rollback()
    session.expire_all()
    assert session.scalar(select(User).where(User.email == "dr.smith@valid.test")).password_hash is None
    [invitation] = deliver_account_mail(session, mx)
    assert invitation["To"] == "dr.smith@valid.test" and invitation["Subject"] == "You are invited to Bar Clinic on CarePost"
    assert mx.messages[0].tls  # over the organization's protected delivery (verified TLS to this MX)
    assert "DKIM-Signature" in invitation and "bar.example" in invitation["DKIM-Signature"]

    smith_client = TestClient(app)
    smith = accept_as_new_person(smith_client, link_in(invitation))
    assert smith.org_id == org_a.id and smith.role == "marketer"

    # B adds the same address as admin: nothing happens until dr.smith accepts, signed in as themselves.
    mx.reset()
    b_client = TestClient(app)
    b_csrf = login_client(b_client, b_owner)
    r = b_client.post("/api/v1/users", json={"email": "dr.smith@valid.test", "role": "admin"},
                      headers={"x-csrf-token": b_csrf})
    assert r.status_code == 202 and r.json()["status"] == "invited"
    session.rollback()
    session.expire_all()
    assert session.scalar(select(Membership).where(Membership.user_id == smith.id, Membership.org_id == org_b.id)
                          .execution_options(all_organizations=True)) is None
    [b_invitation] = deliver_account_mail(session, mx)
    b_path = link_in(b_invitation)
    # A's admin, even holding the link, cannot accept it for dr.smith.
    page = client.get(b_path)
    assert page.status_code == 403 and "another account" in page.text
    r = client.post(b_path, data={"csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 403
    # Nor can anyone without a session: no password form is offered for an existing account.
    anonymous = TestClient(app)
    page = anonymous.get(b_path)
    assert page.status_code == 200 and "Sign in" in page.text and 'name="password"' not in page.text
    r = anonymous.post(b_path, data={"csrf_token": csrf_from(page.text), "password": strong_password()},
                       follow_redirects=False)
    assert r.status_code == 403
    session.rollback()
    session.expire_all()
    assert session.scalar(select(Membership).where(Membership.user_id == smith.id, Membership.org_id == org_b.id)
                          .execution_options(all_organizations=True)) is None
    # A's admin cannot switch into B.
    r = client.post("/app/switch-org", data={"org_id": org_b.id, "csrf_token": csrf})
    assert r.status_code == 403
    # dr.smith, signed in as themselves (still signed in since their TOTP set-up), accepts.
    page = smith_client.get(b_path)
    assert page.status_code == 200 and "Accept invitation" in page.text and "Baz Health" in page.text
    r = smith_client.post(b_path, data={"csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    session.rollback()
    session.expire_all()
    m = session.scalar(select(Membership).where(Membership.user_id == smith.id, Membership.org_id == org_b.id)
                       .execution_options(all_organizations=True))
    assert m is not None and m.role == "admin"
    assert session.scalars(select(AuditEvent).where(AuditEvent.chain == org_b.id,
                                                    AuditEvent.action == "membership.accept")).first().actor_id == smith.id
    assert smith_client.get(b_path).status_code == 410  # used once


def test_no_sending_domain_means_no_invitation(client, org, make_user, session, db):
    csrf = login_client(client, make_user(org, role="admin"))
    r = client.post("/api/v1/users", json={"email": "new@example.test", "role": "analyst"}, headers={"x-csrf-token": csrf})
    assert r.status_code == 409 and r.json()["error"]["field"] == "email"
    session.rollback()
    session.expire_all()
    assert session.scalar(select(User).where(User.email == "new@example.test")) is None


def test_password_reset_by_emailed_link_still_needs_the_second_factor(two_orgs, client, make_user, session):
    org_a, _org_b, env = two_orgs
    mx = env.mx["valid"].recorder
    person = make_user(org_a, role="analyst", email="nurse@valid.test")
    page = client.get("/app/password-reset")
    r = client.post("/app/password-reset", data={"email": "nurse@valid.test", "csrf_token": csrf_from(page.text)})
    assert r.status_code == 200 and "on its way" in r.text
    # An unknown address gets the very same answer.
    r2 = client.post("/app/password-reset", data={"email": "nobody@valid.test", "csrf_token": csrf_from(page.text)})
    assert r2.status_code == 200 and "on its way" in r2.text
    [msg] = deliver_account_mail(session, mx)
    assert msg["To"] == "nurse@valid.test"
    path = link_in(msg)
    page = client.get(path)
    new_password = strong_password()
    r = client.post(path, data={"password": new_password, "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app/mfa"  # second factor still required
    assert client.get("/app", headers={"accept": "application/json"}).status_code in (401, 403)
    person.password = new_password
    assert login_client(client, person)
    assert client.get(path).status_code == 410


def test_mfa_reset_needs_an_owner_of_every_organization(two_orgs, client, make_user, session, app):
    from fastapi.testclient import TestClient

    org_a, org_b, _env = two_orgs
    person = make_user(org_a, role="analyst")
    make_user(org_b, role="analyst", email=person.email)
    owner_a, owner_b = make_user(org_a, role="owner"), make_user(org_b, role="owner")
    admin_a = make_user(org_a, role="admin")
    c_admin = TestClient(app)
    h = {"x-csrf-token": login_client(c_admin, admin_a)}
    assert c_admin.post(f"/api/v1/users/{person.id}/mfa-reset", headers=h).status_code == 403  # owners only
    h = {"x-csrf-token": login_client(client, owner_a)}
    r = client.post(f"/api/v1/users/{person.id}/mfa-reset", headers=h)
    assert r.status_code == 200 and r.json() == {"reset": False}  # B has not approved: nothing changes
    session.rollback()
    session.expire_all()
    assert session.get(User, person.id).totp_confirmed_at is not None
    c_b = TestClient(app)
    hb = {"x-csrf-token": login_client(c_b, owner_b)}
    r = c_b.post(f"/api/v1/users/{person.id}/mfa-reset", headers=hb)
    assert r.status_code == 200 and r.json() == {"reset": True}
    session.rollback()
    session.expire_all()
    user = session.get(User, person.id)
    assert user.totp_secret is None and user.totp_confirmed_at is None
    for chain in (org_a.id, org_b.id):
        assert session.scalars(select(AuditEvent).where(AuditEvent.chain == chain,
                                                        AuditEvent.action == "auth.mfa_reset")).first() is not None


def test_cli_reset_mfa_is_audited(db, org, make_user, session):
    from typer.testing import CliRunner

    from carepost.cli import app as cli_app

    person = make_user(org, role="analyst")
    r = CliRunner().invoke(cli_app, ["user", "reset-mfa", "--email", person.email])
    assert r.exit_code == 0, r.output
    session.rollback()
    session.expire_all()
    assert session.get(User, person.id).totp_confirmed_at is None
    event = session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.action == "auth.mfa_reset")).one()
    assert event.actor_id == "cli" and event.details == {"by": "cli"}
    r = CliRunner().invoke(cli_app, ["user", "reset-mfa", "--email", "nobody@example.test"])
    assert r.exit_code != 0


def test_removed_and_re_added_person_gets_no_old_credential_back(two_orgs, client, make_user, session, app):
    from fastapi.testclient import TestClient

    from carepost.accounts import mfa
    from carepost.accounts.models import WebSession

    org_a, _org_b, env = two_orgs
    owner = make_user(org_a, role="owner")
    person = make_user(org_a, role="analyst", email="dr.smith@valid.test")
    person_client = TestClient(app)
    login_client(person_client, person)
    session.rollback()
    session.expire_all()
    user = session.get(User, person.id)
    session.add(WebAuthnCredential(user_id=user.id, credential_id=b"cred-1", public_key=b"pk"))
    mfa.new_recovery_codes(session, user)
    session.commit()
    h = {"x-csrf-token": login_client(client, owner)}
    assert client.delete(f"/api/v1/users/{person.id}", headers=h).status_code == 204
    session.rollback()
    session.expire_all()
    user = session.get(User, person.id)
    assert user.is_active is False, "still active"
    assert user.password_hash is None and user.totp_secret is None and user.totp_confirmed_at is None
    assert not session.scalars(select(WebAuthnCredential).where(WebAuthnCredential.user_id == user.id)).all()
    assert not session.scalars(select(WebSession).where(WebSession.user_id == user.id,
                                                        WebSession.revoked_at.is_(None))).all()
    assert person_client.get("/app", headers={"accept": "application/json"}).status_code == 401
    # Re-added: an invitation, and the old password no longer signs in.
    r = client.post("/api/v1/users", json={"email": person.email, "role": "analyst"}, headers=h)
    assert r.status_code == 202
    page = person_client.get("/app/login")
    r = person_client.post("/app/login", data={"email": person.email, "password": person.password,
                                               "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 401
    [invitation] = deliver_account_mail(session, env.mx["valid"].recorder)
    assert "Choose a password" in person_client.get(link_in(invitation)).text
    session.rollback()
    session.expire_all()
    assert session.scalars(select(OneTimeLink).where(OneTimeLink.purpose == "invitation")).first() is not None
