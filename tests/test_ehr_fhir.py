"""FHIR R4 Appointment and Encounter in (issue 15 item 3): posted to /api/v1/fhir/... or in a
Subscription rest-hook notification Bundle, validated with fhir.resources (an OperationOutcome
naming the element), mapped to contact events for the patient referenced by a prior FHIR
import's id or by MRN, recorded once per id and versionId, and never for another
organization's patient."""

from __future__ import annotations

import json
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


def _backport_status(ntype: str = "event-notification", events: list[tuple[str, str]] = ()) -> dict:
    """The R4 Subscriptions backport's status: a Parameters resource (first entry of a history Bundle)."""
    params = [{"name": "subscription", "valueReference": {"reference": "https://ehr.example/fhir/Subscription/sub-1"}},
              {"name": "topic", "valueCanonical": "https://ehr.example/SubscriptionTopic/appointments"},
              {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": ntype},
              {"name": "events-since-subscription-start", "valueString": str(len(events))}]
    for number, focus in events:
        params.append({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": number},
            {"name": "timestamp", "valueInstant": "2026-12-04T10:00:00Z"},
            {"name": "focus", "valueReference": {"reference": focus}}]})
    return {"resourceType": "Parameters", "meta": {"profile": [
        "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]},
        "parameter": params}


def _notification(status: dict, *entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "history", "timestamp": "2026-12-04T10:00:01Z",
            "entry": [{"fullUrl": "urn:uuid:5c1b3d0e-0000-4000-8000-000000000001", "resource": status}, *entries]}


def test_id_only_notifications_keep_the_ids_and_say_no_event_was_recorded(db, org, api):
    client, key = api
    _patient(org.id, source="Patient/pat-77")
    url = "https://ehr.example/fhir/Appointment/apt-20/_history/3"
    bundle = _notification(_backport_status(events=[("7", url), ("8", "https://ehr.example/fhir/Encounter/enc-20")]),
                           {"fullUrl": url, "request": {"method": "PUT", "url": "Appointment/apt-20"},
                            "response": {"status": "200"}})
    r = client.post("/api/v1/fhir/subscription-notification", headers=key, json=bundle)
    assert r.status_code == 200, r.text
    issues = r.json()["issue"]
    assert [i["expression"][0] for i in issues] == [
        "Bundle.entry[1].fullUrl",
        "Bundle.entry[0].resource.parameter.where(name='notification-event')[1].part.where(name='focus')"]
    assert all(i["severity"] == "warning" and "does not fetch" in i["diagnostics"] for i in issues)
    assert issues[0]["diagnostics"].startswith("Appointment/apt-20/_history/3:")
    assert _events(org.id) == []  # no resource, no event
    listed = client.get("/api/v1/ehr/messages", headers=key, params={"status": "ignored"}).json()
    assert sorted((m["message_type"], m["reason_code"], m["control_id"]) for m in listed) == [
        ("Appointment", "id_only", "id-only:Appointment/apt-20/_history/3@sub-1#7"),
        ("Encounter", "id_only", "id-only:Encounter/enc-20@sub-1#8")]
    # A redelivery (rest-hook retry) keeps nothing twice.
    again = client.post("/api/v1/fhir/subscription-notification", headers=key, json=bundle)
    assert again.status_code == 200 and "already received" in again.json()["issue"][0]["diagnostics"]
    assert len(client.get("/api/v1/ehr/messages", headers=key, params={"status": "ignored"}).json()) == 2


def test_full_resource_notifications_r4b_and_handshakes(db, org, api):
    client, key = api
    _patient(org.id, source="Patient/pat-77")
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": "event-notification",
              "eventsSinceSubscriptionStart": "2",
              "notificationEvent": [{"eventNumber": "2", "focus": {"reference": "Appointment/apt-30"}}],
              "subscription": {"reference": "Subscription/sub-2"}, "topic": "https://ehr.example/topic/appt"}
    bundle = {"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": status},
        {"fullUrl": "https://ehr.example/fhir/Appointment/apt-30", "resource": appointment(rid="apt-30")}]}
    r = client.post("/api/v1/fhir/subscription-notification", headers=key, json=bundle)
    assert r.status_code == 200, r.text
    assert [e.name for e in _events(org.id)] == ["appointment.booked"]
    # the focus is the resource in the Bundle: not an id-only reference as well
    assert client.get("/api/v1/ehr/messages", headers=key, params={"status": "ignored"}).json() == []
    for ntype in ("handshake", "heartbeat"):
        for shape in (_notification(_backport_status(ntype)), {**bundle, "entry": [{"resource": {**status, "type": ntype}}]}):
            r = client.post("/api/v1/fhir/subscription-notification", headers=key, json=shape)
            assert r.status_code == 200 and f"A {ntype} notification" in r.text, r.text
    empty = client.post("/api/v1/fhir/subscription-notification", headers=key,
                        json=_notification(_backport_status(events=[("3", "")])))
    assert empty.status_code == 200 and "nothing to record" in empty.text
    bad = [({**bundle, "entry": [{"resource": {**status, "type": "ping"}}]}, "Bundle.entry[0].resource.type"),
           (_notification(_backport_status("ping")), "Bundle.entry[0].resource.parameter.where(name='type').value"),
           (_notification(_backport_status(events=[("4", "not a reference")])),
            "Bundle.entry[0].resource.parameter.where(name='notification-event')[0].part.where(name='focus')"),
           (_notification(_backport_status(), {"fullUrl": "urn:uuid:x"}), "Bundle.entry[1].fullUrl"),
           ({**bundle, "type": "document"}, "Bundle.type"), ({**bundle, "entry": [3]}, "Bundle.entry[0]")]
    for shape, expression in bad:
        r = client.post("/api/v1/fhir/subscription-notification", headers=key, json=shape)
        assert r.status_code == 422 and r.json()["issue"][0]["expression"] == [expression], (expression, r.text)
    assert len(_events(org.id)) == 1


def test_r4_rest_hook_puts_and_empty_pings(db, org, api, client, sender):
    http, key = api
    _patient(org.id, source="Patient/pat-77")
    # R4 rest-hook with a payload: PUT <endpoint>/Appointment/<id>.
    r = http.put("/api/v1/fhir/Appointment/apt-40", headers=key, json=appointment(rid="apt-40"))
    assert r.status_code == 201 and "appointment.booked" in r.text, r.text
    again = http.put("/api/v1/fhir/Appointment/apt-40", headers=key, json=appointment(rid="apt-40"))
    assert again.status_code == 200 and "Already received" in again.text
    r = http.put("/api/v1/fhir/Encounter/enc-40", headers=key, json=encounter(rid="enc-40"))
    assert r.status_code == 201 and "patient.discharged" in r.text
    wrong = http.put("/api/v1/fhir/Appointment/apt-41", headers=key, json=appointment(rid="apt-40"))
    assert wrong.status_code == 400 and wrong.json()["issue"][0]["expression"] == ["Appointment.id"]
    # R4 rest-hook with payload empty: a POST without a body.
    ping = http.post("/api/v1/fhir/subscription-notification", headers=key)
    assert ping.status_code == 200 and "names no resource" in ping.text
    assert [e.name for e in _events(org.id)] == ["appointment.booked", "patient.discharged"]
    # Authenticated like every event endpoint.
    assert client.post("/api/v1/fhir/subscription-notification", headers=FHIR).status_code == 401
    assert client.post("/api/v1/fhir/subscription-notification",
                       headers={**FHIR, **sender.key("analytics:read")}).status_code == 403
    assert client.put("/api/v1/fhir/Appointment/apt-40", headers=FHIR, json=appointment(rid="apt-40")).status_code == 401


def test_notifications_over_http_to_carepost_serve(db, org, sender, live_server):
    """The rest-hook as an EHR calls it: real HTTP to a real ``carepost serve`` process."""
    import httpx

    cid = _patient(org.id, source="Patient/pat-77")
    key = {**FHIR, **sender.key("phi:write")}
    url = f"{live_server.url}/api/v1/fhir/subscription-notification"
    bundle = _notification(_backport_status(events=[("1", "Appointment/apt-50"), ("2", "Encounter/enc-50")]),
                           {"fullUrl": "https://ehr.example/fhir/Appointment/apt-50",
                            "resource": appointment(rid="apt-50")})
    with httpx.Client(timeout=60) as http:
        r = http.post(url, headers=key, content=json.dumps(bundle))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/fhir+json")
        assert [i["severity"] for i in r.json()["issue"]] == ["information", "warning"]  # full, then id-only
        assert http.post(url, headers=key, content=json.dumps(bundle)).status_code == 200  # redelivered
        assert http.post(url, headers=key).status_code == 200  # R4 empty ping
        assert http.post(url, headers=FHIR, content=json.dumps(bundle)).status_code == 401
        bad = http.post(url, headers=key, content=json.dumps({**bundle, "type": "document"}))
        assert bad.status_code == 422 and bad.json()["issue"][0]["expression"] == ["Bundle.type"]
    assert [(e.name, e.contact_id) for e in _events(org.id)] == [("appointment.booked", cid)]
    with read_only_session(org.id) as s:
        kept = s.scalars(select(EhrMessage.control_id).where(EhrMessage.org_id == org.id,
                                                             EhrMessage.reason_code == "id_only")).all()
    assert kept == ["id-only:Encounter/enc-50@sub-1#2"]
