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


def test_the_verify_page_shows_the_anchor_verification_starts_at(page, session, make_user):
    """After a retention purge removed the chain's oldest events, the verify result says where
    verification starts: the signed anchor's seq, the date of the last removed event, whether its
    signature is valid — and the anchor_invalid and missing states when it was forged, when the
    event after it was deleted, or when the anchor itself was deleted (issue 16 item 1)."""
    from datetime import timedelta

    from sqlalchemy import delete, select, update
    from sqlalchemy.orm import make_transient

    from carepost.accounts.service import create_organization
    from carepost.audit.models import AuditChainAnchor, AuditEvent
    from carepost.core import clock
    from carepost.core.database import org_session, system_session
    from carepost.retention import purge, service

    year, actor = timedelta(days=365), service.Actor("system", "test")
    clock.advance(-8 * year)
    with system_session() as s:
        org = create_organization(s, "Anchored Clinic")
        s.commit()
    with org_session(org.id) as s:
        for i in range(4):
            record(s, org_id=org.id, actor_type="system", actor_id="test", action="test.old", target_id=f"t{i}")
        s.commit()
    clock.reset()
    with org_session(org.id) as s:
        service.set_schedule(s, org.id, "audit", min_days=service.HIPAA_MIN_DAYS, max_days=service.HIPAA_MIN_DAYS,
                             actor=actor)
        s.commit()
    run = purge.run_purge(org.id, actor)
    assert run["progress"]["audit"]["count"] >= 4
    with system_session() as s:
        anchor = s.get(AuditChainAnchor, org.id)
        seq, occurred = anchor.seq, anchor.occurred_at
    officer = make_user(org, role="compliance_officer")
    session.commit()
    ui_login(page, officer)

    def verify():
        page.goto("/app/audit")
        page.get_by_test_id("verify-chain").click()  # htmx: the result appears in place
        box = page.get_by_test_id("verify-anchor")
        box.wait_for()
        return box

    box = verify()
    assert "Chain intact" in page.get_by_test_id("verify-result").inner_text()
    assert box.get_attribute("data-anchor-state") == "valid"
    assert f"seq {seq}: the chain starts at seq {seq + 1}" in page.get_by_test_id("anchor-seq").inner_text()
    assert occurred in page.get_by_test_id("anchor-date").inner_text()
    assert page.get_by_test_id("anchor-signature").inner_text().startswith("valid")

    # Moved forward without the key: the signature no longer holds.
    with system_session() as s:
        s.execute(update(AuditChainAnchor).where(AuditChainAnchor.chain == org.id).values(seq=seq + 1))
        s.commit()
    box = verify()
    assert box.get_attribute("data-anchor-state") == "anchor_invalid"
    assert page.get_by_test_id("anchor-signature").inner_text() == "not valid"
    assert "anchor_invalid" in page.get_by_test_id("verify-result").inner_text()

    # The genuine anchor, but the event after it deleted: missing.
    with system_session() as s:
        s.execute(update(AuditChainAnchor).where(AuditChainAnchor.chain == org.id).values(seq=seq))
        saved = s.scalar(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.seq == seq + 1))
        s.expunge(saved)
        make_transient(saved)
        s.execute(delete(AuditEvent).where(AuditEvent.id == saved.id))
        s.commit()
    box = verify()
    assert box.get_attribute("data-anchor-state") == "missing"
    assert page.get_by_test_id("anchor-signature").inner_text().startswith("valid")
    assert f"from seq {seq + 1}) are missing" in page.get_by_test_id("anchor-state").inner_text()

    # The anchor deleted: the chain's start is missing, with no anchor to start from.
    with system_session() as s:
        s.add(saved)
        s.execute(delete(AuditChainAnchor).where(AuditChainAnchor.chain == org.id))
        s.commit()
    box = verify()
    assert box.get_attribute("data-anchor-state") == "missing"
    assert "there is no retention anchor" in page.get_by_test_id("anchor-state").inner_text()
    assert "Chain verification failed (missing)" in page.get_by_test_id("verify-result").inner_text()
