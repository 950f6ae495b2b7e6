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


def _memberships(session, user_id):
    from carepost.accounts.models import Membership, Organization

    session.rollback()
    rows = session.execute(select(Organization.name, Membership.role).join(Membership, Membership.org_id == Organization.id)
                           .where(Membership.user_id == user_id))
    return sorted(tuple(r) for r in rows)


def test_demo_loaded_before_setup_is_reachable_by_the_first_owner(client, db, session):
    """Issue 10 item 10: `carepost run --demo` runs before the setup link is used; the demo is a
    distinctly named organization the owner the setup link creates belongs to."""
    from carepost.accounts.models import Organization, User
    from tests.test_accounts_setup import setup_link, submit

    slug, loaded = demo.ensure_demo_population(count=2, seed=5)
    assert loaded == 2
    session.rollback()
    org = session.scalar(select(Organization).where(Organization.slug == slug))
    assert org.name == "Demo Clinic (synthetic patients)" and org.settings.get("demo") is True
    r = submit(client, setup_link(), org_name="Demo Clinic")
    assert r.status_code == 303
    session.rollback()
    owner = session.scalar(select(User))
    assert _memberships(session, owner.id) == [("Demo Clinic", "owner"), ("Demo Clinic (synthetic patients)", "owner")]
    # Two organizations, named apart; a second call loads nothing and adds nobody.
    assert demo.ensure_demo_population(count=2, seed=5) == (slug, 0)
    assert sorted(session.scalars(select(Organization.name))) == ["Demo Clinic", "Demo Clinic (synthetic patients)"]


def test_demo_loaded_after_setup_joins_the_setup_owner(client, db, session):
    from carepost.accounts.models import User
    from tests.test_accounts_setup import setup_link, submit

    assert submit(client, setup_link()).status_code == 303
    session.rollback()
    owner = session.scalar(select(User))
    demo.ensure_demo_population(count=2, seed=5)
    assert _memberships(session, owner.id) == [("Bar Clinic", "owner"), ("Demo Clinic (synthetic patients)", "owner")]
