"""Segments over the importer's demo data (Synthea-shaped FHIR bundles through the real FHIR
importer): diabetes + HbA1c, refill due, immunization missing — each returns exactly the patients
a direct reading of the imported rows says; and ``carepost segment count`` as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from carepost.segments import library

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
AT = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)  # the demo's reference date


@pytest.fixture
def demo(db):
    """40 demo patients imported through the FHIR importer. The demo's prescriptions carry no
    dispense request; Synthea's do, so every second one gets a 30-day supply (refills can be due)."""
    import io
    import json

    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session, read_only_session, system_session
    from carepost.core.ids import new_id
    from carepost.patients import models as pm
    from carepost.patients.demo import synthetic_bundles
    from carepost.patients.fhir import FhirImporter
    from carepost.patients.imports import DbErrorSink, create_job

    with system_session() as s:
        org = create_organization(s, "Demo Segments")
        s.commit()
        org_id, slug = org.id, org.slug
    entries = [e for b in synthetic_bundles(40, seed=3) for e in b["entry"]]
    for i, e in enumerate(x for x in entries if x["resource"]["resourceType"] == "MedicationRequest"):
        if i % 2 == 0:
            e["resource"]["dispenseRequest"] = {"expectedSupplyDuration": {"value": 30, "unit": "days",
                                                                           "system": "http://unitsofmeasure.org", "code": "d"}}
    data = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode()
    with org_session(org_id) as s:
        job = create_job(s, org_id, format="fhir", filename="demo.json", created_by="test")
        s.commit()
        FhirImporter(s, org_id, new_id(), DbErrorSink(s, job)).import_json(lambda: io.BytesIO(data))
        s.commit()
    with read_only_session(org_id) as s:
        rows = {
            "contacts": list(s.scalars(select(pm.Contact))),
            "conditions": list(s.scalars(select(pm.Condition))),
            "observations": list(s.scalars(select(pm.Observation))),
            "medications": list(s.scalars(select(pm.Medication))),
            "immunizations": list(s.scalars(select(pm.Immunization))),
        }
    assert len(rows["contacts"]) == 40
    return org_id, slug, rows


def _ids(org_id: str, query: str, at: datetime = AT) -> set[str]:
    from carepost.core.database import read_only_session
    from carepost.segments import service

    with read_only_session(org_id) as s:
        return set(service.contact_ids(s, org_id, query, service.SYSTEM, at=at))


def _aware(dt):
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def test_demo_population_queries_and_the_cli(demo, storage):
    """One import, four checks (importing takes most of the time)."""
    check_diabetes_and_latest_hba1c_above_8(demo)
    check_refill_due_within_14_days(demo)
    check_flu_immunization_missing_in_12_months(demo)
    check_the_cli_prints_the_count_and_the_time(demo, storage)


def check_diabetes_and_latest_hba1c_above_8(demo):
    org_id, _, rows = demo
    diabetes = library.shipped_value_set("diabetes")
    living = {c.id for c in rows["contacts"] if not c.deceased}
    diabetic = {f.contact_id for f in rows["conditions"] if library.value_set_matches(f.code_system, f.code, diabetes)}
    assert diabetic, "the demo population has diabetics"
    latest: dict[str, tuple] = {}
    for o in rows["observations"]:
        if o.code_system == "loinc" and o.code == "4548-4" and o.effective_at is not None \
                and _aware(o.effective_at) >= AT - timedelta(days=365 * 2):
            key = (_aware(o.effective_at), o.id)
            if o.contact_id not in latest or key > latest[o.contact_id][0]:
                latest[o.contact_id] = (key, o.value_quantity)
    high = {cid for cid, (_, v) in latest.items() if v is not None and v > 8}
    expected = diabetic & high & living
    assert expected and expected != diabetic & living, "some diabetics above 8, some not"
    got = _ids(org_id, 'has condition in valueset "diabetes" and last observation loinc:4548-4 > 8 within 24 months')
    assert got == expected
    # the ICD-10 / SNOMED spelling of the same question agrees
    assert _ids(org_id, "has condition snomed:44054006 and last observation loinc:4548-4 > 8 within 24 months") == {
        cid for cid in expected if any(f.contact_id == cid and f.code == "44054006" for f in rows["conditions"])}


def check_refill_due_within_14_days(demo):
    org_id, _, rows = demo
    active = [m for m in rows["medications"] if m.status == "active" and m.next_refill_due is not None]
    assert active, "the demo population has active prescriptions with a refill date"
    dues = sorted(m.next_refill_due for m in active)
    at = datetime.combine(dues[len(dues) // 2] - timedelta(days=7), datetime.min.time(), tzinfo=timezone.utc)
    living = {c.id for c in rows["contacts"] if not c.deceased}
    expected = {m.contact_id for m in active if at.date() <= m.next_refill_due <= at.date() + timedelta(days=14)} & living
    assert expected
    assert _ids(org_id, "refill due within 14 days", at) == expected
    after_all = datetime.combine(dues[-1] + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
    assert _ids(org_id, "refill due within 14 days", after_all) == set()
    before_all = datetime.combine(dues[0] - timedelta(days=20), datetime.min.time(), tzinfo=timezone.utc)
    assert _ids(org_id, "refill due within 14 days", before_all) == set()


def check_flu_immunization_missing_in_12_months(demo):
    org_id, _, rows = demo
    living = {c.id for c in rows["contacts"] if not c.deceased}
    flu = library.shipped_value_set("flu_immunization")
    recent = {i.contact_id for i in rows["immunizations"]
              if library.value_set_matches(i.code_system, i.code, flu) and i.status != "not-done"
              and i.occurrence_date is not None and i.occurrence_date >= AT.date() - timedelta(days=365)}
    expected = living - recent
    assert expected and recent, "some patients had a flu shot in the year, some did not"
    assert _ids(org_id, 'has no immunization in valueset "flu_immunization" within 12 months') == expected
    assert _ids(org_id, "not has immunization cvx:140 within 12 months") >= expected


def check_the_cli_prints_the_count_and_the_time(demo, storage):
    org_id, slug, rows = demo
    expected = len(_ids(org_id, "has condition in valueset \"diabetes\" and age >= 40", datetime.now(timezone.utc)))
    env = {**os.environ, **storage.env, "COLUMNS": "300"}
    result = subprocess.run([sys.executable, "-m", "carepost.cli", "segment", "count", "--org", slug,
                             'has condition in valueset "diabetes" and age >= 40'],
                            env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"{expected} contacts in {slug}") and first.endswith(" ms)"), result.stdout
    bad = subprocess.run([sys.executable, "-m", "carepost.cli", "segment", "count", "--org", slug, "age >>= 3"],
                         env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "line 1, column 6" in bad.stderr
    explain = subprocess.run([sys.executable, "-m", "carepost.cli", "segment", "count", "--org", slug, "--explain",
                              "has condition icd10:E11.*"], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert explain.returncode == 0 and "conditions" in explain.stdout, explain.stderr
