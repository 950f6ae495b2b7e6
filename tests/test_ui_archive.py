"""The message archive in headless Chromium (issue 16 item 8): a compliance officer searches the
archive by words and sees the message; asks for a production export of a whole month (whole
organization: it needs a second approver), cannot approve it herself; a second compliance
officer signs in, approves it, and downloads the ZIP whose manifest hashes match. A bad search
is refused on the page next to the field. The live server caches keys, so these tests never
empty the database under it (no ``db`` fixture)."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import zipfile
from datetime import date, timedelta

import pytest
from playwright.sync_api import expect

from carepost.core.database import system_session
from tests.fixtures.accounts import add_staff, ui_login

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def clinic(live_server):
    from carepost.accounts.service import create_organization
    from carepost.delivery import service
    from carepost.delivery.messages import accept_message
    from carepost.delivery.schemas import MessageIn
    from tests.fixtures.delivery import prove_ownership

    with system_session() as s:
        org = create_organization(s, f"Archive Clinic {secrets.token_hex(2)}")
        s.flush()
        first = add_staff(s, org.id, "compliance_officer", email=f"first-{secrets.token_hex(3)}@example.test")
        second = add_staff(s, org.id, "compliance_officer", email=f"second-{secrets.token_hex(3)}@example.test")
        s.commit()
        org_id = org.id
    with system_session() as s:
        s.info.pop("scope")
        s.info["org_id"] = org_id
        domain = service.create_sending_domain(s, org_id, f"archive{secrets.token_hex(2)}.example")
        prove_ownership(s, domain)
        service.update_delivery_settings(s, org_id, {"default_purpose": "treatment"})
        ids = {}
        for name, subject, text in (("mri", "Imaging appointment", "Your MRI of the left knee is scheduled."),
                                    ("flu", "Flu clinic", "Walk-in flu shots on Saturday.")):
            data = MessageIn.model_validate({"from": f"care@{domain.domain}", "to": [f"{name}@example.org"],
                                             "subject": subject, "text": text})
            ids[name] = accept_message(s, org_id, data, source="api", created_by=None).message.id
        s.commit()
    return {"org_id": org_id, "first": first, "second": second, "ids": ids}


def test_search_then_export_approved_by_a_second_officer(browser, live_server, clinic):
    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(20000)
    ui_login(page, clinic["first"])
    page.goto("/app/archive")
    expect(page.get_by_role("heading", name="Message archive")).to_be_visible()

    # a wildcard is refused next to the words field, the value kept out of the message
    page.fill("#words", "kne*")
    page.fill("#date_from", (date.today() - timedelta(days=3)).isoformat())
    page.click("form[data-testid=archive-search-form] button:text('Search')")
    expect(page.locator("#words-error")).to_contain_text("whole words")
    expect(page.locator("#words")).to_have_attribute("aria-invalid", "true")

    page.fill("#words", "knee MRI")
    page.click("form[data-testid=archive-search-form] button:text('Search')")
    rows = page.locator("[data-testid=archive-results] tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-message-id", clinic["ids"]["mri"])
    expect(rows.first).to_contain_text("Imaging appointment")

    # a whole-organization export over this month: waits for a second approver
    page.fill("#words", "")
    page.fill("#date_from", date.today().replace(day=1).isoformat())
    page.fill("#reason", "Doe v. Archive Clinic, discovery request 4")
    page.select_option("#purpose_of_export", "legal_discovery")
    page.click("[data-testid=request-export]")
    request_row = page.locator("[data-testid=archive-requests] tbody tr").first
    expect(request_row.get_by_test_id("request-status")).to_have_text("pending approval")
    expect(request_row).to_contain_text("whole organization")
    expect(request_row.get_by_test_id("approve")).to_have_count(0)  # not by the requester
    request_id = request_row.get_attribute("data-request-id")
    ctx.close()

    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(20000)
    ui_login(page, clinic["second"])
    page.goto("/app/archive")
    row = page.locator(f"tr[data-request-id='{request_id}']")
    row.get_by_test_id("approve").click()
    row = page.locator(f"tr[data-request-id='{request_id}']")
    expect(row.get_by_test_id("request-status")).to_have_text("completed")
    with page.expect_download() as info:
        row.get_by_test_id("download").click()
    with open(info.value.path(), "rb") as fh:
        data = fh.read()
    z = zipfile.ZipFile(io.BytesIO(data))
    manifest = json.loads(z.read("manifest.json"))
    for f in manifest["files"]:
        assert hashlib.sha256(z.read(f["path"])).hexdigest() == f["sha256"], f["path"]
    custody = json.loads(z.read("chain_of_custody.json"))
    assert custody["approved_by"] == clinic["second"].id and custody["requested_by"] == clinic["first"].id
    assert custody["message_count"] == 2
    emls = [n for n in z.namelist() if n.endswith(".eml")]
    assert sorted(n.rsplit("_", 1)[1][:-4] for n in emls) == sorted(clinic["ids"].values())
    ctx.close()
