"""An owner creates an API key in headless Chromium, uses it, revokes it: the key then gets 401."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


def test_owner_creates_uses_and_revokes_an_api_key(page, live_server, org, make_user):
    owner = make_user(org, role="owner")
    ui_login(page, owner)
    page.get_by_role("link", name="API credentials").click()
    page.wait_for_url(re.compile(r".*/app/api-credentials$"))

    page.fill("#cred-name", "Scheduling system")
    page.get_by_label("messages:read").check()
    page.get_by_label("phi:read_masked").check()
    page.select_option("#cred-expiry", "30")
    page.get_by_role("button", name="Create credential").click()

    secret = page.get_by_test_id("created-secret").inner_text().strip()
    key_id = page.locator("#created-key-id").inner_text().strip()
    assert secret.startswith("cp_sk_") and key_id.startswith("cpk_")
    assert page.get_by_role("button", name="Copy secret").is_visible()

    me = httpx.get(f"{live_server.url}/api/v1/me", headers={"Authorization": f"Bearer {key_id}.{secret}"})
    assert me.status_code == 200, me.text
    assert me.json()["org_id"] == org.id and me.json()["scopes"] == ["messages:read", "phi:read_masked"]

    # Shown once: the list page never shows it again.
    page.get_by_role("link", name="Done").click()
    page.wait_for_url(re.compile(r".*/app/api-credentials$"))
    assert secret not in page.content()
    row = page.locator(f"tr[data-key-id='{key_id}']")
    assert "Scheduling system" in row.inner_text()
    assert row.get_by_test_id("status").inner_text() == "active"

    # Revoke, confirming the browser dialog the static script opens (data-confirm).
    dialogs = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    row.get_by_role("button", name="Revoke Scheduling system").click()
    page.wait_for_url(re.compile(r".*/app/api-credentials$"))
    row.get_by_test_id("status").filter(has_text="revoked").wait_for()
    assert dialogs and "Revoke" in dialogs[0]

    r = httpx.get(f"{live_server.url}/api/v1/me", headers={"Authorization": f"Bearer {key_id}.{secret}"})
    assert r.status_code == 401
