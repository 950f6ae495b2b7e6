"""First-owner setup, sign-in with MFA and adding a person, in headless Chromium against a real server.

The live server is another process: it caches unwrapped keys, so these tests never empty the
database under it (no ``db`` fixture); each test makes the people it needs.
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import timedelta

import pytest

from carepost.accounts import mfa
from tests.fixtures.accounts import TestUser, strong_password, ui_login

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


def setup_path() -> str:
    from carepost.accounts.models import OneTimeLink
    from carepost.accounts.service import hash_token
    from carepost.core import clock
    from carepost.core.database import system_session

    token = secrets.token_urlsafe(32)
    with system_session() as s:
        s.add(OneTimeLink(purpose="setup", token_hash=hash_token(token), expires_at=clock.now() + timedelta(hours=24)))
        s.commit()
    return f"/app/setup/{token}"


def test_first_owner_setup_then_mfa_enrollment_then_dashboard(page):
    page.goto(setup_path())
    page.get_by_label("Organization name").fill("Harbor Family Practice")
    page.get_by_label("Your name").fill("Olive Owner")
    email = f"olive-{secrets.token_hex(3)}@harbor.test"
    page.get_by_label("Your email address").fill(email)
    page.get_by_label("Password").fill("short")
    page.get_by_role("button", name="Create organization and owner").click()
    error = page.locator("#password-error")
    assert "at least 12" in error.inner_text()  # the error sits next to the field
    page.get_by_label("Password").fill("Quiet-Harbor-Lamp-42")
    page.get_by_role("button", name="Create organization and owner").click()
    page.wait_for_url("**/app/mfa/enroll")
    assert page.locator("img.qr").get_attribute("src").startswith("data:image/svg+xml")
    page.screenshot(path="/tmp/ui-mfa-enroll.png", full_page=True)
    secret = page.locator("#totp-secret").get_attribute("data-secret")
    page.get_by_label("6-digit code").fill(mfa.totp_code(secret, int(time.time()) // mfa.TOTP_STEP))
    page.get_by_role("button", name="Turn on two-step sign-in").click()
    assert page.locator("#recovery-codes li").count() == 10
    page.get_by_role("link", name=re.compile("continue")).click()
    page.wait_for_url(re.compile(r".*/app$"))
    assert page.get_by_test_id("current-org").inner_text() == "Harbor Family Practice"
    assert email in page.locator(".topbar").inner_text()
    page.screenshot(path="/tmp/ui-dashboard.png", full_page=True)


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


def test_owner_adds_a_person(page):
    owner = make_person()
    ui_login(page, owner)
    page.get_by_role("link", name="Users").click()
    page.wait_for_url("**/app/users")
    page.get_by_label("Email address").fill("new.marketer@example.test")
    page.get_by_label("Name", exact=True).fill("Nia Marketer")
    page.get_by_label("Role", exact=True).select_option("marketer")
    page.get_by_role("button", name="Add person").click()
    link = page.locator("#enrollment-link").inner_text()
    assert re.match(r"^http://localhost:\d+/app/enroll/[\w-]+$", link)
    row = page.locator("tr", has_text="new.marketer@example.test")
    assert "invited" in row.inner_text()
    assert row.locator("select").input_value() == "marketer"
    page.screenshot(path="/tmp/ui-users.png", full_page=True)
    # The newcomer opens the link in their own browser session and chooses a password.
    context = page.context.browser.new_context(base_url=page.url.split("/app")[0])
    newcomer = context.new_page()
    newcomer.goto(link)
    newcomer.get_by_label("Password").fill("Copper-Meadow-Violin-8")
    newcomer.get_by_role("button", name="Set password").click()
    newcomer.wait_for_url("**/app/mfa/enroll")
    context.close()
