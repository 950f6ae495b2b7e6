"""Authorization evidence that cannot be forged (issue 9 item 12).

* The API and staff record only ``api``, ``paper`` and ``verbal``; ``form``, ``portal`` and
  ``email_link`` are CarePost's own flows, and the caller cannot hand in a "patient" IP address or
  user agent: the recorder's own request facts are kept, labelled as such.
* ``paper`` needs the uploaded scan (PDF, PNG or JPEG by magic bytes, a size limit), stored
  encrypted, downloadable by ``consent:manage`` + ``phi:read_unmasked`` with an audit event.
* A signing date more than ``BACKDATE_WINDOW_DAYS`` back needs a ``backdate_reason`` and is flagged
  ``backdated`` in the API, the consent page, the evidence export and the reports.
* Expiry is a date or one event of a fixed list; free text is refused naming the field; an
  event-based authorization ends when its event is recorded.
"""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.accounts import credentials as creds
from carepost.audit.models import AuditEvent
from carepost.consent import authorizations as auth
from carepost.consent.models import (
    BACKDATE_WINDOW_DAYS,
    SCAN_MAX_BYTES,
    Authorization,
    AuthorizationScan,
)
from carepost.core import clock
from carepost.core.database import org_session
from carepost.core.errors import ValidationFailed
from tests.fixtures.accounts import login_client

ALL = ("consent:manage", "phi:read_unmasked", "phi:write", "phi:read_masked")
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n% signed authorization of Ann\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64


@pytest.fixture
def key(session):
    def make(org_id, scopes=ALL):
        cred, secret = creds.create_credential(session, org_id, name="Evidence test", scopes=list(scopes))
        session.commit()
        return {"Authorization": f"Bearer {cred.key_id}.{secret}"}

    return make


@pytest.fixture
def h(key, org):
    return key(org.id)


@pytest.fixture
def cid(client, h):
    r = client.post("/api/v1/contacts", json={"given_name": "Ann", "email": "ann@example.test"}, headers=h)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(client, h, cid, **extra):
    return client.post("/api/v1/authorizations", headers=h,
                       json={"contact_id": cid, "purpose": "marketing", "signature": {"name": "Ann Example"}, **extra})


def stored_count(session) -> int:
    session.rollback()
    return len(session.scalars(select(Authorization.id)).all())


def audit_actions(session, org_id) -> list[AuditEvent]:
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.org_id == org_id).order_by(AuditEvent.seq)))


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", ["form", "portal", "email_link", "staff", "anything"])
def test_api_cannot_claim_a_method_carepost_witnesses(client, h, cid, session, method):
    r = post(client, h, cid, method=method)
    assert r.status_code == 422 and r.json()["error"]["field"] == "method", r.text
    assert stored_count(session) == 0


@pytest.mark.parametrize("field,value", [("ip", "203.0.113.9"), ("user_agent", "Patient browser/1.0")])
def test_api_cannot_hand_in_patient_ip_or_user_agent(client, h, cid, session, field, value):
    r = post(client, h, cid, **{field: value})
    assert r.status_code == 422 and r.json()["error"]["field"] == field
    assert value not in r.text and stored_count(session) == 0


def test_api_records_its_own_request_facts_as_the_recorder(client, h, cid, session, org):
    r = client.post("/api/v1/authorizations", headers={**h, "User-Agent": "Billing-sync/2.1"},
                    json={"contact_id": cid, "purpose": "marketing", "signature": {"name": "Ann Example"},
                          "method": "verbal"})
    assert r.status_code == 201, r.text
    assert r.json()["method"] == "verbal" and r.json()["scan"] is None and "Billing-sync" not in r.text
    with org_session(org.id) as s:
        data = auth.authorization_dict(s, s.get(Authorization, r.json()["id"]), include_evidence=True)
    assert data["evidence_of"] == "recorder" and data["user_agent"] == "Billing-sync/2.1"
    assert post(client, h, cid).json()["method"] == "api"  # the default


def test_carepost_flows_still_record_witnessed_methods(org, cid):
    """The service keeps the witnessed methods for CarePost's own flows (forms, portal, email
    links), with the patient's own request facts and the signing time the flow recorded."""
    with org_session(org.id) as s:
        row = auth.record_authorization(s, org.id, contact_id=cid, purpose="marketing", method="email_link",
                                        signature_name="Ann Example", signed_at=clock.now() - timedelta(days=20),
                                        ip="198.51.100.4", user_agent="Patient browser", send_copy=False)
        data = auth.authorization_dict(s, row, include_evidence=True)
        assert (data["method"], data["evidence_of"], data["ip"], data["backdated"]) == (
            "email_link", "patient", "198.51.100.4", False)
        s.rollback()


def test_openapi_lists_only_the_recorded_methods_and_the_events(client):
    spec = client.get("/api/v1/openapi.json").json()
    schema = spec["components"]["schemas"]["AuthorizationIn"]["properties"]
    assert schema["method"]["enum"] == ["api", "paper", "verbal"]
    events = next(x for x in schema["expiration_event"]["anyOf"] if "enum" in x)["enum"]
    assert events == ["end_of_treatment", "end_of_enrollment", "end_of_program", "age_of_majority"]
    assert "ip" not in schema and "user_agent" not in schema and "scan" in schema and "backdate_reason" in schema
    assert "/api/v1/authorizations/{authorization_id}/scan" in spec["paths"]


# --------------------------------------------------------------------------- paper and its scan


def test_paper_without_a_scan_is_refused(client, h, cid, session):
    r = post(client, h, cid, method="paper")
    assert r.status_code == 422 and r.json()["error"]["field"] == "scan", r.text
    assert stored_count(session) == 0


@pytest.mark.parametrize("content,content_type", [
    (b"GIF89a" + b"\0" * 20, None),                        # not PDF, PNG or JPEG
    (b"<html><script>alert(1)</script>", "application/pdf"),  # claims PDF, is not
    (PNG, "application/pdf"),                               # a PNG declared as a PDF
    (b"MZ\x90\x00 executable", None),
])
def test_scan_is_checked_by_its_magic_bytes(client, h, cid, session, content, content_type):
    scan = {"content": b64(content), **({"content_type": content_type} if content_type else {})}
    r = post(client, h, cid, method="paper", scan=scan)
    assert r.status_code == 422 and r.json()["error"]["field"] == "scan", r.text
    assert stored_count(session) == 0


def test_scan_size_limit_and_scan_only_with_paper(client, h, cid, session):
    with pytest.raises(ValidationFailed) as too_big:
        auth.check_scan(b"%PDF-" + b"0" * SCAN_MAX_BYTES)
    assert too_big.value.field == "scan"
    assert auth.check_scan(JPEG) == "image/jpeg" and auth.check_scan(PNG, "image/png") == "image/png"
    r = post(client, h, cid, method="verbal", scan={"content": b64(PDF)})
    assert r.status_code == 422 and r.json()["error"]["field"] == "scan"
    r = post(client, h, cid, method="paper", scan={"content": "not base64!"})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("scan")
    assert stored_count(session) == 0


def test_paper_with_scan_is_stored_encrypted_retrievable_and_audited(client, h, key, cid, session, org):
    r = post(client, h, cid, method="paper", scan={"content_type": "application/pdf", "content": b64(PDF)})
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["method"] == "paper" and a["scan"]["content_type"] == "application/pdf" and a["scan"]["size"] == len(PDF)
    session.rollback()
    [stored] = session.scalars(select(AuthorizationScan)).all()
    assert stored.org_id == org.id and b"signed authorization of Ann" not in stored.content_enc  # encrypted at rest
    assert session.get(Authorization, a["id"]).scan_id == stored.id

    got = client.get(f"/api/v1/authorizations/{a['id']}/scan", headers=h)
    assert got.status_code == 200 and got.content == PDF
    assert got.headers["content-type"] == "application/pdf" and "attachment" in got.headers["content-disposition"]
    assert got.headers["x-content-type-options"] == "nosniff"
    [event] = [e for e in audit_actions(session, org.id) if e.action == "authorization.scan_download"]
    assert event.target_id == a["id"] and event.details["scan_id"] == stored.id and "Ann" not in str(event.details)

    # the scan is PHI: consent:manage without phi:read_unmasked is refused (and audited as a denial)
    masked = key(org.id, ("consent:manage", "phi:read_masked"))
    assert client.get(f"/api/v1/authorizations/{a['id']}/scan", headers=masked).status_code == 403
    # an authorization without a scan has none to give
    other = post(client, h, cid).json()
    missing = client.get(f"/api/v1/authorizations/{other['id']}/scan", headers=h)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "authorization_id"


def test_scan_of_another_organization_is_not_found(client, h, key, cid, session):
    from carepost.accounts.service import create_organization

    a = post(client, h, cid, method="paper", scan={"content": b64(PNG)}).json()
    other = create_organization(session, "Elsewhere Clinic")
    session.commit()
    r = client.get(f"/api/v1/authorizations/{a['id']}/scan", headers=key(other.id))
    assert r.status_code == 404 and b"PNG" not in r.content


# --------------------------------------------------------------------------- signing date


def test_backdated_without_reason_is_refused_with_reason_flagged(client, h, cid, session, org):
    old = (clock.now() - timedelta(days=BACKDATE_WINDOW_DAYS + 23)).isoformat()
    r = post(client, h, cid, method="verbal", signature={"name": "Ann Example", "signed_at": old})
    assert r.status_code == 422 and r.json()["error"]["field"] == "backdate_reason", r.text
    assert stored_count(session) == 0

    r = post(client, h, cid, method="verbal", signature={"name": "Ann Example", "signed_at": old},
             backdate_reason="Phone consent logged on the clinic's paper call sheet; entered after the audit")
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["backdated"] is True and "call sheet" not in r.text  # the reason is evidence, not echoed
    listed = client.get(f"/api/v1/authorizations?contact_id={cid}", headers=h).json()["data"]
    assert [x["backdated"] for x in listed] == [True]
    assert client.get(f"/api/v1/authorizations/{a['id']}", headers=h).json()["backdated"] is True
    report = client.get("/api/v1/consent/reports", headers=h).json()
    assert report["backdated"]["count"] == 1 and report["backdated"]["items"][0]["id"] == a["id"]
    assert report["backdated"]["window_days"] == BACKDATE_WINDOW_DAYS
    evidence = client.get(f"/api/v1/contacts/{cid}/consent/evidence", headers=h).text
    assert "BACKDATED" in evidence and "paper call sheet" in evidence
    [event] = [e for e in audit_actions(session, org.id) if e.action == "authorization.create"]
    assert event.details["backdated"] is True and "call sheet" not in str(event.details)


def test_recent_dates_are_not_backdated_and_take_no_reason(client, h, cid):
    recent = (clock.now() - timedelta(days=BACKDATE_WINDOW_DAYS - 2)).isoformat()
    r = post(client, h, cid, signature={"name": "Ann Example", "signed_at": recent})
    assert r.status_code == 201 and r.json()["backdated"] is False
    r = post(client, h, cid, signature={"name": "Ann Example", "signed_at": recent}, backdate_reason="Entered late")
    assert r.status_code == 422 and r.json()["error"]["field"] == "backdate_reason"
    future = (clock.now() + timedelta(days=1)).isoformat()
    r = post(client, h, cid, signature={"name": "Ann Example", "signed_at": future})
    assert r.status_code == 422 and r.json()["error"]["field"] == "signature.signed_at"


# --------------------------------------------------------------------------- expiry


@pytest.mark.parametrize("event", ["End of the study", "never", "revocation_only", "END_OF_TREATMENT"])
def test_free_text_expiration_event_is_refused(client, h, cid, session, event):
    r = post(client, h, cid, expiration_event=event)
    assert r.status_code == 422 and r.json()["error"]["field"] == "expiration_event", r.text
    assert stored_count(session) == 0


def test_expiry_is_a_date_or_one_event(client, h, cid, session):
    later = (clock.now() + timedelta(days=100)).isoformat()
    r = post(client, h, cid, expiration_event="end_of_treatment", expires_at=later)
    assert r.status_code == 422 and r.json()["error"]["field"] == "expiration_event"
    r = post(client, h, cid, expiration_event="age_of_majority")  # only for a minor a representative signed for
    assert r.status_code == 422 and r.json()["error"]["field"] == "expiration_event"
    r = post(client, h, cid, expiration_event="age_of_majority", representative={"name": "Bea", "authority": "parent"})
    assert r.status_code == 201 and r.json()["expiration_event"] == "age_of_majority"
    r = post(client, h, cid, expires_at=later)
    assert r.status_code == 201 and r.json()["expires_at"][:10] == later[:10] and r.json()["expiration_event"] is None


def test_an_event_based_authorization_ends_when_the_event_is_recorded(client, h, cid, session, org):
    r = post(client, h, cid, expiration_event="end_of_treatment")
    assert r.status_code == 201 and r.json()["expires_at"] is None
    a = r.json()
    check = client.post("/api/v1/eligibility", headers=h, json={"contact_ids": [cid], "purpose": "marketing"})
    assert check.json()["results"] == {cid: "eligible"}  # an event not yet recorded: still valid
    before_signing = (clock.now() - timedelta(days=2)).isoformat()
    bad = client.post(f"/api/v1/authorizations/{a['id']}/expiration-event", headers=h, json={"occurred_at": before_signing})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "occurred_at"
    r = client.post(f"/api/v1/authorizations/{a['id']}/expiration-event", headers=h, json={})
    assert r.status_code == 200 and r.json()["status"] == "expired" and r.json()["expiration_event_recorded_at"]
    again = client.post(f"/api/v1/authorizations/{a['id']}/expiration-event", headers=h, json={})
    assert again.status_code == 409
    check = client.post("/api/v1/eligibility", headers=h, json={"contact_ids": [cid], "purpose": "marketing"})
    assert check.json()["results"] == {cid: "authorization_expired"}
    dated = post(client, h, cid).json()  # a date-based one has no event to record
    r = client.post(f"/api/v1/authorizations/{dated['id']}/expiration-event", headers=h, json={})
    assert r.status_code == 422 and r.json()["error"]["field"] == "authorization_id"
    assert "authorization.expiration_event" in {e.action for e in audit_actions(session, org.id)}


# --------------------------------------------------------------------------- staff pages


@pytest.fixture
def staff(client, org, make_user):
    return login_client(client, make_user(org, role="compliance_officer"))


def _text_id(org_id):
    with org_session(org_id) as s:
        return auth.current_text(s, org_id, "marketing").id


def test_staff_page_records_paper_with_scan_and_verbal_only(client, org, cid, staff, session):
    text_id = _text_id(org.id)
    base = {"csrf_token": staff, "text_id": text_id, "signature_name": "Ann Example"}
    url = f"/app/contacts/{cid}/consent/authorizations"
    page = client.get(f"/app/contacts/{cid}/consent")
    assert 'name="scan"' in page.text and 'value="paper"' in page.text and 'value="verbal"' in page.text
    assert 'value="form"' not in page.text and 'value="portal"' not in page.text
    # a forged method, paper without its scan, a file that is not a scan: refused, nothing stored
    r = client.post(url, data={**base, "method": "form"})
    assert r.status_code == 422 and 'id="method-error"' in r.text
    r = client.post(url, data={**base, "method": "paper"})
    assert r.status_code == 422 and 'id="scan-error"' in r.text
    r = client.post(url, data={**base, "method": "paper"}, files={"scan": ("scan.pdf", b"<svg onload=x>", "application/pdf")})
    assert r.status_code == 422 and 'id="scan-error"' in r.text and "<svg" not in r.text
    r = client.post(url, data={**base, "method": "verbal", "expiration_event": "until I say so"})
    assert r.status_code == 422 and 'id="expiration_event-error"' in r.text
    assert stored_count(session) == 0
    # backdated: a reason is required, then the row is flagged on the page
    old = (clock.now() - timedelta(days=40)).strftime("%Y-%m-%d")
    r = client.post(url, data={**base, "method": "paper", "signed_on": old},
                    files={"scan": ("signed.png", PNG, "image/png")})
    assert r.status_code == 422 and 'id="backdate_reason-error"' in r.text
    r = client.post(url, data={**base, "method": "paper", "signed_on": old, "backdate_reason": "Found in the mailroom",
                               "expiration_event": "end_of_treatment"},
                    files={"scan": ("signed.png", PNG, "image/png")}, follow_redirects=False)
    assert r.status_code == 303, r.text
    r = client.post(url, data={**base, "method": "verbal"}, follow_redirects=False)
    assert r.status_code == 303
    with org_session(org.id) as s:
        rows = {a.method: a for a in auth.authorizations_of(s, org.id, cid)}
        assert set(rows) == {"paper", "verbal"} and rows["paper"].backdated and not rows["verbal"].backdated
        assert rows["paper"].scan_id and rows["verbal"].scan_id is None
        assert rows["paper"].expiration_event == "end_of_treatment"
        paper_id = rows["paper"].id
        evidence = auth.authorization_dict(s, rows["verbal"], include_evidence=True)
        assert evidence["evidence_of"] == "recorder"  # the staff member's request, not the patient's
    page = client.get(f"/app/contacts/{cid}/consent")
    assert page.text.count('data-testid="backdated"') == 1 and f'/app/authorizations/{paper_id}/scan' in page.text
    got = client.get(f"/app/authorizations/{paper_id}/scan")
    assert got.status_code == 200 and got.content == PNG and got.headers["content-type"] == "image/png"
    reports = client.get("/app/consent/reports")
    assert 'data-testid="backdated"' in reports.text and f"/app/contacts/{cid}/consent" in reports.text
    acts = [e.action for e in audit_actions(session, org.id)]
    assert acts.count("authorization.create") == 2 and "authorization.scan_download" in acts
