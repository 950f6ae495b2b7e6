"""The breach incident register (issue 16 item 5, 164.400-414) through the API: an incident opened
for a message sent to the wrong address plus a user's reads found in the audit trail — affected
patients, categories and states computed from the message log and the audit trail; the guided
four-factor assessment (in order, a low rating documented); the 60-day clock; notices in the
patient's language (Spanish, English); the HHS and media thresholds at 500 / more than 500 in a
state; notifications and closing; bad input 422 naming the field; every step audited."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from carepost.audit.models import AuditEvent
from tests.test_bounces import make_sent


def _headers(session, org_id, scopes, name):
    cred, secret = create_credential(session, org_id, name=name, scopes=scopes)
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


@pytest.fixture
def incident_world(session, org, client):
    from carepost.core.database import org_session
    from carepost.delivery.models import MessageRecipient
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(org.id) as s:
        ana = save_contact(s, org.id, ContactIn(given_name="Ana", family_name="Quiroga", email="ana.q@example.org",
                                                preferred_language="es-MX", state="CA")).contact.id
        ben = save_contact(s, org.id, ContactIn(given_name="Benedikt", family_name="Lowe", email="ben.l@example.org",
                                                state="TX")).contact.id
        s.commit()
    sent = make_sent(session, org.id, "wrong.person@example.net")
    with org_session(org.id) as s:
        s.get(MessageRecipient, sent.recipient_id).contact_id = ana  # Ana's reminder went to a stranger
        s.commit()
    officer = _headers(session, org.id, ["compliance:manage", "phi:read_unmasked"], "officer")
    snoop = _headers(session, org.id, ["phi:read_masked", "phi:read_unmasked"], "snoop")
    started = date.today().isoformat() + "T00:00:00Z"
    assert client.get(f"/api/v1/contacts/{ben}", headers=snoop).status_code == 200
    session.rollback()
    read = session.scalars(select(AuditEvent).where(AuditEvent.action == "contact.read",
                                                    AuditEvent.target_id == ben)).first()
    return {"org": org, "ana": ana, "ben": ben, "message_id": sent.message_id, "officer": officer,
            "masked": _headers(session, org.id, ["compliance:manage"], "masked"),
            "snoop_actor": read.actor_id, "from": started,
            "to": (date.today() + timedelta(days=1)).isoformat() + "T00:00:00Z"}


def test_incident_from_the_message_log_and_audit_trail(client, session, incident_world):
    w = incident_world
    h = w["officer"]
    good = {"title": "Reminder sent to a wrong address", "kind": "misdirected_message",
            "discovered_on": (date.today() - timedelta(days=3)).isoformat(), "message_ids": [w["message_id"]],
            "audit_actor_id": w["snoop_actor"], "audit_from": w["from"], "audit_to": w["to"],
            "notice_contact": "1-800-555-0100 or privacy@clinic.example", "description": "Found by the front desk."}

    def field(body):
        r = client.post("/api/v1/compliance/breaches", json=body, headers=h)
        assert r.status_code == 422, r.text
        return r.json()["error"]["field"]

    assert field({**good, "title": ""}) == "title"
    assert field({**good, "kind": "oops"}) == "kind"
    assert field({**good, "discovered_on": (date.today() + timedelta(days=1)).isoformat()}) == "discovered_on"
    assert field({**good, "occurred_on": date.today().isoformat()}) == "occurred_on"
    assert field({**good, "message_ids": ["0" * 32]}) == "message_ids"
    assert field({**good, "message_ids": ["not-an-id"]}) == "message_ids"
    assert field({**good, "audit_to": None}) == "audit_from"
    assert field({**good, "audit_actor_id": None}) == "audit_actor_id"
    assert field({**good, "audit_to": w["from"]}) == "audit_to"
    assert field({"title": "x", "kind": "other", "discovered_on": date.today().isoformat()}) == "message_ids"

    r = client.post("/api/v1/compliance/breaches", json=good, headers=h)
    assert r.status_code == 201, r.text
    inc = r.json()
    assert inc["affected_count"] == 2 and inc["by_state"] == {"CA": 1, "TX": 1}
    assert "name and email address" in inc["categories"]
    assert "demographics and contact details" in inc["categories"]
    assert inc["deadlines"]["days_left"] == 57
    assert inc["deadlines"]["hhs"]["immediate"] is False and inc["deadlines"]["media"]["required"] is False
    assert inc["deadlines"]["hhs"]["due"] == (date(date.today().year - (1 if (date.today() - timedelta(days=3)).year
                                                                         < date.today().year else 0), 12, 31)
                                              + timedelta(days=60)).isoformat()
    iid = inc["id"]

    # The guided assessment: in order; a low rating must say why; then the conclusion.
    def assess(**body):
        return client.post(f"/api/v1/compliance/breaches/{iid}/assessment", json=body, headers=h)

    r = assess(factor="mitigation", rating="high", notes="")
    assert r.status_code == 422 and r.json()["error"]["field"] == "factor"
    r = assess(factor="nature_extent", rating="severe")
    assert r.status_code == 422 and r.json()["error"]["field"] == "rating"
    r = assess(factor="nature_extent", rating="low")
    assert r.status_code == 422 and r.json()["error"]["field"] == "notes"
    assert assess(factor="nature_extent", rating="medium", notes="Name, appointment type and time").status_code == 200
    assert assess(factor="unauthorized_person", rating="medium", notes="A member of the public").status_code == 200
    assert assess(factor="acquired_viewed", rating="high", notes="The recipient replied quoting it").status_code == 200
    r = assess(factor="mitigation", rating="medium", notes="Asked to delete; no assurance yet")
    assert r.status_code == 200 and r.json()["conclusion"] == "notifiable" and r.json()["status"] == "assessed"
    assert r.json()["assessment"]["acquired_viewed"]["rating"] == "high"

    # Notices in each patient's language; PHI: unmasked permission needed.
    assert client.get(f"/api/v1/compliance/breaches/{iid}/notices", headers=w["masked"]).status_code == 403
    r = client.get(f"/api/v1/compliance/breaches/{iid}/notices", headers=h)
    assert r.status_code == 200, r.text
    by_lang = {n["language"]: n for n in r.json()["data"]}
    assert set(by_lang) == {"es", "en"}
    assert by_lang["es"]["text"].startswith("Estimado/a Ana Quiroga:") and "1-800-555-0100" in by_lang["es"]["text"]
    assert "Qué sucedió" in by_lang["es"]["text"] and by_lang["es"]["subject"].startswith("Aviso")
    assert by_lang["en"]["text"].startswith("Dear Benedikt Lowe,") and "What information was involved" in by_lang["en"]["text"]

    # Closing needs the individuals notified first; dates are checked.
    r = client.post(f"/api/v1/compliance/breaches/{iid}/notifications", json={"closed_on": date.today().isoformat()},
                    headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "closed_on"
    r = client.post(f"/api/v1/compliance/breaches/{iid}/notifications",
                    json={"individuals_notified_on": (date.today() + timedelta(days=2)).isoformat()}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "individuals_notified_on"
    r = client.post(f"/api/v1/compliance/breaches/{iid}/notifications",
                    json={"individuals_notified_on": date.today().isoformat(), "hhs_notified_on": date.today().isoformat(),
                          "closed_on": date.today().isoformat()}, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "closed", r.text

    # Every step is in the audit trail, with no PHI.
    session.rollback()
    rows = session.scalars(select(AuditEvent).where(AuditEvent.target_id == iid).order_by(AuditEvent.seq)).all()
    actions = [e.action for e in rows]
    for action in ("compliance.breach.opened", "compliance.breach.computed", "compliance.breach.factor_assessed",
                   "compliance.breach.notices_drafted", "compliance.breach.notifications_recorded"):
        assert action in actions
    assert actions.count("compliance.breach.factor_assessed") == 4
    assert not any("Quiroga" in str(e.details) or "front desk" in str(e.details) for e in rows)

    # Another organization does not see it.
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Elsewhere")
    session.commit()
    theirs = _headers(session, other.id, ["compliance:manage"], "theirs")
    assert client.get(f"/api/v1/compliance/breaches/{iid}", headers=theirs).status_code == 404


def test_hhs_and_media_thresholds(client, session, incident_world):
    from carepost.core.database import org_session
    from carepost.core.ids import new_id
    from carepost.patients.models import Contact

    w = incident_world
    org_id = w["org"].id
    with org_session(org_id) as s:
        ids = [new_id() for _ in range(501)]
        s.add_all([Contact(id=i, org_id=org_id, state="NY") for i in ids])
        s.add_all([Contact(id=new_id(), org_id=org_id, state="NJ") for _ in range(3)])
        s.commit()
    base = {"title": "Laptop stolen", "kind": "lost_device", "discovered_on": date.today().isoformat()}
    r = client.post("/api/v1/compliance/breaches", json={**base, "contact_ids": ids[:500]}, headers=w["officer"])
    d = r.json()["deadlines"]
    assert r.status_code == 201 and d["hhs"]["immediate"] is True and d["media"]["required"] is False  # 500: not > 500
    r = client.post("/api/v1/compliance/breaches", json={**base, "contact_ids": ids}, headers=w["officer"])
    d = r.json()["deadlines"]
    assert d["hhs"]["immediate"] is True and d["media"] == {**d["media"], "required": True, "states": ["NY"]}
    assert d["hhs"]["due"] == d["individuals_due"] == (date.today() + timedelta(days=60)).isoformat()
