"""Workforce training and policy acknowledgement (issue 16 item 10, 164.308(a)(5)): once an
organization publishes a policy, a person (and a key a person created) sees PHI masked and is
refused routes that need it unmasked (403 ``acknowledgement_required``; a browser is sent to the
acknowledgement page) until they acknowledge the current versions; a new version gates again;
an expired acknowledgement gates; reminders go to those due; the per-person report; bad input
422 naming the field; an organization that published nothing is not gated."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from carepost.audit.models import AuditEvent
from tests.fixtures.accounts import login_client

POLICY = "Use patient data only for your duties. Report any misdirected message at once to the privacy officer."


@pytest.fixture
def gated(session, org, make_user):
    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(org.id) as s:
        contact = save_contact(s, org.id, ContactIn(given_name="Ottilie", family_name="Braddock",
                                                    email="ottilie@example.org")).contact
        s.commit()
        contact_id = contact.id
    nurse = make_user(org, role="compliance_officer")
    cred, secret = create_credential(session, org.id, name="nurse key", created_by=nurse.id,
                                     scopes=["phi:read_masked", "phi:read_unmasked", "compliance:manage"])
    session.commit()
    return org, nurse, contact_id, {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def _publish(client, headers, **over):
    body = {"key": "privacy-policy", "kind": "policy", "title": "Privacy policy", "body": POLICY}
    body.update(over)
    return client.post("/api/v1/compliance/policies", json=body, headers=headers)


def test_the_gate_masks_and_refuses_until_acknowledged(client, session, gated):
    from carepost.compliance import training

    org, nurse, contact_id, key = gated
    # Nothing published: not gated.
    assert client.get(f"/api/v1/contacts/{contact_id}", headers=key).json()["given_name"] == "Ottilie"

    def field(resp):
        assert resp.status_code == 422, resp.text
        return resp.json()["error"]["field"]

    assert field(_publish(client, key, key="Privacy Policy!")) == "key"
    assert field(_publish(client, key, kind="memo")) == "kind"
    assert field(_publish(client, key, title="")) == "title"
    assert field(_publish(client, key, body="too short")) == "body"
    assert field(client.put("/api/v1/compliance/policy-settings", json={"period_days": 5}, headers=key)) == "period_days"
    assert field(client.put("/api/v1/compliance/policy-settings", json={"reminder_days": 400}, headers=key)) == "reminder_days"
    r = _publish(client, key)
    assert r.status_code == 201 and r.json()["version"] == 1, r.text
    training.clear_cache()

    # Published: the key's creator has not acknowledged, so the key reads masked and is refused
    # where unmasked PHI is required, with a message saying what to do.
    assert client.get(f"/api/v1/contacts/{contact_id}", headers=key).json()["given_name"] == "***"
    r = client.get("/api/v1/compliance/disclosures", params={"contact_id": contact_id}, headers=key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "acknowledgement_required", r.text
    assert "/app/compliance/acknowledge" in r.json()["error"]["message"]
    session.rollback()
    denial = session.scalars(select(AuditEvent).where(AuditEvent.action == "access.denied")
                             .order_by(AuditEvent.occurred_at.desc())).first()
    assert "phi:read_unmasked" in denial.details["reason"]

    # A browser is sent to the acknowledgement page; acknowledging there lifts the gate.
    csrf = login_client(client, nurse)
    r = client.get(f"/app/compliance/accounting-requests/{'0' * 32}/document", follow_redirects=False,
                   headers={"accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"].startswith("/app/compliance/acknowledge?next=")
    page = client.get("/app/compliance/acknowledge")
    assert page.status_code == 200 and "Privacy policy" in page.text and "version 1" in page.text
    r = client.post("/app/compliance/acknowledge", data={"csrf_token": csrf, "next": "/app/contacts"},
                    follow_redirects=False)
    assert r.status_code == 422 and "Tick the box" in r.text  # not confirmed: nothing stored
    r = client.post("/app/compliance/acknowledge", data={"csrf_token": csrf, "confirm": "yes", "next": "//evil.example"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app"  # an outside "next" is not followed
    client.cookies.clear()
    training.clear_cache()
    assert client.get(f"/api/v1/contacts/{contact_id}", headers=key).json()["given_name"] == "Ottilie"
    report = client.get("/api/v1/compliance/policies/report", headers=key).json()
    [me] = [p for p in report["people"] if p["user_id"] == nurse.id]
    assert me["current"] and me["documents"][0]["state"] == "ok"

    # A new version gates again.
    assert _publish(client, key, body=POLICY + " Version two adds the clean-desk rule.").json()["version"] == 2
    training.clear_cache()
    assert client.get(f"/api/v1/contacts/{contact_id}", headers=key).json()["given_name"] == "***"
    r = client.post("/api/v1/compliance/acknowledgements", json={"document_ids": ["0" * 32]}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "document_ids"
    r = client.post("/api/v1/compliance/acknowledgements", json={}, headers=key)
    assert r.status_code == 201 and r.json()["current"], r.text
    assert client.get(f"/api/v1/contacts/{contact_id}", headers=key).json()["given_name"] == "Ottilie"
    session.rollback()
    assert session.scalar(select(AuditEvent).where(AuditEvent.action == "compliance.policy.acknowledged",
                                                   AuditEvent.target_id == nurse.id)) is not None


def test_expiry_and_reminders(client, session, gated):
    from carepost.compliance import training
    from carepost.compliance.models import PolicyAcknowledgement
    from carepost.core import clock
    from carepost.core.database import org_session

    org, nurse, contact_id, key = gated
    assert client.put("/api/v1/compliance/policy-settings", json={"period_days": 60, "reminder_days": 10},
                      headers=key).status_code == 200
    _publish(client, key)
    assert client.post("/api/v1/compliance/acknowledgements", json={}, headers=key).status_code == 201
    with org_session(org.id) as s:
        # 55 days later the acknowledgement ends within the 10 reminder days: due soon, still current.
        later = clock.now() + timedelta(days=55)
        st = training.status(s, org.id, nurse.id, now=later)
        assert st["current"] and st["documents"][0]["state"] == "due_soon"
        st = training.status(s, org.id, nurse.id, now=clock.now() + timedelta(days=61))
        assert not st["current"] and st["documents"][0]["state"] == "expired"
        # Move the acknowledgement back 61 days: the gate closes again.
        for row in s.scalars(select(PolicyAcknowledgement).where(PolicyAcknowledgement.user_id == nurse.id)):
            row.acknowledged_at = row.acknowledged_at - timedelta(days=61)
        s.commit()
    training.clear_cache()
    assert client.get(f"/api/v1/contacts/{contact_id}", headers=key).json()["given_name"] == "***"
    with org_session(org.id) as s:
        reminded = training.send_reminders(s, org.id)
        s.commit()
        assert reminded == [nurse.id]
        assert training.send_reminders(s, org.id) == []  # at most once a week
        s.commit()
    session.rollback()
    assert session.scalar(select(AuditEvent).where(AuditEvent.action == "compliance.policy.reminded",
                                                   AuditEvent.target_id == nurse.id)) is not None
