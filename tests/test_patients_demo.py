"""The synthetic population behind ``carepost run --demo`` and the benchmarks."""

from __future__ import annotations

import json
from collections import Counter

from sqlalchemy import func, select

from carepost.patients import demo
from carepost.patients.models import (
    Appointment,
    CarePlan,
    Contact,
    Coverage,
    Encounter,
    Immunization,
    Procedure,
)


def test_bundles_add_what_carebundle_lacks_and_are_deterministic():
    bundles = [demo.synthetic_bundle(i, seed=3) for i in range(30)]
    types = Counter(e["resource"]["resourceType"] for b in bundles for e in b["entry"])
    for rtype in ("Patient", "Immunization", "Appointment", "Coverage", "CarePlan", "Procedure", "Encounter", "Observation"):
        assert types[rtype] > 0, rtype
    assert types["Patient"] == 30
    inpatient = [e for b in bundles for e in b["entry"]
                 if e["resource"]["resourceType"] == "Encounter" and e["resource"]["class"]["code"] == "IMP"]
    assert inpatient
    emails = [t["value"] for b in bundles for e in b["entry"] if e["resource"]["resourceType"] == "Patient"
              for t in e["resource"]["telecom"] if t["system"] == "email"]
    assert emails and all(e.endswith(".example") for e in emails) and len(emails) == 27  # one in ten has none
    assert all(e["resource"]["address"][0]["postalCode"] for b in bundles for e in b["entry"] if e["resource"]["resourceType"] == "Patient")
    assert json.dumps(demo.synthetic_bundle(4, seed=3)) == json.dumps(demo.synthetic_bundle(4, seed=3))


def test_ndjson_uses_type_id_references(tmp_path):
    path = tmp_path / "pop.ndjson"
    n = demo.write_ndjson(path, 3, seed=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == n and all(r.get("id") for r in lines)
    assert '"reference":"urn:uuid:' not in path.read_text()
    cond = next(r for r in lines if r["resourceType"] == "Condition")
    assert cond["subject"]["reference"].startswith("Patient/")


def test_demo_population_loads_once(db, session):
    slug, loaded = demo.ensure_demo_population(count=6, seed=5)
    assert loaded == 6
    assert demo.ensure_demo_population(count=6, seed=5) == (slug, 0)
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Contact)) == 6
    for model in (Immunization, Appointment, Coverage, Encounter):
        assert session.scalar(select(func.count()).select_from(model)) > 0, model.__tablename__
    assert session.scalar(select(func.count()).select_from(CarePlan)) + session.scalar(select(func.count()).select_from(Procedure)) > 0
    contacts = session.scalars(select(Contact)).all()
    assert all(c.postal_code and c.time_zone for c in contacts)
    assert {c.care_stage for c in contacts} <= {"new", "active", "overdue", "at_risk"}
