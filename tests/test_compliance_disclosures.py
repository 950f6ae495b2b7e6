"""Accounting of disclosures (issue 16 item 4, 45 CFR 164.528): disclosures recorded by hand and
derived from PHI webhooks, the accounting per patient over six years, and the request workflow —
60 days, one 30-day extension with a reason, overdue flag, fulfilment with the document's hash —
through the API and the pages (server-side); bad input 422 naming the field; cross-tenant 404."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest
from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from tests.test_webhooks import _tls_receiver, allow_private, immediate, make_endpoint, tls_receiver  # noqa: F401

PATIENT_EMAIL = "ophelia.marchbanks@example.org"


def _headers(session, org_id, scopes, name):
    cred, secret = create_credential(session, org_id, name=name, scopes=scopes)
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


@pytest.fixture
def clinic(session, org):
    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(org.id) as s:
        ophelia = save_contact(s, org.id, ContactIn(given_name="Ophelia", family_name="Marchbanks", email=PATIENT_EMAIL,
                                                    birth_date="1970-02-02")).contact
        other = save_contact(s, org.id, ContactIn(given_name="Bertram", family_name="Oakes",
                                                  email="bertram@example.org")).contact
        s.commit()
        ids = {"ophelia": ophelia.id, "other": other.id}
    ids["officer"] = _headers(session, org.id, ["compliance:manage", "phi:read_unmasked"], "officer")
    ids["masked"] = _headers(session, org.id, ["compliance:manage"], "masked")
    return org, ids


def _record(client, headers, contact_id, **over):
    body = {"contact_id": contact_id, "disclosed_at": (date.today() - timedelta(days=40)).isoformat(),
            "recipient_name": "State Department of Health", "recipient_address": "1 Capitol Way, Springfield",
            "description": "Immunization history", "purpose": "Public health reporting required by law"}
    body.update(over)
    return client.post("/api/v1/compliance/disclosures", json=body, headers=headers)


def test_recorded_disclosures_and_bad_input(client, clinic, session):
    from carepost.accounts.service import create_organization
    from carepost.audit.models import AuditEvent, Disclosure

    org, ids = clinic
    h = ids["officer"]
    r = _record(client, h, ids["ophelia"])
    assert r.status_code == 201, r.text
    # stored encrypted: the recipient and description are not in the row in clear
    session.commit()
    row = session.get(Disclosure, r.json()["id"])
    assert b"Department" not in row.recipient_name_enc and b"Immunization" not in row.description_enc
    event = session.scalar(select(AuditEvent).where(AuditEvent.action == "disclosure.recorded"))
    assert event.target_id == ids["ophelia"] and "Department" not in str(event.details)

    def field(resp):
        assert resp.status_code == 422, resp.text
        return resp.json()["error"]["field"]

    assert field(_record(client, h, ids["ophelia"], disclosed_at=(date.today() + timedelta(days=3)).isoformat())) == "disclosed_at"
    assert field(_record(client, h, ids["ophelia"], disclosed_at=(date.today() - timedelta(days=6 * 366)).isoformat())) == "disclosed_at"
    assert field(_record(client, h, ids["ophelia"], disclosed_at="2025-02-30")) == "disclosed_at"
    assert field(_record(client, h, ids["ophelia"], purpose="")) == "purpose"
    assert field(_record(client, h, ids["ophelia"], recipient_name="   ")) == "recipient_name"
    assert field(_record(client, h, "0" * 32)) == "contact_id"
    other = create_organization(session, "Elsewhere Clinic")
    session.commit()
    theirs = _headers(session, other.id, ["compliance:manage", "phi:read_unmasked"], "theirs")
    # another organization's patient is unknown there: 422 naming contact_id, nothing stored
    assert field(_record(client, theirs, ids["ophelia"])) == "contact_id"
    r = client.get("/api/v1/compliance/disclosures", params={"contact_id": ids["ophelia"]}, headers=theirs)
    assert r.status_code == 422 and r.json()["error"]["field"] == "contact_id"
    assert session.scalar(select(Disclosure.id).where(Disclosure.org_id == other.id)) is None

    # listing needs unmasked PHI rights (recipients and descriptions are PHI)
    r = client.get("/api/v1/compliance/disclosures", params={"contact_id": ids["ophelia"]}, headers=ids["masked"])
    assert r.status_code == 403
    r = client.get("/api/v1/compliance/disclosures", params={"contact_id": ids["ophelia"]}, headers=h)
    assert r.status_code == 200
    assert [(e["recipient_name"], e["source"]) for e in r.json()["data"]] == [("State Department of Health", "manual")]
    assert client.get("/api/v1/compliance/disclosures", params={"contact_id": ids["other"]}, headers=h).json()["data"] == []
    r = client.get("/api/v1/compliance/disclosures", params={"contact_id": ids["ophelia"], "period_end": "0001-01-01"},
                   headers=h)
    assert r.status_code == 200 and r.json()["data"] == []  # the earliest date: an empty period, not an error
    for params, name in (({"period_end": "9999-12-31"}, "period_end"),
                         ({"period_start": "2000-01-01"}, "period_start")):
        r = client.get("/api/v1/compliance/disclosures", params={"contact_id": ids["ophelia"], **params}, headers=h)
        assert r.status_code == 422 and r.json()["error"]["field"] == name, (params, r.text)


def test_webhooks_carrying_phi_are_in_the_accounting(client, clinic, session, tls_receiver, allow_private, immediate):  # noqa: F811
    from carepost.core.database import org_session
    from carepost.tracking.service import emit

    org, ids = clinic
    phi, _ = make_endpoint(session, org.id, tls_receiver.url("/crm"), event_types=["consent.unsubscribed"],
                           include_phi=True, allow_phi=True)
    phi.description = "Acme CRM"
    session.commit()
    make_endpoint(session, org.id, tls_receiver.url("/plain"), event_types=["consent.unsubscribed"])
    with org_session(org.id) as work:
        emit(work, org.id, "consent.unsubscribed", {"contact_id": ids["ophelia"], "topic_id": None},
             phi={"address": PATIENT_EMAIL})
        emit(work, org.id, "consent.unsubscribed", {"contact_id": ids["other"], "topic_id": None},
             phi={"address": "bertram@example.org"})
        work.commit()
    assert len(tls_receiver.wait(4)) == 4
    r = client.get("/api/v1/compliance/disclosures", params={"contact_id": ids["ophelia"]}, headers=ids["officer"])
    entries = r.json()["data"]
    # one PHI delivery concerns Ophelia; the plain endpoint got no PHI, and Bertram's is his own
    assert [(e["source"], e["recipient_name"]) for e in entries] == [("webhook", "Acme CRM")]
    assert entries[0]["recipient_address"].endswith("/crm") and "consent.unsubscribed" in entries[0]["description"]
    assert "webhook" in r.json()["sources"]
    r = client.get("/api/v1/compliance/disclosures", params={"contact_id": ids["other"]}, headers=ids["officer"])
    assert len(r.json()["data"]) == 1


def test_request_workflow_due_dates_extension_overdue_and_fulfilment(client, clinic, session):
    from carepost.audit.models import AuditEvent

    org, ids = clinic
    h = ids["officer"]
    today = date.today()
    _record(client, h, ids["ophelia"])
    _record(client, h, ids["ophelia"], disclosed_at=(today - timedelta(days=5 * 365)).isoformat(),
            recipient_name="County Court", description="Visit dates", purpose="Subpoena")

    def create(**over):
        body = {"contact_id": ids["ophelia"], "received_on": (today - timedelta(days=10)).isoformat()}
        body.update(over)
        return client.post("/api/v1/compliance/accounting-requests", json=body, headers=h)

    r = create()
    assert r.status_code == 201, r.text
    req = r.json()
    assert req["due_on"] == (today + timedelta(days=50)).isoformat() and req["days_left"] == 50
    assert req["status"] == "open" and req["overdue"] is False
    assert req["period_start"] == (today - timedelta(days=10)).replace(year=today.year - 6).isoformat()

    # bad input names the field
    def field(resp):
        assert resp.status_code == 422, resp.text
        return resp.json()["error"]["field"]

    assert field(create(received_on=(today + timedelta(days=1)).isoformat())) == "received_on"
    assert field(create(received_on=(today - timedelta(days=7 * 365)).isoformat())) == "received_on"
    assert field(create(period_start=(today - timedelta(days=7 * 365)).isoformat())) == "period_start"
    assert field(create(period_end=today.isoformat())) == "period_end"
    assert field(create(contact_id="0" * 32)) == "contact_id"
    url = f"/api/v1/compliance/accounting-requests/{req['id']}"
    assert field(client.post(f"{url}/extension", json={}, headers=h)) == "reason"
    assert field(client.post(f"{url}/extension", json={"reason": "   "}, headers=h)) == "reason"

    r = client.post(f"{url}/extension", json={"reason": "Records held by our billing vendor are still due."}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["extended_due_on"] == (today + timedelta(days=80)).isoformat()
    assert r.json()["status"] == "extended" and r.json()["extension_reason"].startswith("Records held")
    r = client.post(f"{url}/extension", json={"reason": "again"}, headers=h)
    assert r.status_code == 409 and r.json()["error"]["field"] == "extension"

    # a request received 70 days ago is overdue and can no longer be extended
    late = create(received_on=(today - timedelta(days=70)).isoformat()).json()
    assert late["overdue"] is True and late["days_left"] == -10
    r = client.post(f"/api/v1/compliance/accounting-requests/{late['id']}/extension", json={"reason": "busy"}, headers=h)
    assert field(r) == "due_on"
    overdue = client.get("/api/v1/compliance/accounting-requests", params={"overdue": "true"}, headers=h).json()["data"]
    assert [x["id"] for x in overdue] == [late["id"]]

    # a narrower period (the last year) leaves the older disclosure out
    narrow = create(period_start=(today - timedelta(days=365)).isoformat()).json()
    doc = client.get(f"/api/v1/compliance/accounting-requests/{narrow['id']}/accounting", headers=h).json()
    assert [e["recipient_name"] for e in doc["entries"]] == ["State Department of Health"]

    # the document: text and HTML name the patient, each entry's date, recipient, description, purpose
    doc = client.get(f"{url}/accounting", headers=h).json()
    assert [e["recipient_name"] for e in doc["entries"]] == ["County Court", "State Department of Health"]
    text = client.get(f"{url}/accounting", params={"format": "text"}, headers=h)
    assert text.status_code == 200 and "attachment" in text.headers["content-disposition"]
    for value in ("Ophelia Marchbanks", "County Court", "Subpoena", "Public health reporting required by law",
                  (today - timedelta(days=40)).isoformat(), "Bar Clinic"):
        assert value in text.text, value
    html = client.get(f"{url}/accounting", params={"format": "html"}, headers=h)
    assert html.status_code == 200 and "County Court" in html.text and "<table" in html.text
    assert client.get(f"{url}/accounting", headers=ids["masked"]).status_code == 403

    # fulfilment: the date cannot be in the future or before receipt; the text's hash is kept
    assert field(client.post(f"{url}/fulfil", json={"fulfilled_on": (today + timedelta(days=1)).isoformat()},
                             headers=h)) == "fulfilled_on"
    assert field(client.post(f"{url}/fulfil", json={"fulfilled_on": (today - timedelta(days=11)).isoformat()},
                             headers=h)) == "fulfilled_on"
    r = client.post(f"{url}/fulfil", json={"delivery_method": "mail"}, headers=h)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "fulfilled" and done["fulfilled_on"] == today.isoformat() and done["entry_count"] == 2
    assert re.fullmatch(r"[0-9a-f]{64}", done["document_sha256"]) and done["overdue"] is False
    assert client.post(f"{url}/fulfil", json={}, headers=h).status_code == 409
    session.commit()
    actions = [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id)
                                                 .order_by(AuditEvent.seq))]
    for action in ("disclosure.accounting_request.created", "disclosure.accounting_request.extended",
                   "disclosure.accounting.read", "disclosure.accounting.produced",
                   "disclosure.accounting_request.fulfilled"):
        assert action in actions, action


def test_cross_tenant_requests_are_404(client, clinic, session):
    from carepost.accounts.service import create_organization

    org, ids = clinic
    r = client.post("/api/v1/compliance/accounting-requests",
                    json={"contact_id": ids["ophelia"], "received_on": date.today().isoformat()}, headers=ids["officer"])
    rid = r.json()["id"]
    other = create_organization(session, "Far Clinic")
    session.commit()
    theirs = _headers(session, other.id, ["compliance:manage", "phi:read_unmasked"], "far")
    base = f"/api/v1/compliance/accounting-requests/{rid}"
    assert client.get(base, headers=theirs).status_code == 404
    assert client.get(f"{base}/accounting", headers=theirs).status_code == 404
    assert client.post(f"{base}/extension", json={"reason": "x"}, headers=theirs).status_code == 404
    assert client.post(f"{base}/fulfil", json={}, headers=theirs).status_code == 404
    assert client.get("/api/v1/compliance/accounting-requests", headers=theirs).json()["data"] == []
    r = client.post("/api/v1/compliance/accounting-requests",
                    json={"contact_id": ids["ophelia"], "received_on": date.today().isoformat()}, headers=theirs)
    assert r.status_code == 422 and r.json()["error"]["field"] == "contact_id"


def test_pages_track_a_request_from_receipt_to_fulfilment(client, clinic, make_user):
    from tests.fixtures.accounts import csrf_from, login_client

    org, ids = clinic
    officer = make_user(org, role="compliance_officer")
    login_client(client, officer)
    page = client.get("/app/compliance")
    assert page.status_code == 200 and "Compliance center" in page.text
    csrf = csrf_from(page.text)
    # errors are shown next to their field
    r = client.post("/app/compliance/accounting-requests",
                    data={"contact_id": ids["ophelia"], "received_on": "2999-01-01", "csrf_token": csrf})
    assert r.status_code == 422 and 'id="received_on-error"' in r.text
    r = client.post("/app/compliance/accounting-requests",
                    data={"contact_id": "not-a-patient", "received_on": date.today().isoformat(), "csrf_token": csrf})
    assert r.status_code == 422 and 'id="contact_id-error"' in r.text
    late = (date.today() - timedelta(days=61)).isoformat()
    r = client.post("/app/compliance/accounting-requests",
                    data={"contact_id": ids["ophelia"], "received_on": late, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    detail_url = r.headers["location"]
    page = client.get("/app/compliance")
    assert 'data-testid="overdue-count"' in page.text and 'data-overdue="true"' in page.text

    detail = client.get(detail_url)
    assert detail.status_code == 200 and "Ophelia Marchbanks" in detail.text
    assert 'data-testid="accounting-empty"' in detail.text
    r = client.post(f"{detail_url}/extension", data={"reason": "", "csrf_token": csrf})
    assert r.status_code == 422 and 'id="reason-error"' in r.text
    r = client.post(f"{detail_url}/disclosures", data={
        "disclosed_at": (date.today() - timedelta(days=75)).isoformat(), "recipient_name": "Gamma Research Institute",
        "recipient_address": "", "description": "Lab results", "purpose": "Research under an IRB waiver",
        "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    r = client.post(f"{detail_url}/disclosures", data={"disclosed_at": "", "recipient_name": "x", "description": "y",
                                                       "purpose": "z", "csrf_token": csrf})
    assert r.status_code == 422 and 'id="disclosed_at-error"' in r.text
    detail = client.get(detail_url)
    assert "Gamma Research Institute" in detail.text and "Research under an IRB waiver" in detail.text
    printable = client.get(f"{detail_url}/document")
    assert printable.status_code == 200 and "Gamma Research Institute" in printable.text
    assert 'href="/static/app.css"' in printable.text and "http" not in printable.text.split("<body>")[0].replace(
        'http-equiv', '')
    text = client.get(f"{detail_url}/accounting.txt")
    assert text.status_code == 200 and "Gamma Research Institute" in text.text
    r = client.post(f"{detail_url}/fulfil", data={"fulfilled_on": date.today().isoformat(), "delivery_method": "mail",
                                                 "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    detail = client.get(detail_url)
    assert "fulfilled" in detail.text and "1 entries" in detail.text


def test_roles_without_compliance_permission_are_refused(client, clinic, make_user):
    from tests.fixtures.accounts import login_client

    org, _ids = clinic
    marketer = make_user(org, role="marketer")
    login_client(client, marketer)
    assert client.get("/app/compliance").status_code == 403
    assert "/app/compliance" not in client.get("/app").text
