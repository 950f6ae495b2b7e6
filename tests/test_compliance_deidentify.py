"""De-identified exports (issue 16 item 7, Safe Harbor 45 CFR 164.514(b)(2)).

The central test builds contacts carrying every kind of identifier — including identifiers hidden
in free-text fields, custom attributes, the display text of fact codes, an observation's value
text, a coverage's plan name and an unverified code — exports them in both formats, and scans the
output for every identifier value in every format (dates in several spellings, phones with and
without punctuation, ZIP5 and ZIP+4, CarePost ids). Also: ZIP3 restriction, 90+, random
pseudonyms, the API job with its status and download, audit, permissions, cross-tenant 404s,
bad input 422 naming the field, the CLI.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from datetime import date, datetime

import pytest
from sqlalchemy import select

from carepost.accounts.credentials import create_credential

SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
DL_SYSTEM = "urn:carepost:drivers-license"

ZEB = {
    "name_prefix": "Rev", "given_name": "Zebulon", "middle_name": "Ignatius", "family_name": "Quixotez",
    "name_suffix": "III", "address_line1": "4417 Juniper Hollow Road", "address_line2": "Apartment 9B",
    "city": "Brattleboro", "state": "NH", "postal_code": "03601-4471", "country": "US",
    "email": "zebulon.quixotez@example.org", "phone": "(617) 555-0142",
    "phones": [{"value": "(617) 555-0142", "use": "mobile"}, {"value": "617-555-0199", "use": "fax"}],
    "mrn": "MRN-99887766", "birth_date": "1931-03-17", "sex": "male", "time_zone": "America/New_York",
    "coverage_plan": "Zebulon family gold plan", "coverage_type": "commercial",
    # identifiers hidden in free-text demographic fields
    "education": "call 617-555-0142", "household_status": "zebulon.quixotez@example.org",
    "employment_status": "see https://zebulon.example.org/cv", "race": "white",
    "identifiers": [
        {"system": SSN_SYSTEM, "value": "123-45-6789", "type": "SS"},
        {"system": "urn:example:plan", "value": "MBR-55443322", "type": "MB"},
        {"system": "urn:example:account", "value": "ACCT-7788123", "type": "AN"},
        {"system": DL_SYSTEM, "value": "D7712345", "type": "DL"},
        {"system": "urn:example:certificate", "value": "CERT-4410987", "type": "LN"},
        {"system": "urn:example:vin", "value": "1HGCM82633A004352", "type": "VIN"},
        {"system": "urn:example:udi", "value": "(01)00844588003288", "type": "UDI"},
        {"system": "urn:example:url", "value": "https://zebulon.example.org/profile", "type": "URL"},
        {"system": "urn:example:ip", "value": "203.0.113.77", "type": "IP"},
        {"system": "urn:example:biometric", "value": "fingerprint-8842AB71", "type": "BIO"},
        {"system": "urn:example:photo", "value": "photo-zq-20190514.jpg", "type": "PHOTO"},
    ],
}
ALMA = {
    "given_name": "Almandine", "family_name": "Verhoevenlund", "email": "alma.v@example.net", "phone": "+1 415 555 0187",
    "birth_date": "1980-07-04", "sex": "female", "city": "Cambridge", "state": "MA", "postal_code": "02139", "country": "US",
    "mrn": "MRN-11223344", "address_line1": "77 Quarry Lane",
}

# Dates that must only ever appear as a year.
DATES = [date(1931, 3, 17), date(1980, 7, 4), date(2019, 5, 14), date(2019, 5, 20), date(2020, 2, 11),
         date(2021, 8, 9), date(2022, 1, 3), date(2022, 1, 9), date(2018, 10, 30), date(2023, 6, 1)]


def _date_forms(d: date) -> list[str]:
    month = d.strftime("%B")
    return [d.isoformat(), d.strftime("%m/%d/%Y"), f"{d.month}/{d.day}/{d.year}", d.strftime("%d.%m.%Y"),
            d.strftime("%Y%m%d"), d.strftime("%Y/%m/%d"), d.strftime("%m-%d-%Y"), f"{month} {d.day}, {d.year}",
            f"{d.day} {month} {d.year}", d.strftime("%d-%b-%Y"), d.strftime("%m/%d/%y")]


def _phone_forms(value: str) -> list[str]:
    digits = re.sub(r"\D", "", value)[-10:]
    a, b, c = digits[:3], digits[3:6], digits[6:]
    return [value, digits, f"{a}-{b}-{c}", f"({a}) {b}-{c}", f"{a}.{b}.{c}", f"+1{digits}", f"{b}-{c}", f"{b}{c}"]


def _forbidden(ids: list[str]) -> list[str]:
    """Every identifier value, in every spelling, that must not appear in the output."""
    values: list[str] = []
    for person in (ZEB, ALMA):
        for key in ("name_prefix", "given_name", "middle_name", "family_name", "address_line1", "address_line2",
                    "city", "email", "mrn", "coverage_plan"):
            if person.get(key) and len(person[key]) > 3:
                values.append(person[key])
        values += [w for w in (person.get("address_line1") or "").split() if len(w) > 4]
        for p in [person.get("phone")] + [p["value"] for p in person.get("phones", [])]:
            if p:
                values += _phone_forms(p)
        for ident in person.get("identifiers", []):
            values.append(ident["value"])
            digits = re.sub(r"\D", "", ident["value"])
            if len(digits) >= 5:
                values.append(digits)
        zip_code = person["postal_code"]
        values += [zip_code, re.sub(r"\D", "", zip_code), zip_code[:5]]
    values += ["123-45-6789", "123456789", "123 45 6789", "99887766", "11223344", "zebulon.example.org",
               "203.0.113.77", "example.org", "example.net", "1931", "Juniper", "Quarry"]
    for d in DATES:
        values += _date_forms(d)
    values += ids
    return values


@pytest.fixture
def population(session, org):
    """Zebulon (93, restricted ZIP3 036, every identifier) and Almandine (45, ZIP 02139), with facts
    whose free text hides identifiers, in a saved segment; plus a compliance credential."""
    from carepost.core.database import org_session
    from carepost.patients import models as pm
    from carepost.patients.schemas import AttributeDefinitionIn
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import define_attribute, save_contact, set_attributes, set_identifier_policy
    from carepost.segments import service as segments

    ids: dict[str, list[str] | str] = {"facts": []}
    with org_session(org.id) as s:
        set_identifier_policy(s, org.id, [SSN_SYSTEM, DL_SYSTEM])
        define_attribute(s, org.id, AttributeDefinitionIn(key="notes", label="Notes", type="text"))
        zeb = save_contact(s, org.id, ContactIn(**ZEB)).contact
        alma = save_contact(s, org.id, ContactIn(**ALMA)).contact
        set_attributes(s, org.id, zeb, {"notes": "SSN 123-45-6789, seen 05/14/2019"})
        ids["zeb"], ids["alma"] = zeb.id, alma.id
        facts = [
            pm.Condition(org_id=org.id, contact_id=zeb.id, code_system="icd10cm", code="E11.9", status="active",
                         display="Diabetes, Zebulon Quixotez MRN-99887766 tel 617-555-0142",
                         onset_date=date(2019, 5, 14), recorded_date=date(2019, 5, 20)),
            pm.Observation(org_id=org.id, contact_id=zeb.id, code_system="loinc", code="4548-4", category="laboratory",
                           display="HbA1c for zebulon.quixotez@example.org", effective_at=datetime(2021, 8, 9, 10, 30),
                           value_quantity=7.1, value_unit="%", value_display="emailed to zebulon.quixotez@example.org"),
            pm.Encounter(org_id=org.id, contact_id=zeb.id, code_system="snomed", code="32485007", class_code="IMP",
                         is_hospitalization=True, start_at=datetime(2022, 1, 3, 8), end_at=datetime(2022, 1, 9, 17),
                         display="Admitted from 4417 Juniper Hollow Road", discharge_disposition="home"),
            pm.Coverage(org_id=org.id, contact_id=zeb.id, plan_name="Gold MBR-55443322", payor_name="Acme ACCT-7788123",
                        period_start=date(2020, 2, 11), display="Plan MBR-55443322"),
            pm.Procedure(org_id=org.id, contact_id=zeb.id, code_system="cpt", code="203.0.113.77", code_verified=False,
                         display="https://zebulon.example.org/photo", performed_start=datetime(2018, 10, 30, 9)),
            pm.Medication(org_id=org.id, contact_id=alma.id, code_system="rxnorm", code="860975", status="active",
                          display="metformin for Almandine Verhoevenlund", authored_on=date(2023, 6, 1),
                          last_fill_date=date(2023, 6, 1), days_supply=30),
        ]
        for f in facts:
            s.add(f)
        s.flush()
        ids["facts"] = [f.id for f in facts]
        seg = segments.create_segment(s, org.id, {"name": "Everyone with a birth date", "query": "age >= 0"},
                                      segments.SYSTEM)
        ids["segment"] = seg.id
        s.commit()
    cred, secret = create_credential(session, org.id, name="compliance", scopes=["compliance:manage", "phi:read_unmasked"])
    session.commit()
    ids["headers"] = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    return org, ids


def _run(org_id: str, segment_id: str, fmt: str) -> tuple[object, bytes]:
    from carepost.compliance import service
    from carepost.core.database import org_session
    from carepost.segments.service import SYSTEM

    with org_session(org_id) as s:
        job = service.create_export(s, org_id, segment_id, fmt, SYSTEM)
        s.commit()
        job = service.run_export(s, org_id, job.id)
        assert job.status == "succeeded", job.failure
        _name, _media, data = service.download(s, org_id, job.id, SYSTEM)
        s.commit()
        return job, data


def _jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def _csv_text(data: bytes) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {name: z.read(name).decode() for name in z.namelist()}


def _scan(text: str, subject_ids: list[str], forbidden: list[str]) -> list[str]:
    for sid in subject_ids:  # random pseudonyms could hold any hex run
        text = text.replace(sid, "S")
    low = text.lower()
    return [v for v in forbidden if v.lower() in low]


def test_no_identifier_survives_in_either_format(population):
    org, ids = population
    carepost_ids = [ids["zeb"], ids["alma"], ids["segment"], org.id, *ids["facts"]]
    forbidden = _forbidden(carepost_ids)
    # the scan itself finds what it looks for (a leaky rendering of the source is caught)
    leaked = _scan(json.dumps({**ZEB, "id": ids["zeb"], "onset": "05/14/2019"}), [], forbidden)
    assert {"Zebulon", "(617) 555-0142", "123-45-6789", "05/14/2019", ids["zeb"], "03601"} <= set(leaked)

    job, data = _run(org.id, ids["segment"], "jsonl")
    subjects = _jsonl(data)
    assert job.subject_count == 2 and len(subjects) == 2 and job.fact_count == 6
    sids = [s["subject_id"] for s in subjects]
    assert _scan(data.decode(), sids, forbidden) == []

    old = next(s for s in subjects if s["age"] == "90+")
    young = next(s for s in subjects if s["age"] != "90+")
    # 90+: no birth year; restricted ZIP3 036 -> 000; the state stays; free text with identifiers dropped
    assert old["birth_year"] is None and old["zip3"] == "000" and old["state"] == "NH"
    assert old["education"] is None and old["household_status"] is None and old["employment_status"] is None
    assert old["race"] == "white" and old["coverage_type"] == "commercial"
    assert young["birth_year"] == 1980 and young["age"] >= 45 and young["zip3"] == "021"
    assert set(old) == set(young) and not {"given_name", "city", "email", "postal_code", "time_zone", "coverage_plan",
                                          "attributes", "id"} & set(old)
    facts = {f["fact_type"]: f for f in old["facts"]}
    assert facts["conditions"]["code"] == "E11.9" and facts["conditions"]["year"] == 2019
    assert facts["encounters"]["year"] == 2022 and facts["encounters"]["end_year"] == 2022
    assert facts["encounters"]["hospitalization"] is True
    assert facts["observations"]["value"] == 7.1 and facts["observations"]["year"] == 2021
    assert facts["procedures"]["code"] is None  # an unverified code is dropped (it held an IP address)
    assert all("display" not in f for f in old["facts"])
    assert job.suppressed_values >= 3

    job2, data2 = _run(org.id, ids["segment"], "csv")
    files = _csv_text(data2)
    assert set(files) == {"subjects.csv", "facts.csv", "README.txt"}
    sids2 = [line.split(",")[0] for line in files["subjects.csv"].splitlines()[1:]]
    for name in ("subjects.csv", "facts.csv"):
        assert _scan(files[name], sids2, forbidden) == [], name
    assert "90+" in files["subjects.csv"] and ",000," in files["subjects.csv"]
    assert "2000 Census" in files["README.txt"] or "2000" in files["README.txt"]
    # pseudonyms are random per export: nothing links the two exports
    assert not set(sids) & set(sids2)


def test_zip3_age_and_pseudonym_rules():
    from carepost.compliance import deidentify

    assert deidentify.zip3("03601", "US") == "000" and deidentify.zip3("89301-1234", None) == "000"
    assert deidentify.zip3("02139", "US") == "021" and deidentify.zip3("K1A 0B1", "CA") is None
    assert deidentify.zip3("1234", "US") is None
    source = deidentify.restricted_zip3()
    assert len(source["zip3"]) == 17 and "Census" in source["source"]
    assert deidentify.age_on(date(1936, 12, 5), date(2026, 12, 4)) == 89
    assert deidentify.age_on(date(1936, 12, 4), date(2026, 12, 4)) == 90
    assert len({deidentify.new_pseudonym() for _ in range(1000)}) == 1000
    for bad in ("617-555-0142", "a@b.org", "http://x.example", "10.0.0.1", "05/14/2019", "2019-05-14",
                "May 14", "MBR 55443322"):
        assert deidentify.looks_like_identifier(bad), bad
    for ok in ("white", "commercial", "Hispanic or Latino", "en-US", "active", "home"):
        assert not deidentify.looks_like_identifier(ok), ok


def test_api_job_status_download_audit_and_permissions(client, population, session, immediate):
    from carepost.audit.models import AuditEvent

    org, ids = population
    headers = ids["headers"]
    r = client.post("/api/v1/compliance/deidentified-exports", json={"segment_id": ids["segment"], "format": "csv"},
                    headers=headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "succeeded" and job["subject_count"] == 2  # immediate mode: the task ran
    r = client.get(f"/api/v1/compliance/deidentified-exports/{job['id']}", headers=headers)
    assert r.json()["download"].endswith("/download")
    r = client.get(job["download"], headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["cache-control"] == "no-store"
    assert "subjects.csv" in zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    listed = client.get("/api/v1/compliance/deidentified-exports", headers=headers).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]

    session.commit()
    events = {e.action: e for e in session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id))}
    requested = events["compliance.deidentified_export.requested"]
    assert requested.actor_type == "api_credential" and requested.details["segment_id"] == ids["segment"]
    done = events["compliance.deidentified_export.completed"]
    assert done.details["subjects"] == 2 and done.details["facts"] == 6 and done.on_behalf_of == requested.actor_id
    assert "compliance.deidentified_export.downloaded" in events

    # bad input: 422 naming the field
    r = client.post("/api/v1/compliance/deidentified-exports", json={"segment_id": "0" * 32}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["field"] == "segment_id"
    r = client.post("/api/v1/compliance/deidentified-exports", json={"segment_id": ids["segment"], "format": "xml"},
                    headers=headers)
    assert r.status_code == 422 and r.json()["error"]["field"] == "format"

    # permission: a marketer's scopes are not enough
    cred, secret = create_credential(session, org.id, name="marketing", scopes=["segments:read", "phi:read_masked"])
    session.commit()
    r = client.post("/api/v1/compliance/deidentified-exports", json={"segment_id": ids["segment"]},
                    headers={"Authorization": f"Bearer {cred.key_id}.{secret}"})
    assert r.status_code == 403


def test_cross_tenant_export_is_404_and_segment_is_422(client, population, session, immediate):
    from carepost.accounts.service import create_organization

    org, ids = population
    r = client.post("/api/v1/compliance/deidentified-exports", json={"segment_id": ids["segment"]}, headers=ids["headers"])
    export_id = r.json()["id"]
    other = create_organization(session, "Other Clinic")
    session.commit()
    cred, secret = create_credential(session, other.id, name="other", scopes=["compliance:manage", "phi:read_unmasked"])
    session.commit()
    theirs = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    assert client.get(f"/api/v1/compliance/deidentified-exports/{export_id}", headers=theirs).status_code == 404
    assert client.get(f"/api/v1/compliance/deidentified-exports/{export_id}/download", headers=theirs).status_code == 404
    r = client.post("/api/v1/compliance/deidentified-exports", json={"segment_id": ids["segment"]}, headers=theirs)
    assert r.status_code == 422 and r.json()["error"]["field"] == "segment_id"
    assert client.get("/api/v1/compliance/deidentified-exports", headers=theirs).json()["data"] == []


def test_cli_writes_the_file(population, tmp_path):
    from typer.testing import CliRunner

    from carepost.cli import app

    org, ids = population
    out = tmp_path / "export.jsonl"
    result = CliRunner().invoke(app, ["compliance", "deidentify", "--org", org.id, "--segment", ids["segment"],
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out.stat().st_mode & 0o777) == 0o600
    subjects = _jsonl(out.read_bytes())
    assert len(subjects) == 2
    assert _scan(out.read_text(), [s["subject_id"] for s in subjects], _forbidden([ids["zeb"], ids["alma"]])) == []
    result = CliRunner().invoke(app, ["compliance", "deidentify", "--org", org.id, "--segment", "0" * 32,
                                      "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "segment_id" in result.output


def test_compliance_page_button_starts_an_export(client, population, make_user, immediate):
    from tests.fixtures.accounts import csrf_from, login_client

    org, ids = population
    officer = make_user(org, role="compliance_officer")
    login_client(client, officer)
    page = client.get("/app/compliance")
    assert page.status_code == 200 and 'data-testid="deidentified-export-form"' in page.text
    assert "Everyone with a birth date" in page.text
    r = client.post("/app/compliance/deidentified-exports",
                    data={"segment_id": ids["segment"], "format": "jsonl", "csrf_token": csrf_from(page.text)},
                    follow_redirects=False)
    assert r.status_code == 303
    page = client.get("/app/compliance")
    assert 'data-testid="deidentified-exports"' in page.text and "succeeded" in page.text
    link = re.search(r'href="(/app/compliance/deidentified-exports/[0-9a-f]+/download)"', page.text).group(1)
    r = client.get(link)
    assert r.status_code == 200 and len(_jsonl(r.content)) == 2
    r = client.post("/app/compliance/deidentified-exports",
                    data={"segment_id": "nope", "format": "jsonl", "csrf_token": csrf_from(page.text)})
    assert r.status_code == 422 and 'id="segment_id-error"' in r.text


@pytest.fixture
def immediate():
    """Run queued tasks at once, as the worker would."""
    from carepost.core.queue import huey

    huey.immediate = True
    yield huey
    huey.immediate = False
