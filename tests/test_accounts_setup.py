"""First start through the one-time setup link, and enrollment links for new people."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import func, select

from carepost.accounts.models import Membership, OneTimeLink, Organization, User
from carepost.accounts.service import create_setup_link_if_needed
from carepost.audit.models import AuditEvent
from carepost.core import clock
from carepost.core.database import system_session
from tests.fixtures.accounts import csrf_from, login_client

GOOD = {"org_name": "Bar Clinic", "email": "Owner@Bar-Clinic.test", "display_name": "Olive Owner",
        "password": "Tidal-Lantern-Quartz-91"}


def setup_link() -> str:
    with system_session() as s:
        link = create_setup_link_if_needed(s, "http://localhost:8000")
        s.commit()
    return link.removeprefix("http://localhost:8000")


def submit(client, path, **overrides):
    page = client.get(path)
    data = {**GOOD, **overrides, "csrf_token": csrf_from(page.text)}
    return client.post(path, data=data, follow_redirects=False)


def count(session, model):
    session.rollback()
    return session.scalar(select(func.count()).select_from(model))


def test_setup_link_creates_org_and_owner_then_mfa_enrollment(client, db, session):
    path = setup_link()
    page = client.get(path)
    assert page.status_code == 200 and "Organization name" in page.text
    r = submit(client, path)
    assert r.status_code == 303 and r.headers["location"] == "/app/mfa/enroll"
    session.rollback()
    org = session.scalar(select(Organization))
    user = session.scalar(select(User))
    assert org.name == "Bar Clinic" and org.slug == "bar-clinic"
    assert user.email == "owner@bar-clinic.test" and user.display_name == "Olive Owner"
    assert user.password_hash.startswith("$argon2id$")
    membership = session.scalar(select(Membership).where(Membership.org_id == org.id))
    assert membership.role == "owner" and membership.user_id == user.id
    assert client.get("/app/mfa/enroll").status_code == 200
    actions = [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id))]
    assert "organization.setup" in actions and "user.create" in actions
    # Used once: the same link now answers 410, and the attempt is audited.
    again = client.get(path)
    assert again.status_code == 410 and "already been used" in again.text
    session.rollback()
    system = list(session.scalars(select(AuditEvent).where(AuditEvent.chain == "system", AuditEvent.action == "link.setup")
                                  .order_by(AuditEvent.seq)))
    assert system and system[-1].details == {"reason": "link_expired"}
    # No new setup link is made once a person exists.
    with system_session() as s:
        assert create_setup_link_if_needed(s, "http://localhost:8000") is None


def test_setup_link_unknown_and_expired(client, db, session):
    assert client.get("/app/setup/not-a-real-token").status_code == 404
    path = setup_link()
    clock.advance(timedelta(hours=24, seconds=1))
    r = client.get(path)
    assert r.status_code == 410 and "expired" in r.text
    csrf = csrf_from(client.get("/app/login").text)
    assert client.post(path, data={**GOOD, "csrf_token": csrf}).status_code == 410
    assert count(session, User) == 0


def test_setup_bad_input_names_the_field_and_writes_nothing(client, db, session):
    path = setup_link()
    for overrides, field in [({"password": "password1234"}, "password"), ({"email": "not-an-email"}, "email"),
                             ({"org_name": ""}, "org_name"), ({"password": "bar clinic 2024 !!"}, "password")]:
        r = submit(client, path, **overrides)
        assert r.status_code == 422, (overrides, r.status_code)
        assert f'id="{field}-error"' in r.text and 'aria-invalid="true"' in r.text
        assert count(session, User) == 0 and count(session, Organization) == 0
    # The password is never echoed back into the form.
    r = submit(client, path, password="password1234")
    assert "password1234" not in r.text
    # The link still works after the failed attempts.
    assert submit(client, path).status_code == 303


def test_setup_form_needs_csrf(client, db, session):
    path = setup_link()
    client.get(path)
    r = client.post(path, data={**GOOD, "csrf_token": "x"}, follow_redirects=False)
    assert r.status_code == 403 and count(session, User) == 0


def cli_enrollment_link(org, email: str, display_name: str = "") -> str:
    """What ``carepost user create`` prints on the server console for a new person."""
    from carepost.accounts.service import create_member

    with system_session() as s:
        _user, link = create_member(s, org.id, email=email, role="marketer", display_name=display_name,
                                    base_url="http://localhost:8000")
        s.commit()
    return re.match(r"http://localhost:8000(/app/enroll/[\w-]+)$", link).group(1)


def test_enrollment_link_from_the_server_cli(client, org, make_user, session):
    owner = make_user(org)
    csrf = login_client(client, owner)
    link = cli_enrollment_link(org, "new.person@example.test", "New Person")
    session.rollback()
    stored = session.scalar(select(OneTimeLink).where(OneTimeLink.purpose == "enrollment"))
    assert link.rsplit("/", 1)[1] not in stored.token_hash  # stored hashed
    assert "New Person" in client.get("/app/users").text and link not in client.get("/app/users").text  # shown once
    assert csrf

    newcomer = type(client)(client.app, base_url="http://localhost:8000")
    page = newcomer.get(link)
    assert page.status_code == 200 and "new.person@example.test" in page.text
    weak = newcomer.post(link, data={"password": "short", "display_name": "New Person", "csrf_token": csrf_from(page.text)})
    assert weak.status_code == 422 and 'id="password-error"' in weak.text
    r = newcomer.post(link, data={"password": "Quiet-Harbor-Lamp-42", "display_name": "New Person",
                                  "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app/mfa/enroll"
    assert newcomer.get(link).status_code == 410
    session.rollback()
    user = session.scalar(select(User).where(User.email == "new.person@example.test"))
    assert user.password_hash and user.is_active
    assert session.scalar(select(AuditEvent).where(AuditEvent.action == "user.enroll")).actor_id == user.id


def test_enrollment_link_expires(client, org, make_user):
    owner = make_user(org)
    login_client(client, owner)
    link = cli_enrollment_link(org, "late@example.test")
    clock.advance(timedelta(hours=73))
    assert client.get(link).status_code == 410


def test_setup_link_dies_once_any_person_exists(client, db, session, monkeypatch):
    """Issue 9 item 23: a setup link printed by ``carepost init`` stops working as soon as any
    person exists (here created as ``carepost user create`` does), used or not."""
    from carepost.accounts.service import create_member, create_organization

    path = setup_link()
    with system_session() as s:
        other = create_organization(s, "Other Clinic")
        create_member(s, other.id, email="owner@other.test", role="owner", password="Tidal-Lantern-Quartz-77",
                      base_url="http://localhost:8000")
        s.commit()
    page = client.get(path)
    assert page.status_code == 410 and "Setup is finished" in page.text
    csrf = csrf_from(client.get("/app/login").text)
    r = client.post(path, data={**GOOD, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 410
    assert count(session, Organization) == 1 and count(session, User) == 1
