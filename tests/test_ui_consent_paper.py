"""Staff record a paper authorization in headless Chromium (issue 9 item 12): the consent page
offers only paper and verbal, refuses paper without its scan and an old signing date without a
reason (naming the field), then records a backdated paper authorization with its uploaded scan;
the row is flagged "backdated" and the scan downloads (audited)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui

SCAN = b"%PDF-1.4\n% scanned signed authorization\n%%EOF\n"


def test_compliance_officer_records_a_backdated_paper_authorization_with_its_scan(page, live_server, org, make_user,
                                                                                tmp_path):
    from carepost.audit.models import AuditEvent
    from carepost.consent import authorizations
    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.patients import service as patients

    with org_session(org.id) as s:
        cid = patients.save_contact(s, org.id, {"given_name": "Rita", "email": "rita@example.test"}).contact.id
        s.commit()
    officer = make_user(org, role="compliance_officer")
    ui_login(page, officer)
    page.goto(f"/app/contacts/{cid}/consent")
    form = page.get_by_test_id("record-authorization")
    method = form.get_by_label("How it was given")
    assert method.locator("option").all_inner_texts() == ["Signed on paper", "Verbal"]

    # paper without the scan: refused, the error names the field
    form.get_by_label("Name as signed").fill("Rita Example")
    form.get_by_role("button", name="Record authorization").click()
    expect(page.locator("#scan-error")).to_contain_text("scan")

    # an old signing date without a reason: refused
    old = (clock.now() - timedelta(days=30)).strftime("%Y-%m-%d")
    scan_path = tmp_path / "signed-authorization.pdf"
    scan_path.write_bytes(SCAN)
    form = page.get_by_test_id("record-authorization")
    form.get_by_label("Name as signed").fill("Rita Example")
    form.get_by_label("Signed on").fill(old)
    form.get_by_label("Scan of the signed paper").set_input_files(str(scan_path))
    form.get_by_role("button", name="Record authorization").click()
    expect(page.locator("#backdate_reason-error")).to_contain_text("7 days")

    # with the reason (and the scan chosen again): recorded, flagged, the scan downloads
    form = page.get_by_test_id("record-authorization")
    form.get_by_label("Scan of the signed paper").set_input_files(str(scan_path))
    form.get_by_label(re.compile("^Why recorded only now")).fill("Signed at the health fair; the form reached us late")
    form.get_by_label("Or expires at the event").select_option("end_of_treatment")
    form.get_by_role("button", name="Record authorization").click()
    page.wait_for_url(re.compile(rf".*/app/contacts/{cid}/consent$"))
    table = page.get_by_test_id("authorizations")
    expect(table.get_by_test_id("backdated")).to_have_text("backdated")
    expect(table).to_contain_text("paper")
    expect(table).to_contain_text("course of treatment")
    with page.expect_download() as dl:
        table.get_by_test_id("scan-link").click()
    saved = tmp_path / "downloaded.pdf"
    dl.value.save_as(saved)
    assert saved.read_bytes() == SCAN and dl.value.suggested_filename.endswith(".pdf")

    page.goto("/app/consent/reports")
    expect(page.get_by_test_id("backdated-count")).to_have_text("1")

    with org_session(org.id) as s:
        [row] = authorizations.authorizations_of(s, org.id, cid)
        assert (row.method, row.backdated, row.expiration_event) == ("paper", True, "end_of_treatment") and row.scan_id
        data = authorizations.authorization_dict(s, row, include_evidence=True)
        assert data["evidence_of"] == "recorder" and data["backdate_reason"].startswith("Signed at the health fair")
        actions = [e.action for e in s.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id,
                                                                       AuditEvent.target_id == row.id))]
        assert "authorization.create" in actions and "authorization.scan_download" in actions
