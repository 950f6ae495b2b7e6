"""FHIR R4 (Bundle, NDJSON) and CSV import: mapping, streaming, idempotency, bad input."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
from sqlalchemy import func, select, text

from carepost.core.database import Base, get_engine, org_session
from carepost.patients import imports, service
from carepost.patients.models import (
    Condition,
    Contact,
    ContactIdentifier,
    Encounter,
    ImportChunk,
    Medication,
    Observation,
)


def synthea_like(seed: int = 7, profile: str = "type2_diabetes") -> dict:
    from carebundle import generate_bundle, to_json

    return json.loads(to_json(generate_bundle(profile=profile, seed=seed)))


def run_import(org_id: str, data: bytes, fmt: str = "auto", **kw) -> dict:
    with org_session(org_id) as s:
        job = imports.create_job(s, org_id, format=fmt, filename="upload.bin", **kw)
        imports.store_upload(s, job, [data[i : i + 4096] for i in range(0, len(data), 4096)])
        job.status = "queued"
        s.commit()
        imports.run_job(s, job.id)
        return imports.job_dict(s, imports.get_job(s, job.id), with_errors=1000)


def count(session, model, org_id):
    session.rollback()
    return session.scalar(select(func.count()).select_from(model).where(model.org_id == org_id))


def test_synthea_style_bundle_imports(db, org, session):
    bundle = synthea_like()
    types = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
    report = run_import(org.id, json.dumps(bundle).encode())
    assert report["status"] == "succeeded", report
    assert report["counts"]["by_type"]["Patient"] == {"created": 1}
    assert report["counts"]["by_type"]["Practitioner"] == {"skipped": types["Practitioner"]}
    assert report["counts"]["by_type"]["DiagnosticReport"] == {"skipped": types["DiagnosticReport"]}
    assert count(session, Contact, org.id) == 1
    assert count(session, Condition, org.id) == types["Condition"]
    assert count(session, Medication, org.id) == types["MedicationRequest"]
    assert count(session, Encounter, org.id) == types["Encounter"]
    assert count(session, Observation, org.id) >= types["Observation"]  # blood pressure components add rows
    systolic = session.scalar(select(Observation).where(Observation.org_id == org.id, Observation.code == "8480-6"))
    assert systolic is not None and systolic.value_quantity > 0 and systolic.value_unit
    cond = session.scalar(select(Condition).where(Condition.org_id == org.id, Condition.code_system == "icd10cm"))
    assert cond.status == "active" and cond.onset_date is not None
    contact = session.scalar(select(Contact).where(Contact.org_id == org.id))
    assert contact.birth_date is not None and contact.sex in ("female", "male") and contact.care_stage in ("active", "overdue")
    # the upload is gone once the job ends; the import is audited
    assert count(session, ImportChunk, org.id) == 0
    from carepost.audit.models import AuditEvent

    assert session.scalar(select(AuditEvent).where(AuditEvent.org_id == org.id, AuditEvent.action == "import.finish"))


def test_synthea_deceased_patient_gets_the_terminal_stage(db, org, session):
    """Issue 10 item 2: Synthea writes ``deceasedDateTime``; the patient is stored deceased with
    the stage ``deceased`` (not ``overdue``) and is excluded from every send as ``deceased``."""
    from carepost.consent.service import check_eligibility

    bundle = synthea_like(seed=9)
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["deceasedDateTime"] = "2021-03-04T05:06:07-05:00"
    patient["telecom"] = [{"system": "email", "value": "late.patient@example.org"}]
    report = run_import(org.id, json.dumps(bundle).encode())
    assert report["status"] == "succeeded", report["errors"]
    session.rollback()
    contact = session.scalar(select(Contact).where(Contact.org_id == org.id))
    assert contact.deceased is True and contact.care_stage == "deceased"
    with org_session(org.id) as s:
        for purpose in ("transactional", "treatment", "marketing"):
            assert check_eligibility(s, [contact.id], purpose, org_id=org.id) == {contact.id: "deceased"}


def test_reimport_is_idempotent(db, org, session):
    data = json.dumps(synthea_like(seed=3)).encode()
    first = run_import(org.id, data)
    totals = {m: count(session, m, org.id) for m in (Contact, Condition, Observation, Medication, ContactIdentifier)}
    second = run_import(org.id, data)
    assert {m: count(session, m, org.id) for m in totals} == totals
    assert second["counts"]["created"] == 0 and second["counts"]["updated"] == first["counts"]["created"]


def test_narratives_are_never_stored(db, org, session):
    bundle = synthea_like(seed=11)
    marker = "NARRATIVE-MARKER-Zq"
    for e in bundle["entry"]:
        e["resource"]["text"] = {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{marker}</div>'}
        if e["resource"]["resourceType"] == "Condition":
            e["resource"]["note"] = [{"text": marker}]
    assert run_import(org.id, json.dumps(bundle).encode())["status"] == "succeeded"
    session.rollback()
    engine = get_engine()
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                assert marker not in repr(tuple(row)), table.name


def test_patient_after_its_resources_and_conditional_references(db, org, session):
    bundle = synthea_like(seed=5)
    bundle["entry"].reverse()  # the Patient is now the last entry
    bundle["type"] = "collection"
    patient = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["resource"]["identifier"] = [{"system": "http://hospital.example/mrn", "value": "MRN-77",
                                          "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}]
    enc = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter")
    enc["resource"]["participant"] = [{"individual": {"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999999999"}}]
    report = run_import(org.id, json.dumps(bundle).encode())
    assert report["status"] == "succeeded", report["errors"]
    # a later file references the patient conditionally, by MRN
    later = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": {
        "resourceType": "Immunization", "id": "imm-1", "status": "completed",
        "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140", "display": "Influenza"}]},
        "patient": {"reference": "Patient?identifier=http://hospital.example/mrn|MRN-77"}, "occurrenceDateTime": "2025-10-01"}}]}
    report = run_import(org.id, json.dumps(later).encode())
    assert report["status"] == "succeeded", report["errors"]
    with org_session(org.id) as s:
        cid = service.find_contact_ids(s, org.id, mrn="MRN-77")[0]
        imms = service.list_facts(s, org.id, cid, "immunizations")
        assert [(i.code_system, i.code) for i in imms] == [("cvx", "140")]


def _patient(pid: str, **extra) -> dict:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": "Doe", "given": ["Jo"]}], "gender": "female",
            "birthDate": "1970-02-03", **extra}


def _condition(cid: str, patient_ref: str, **extra) -> dict:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": patient_ref},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10", "display": "Hypertension"}]}, **extra}


def test_bad_resources_go_to_the_error_report_and_valid_ones_stay(db, org, session):
    entries = [
        _patient("p1"),
        _condition("c1", "Patient/p1"),
        _condition("c2", "Patient/missing"),
        _condition("c3", "Patient/p1", onsetDateTime="2020-13-45"),
        _condition("c4", "Patient/p1", code={"coding": [{"system": "http://loinc.org", "code": "not a code"}]}),
        _condition("c1", "Patient/p1"),  # duplicate id within the file
        {"resourceType": "Claim", "id": "x", "whatever": True},  # unmapped: skipped, not validated
        {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}, "valueQuantity": {"value": 7.1, "unit": "%"},
         "effectiveDateTime": "2025-01-01"},
        {"resourceType": "Patient", "id": "p2", "birthDate": "not-a-date"},
    ]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in entries]}
    report = run_import(org.id, json.dumps(bundle).encode())
    assert report["status"] == "completed_with_errors"
    errors = {e["resource"]: e for e in report["errors"]}
    assert "neither in this file nor in CarePost" in errors["Condition/c2"]["reason"]
    assert errors["Condition/c3"]["field"] == "onsetDateTime"
    assert "loinc" in errors["Condition/c4"]["reason"] and errors["Condition/c4"]["severity"] == "warning"
    assert "more than once" in errors["Condition/c1"]["reason"]
    assert errors["Patient/p2"]["field"] == "birthDate"
    assert report["counts"]["by_type"]["Claim"] == {"skipped": 1}
    # c4 is kept (its code marked unverified): a warning, not a failure
    assert count(session, Condition, org.id) == 2 and count(session, Observation, org.id) == 1
    assert report["warning_count"] == 1 and report["counts"]["warnings"] == 1
    assert report["error_count"] == 4 == sum(1 for e in report["errors"] if e["severity"] == "error")
    assert count(session, Contact, org.id) == 1
    for e in report["errors"]:
        assert "13-45" not in e["reason"] and "not a code" not in e["reason"]


def test_a_malformed_code_keeps_the_record_flagged_unverified(db, org, session):
    """Issue 10 item 4: a Synthea export with ``5089AAAA…`` labelled LOINC (and a bad SNOMED
    encounter type, a bad ICD-10-CM condition code) keeps every Observation, Encounter and
    Condition; the bad codes are flagged ``code_verified = False`` so code queries that require a
    verified code skip them; each is a warning in the error report, counted apart from failures."""
    bundle = synthea_like(seed=21)
    by_type: dict[str, list[dict]] = {}
    for e in bundle["entry"]:
        by_type.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    obs = next(o for o in by_type["Observation"] if not o.get("component"))
    obs["code"]["coding"][0] = {"system": "http://loinc.org", "code": "5089AAAA-BBBB-CCCC", "display": "Glucose"}
    bp = next(o for o in by_type["Observation"] if o.get("component"))
    bp["component"][0]["code"]["coding"][0]["code"] = "8480XX"
    enc = by_type["Encounter"][0]
    enc["type"] = [{"coding": [{"system": "http://snomed.info/sct", "code": "not-snomed", "display": "Visit"}]}]
    cond = by_type["Condition"][0]
    cond["code"]["coding"] = [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9.9.9.9", "display": "Diabetes"}]
    report = run_import(org.id, json.dumps(bundle).encode())
    assert report["status"] == "succeeded", report["errors"]
    assert report["error_count"] == 0 and report["counts"]["failed"] == 0
    assert report["warning_count"] == 4 == report["counts"]["warnings"]
    warnings = {(e["resource"], e["field"]): e for e in report["errors"]}
    assert all(e["severity"] == "warning" and "unverified" in e["reason"] for e in warnings.values())
    assert {k[1] for k in warnings} == {"code", "component.0.code", "type"}
    assert "5089AAAA" not in json.dumps(report)  # the report names the field, never the value
    session.rollback()
    # every record is there: one row per Observation (plus components), Encounter and Condition
    assert count(session, Encounter, org.id) == len(by_type["Encounter"])
    assert count(session, Condition, org.id) == len(by_type["Condition"])
    bad = session.scalar(select(Observation).where(Observation.org_id == org.id, Observation.code == "5089AAAA-BBBB-CCCC"))
    assert bad is not None and bad.code_verified is False and bad.code_system == "loinc" and bad.effective_at is not None
    verified = select(func.count()).select_from(Observation).where(
        Observation.org_id == org.id, Observation.code_verified.is_(True), Observation.code.startswith("5089"))
    assert session.scalar(verified) == 0  # a code query that requires verified codes does not match it
    assert session.scalar(select(func.count()).select_from(Encounter).where(Encounter.org_id == org.id,
                                                                            Encounter.code_verified.is_(False))) == 1
    assert session.scalar(select(func.count()).select_from(Observation).where(
        Observation.org_id == org.id, Observation.code_verified.is_(False))) == 2  # the glucose and one component
    csv_lines = list(imports.error_report_csv(session, imports.get_job(session, report["id"])))
    assert "".join(csv_lines).splitlines()[0] == "line,resource,field,reason,severity"
    assert sum(line.count(",warning") for line in csv_lines) == 4
    # importing the corrected file again verifies the codes
    obs["code"]["coding"][0]["code"] = "2339-0"
    report = run_import(org.id, json.dumps(bundle).encode())
    assert report["warning_count"] == 3
    session.rollback()
    assert session.scalar(select(Observation).where(Observation.org_id == org.id, Observation.code == "2339-0",
                                                    Observation.code_verified.is_(True))) is not None


def test_malformed_json_keeps_what_came_before(db, org, session):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": _patient("p1")}, {"resource": _condition("c1", "Patient/p1")}]}
    data = json.dumps(bundle).encode()[:-2] + b',{"resource": {"resourceType": "Condi'
    report = run_import(org.id, data)
    assert report["status"] == "failed" and "not valid JSON after entry 2" in report["failure"]
    assert count(session, Contact, org.id) == 1 and count(session, Condition, org.id) == 1


@pytest.mark.parametrize("payload, message", [
    (b"", "empty"),
    (b"[1, 2]", "JSON array"),
    (b'{"resourceType": "Bundle", "type": "transaction-response", "entry": []}', "cannot be imported"),
    (b'{"no": "resourceType"}', "no resourceType"),
    (b'{"resourceType": "Bundle", "type": "batch", "entry": [', "not valid JSON"),
])
def test_unimportable_files_fail_clearly(db, org, payload, message):
    report = run_import(org.id, payload, fmt="auto" if payload[:1] != b"{" or b"Bundle" not in payload else "fhir")
    assert report["status"] == "failed" and message in report["failure"]


def test_single_resource_document(db, org, session):
    report = run_import(org.id, json.dumps(_patient("solo", telecom=[{"system": "phone", "value": "555-010-2000"}])).encode())
    assert report["status"] == "succeeded" and count(session, Contact, org.id) == 1


def test_ndjson_bulk_export(db, org, session):
    lines = [
        json.dumps(_condition("c1", "Patient/p1")),  # before its patient
        json.dumps(_patient("p1", telecom=[{"system": "email", "value": "jo@example.org"}])),
        "{not json",
        json.dumps(_patient("p2")),  # patients without an email are imported like any other
        json.dumps({"resourceType": "Appointment", "id": "a1", "status": "noshow", "start": "2026-01-05T10:00:00Z",
                    "participant": [{"actor": {"reference": "Practitioner/dr"}, "status": "accepted"},
                                    {"actor": {"reference": "Patient/p2"}, "status": "accepted"}]}),
        json.dumps({"resourceType": "Coverage", "id": "cov1", "status": "active", "beneficiary": {"reference": "Patient/p1"},
                    "payor": [{"display": "Acme Health"}], "subscriberId": "MEMBER-123",
                    "type": {"coding": [{"code": "HIP", "display": "health insurance plan policy"}]},
                    "class": [{"type": {"coding": [{"code": "plan"}]}, "value": "GOLD", "name": "Gold PPO"}]}),
        json.dumps({"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p2"},
                    "class": {"code": "IMP"}, "period": {"start": "2026-11-01T00:00:00Z", "end": "2026-11-05T00:00:00Z"}}),
    ]
    report = run_import(org.id, ("\n".join(lines) + "\n").encode())
    assert report["format"] == "ndjson" and report["status"] == "completed_with_errors"
    assert [(e["line"], e["reason"]) for e in report["errors"]] == [(3, "The line is not valid JSON.")]
    assert count(session, Contact, org.id) == 2
    with org_session(org.id) as s:
        p1 = service.find_contact_ids(s, org.id, email="jo@example.org")[0]
        contact = service.get_contact(s, p1)
        assert contact.coverage_plan == "Gold PPO"
        assert service.find_contact_ids(s, org.id, identifier="MEMBER-123") == [p1]
        p2 = next(c.id for c in service.list_contacts(s, org.id, service.ContactFilters())[0] if c.id != p1)
        enc = service.list_facts(s, org.id, p2, "encounters")[0]
        assert enc.is_hospitalization


def test_streaming_reads_chunks(db, org, monkeypatch):
    from carebundle import generate_cohort, to_json

    monkeypatch.setattr(imports, "CHUNK_BYTES", 32 * 1024)

    cohort = [json.loads(to_json(b)) for b in generate_cohort(count=6, seed=1)]
    entries = [e for b in cohort for e in b["entry"]]
    data = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode()
    assert len(data) > imports.CHUNK_BYTES  # stored as several encrypted chunks
    report = run_import(org.id, data)
    assert report["status"] == "succeeded" and report["counts"]["patients"] == 6


# --------------------------------------------------------------------------- CSV

CSV_HEADER = "Patient ID;First Name;Last Name;DOB;Sex;Email;Cell Phone;Address;City;State;Zip;Favorite Color\n"


def test_csv_auto_mapping_semicolons_latin1(db, org, session):
    body = CSV_HEADER + "".join([
        "A1;Zoë;Müller;03/04/1961;F;zoe@example.org;555-201-3344;1 Main St;Denver;CO;80202;blue\n",
        "A2;Bob;Smith;1975-12-01;M;;;;Austin;TX;787;red\n",
        "A3;Bad;Date;31/31/1999;M;;;;;;;\n",
        "A4;Bad;Sex;01/01/1980;Q;;;;;;;\n",
        "A5;Bad;Mail;01/01/1980;F;not-an-email;;;;;;\n",
        ";No;Id;01/01/1980;F;;;;;;;\n",
        "A1;Zoë;Again;03/04/1961;F;;;;;;;\n",
    ])
    report = run_import(org.id, body.encode("latin-1"))
    assert report["format"] == "csv" and report["status"] == "completed_with_errors"
    errors = {e["line"]: e for e in report["errors"]}
    assert errors[4]["field"] == "DOB" and errors[5]["field"] == "Sex" and errors[6]["field"] == "Email"
    assert "external id" in errors[7]["reason"] and "more than once" in errors[8]["reason"]
    assert report["counts"]["by_type"]["ignored_columns"] == {"Favorite Color": 1}
    with org_session(org.id) as s:
        zoe = service.contact_dict(s, service.get_contact(s, service.find_contact_ids(s, org.id, email="zoe@example.org")[0]))
        assert (zoe["given_name"], zoe["family_name"], zoe["birth_date"], zoe["time_zone"]) == ("Zoë", "Müller", "1961-03-04", None)
        assert zoe["phones"] == [{"value": "555-201-3344", "use": "mobile"}] and zoe["state"] == "CO"
        assert zoe["external_id"] == "A1"
        bob_id = service.find_contact_ids(s, org.id, identifier="A2")[0]
        assert service.get_contact(s, bob_id).postal_code == "00787"
    again = run_import(org.id, body.encode("latin-1"))
    assert again["counts"]["created"] == 0 and count(session, Contact, org.id) == 2


def test_csv_utf8_bom_saved_mapping_and_attributes(db, org, session):
    from carepost.patients import csvimport
    from carepost.patients.schemas import AttributeDefinitionIn, CsvMappingIn

    with org_session(org.id) as s:
        service.define_attribute(s, org.id, AttributeDefinitionIn(key="portal_user", label="Portal user", type="boolean"))
        mapping = csvimport.create_mapping(s, org.id, CsvMappingIn(
            name="PM export", columns={"Acct": "external_id", "Nm": "full_name", "Born": "birth_date", "Portal": "attributes.portal_user",
                                       "Notes": "ignore"},
            date_format="%d.%m.%Y", identifier_system="urn:pm:acct"))
        s.commit()
        mapping_id = mapping.id
    body = "\ufeffAcct,Nm,Born,Portal,Notes\nX9,\"Doe, Jane\",24.12.1980,yes,\"multi\nline note\"\nX10,Sam Poe,1980-01-01,no,\n"
    report = run_import(org.id, body.encode("utf-8"), mapping_id=mapping_id)
    assert report["status"] == "completed_with_errors"
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(4, "Born")]
    with org_session(org.id) as s:
        cid = service.find_contact_ids(s, org.id, identifier="X9", system="urn:pm:acct")[0]
        data = service.contact_dict(s, service.get_contact(s, cid))
        assert (data["given_name"], data["family_name"], data["birth_date"]) == ("Jane", "Doe", "1980-12-24")
        assert data["attributes"] == {"portal_user": True}


def test_csv_wrong_delimiter_and_bad_encoding_and_extra_cells(db, org, session):
    from carepost.patients.models import CsvMapping

    with org_session(org.id) as s:
        s.add(CsvMapping(org_id=org.id, name="m", columns={"id": "external_id", "first": "given_name"}, options={"delimiter": ","}))
        s.commit()
        mapping_id = s.scalar(select(CsvMapping.id))
    report = run_import(org.id, b"id;first\n1;Ann\n", mapping_id=mapping_id)
    assert report["status"] == "failed" and "delimiter" in report["failure"]
    body = b"id,first\n1,Ann\n2,\xff\xfe\x00bad\n3,Cy,extra\n4,Di\n"
    report = run_import(org.id, body, fmt="csv", options={"encoding": "utf-8"})
    reasons = {e["line"]: e["reason"] for e in report["errors"]}
    assert "encoding" in reasons[3] and "cells" in reasons[4]
    assert count(session, Contact, org.id) == 2


def test_csv_mapping_requires_an_identity_column(db, org):
    from carepost.core.errors import ValidationFailed
    from carepost.patients import csvimport
    from carepost.patients.schemas import CsvMappingIn

    with org_session(org.id) as s:
        with pytest.raises(ValidationFailed) as exc:
            csvimport.create_mapping(s, org.id, CsvMappingIn(name="x", columns={"Email": "email"}))
        assert exc.value.field == "columns"


def test_preview_shows_headers_not_values(db):
    from carepost.patients import csvimport

    p = csvimport.preview("MRN\tFirst Name\tDOB\n123\tAnn\t01/02/1990\n".encode())
    assert p["delimiter"] == "\t" and p["has_header"] and p["suggested"] == {"MRN": "mrn", "First Name": "given_name", "DOB": "birth_date"}
    assert "Ann" not in json.dumps(p)
