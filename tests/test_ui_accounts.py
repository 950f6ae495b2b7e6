"""First-owner setup, sign-in with MFA and adding a person, in headless Chromium against a real server.

The live server is another process: it caches unwrapped keys, so these tests never empty the
database under it (no ``db`` fixture); each test makes the people it needs.
"""

from __future__ import annotations

import re
import secrets
import time

import pytest

from carepost.accounts import mfa
from tests.fixtures.accounts import TestUser, strong_password, ui_login
from tests.fixtures.delivery import prove_ownership

pytestmark = pytest.mark.ui


def make_person(role: str = "owner") -> TestUser:
    """An organization and a person with confirmed TOTP, written straight to the shared database."""
    from carepost.accounts.models import User
    from carepost.accounts.passwords import hash_password
    from carepost.accounts.service import add_membership, create_organization
    from carepost.core import clock
    from carepost.core.database import system_session

    with system_session() as s:
        org = create_organization(s, f"Clinic {secrets.token_hex(3)}")
        password = strong_password()
        user = User(email=f"ui-{secrets.token_hex(4)}@example.test", display_name="Uma Interface",
                    password_hash=hash_password(password), password_changed_at=clock.now())
        s.add(user)
        s.flush()
        secret = mfa.new_totp_secret()
        mfa.store_totp_secret(s, user, secret)
        user.totp_confirmed_at = clock.now()
        add_membership(s, org.id, user, role)
        s.commit()
        return TestUser(id=user.id, email=user.email, password=password, totp_secret=secret, org_id=org.id, role=role)


def test_login_with_mfa(page):
    owner = make_person()
    page.goto("/app/login")
    page.screenshot(path="/tmp/ui-login.png", full_page=True)
    page.fill("#email", owner.email)
    page.fill("#password", "Wrong-password-entirely-1")
    page.click("button[type=submit]")
    assert "not correct" in page.get_by_role("alert").inner_text()
    ui_login(page, owner)
    page.get_by_role("link", name="Security", exact=True).click()
    page.wait_for_url("**/app/account/security")
    assert "this session" in page.content()
    page.screenshot(path="/tmp/ui-security.png", full_page=True)
    page.get_by_role("button", name="Sign out").first.click()
    page.wait_for_url(re.compile(r".*/app/login\?m=ended$"))
    page.goto("/app/users")
    page.wait_for_url(re.compile(r".*/app/login$"))


def _deliver_account_mail(org_id: str, mx) -> list:
    """Run the delivery pipeline in this process on the account notices the server queued."""
    import email
    import email.policy

    from sqlalchemy import select

    from carepost.core.database import system_session
    from carepost.delivery import pipeline
    from carepost.delivery.models import Message

    with system_session() as s:
        ids = list(s.scalars(select(Message.id).where(Message.org_id == org_id,
                                                      Message.created_by.like("system:account.%"))))
    pipeline.reset()
    pipeline.deliver(ids)
    return [email.message_from_bytes(m.data, policy=email.policy.default) for m in mx.messages]


def _sending_domain(org_id: str, domain: str) -> None:
    from carepost.core.database import org_session
    from carepost.delivery import service

    with org_session(org_id) as s:
        prove_ownership(s, service.create_sending_domain(s, org_id, domain))
        s.commit()


def test_invitation_is_accepted_by_the_invitee_in_their_own_browser(page, delivery_env):
    """Issue 9 item 1: the owner invites; the link reaches only the invitee's mailbox; the invitee
    chooses their own password and second factor; a second organization's invitation is accepted
    by the same person while signed in as themselves."""
    from carepost.accounts.service import invite_member
    from carepost.core.database import system_session

    mx = delivery_env.mx["valid"].recorder
    owner = make_person()
    _sending_domain(owner.org_id, f"c{secrets.token_hex(3)}.example")
    invitee = f"dr.smith-{secrets.token_hex(3)}@valid.test"
    ui_login(page, owner)
    page.get_by_role("link", name="Users").click()
    page.wait_for_url("**/app/users")
    page.get_by_label("Email address").fill(invitee)
    page.get_by_label("Name", exact=True).fill("Dr Smith")
    page.get_by_label("Role", exact=True).select_option("marketer")
    page.get_by_role("button", name="Add person").click()
    assert f"Invitation emailed to {invitee}" in page.get_by_role("status").first.inner_text()
    assert invitee in page.locator("#invitations-h").locator("..").inner_text()
    assert "/app/invite/" not in page.content() and "/app/enroll/" not in page.content()
    page.screenshot(path="/tmp/ui-users-invited.png", full_page=True)
    [mail] = _deliver_account_mail(owner.org_id, mx)
    assert mail["To"] == invitee
    link = re.search(r"http://localhost:\d+(/app/invite/[\w-]+)", mail.get_body(("plain",)).get_content()).group(1)
    # The invitee, in their own browser, chooses a password and a second factor.
    context = page.context.browser.new_context(base_url=page.url.split("/app")[0])
    newcomer = context.new_page()
    newcomer.goto(link)
    newcomer.get_by_label("Password").fill("Copper-Meadow-Violin-8")
    newcomer.get_by_role("button", name="Set password").click()
    newcomer.wait_for_url("**/app/mfa/enroll")
    secret = newcomer.locator("#totp-secret").get_attribute("data-secret")
    newcomer.get_by_label("6-digit code").fill(mfa.totp_code(secret, int(time.time()) // mfa.TOTP_STEP))
    newcomer.get_by_role("button", name="Turn on two-step sign-in").click()
    newcomer.get_by_role("link", name=re.compile("continue")).click()
    newcomer.wait_for_url(re.compile(r".*/app$"))
    # A second organization invites the same person: they accept it themselves, signed in.
    other = make_person()
    _sending_domain(other.org_id, f"d{secrets.token_hex(3)}.example")
    mx.reset()
    with system_session() as s:
        invite_member(s, other.org_id, email=invitee, role="analyst", base_url=page.url.split("/app")[0])
        s.commit()
    [mail] = _deliver_account_mail(other.org_id, mx)
    link = re.search(r"http://localhost:\d+(/app/invite/[\w-]+)", mail.get_body(("plain",)).get_content()).group(1)
    newcomer.goto(link)
    assert "Accept invitation" in newcomer.content()
    newcomer.screenshot(path="/tmp/ui-invitation-accept.png", full_page=True)
    newcomer.get_by_role("button", name="Accept invitation").click()
    newcomer.wait_for_url(re.compile(r".*/app$"))
    assert newcomer.get_by_test_id("current-org").inner_text().startswith("Clinic ")
    context.close()
