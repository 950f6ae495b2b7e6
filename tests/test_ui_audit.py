"""A compliance officer browses the audit log in headless Chromium: filter, open, verify."""

from __future__ import annotations

import re
import shutil

import pytest

from carepost.audit import checkpoints
from carepost.audit.service import record
from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


@pytest.fixture(autouse=True)
def fresh_checkpoints(db):
    shutil.rmtree(checkpoints.checkpoint_dir(), ignore_errors=True)
    yield


def test_compliance_officer_browses_filters_opens_and_verifies(page, session, org, make_user):
    officer = make_user(org, role="compliance_officer")
    reads = [record(session, org_id=org.id, actor_type="user", actor_id=officer.id, action="contact.read",
                    target_type="contact", target_id=f"c{i}", ip="10.0.0.5") for i in range(3)]
    record(session, org_id=org.id, actor_type="system", actor_id="cli", action="organization.update",
           target_type="organization", target_id=org.id)
    session.commit()

    ui_login(page, officer)
    page.get_by_role("link", name="Audit log").click()
    page.wait_for_url(re.compile(r".*/app/audit$"))
    table = page.get_by_test_id("audit-events")
    assert table.locator("tr[data-event-id]").count() >= 5  # seeded events plus the sign-in
    assert "organization.update" in table.inner_text()

    page.fill("#f-action", "contact.read")
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url(re.compile(r".*/app/audit\?.*action=contact\.read"))
    rows = page.locator("tr[data-event-id]")
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("data-event-id") for i in range(3)] == [e.id for e in reversed(reads)]
    assert officer.email in rows.first.inner_text()

    rows.first.get_by_role("link", name=re.compile("Details")).click()
    page.wait_for_url(re.compile(rf".*/app/audit/events/{reads[-1].id}$"))
    assert page.get_by_test_id("event-hash").inner_text() == reads[-1].hash
    detail = page.get_by_test_id("audit-event").inner_text()
    assert "contact.read" in detail and "10.0.0.5" in detail and officer.email in detail

    page.get_by_role("link", name=re.compile("Audit log")).first.click()
    page.get_by_test_id("verify-chain").click()  # htmx: the result appears in place
    result = page.get_by_test_id("verify-result")
    result.wait_for()
    assert "Chain intact" in result.inner_text()
    assert page.url.endswith("/app/audit")
