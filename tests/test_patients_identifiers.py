"""Minimum necessary (issue 10 item 3): SSN, driver's licence and passport numbers are classified
and not stored at FHIR or CSV import unless the organization keeps their system; where kept,
even the unmasked view shows the last four characters until one is revealed (audited)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from carepost.accounts import credentials as creds
from carepost.audit.models import AuditEvent
from carepost.core.database import get_engine, org_session
from carepost.patients import service
from carepost.patients.models import ContactIdentifier, IdentifierSystem
from tests.fixtures.accounts import login_client
from tests.test_patients_import import run_import, synthea_like

V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
DL_SYSTEM = "urn:oid:2.16.840.1.113883.4.3.25"
PASSPORT_SYSTEM = "http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber"
MRN_SYSTEM = "http://hospital.smarthealthit.org"


def _typed(code: str, display: str) -> dict:
    return {"coding": [{"system": V2, "code": code, "display": display}], "text": display}


def synthea_patient_bundle(seed: int = 31) -> dict:
    """A carebundle bundle whose Patient carries the identifiers real Synthea exports write."""
    bundle = synthea_like(seed=seed)
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["identifier"] = [
        {"system": "https://github.com/synthetichealth/synthea", "value": "b0a5e1c3-9f1d-4f57-9d6e-1f1c2d3e4f50"},
        {"type": _typed("MR", "Medical Record Number"), "system": MRN_SYSTEM, "value": "MRN-5550042"},
        {"type": _typed("SS", "Social Security Number"), "system": SSN_SYSTEM, "value": "999-12-3456"},
        {"type": _typed("DL", "Driver's license number"), "system": DL_SYSTEM, "value": "S99987654"},
        {"type": _typed("PPN", "Passport Number"), "system": PASSPORT_SYSTEM, "value": "X11223344X"},
    ]
    patient["telecom"] = [{"system": "email", "value": "ssn.test@example.org"}]
    return bundle


@pytest.fixture
def key(session):
    def make(org_id, scopes=("phi:read_masked", "phi:read_unmasked", "phi:write", "contacts:import")):
        cred, secret = creds.create_credential(session, org_id, name="Identifiers test", scopes=list(scopes))
        session.commit()
        return {"Authorization": f"Bearer {cred.key_id}.{secret}"}

    return make


def _raw_database_holds(value: str) -> bool:
    with get_engine().connect() as conn:
        from carepost.core.database import Base

        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                if value in repr(tuple(row)):
                    return True
    return False


def test_classification():
    assert service.identifier_class(SSN_SYSTEM, None) == "government"
    assert service.identifier_class("urn:oid:2.16.840.1.113883.4.1", None) == "government"
    assert service.identifier_class(DL_SYSTEM, "DL") == "government"
    assert service.identifier_class("urn:oid:2.16.840.1.113883.4.3.6", None) == "government"  # a state's licences
    assert service.identifier_class(PASSPORT_SYSTEM, None) == "government"
    assert service.identifier_class("http://example.org/anything", "PPN") == "government"
    assert service.identifier_class("http://example.org/anything", "TAX") == "government"
    assert service.identifier_class("http://example.org/national", "NNGBR") == "government"
    assert service.identifier_class(MRN_SYSTEM, "MR") == "record"
    assert service.identifier_class("urn:carepost:member-id:Aetna", "MB") == "record"
    assert service.identifier_class("https://github.com/synthetichealth/synthea", None) == "record"
    assert service.mask_last_four("999-12-3456") == "***3456" and service.mask_last_four("123") == "***"


def test_synthea_government_identifiers_are_not_stored_by_default(db, org, session):
    report = run_import(org.id, json.dumps(synthea_patient_bundle()).encode())
    assert report["status"] == "succeeded", report["errors"]
    assert report["counts"]["identifiers_not_kept"] == 3
    session.rollback()
    systems = set(session.scalars(select(ContactIdentifier.system).where(ContactIdentifier.org_id == org.id,
                                                                         ContactIdentifier.kind == "identifier")))
    assert systems == {MRN_SYSTEM, "https://github.com/synthetichealth/synthea"}
    registered = set(session.scalars(select(IdentifierSystem.system).where(IdentifierSystem.org_id == org.id)))
    assert SSN_SYSTEM not in registered and DL_SYSTEM not in registered and PASSPORT_SYSTEM not in registered
    with org_session(org.id) as s:
        # not even a blind index: an SSN cannot be looked up
        assert service.find_contact_ids(s, org.id, identifier="999-12-3456", system=SSN_SYSTEM) == []
        assert len(service.find_contact_ids(s, org.id, mrn="MRN-5550042")) == 1


def test_csv_government_columns_are_left_out(db, org, session):
    csv_text = "Patient ID,First Name,Last Name,SSN,Driver's License,Passport Number,Email\n" \
               "P-1,Ann,Lee,999-45-6789,D1234567,P7654321,ann@example.org\n"
    report = run_import(org.id, csv_text.encode(), "csv")
    assert report["status"] == "succeeded", report["errors"]
    assert report["counts"]["identifiers_not_kept"] == 3
    session.rollback()
    kinds = list(session.scalars(select(ContactIdentifier.system).where(ContactIdentifier.org_id == org.id,
                                                                        ContactIdentifier.kind == "identifier")))
    assert kinds == ["urn:carepost:external"]


def test_opted_in_system_is_kept_masked_to_four_and_revealed_one_by_one(db, org, session, client, key, make_user):
    owner = make_user(org, role="owner")
    csrf = login_client(client, owner)
    r = client.get("/api/v1/identifier-policy")
    assert r.status_code == 200 and r.json() == {"keep_systems": []}
    r = client.put("/api/v1/identifier-policy", json={"keep_systems": [SSN_SYSTEM]}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    assert r.json() == {"keep_systems": [SSN_SYSTEM]}
    r = client.put("/api/v1/identifier-policy", json={"keep_systems": [""]}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and r.json()["error"]["field"] == "keep_systems.0"
    client.cookies.clear()

    report = run_import(org.id, json.dumps(synthea_patient_bundle(seed=32)).encode())
    assert report["counts"]["identifiers_not_kept"] == 2  # the licence and the passport
    assert not _raw_database_holds("999-12-3456")  # kept, but encrypted
    h = key(org.id)
    cid = client.post("/api/v1/contacts/search", json={"mrn": "MRN-5550042"}, headers=h).json()["data"][0]["id"]
    contact = client.get(f"/api/v1/contacts/{cid}", headers=h).json()
    by_type = {i["type"]: i for i in contact["identifiers"]}
    assert set(by_type) == {"MR", "SS", None}
    assert by_type["SS"]["value"] == "***3456" and by_type["SS"]["class"] == "government" and by_type["SS"]["revealed"] is False
    assert by_type["MR"]["value"] == "MRN-5550042"  # a record number is shown in clear to those allowed
    assert "999-12-3456" not in json.dumps(contact)
    masked = client.get(f"/api/v1/contacts/{cid}?masked=true", headers=h).json()
    assert "3456" not in json.dumps([i for i in masked["identifiers"] if i["type"] == "SS"])

    # revealing is one identifier at a time, needs the unmasked permission, and is audited
    url = f"/api/v1/contacts/{cid}/identifiers/{by_type['SS']['id']}/reveal"
    assert client.post(url, headers=key(org.id, ("phi:read_masked",))).status_code == 403
    r = client.post(url, headers=h)
    assert r.status_code == 200 and r.json()["value"] == "999-12-3456"
    session.rollback()
    event = session.scalar(select(AuditEvent).where(AuditEvent.org_id == org.id, AuditEvent.action == "contact.identifier.reveal"))
    assert event is not None and event.target_id == cid and event.details["identifier_id"] == by_type["SS"]["id"]
    assert "999-12-3456" not in json.dumps(event.details)
    assert client.post(f"/api/v1/contacts/{cid}/identifiers/{'0' * 32}/reveal", headers=h).status_code == 404
    session.rollback()  # the 404 wrote its access.denied event: this read snapshot is stale for writing

    # the contact page: last four, a Reveal button, the clear value after the (audited) POST
    viewer = make_user(org, role="owner")
    csrf = login_client(client, viewer)
    page = client.get(f"/app/contacts/{cid}")
    assert page.status_code == 200 and "***3456" in page.text and "999-12-3456" not in page.text
    assert f'/app/contacts/{cid}/identifiers/{by_type["SS"]["id"]}/reveal' in page.text
    page = client.post(f"/app/contacts/{cid}/identifiers/{by_type['SS']['id']}/reveal", data={"csrf_token": csrf})
    assert page.status_code == 200 and "999-12-3456" in page.text
    session.rollback()
    assert len(list(session.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id,
                                                             AuditEvent.action == "contact.identifier.reveal")))) == 2
