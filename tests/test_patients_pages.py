"""Contacts list, contact page and import pages through the web UI (TestClient; Playwright
flows are in test_patients_ui.py)."""

from __future__ import annotations

import json

from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.core.database import org_session
from carepost.patients import service
from carepost.patients.schemas import ContactIn, FactIn
from tests.fixtures.accounts import csrf_from, login_client


def _jane(org_id: str) -> str:
    with org_session(org_id) as s:
        c = service.save_contact(s, org_id, ContactIn(external_id="J1", given_name="Jane", family_name="Doe", email="jane@example.org",
                                                      birth_date="1980-05-17", mrn="MRN-55", city="Madison", state="WI")).contact
        service.create_fact(s, org_id, c.id, "conditions", FactIn(code_system="icd10cm", code="E11.9", display="Type 2 diabetes"))
        s.commit()
        return c.id


def test_marketer_sees_masked_owner_sees_clear(client, org, make_user, session):
    cid = _jane(org.id)
    marketer = make_user(org, role="marketer")
    login_client(client, marketer)
    page = client.get(f"/app/contacts/{cid}")
    assert page.status_code == 200
    # No direct identifier at all in the masked view, not even an initial or the email domain (issue 9 item 7).
    assert "***" in page.text and "Jane" not in page.text and "jane@" not in page.text and "1980-05-17" not in page.text
    # Clinical facts as a count per category only: no code, no description (issue 9 item 7).
    assert "Type 2 diabetes" not in page.text and "E11.9" not in page.text and "Masked view" in page.text
    assert "1 recorded" in page.text
    listing = client.get("/app/contacts")
    assert "Doe" not in listing.text and "Jane" not in listing.text

    from fastapi.testclient import TestClient

    owner = make_user(org, role="owner")
    with TestClient(client.app, base_url="http://localhost:8000") as other:
        login_client(other, owner)
        page = other.get(f"/app/contacts/{cid}")
        assert "Jane" in page.text and "jane@example.org" in page.text and "1980-05-17" in page.text
        assert "Type 2 diabetes" in page.text
    session.rollback()
    views = [e.details["view"] for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "contact.read").order_by(AuditEvent.seq))]
    assert views == ["masked", "unmasked"]


def test_search_is_a_post_and_filters_validate(client, org, make_user):
    cid = _jane(org.id)
    user = make_user(org, role="owner")
    csrf = login_client(client, user)
    r = client.post("/app/contacts/search", data={"email": "JANE@example.org", "csrf_token": csrf})
    assert r.status_code == 200 and f"/app/contacts/{cid}" in r.text
    r = client.post("/app/contacts/search", data={"email": "", "csrf_token": csrf})
    assert r.status_code == 422 and "Search by email" in r.text
    r = client.get("/app/contacts?born_after=yesterday")
    assert r.status_code == 422 and "YYYY-MM-DD" in r.text
    r = client.get("/app/contacts?state=WI")
    assert f"/app/contacts/{cid}" in r.text


def test_delete_from_the_contact_page(client, org, make_user):
    cid = _jane(org.id)
    user = make_user(org, role="owner")
    csrf = login_client(client, user)
    page = client.get(f"/app/contacts/{cid}")
    r = client.post(f"/app/contacts/{cid}/delete", data={"csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get(f"/app/contacts/{cid}").status_code == 404


def test_import_pages_and_cookie_upload(client, org, make_user):
    from carepost.core.queue import huey

    user = make_user(org, role="marketer")
    csrf = login_client(client, user)
    page = client.get("/app/imports")
    assert page.status_code == 200 and 'id="import-file"' in page.text and "/static/patients-import.js" in page.text
    huey.immediate = True
    try:
        r = client.post("/api/v1/imports", content=b"Patient ID,First Name\n1,Ann\n,NoId\n",
                        headers={"Content-Type": "text/csv", "X-CSRF-Token": csrf})
    finally:
        huey.immediate = False
    assert r.status_code == 202, r.text
    job = r.json()
    status = client.get(f"/app/imports/{job['id']}")
    assert "completed with errors" in status.text and job["error_report"] in status.text
    fragment = client.get(f"/app/imports/{job['id']}/progress")
    assert "hx-get" not in fragment.text  # finished: polling stops
    assert client.post("/api/v1/imports", content=b"x", headers={"Content-Type": "text/csv"}).status_code == 403  # no CSRF token


def test_pages_need_permissions(client, org, make_user):
    user = make_user(org, role="developer")  # may import, sees masked PHI, no unmasked
    login_client(client, user)
    cid = _jane(org.id)
    assert client.get(f"/app/contacts/{cid}").status_code == 200
    assert "Export (HTML)" not in client.get(f"/app/contacts/{cid}").text
    analyst = make_user(org, role="analyst")
    from fastapi.testclient import TestClient

    with TestClient(client.app, base_url="http://localhost:8000") as other:
        login_client(other, analyst)
        assert other.get("/app/imports").status_code == 403
        assert json.dumps(other.get(f"/api/v1/contacts/{cid}").json()).count("***") >= 2


def test_export_links_work_with_the_session(client, org, make_user):
    cid = _jane(org.id)
    login_client(client, make_user(org, role="owner"))
    page = client.get(f"/app/contacts/{cid}")
    assert f"/api/v1/contacts/{cid}/export?format=html" in page.text
    r = client.get(f"/api/v1/contacts/{cid}/export?format=html")
    assert r.status_code == 200 and "Type 2 diabetes" in r.text and "<script" not in r.text


def test_import_page_counts_warnings_apart_from_failures(client, org, make_user):
    """Issue 10 item 4: a record kept with an unverified code is a warning in the UI summary and
    the error table, not a failure."""
    from carepost.core.queue import huey

    user = make_user(org, role="marketer")
    csrf = login_client(client, user)
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "name": [{"family": "Roe", "given": ["Rita"]}]}},
        {"resource": {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
                      "code": {"coding": [{"system": "http://loinc.org", "code": "5089AAAA"}]}, "effectiveDateTime": "2025-01-01"}},
        {"resource": {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/nobody"}}},
    ]}
    huey.immediate = True
    try:
        r = client.post("/api/v1/imports", content=json.dumps(bundle).encode(),
                        headers={"Content-Type": "application/fhir+json", "X-CSRF-Token": csrf})
    finally:
        huey.immediate = False
    assert r.status_code == 202, r.text
    page = client.get(f"/app/imports/{r.json()['id']}").text
    assert 'data-testid="count-failed">1<' in page and 'data-testid="count-warnings">1<' in page
    assert "warning" in page and "unverified" in page and 'data-testid="count-patients">1<' in page
    assert 'data-testid="no-email-warning"' in page
