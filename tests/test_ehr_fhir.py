"""FHIR R4 Appointment and Encounter in (issue 15 item 3): posted to /api/v1/fhir/... or in a
Subscription rest-hook notification Bundle, validated with fhir.resources (an OperationOutcome
naming the element), mapped to contact events for the patient referenced by a prior FHIR
import's id or by MRN, recorded once per id and versionId, and never for another
organization's patient."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from carepost.core.database import org_session, read_only_session
from carepost.ehr.models import EhrMessage
from carepost.tracking.conversions import ContactEvent

FHIR = {"Content-Type": "application/fhir+json"}
START = (datetime.now(UTC) + timedelta(days=5)).replace(hour=14, minute=0, second=0, microsecond=0)


@pytest.fixture
def api(client, sender):
    return client, {**FHIR, **sender.key("phi:write", "phi:read_masked")}


def _patient(org_id: str, *, mrn: str | None = None, source: str | None = None, email: str = "ann@valid.test") -> str:
    from carepost.patients import service as patients

    data = {"given_name": "Ann", "email": email}
    if mrn:
        data["mrn"] = mrn
    with org_session(org_id) as s:
        cid = patients.save_contact(s, org_id, data, source="fhir", source_refs=[source] if source else ()).contact.id
        s.commit()
    return cid


def _events(org_id: str) -> list[ContactEvent]:
    with read_only_session(org_id) as s:
        return list(s.scalars(select(ContactEvent).where(ContactEvent.org_id == org_id)
                              .order_by(ContactEvent.received_at, ContactEvent.id)))


def _props(event: ContactEvent) -> dict:
    from carepost.tracking.conversions import event_properties

    with read_only_session(event.org_id) as s:
        return event_properties(s, event)


def _queue(org_id: str) -> list[EhrMessage]:
    with read_only_session(org_id) as s:
        return list(s.scalars(select(EhrMessage).where(EhrMessage.org_id == org_id, EhrMessage.status == "error")))


def appointment(rid: str = "apt-1", version: str = "1", status: str = "booked", start: datetime = START,
                patient: dict | None = None) -> dict:
    return {
        "resourceType": "Appointment", "id": rid, "meta": {"versionId": version}, "status": status,
        "appointmentType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276",
                                        "code": "FOLLOWUP"}]},
        "serviceType": [{"coding": [{"system": "http://snomed.info/sct", "code": "394814009"}]}],
        "start": start.isoformat().replace("+00:00", "Z"),
        "end": (start + timedelta(minutes=30)).isoformat().replace("+00:00", "Z"),
        "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Ann Testpatient</div>"},
        "participant": [
            {"actor": patient or {"reference": "Patient/pat-77"}, "status": "accepted"},
            {"actor": {"reference": "Practitioner/dr-9"}, "status": "accepted"},
            {"actor": {"reference": "Location/clinic-2"}, "status": "accepted"},
        ],
    }


def encounter(rid: str = "enc-1", version: str = "1", status: str = "finished", klass: str = "IMP",
              subject: dict | None = None) -> dict:
    begin = datetime.now(UTC) - timedelta(days=2)
    return {
        "resourceType": "Encounter", "id": rid, "meta": {"versionId": version}, "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": klass},
        "subject": subject or {"reference": "Patient/pat-77"},
        "period": {"start": begin.isoformat().replace("+00:00", "Z"),
                   "end": (begin + timedelta(days=1)).isoformat().replace("+00:00", "Z")},
        "participant": [{"individual": {"reference": "Practitioner/dr-9"}}],
        "location": [{"location": {"reference": "Location/ward-4"}}],
    }


def test_appointments_become_events_once_per_version(db, org, api):
    client, key = api
    cid = _patient(org.id, source="Patient/pat-77")
    r = client.post("/api/v1/fhir/Appointment", headers=key, json=appointment())
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and "appointment.booked" in body["issue"][0]["diagnostics"]
    again = client.post("/api/v1/fhir/Appointment", headers=key, json=appointment())
    assert again.status_code == 200 and "Already received" in again.json()["issue"][0]["diagnostics"]
    moved = client.post("/api/v1/fhir/Appointment", headers=key,
                        json=appointment(version="2", start=START + timedelta(days=1)))
    assert moved.status_code == 201 and "appointment.rescheduled" in moved.text
    noted = client.post("/api/v1/fhir/Appointment", headers=key,
                        json=appointment(version="3", start=START + timedelta(days=1)))
    assert noted.status_code == 201 and "appointment.modified" in noted.text
    cancelled = client.post("/api/v1/fhir/Appointment", headers=key, json=appointment(version="4", status="cancelled"))
    assert cancelled.status_code == 201 and "appointment.cancelled" in cancelled.text
    proposed = client.post("/api/v1/fhir/Appointment", headers=key, json=appointment(rid="apt-2", status="proposed"))
    assert proposed.status_code == 200 and "Nothing to record" in proposed.text
    events = _events(org.id)
    assert [e.name for e in events] == ["appointment.booked", "appointment.rescheduled", "appointment.modified",
                                        "appointment.cancelled"]
    assert {e.contact_id for e in events} == {cid}
    props = _props(events[0])
    assert props["start"] == START.isoformat().replace("+00:00", "Z") and props["appointment_type"] == "FOLLOWUP"
    assert props["provider_ids"] == ["dr-9"] and props["location_ids"] == ["clinic-2"]
    assert "Testpatient" not in str(props)
    # The same version with other content is refused naming meta.versionId; nothing changes.
    changed = client.post("/api/v1/fhir/Appointment", headers=key, json=appointment(version="1", status="noshow"))
    assert changed.status_code == 409 and changed.json()["issue"][0]["expression"] == ["Appointment.meta.versionId"]
    assert len(_events(org.id)) == 4


def test_encounters_map_by_class_and_status(db, org, api):
    client, key = api
    _patient(org.id, mrn="MRN-E1")
    by_mrn = {"identifier": {"system": "urn:carepost:mrn", "value": "MRN-E1"}}
    cases = [("enc-1", "finished", "IMP", "patient.discharged"), ("enc-2", "in-progress", "IMP", "patient.admitted"),
             ("enc-3", "arrived", "AMB", "patient.registered"), ("enc-4", "finished", "AMB", "visit.completed"),
             ("enc-5", "finished", "EMER", "patient.discharged")]
    for rid, status, klass, _ in cases:
        r = client.post("/api/v1/fhir/Encounter", headers=key,
                        json=encounter(rid, status=status, klass=klass, subject=by_mrn))
        assert r.status_code == 201, r.text
    planned = client.post("/api/v1/fhir/Encounter", headers=key,
                          json=encounter("enc-6", status="planned", subject=by_mrn))
    assert planned.status_code == 200
    conditional = client.post("/api/v1/fhir/Encounter", headers=key, json=encounter(
        "enc-7", subject={"reference": "Patient?identifier=urn:carepost:mrn|MRN-E1"}))
    assert conditional.status_code == 201, conditional.text
    events = _events(org.id)
    assert [e.name for e in events] == [c[3] for c in cases] + ["patient.discharged"]
    props = _props(events[0])
    assert props["encounter_class"] == "IMP" and props["provider_ids"] == ["dr-9"] and props["location_ids"] == ["ward-4"]


def test_invalid_resources_name_the_element(db, org, api):
    client, key = api
    _patient(org.id, source="Patient/pat-77")
    bad_status = appointment()
    bad_status["status"] = "maybe"
    cases = [
        (bad_status, "Appointment", 422, "Appointment.status"),
        ({**appointment(), "start": "next tuesday"}, "Appointment", 422, "Appointment.start"),
        ({k: v for k, v in appointment().items() if k != "id"}, "Appointment", 422, "Appointment.id"),
        (encounter(), "Appointment", 422, "Appointment.resourceType"),
        ({**encounter(), "class": "IMP"}, "Encounter", 422, "Encounter.class"),
        ({**encounter(), "unknownElement": 1}, "Encounter", 422, "Encounter.unknownElement"),
    ]
    for resource, path, status, expression in cases:
        r = client.post(f"/api/v1/fhir/{path}", headers=key, json=resource)
        assert r.status_code == status, (expression, r.text)
        [issue] = r.json()["issue"]
        assert issue["severity"] == "error" and issue["expression"][0].startswith(expression), (expression, issue)
    r = client.post("/api/v1/fhir/Appointment", headers=key, content=b"{not json")
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert _events(org.id) == [] and _queue(org.id) == []  # the caller has the resource: nothing stored


def test_unmatched_and_other_organizations_patients_wait_in_the_queue(db, org, api, session):
    from carepost.accounts.service import create_organization

    client, key = api
    other = create_organization(session, "Other Clinic")
    session.commit()
    _patient(other.id, mrn="MRN-B", source="Patient/pat-b")
    for resource in (appointment(rid="apt-x", patient={"reference": "Patient/pat-b"}),
                     appointment(rid="apt-y", patient={"identifier": {"system": "urn:carepost:mrn", "value": "MRN-B"}})):
        r = client.post("/api/v1/fhir/Appointment", headers=key, json=resource)
        assert r.status_code == 422, r.text
        [issue] = r.json()["issue"]
        assert issue["code"] == "not-found" and issue["expression"] == ["Appointment.participant.actor"]
        assert "MRN-B" not in r.text and "pat-b" not in r.text
    assert _events(org.id) == [] and _events(other.id) == []
    queued = _queue(org.id)
    assert len(queued) == 2 and {q.reason_code for q in queued} == {"patient_not_found"}
    assert all(q.raw_enc and b"MRN-B" not in q.raw_enc for q in queued)
    # Once the patient is imported into this organization, the queue's retry records the events.
    _patient(org.id, mrn="MRN-B", source="Patient/pat-b", email="b@valid.test")
    r = client.post("/api/v1/ehr/messages/retry", headers=key)
    assert r.status_code == 200 and r.json()["recorded"] == 2, r.text
    assert [e.name for e in _events(org.id)] == ["appointment.booked", "appointment.booked"]
    assert _events(other.id) == []


def test_subscription_notifications(db, org, api):
    client, key = api
    _patient(org.id, source="Patient/pat-77")
    bundle = {"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": [
            {"name": "type", "valueCode": "event-notification"}]}},
        {"fullUrl": "https://ehr.example/Appointment/apt-9", "resource": appointment(rid="apt-9")},
        {"fullUrl": "https://ehr.example/Encounter/enc-9", "resource": encounter(rid="enc-9")},
    ]}
    r = client.post("/api/v1/fhir/subscription-notification", headers=key, json=bundle)
    assert r.status_code == 200, r.text
    assert [i["expression"] for i in r.json()["issue"]] == [["Bundle.entry[1].resource"], ["Bundle.entry[2].resource"]]
    assert [e.name for e in _events(org.id)] == ["appointment.booked", "patient.discharged"]
    # Delivered again (rest-hook retries): nothing twice. A bad entry is named; the others count.
    bad = encounter(rid="enc-10")
    bad["status"] = "done"
    bundle["entry"].append({"resource": bad})
    r = client.post("/api/v1/fhir/subscription-notification", headers=key, json=bundle)
    assert r.status_code == 422
    issues = r.json()["issue"]
    assert issues[-1]["expression"][0].startswith("Bundle.entry[3].resource.status")
    assert len(_events(org.id)) == 2
    heartbeat = client.post("/api/v1/fhir/subscription-notification", headers=key, content=b"")
    assert heartbeat.status_code == 200
    wrong = client.post("/api/v1/fhir/subscription-notification", headers=key, json=appointment())
    assert wrong.status_code == 422 and wrong.json()["issue"][0]["expression"] == ["Bundle.resourceType"]


def test_fhir_routes_need_phi_write(db, org, client, sender):
    r = client.post("/api/v1/fhir/Appointment", headers={**FHIR, **sender.key("analytics:read")}, json=appointment())
    assert r.status_code == 403
    assert client.post("/api/v1/fhir/Appointment", headers=FHIR, json=appointment()).status_code == 401
