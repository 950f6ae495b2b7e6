"""First-owner setup in headless Chromium against a real server: its own module, because the
setup link works only while nobody exists (issue 9 item 23) and the live server of a module
starts on an empty database."""

from __future__ import annotations

import re
import secrets
import time
from datetime import timedelta

import pytest

from carepost.accounts import mfa

pytestmark = pytest.mark.ui


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
