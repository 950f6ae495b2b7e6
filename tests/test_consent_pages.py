"""Staff consent pages with a web session: the consent section on the contact page, history and
revocation, a paper authorization, suppressions (add, import, lift, export), topics, settings and
reports. Permission checks, CSRF, audit, masked addresses."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.consent import authorizations, eligibility, service
from carepost.core import clock
from carepost.core.database import org_session
from tests.fixtures.accounts import login_client


@pytest.fixture
def staff(client, org, make_user):
    user = make_user(org, role="compliance_officer")
    csrf = login_client(client, user)
    return csrf


def _contact(org_id, email="kim@example.test"):
    from carepost.patients import service as patients

    with org_session(org_id) as s:
        c = patients.save_contact(s, org_id, {"given_name": "Kim", "email": email}).contact
        s.commit()
        return c.id


def test_contact_page_section_and_consent_history(client, org, staff, session):
    cid = _contact(org.id)
    with org_session(org.id) as s:
        a = authorizations.record_authorization(s, org.id, contact_id=cid, purpose="marketing", method="api",
                                                signature_name="Kim Example")
        s.commit()
    page = client.get(f"/app/contacts/{cid}")
    assert page.status_code == 200
    assert "Marketing authorization — valid" in page.text and f'href="/app/contacts/{cid}/consent"' in page.text
    history = client.get(f"/app/contacts/{cid}/consent")
    assert history.status_code == 200 and 'data-testid="authorizations"' in history.text
    assert "Kim Example" not in history.text  # the signature is evidence, not shown in the list
    # revoke without CSRF: refused; with it: revoked at once
    assert client.post(f"/app/authorizations/{a.id}/revoke", data={}).status_code == 403
    r = client.post(f"/app/authorizations/{a.id}/revoke", data={"csrf_token": staff}, follow_redirects=False)
    assert r.status_code == 303
    with org_session(org.id) as s:
        assert eligibility.check_eligibility(s, [cid], "marketing", org_id=org.id) == {cid: "authorization_revoked"}
    ev = client.get(f"/app/contacts/{cid}/consent/evidence")
    assert ev.status_code == 200 and "Kim Example" in ev.text and "attachment" in ev.headers["content-disposition"]
    session.rollback()
    acts = {e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id))}
    assert {"consent.read", "authorization.revoke", "consent.evidence_export"} <= acts


def test_paper_authorization_form(client, org, staff):
    cid = _contact(org.id)
    with org_session(org.id) as s:
        text_id = authorizations.current_text(s, org.id, "marketing").id
    r = client.post(f"/app/contacts/{cid}/consent/authorizations",
                    data={"csrf_token": staff, "text_id": text_id, "signature_name": "", "signed_on": "2020-13-40"})
    assert r.status_code == 422 and "field-error" in r.text
    r = client.post(f"/app/contacts/{cid}/consent/authorizations",
                    data={"csrf_token": staff, "text_id": text_id, "signature_name": "<b>Kim</b>",
                          "representative_name": "Lee", "representative_authority": ""})
    assert r.status_code == 422 and "authority" in r.text and "<b>Kim</b>" not in r.text
    signed_on = (clock.now() - timedelta(days=2)).strftime("%Y-%m-%d")
    r = client.post(f"/app/contacts/{cid}/consent/authorizations",
                    data={"csrf_token": staff, "text_id": text_id, "signature_name": "Kim Example", "signed_on": signed_on,
                          "method": "paper"},
                    files={"scan": ("signed.pdf", b"%PDF-1.4\n% signed page\n", "application/pdf")},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    with org_session(org.id) as s:
        [row] = authorizations.authorizations_of(s, org.id, cid)
        assert row.method == "paper" and row.signed_at.strftime("%Y-%m-%d") == signed_on and row.scan_id
        assert not row.backdated


def test_suppressions_page(client, org, staff, session):
    page = client.get("/app/consent/suppressions")
    assert page.status_code == 200
    r = client.post("/app/consent/suppressions", data={"csrf_token": staff, "address": "not an address", "reason": "manual"})
    assert r.status_code == 422 and "valid email" in r.text
    r = client.post("/app/consent/suppressions", data={"csrf_token": staff, "address": "Zed@Example.test", "reason": "legal_hold",
                                                       "scope": "all"}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get("/app/consent/suppressions")
    assert "zed@example.test" in page.text and "Release hold" in page.text
    files = {"file": ("s.csv", io.BytesIO(b"address,reason\nx@example.test,manual\nbad,manual\n"), "text/csv")}
    r = client.post("/app/consent/suppressions/import", data={"csrf_token": staff}, files=files)
    assert r.status_code == 422 and "Line 3" in r.text
    files = {"file": ("s.csv", io.BytesIO(b"address\nx@example.test\ny@example.test\n"), "text/csv")}
    r = client.post("/app/consent/suppressions/import", data={"csrf_token": staff}, files=files)
    assert r.status_code == 200 and "Imported 2 rows" in r.text
    export = client.get("/app/consent/suppressions/export")
    assert export.status_code == 200 and "y@example.test" in export.text
    with org_session(org.id) as s:
        rows, _ = service.list_suppressions(s, org.id, reason="legal_hold")
    r = client.post(f"/app/consent/suppressions/{rows[0].id}/delete", data={"csrf_token": staff}, follow_redirects=False)
    assert r.status_code == 422  # a hold is lifted only by the explicit release
    r = client.post(f"/app/consent/suppressions/{rows[0].id}/delete",
                    data={"csrf_token": staff, "release_legal_hold": "yes"}, follow_redirects=False)
    assert r.status_code == 303


def test_masked_addresses_for_a_role_without_unmasked_view(client, org, make_user):
    from carepost.accounts.models import Membership
    from carepost.core.database import system_session

    user = make_user(org, role="admin")
    with org_session(org.id) as s:
        service.add_suppression(s, org.id, "mia@example.test", "manual")
        s.commit()
    login_client(client, user)
    page = client.get("/app/consent/suppressions")
    assert page.status_code == 200
    # an administrator may see clear values; a marketer may not manage consent at all
    assert "mia@example.test" in page.text
    with system_session() as s:
        m = s.scalars(select(Membership).where(Membership.user_id == user.id)).one()
        m.role = "marketer"
        s.commit()
    assert client.get("/app/consent/suppressions").status_code == 403


def test_topics_settings_and_reports_pages(client, org, staff):
    r = client.post("/app/consent/topics", data={"csrf_token": staff, "key": "Bad Key!", "name": "x"})
    assert r.status_code == 422
    r = client.post("/app/consent/topics", data={"csrf_token": staff, "key": "news", "name": "Newsletter", "double_opt_in": "on"},
                    follow_redirects=False)
    assert r.status_code == 303 and "Newsletter" in client.get("/app/consent/topics").text
    r = client.post("/app/consent/settings", data={"csrf_token": staff, "frequency_cap_daily": "abc", "quiet_hours_start": "21:00"})
    assert r.status_code == 422 and "whole number" in r.text
    r = client.post("/app/consent/settings", data={"csrf_token": staff, "frequency_cap_daily": "2", "frequency_cap_weekly": "5",
                                                   "quiet_hours_start": "21:00", "quiet_hours_end": "08:00",
                                                   "default_time_zone": "America/Chicago", "authorization_default_months": "12",
                                                   "confirmation_link_hours": "24"}, follow_redirects=False)
    assert r.status_code == 303
    with org_session(org.id) as s:
        cfg = service.consent_settings(s, org.id)
    assert cfg["frequency_cap_weekly"] == 5 and cfg["default_time_zone"] == "America/Chicago"
    assert client.get("/app/consent/reports").status_code == 200
    csv = client.get("/app/consent/reports?format=csv")
    assert csv.text.startswith("purpose,topic,valid")
