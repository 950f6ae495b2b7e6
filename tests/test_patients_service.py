"""Contacts: encryption of direct identifiers, blind-index search, upsert, facts, stages, deletion."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select

from carepost.core import clock
from carepost.core.database import org_session
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.patients import service
from carepost.patients.models import Contact, ContactIdentifier, Encounter
from carepost.patients.schemas import AttributeDefinitionIn, ContactIn, FactIn


def _save(org_id, **fields):
    with org_session(org_id) as s:
        result = service.save_contact(s, org_id, ContactIn(**fields))
        s.commit()
        return result.contact.id, result.created


def test_direct_identifiers_are_encrypted_and_searchable(db, org, session):
    cid, created = _save(org.id, given_name="Jane", family_name="Doe", email="Jane.Doe@Example.org",
                         phone="(555) 123-4567", mrn="MRN-0042", birth_date=date(1980, 5, 17), city="Springfield",
                         state="il", postal_code="62701", address_line1="12 Elm Street")
    assert created
    raw = session.get(Contact, cid)
    assert b"Jane" not in raw.given_name_enc and raw.birth_date == date(1980, 5, 17)
    assert raw.state == "IL" and raw.city == "Springfield"
    for row in session.scalars(select(ContactIdentifier).where(ContactIdentifier.contact_id == cid)):
        assert row.value_enc is None or b"example" not in row.value_enc
        assert len(row.blind_index) == 64
    with org_session(org.id) as s:
        assert service.find_contact_ids(s, org.id, email="jane.doe@example.org ") == [cid]
        assert service.find_contact_ids(s, org.id, phone="+1 555 123 4567") == [cid]
        assert service.find_contact_ids(s, org.id, mrn="MRN-0042") == [cid]
        assert service.find_contact_ids(s, org.id, mrn="MRN-0043") == []
        data = service.contact_dict(s, service.get_contact(s, cid))
    assert data["given_name"] == "Jane" and data["email"] == "jane.doe@example.org"
    assert data["mrn"] == "MRN-0042" and data["address_line1"] == "12 Elm Street"


def test_upsert_by_external_id_updates_without_duplicates(db, org, session):
    cid, created = _save(org.id, external_id="P-1", given_name="Ann", email="ann@example.org")
    cid2, created2 = _save(org.id, external_id="P-1", family_name="Lee", emails=["ann@example.org", "a.lee@example.org"])
    assert created and not created2 and cid == cid2
    assert session.scalar(select(Contact).where(Contact.org_id == org.id).with_only_columns(Contact.id.label("n")).limit(5)) == cid
    with org_session(org.id) as s:
        data = service.contact_dict(s, service.get_contact(s, cid))
    assert data["given_name"] == "Ann" and data["family_name"] == "Lee"
    assert data["emails"] == ["ann@example.org", "a.lee@example.org"]


def test_identifier_held_by_another_contact_conflicts(db, org):
    a, _ = _save(org.id, external_id="A", given_name="A")
    _save(org.id, mrn="M1", given_name="B")
    with org_session(org.id) as s:
        with pytest.raises(Conflict) as exc:
            service.save_contact(s, org.id, ContactIn(external_id="A", mrn="M1"))
        assert exc.value.field == "mrn"


def test_bad_email_and_phone_name_the_field(db, org):
    with org_session(org.id) as s:
        with pytest.raises(ValidationFailed) as exc:
            service.save_contact(s, org.id, ContactIn(email="not-an-email"))
        assert exc.value.field == "email"
        s.rollback()
        with pytest.raises(ValidationFailed) as exc:
            service.save_contact(s, org.id, ContactIn(phone="12"))
        assert exc.value.field == "phone"


def test_other_organization_cannot_see_contact(db, org, session):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    cid, _ = _save(org.id, email="x@example.org", given_name="X")
    with org_session(other.id) as s:
        with pytest.raises(NotFound):
            service.get_contact(s, cid)
        assert service.find_contact_ids(s, other.id, email="x@example.org") == []
        rows, _ = service.list_contacts(s, other.id, service.ContactFilters())
        assert rows == []


def test_custom_attributes_are_typed(db, org):
    with org_session(org.id) as s:
        service.define_attribute(s, org.id, AttributeDefinitionIn(key="visits", label="Visits", type="number"))
        service.define_attribute(s, org.id, AttributeDefinitionIn(key="vip", label="VIP", type="boolean"))
        service.define_attribute(s, org.id, AttributeDefinitionIn(key="programs", label="Programs", type="list", options=["diabetes", "heart"]))
        service.define_attribute(s, org.id, AttributeDefinitionIn(key="enrolled", label="Enrolled", type="date"))
        s.commit()
        r = service.save_contact(s, org.id, ContactIn(attributes={"visits": "3", "vip": "yes", "programs": "diabetes;heart", "enrolled": "03/04/2024"}))
        s.commit()
        data = service.contact_dict(s, r.contact)
        assert data["attributes"] == {"visits": 3.0, "vip": True, "programs": ["diabetes", "heart"], "enrolled": "2024-03-04"}
        for bad, field in (({"visits": "many"}, "attributes.visits"), ({"programs": "cancer"}, "attributes.programs"), ({"nope": 1}, "attributes.nope")):
            with pytest.raises(ValidationFailed) as exc:
                service.save_contact(s, org.id, ContactIn(attributes=bad), contact=r.contact)
            assert exc.value.field == field
            s.rollback()


def test_list_filters_and_cursor(db, org):
    ids = [_save(org.id, given_name=f"P{i}", state="IL" if i % 2 else "WI", birth_date=date(1950 + i, 1, 1))[0] for i in range(7)]
    with org_session(org.id) as s:
        page1, cur = service.list_contacts(s, org.id, service.ContactFilters(state="IL"), limit=2)
        page2, cur2 = service.list_contacts(s, org.id, service.ContactFilters(state="IL"), cursor=cur, limit=2)
        got = [c.id for c in page1 + page2]
        assert got == sorted(got) == sorted([ids[1], ids[3], ids[5]]) and cur2 is None
        born, _ = service.list_contacts(s, org.id, service.ContactFilters(born_after=date(1954, 1, 1)))
        assert sorted(c.id for c in born) == sorted(ids[4:])
        with pytest.raises(ValidationFailed):
            service.list_contacts(s, org.id, service.ContactFilters(), cursor="garbage")


def test_care_stage_derivation(db, org):
    cid, _ = _save(org.id, given_name="S")
    with org_session(org.id) as s:
        assert service.get_contact(s, cid).care_stage == "new"
        service.create_fact(s, org.id, cid, "encounters", FactIn(class_code="AMB", status="finished", start_at=clock.now() - timedelta(days=10)))
        assert service.get_contact(s, cid).care_stage == "active"
        s.commit()
    clock.advance(timedelta(days=400))
    with org_session(org.id) as s:
        service.refresh_care_stages(s, org.id, None)
        assert service.get_contact(s, cid).care_stage == "overdue"
        for days in (5, 20):
            service.create_fact(s, org.id, cid, "appointments", FactIn(status="noshow", start_at=clock.now() - timedelta(days=days)))
        assert service.get_contact(s, cid).care_stage == "at_risk"
        service.set_care_journey_config(s, org.id, {"stages": ["pregnancy"], "at_risk_noshow_count": 3})
        assert service.get_contact(s, cid).care_stage == "overdue"
        service.save_contact(s, org.id, ContactIn(care_stage="pregnancy"), contact=service.get_contact(s, cid))
        service.refresh_care_stages(s, org.id, [cid])
        assert service.get_contact(s, cid).care_stage == "pregnancy"
        with pytest.raises(ValidationFailed) as exc:
            service.save_contact(s, org.id, ContactIn(care_stage="unknown"), contact=service.get_contact(s, cid))
        assert exc.value.field == "care_stage"


def test_deceased_is_a_terminal_stage(db, org):
    """Issue 10 item 2: a deceased contact is never ``overdue`` (nor a stage set by hand); marking
    them alive again returns the derived stage."""
    cid, _ = _save(org.id, given_name="D")
    clock.advance(timedelta(days=400))
    with org_session(org.id) as s:
        service.set_care_journey_config(s, org.id, {"stages": ["pregnancy"]})
        assert service.get_contact(s, cid).care_stage == "overdue"
        service.save_contact(s, org.id, ContactIn(deceased=True), contact=service.get_contact(s, cid))
        assert service.get_contact(s, cid).care_stage == "deceased"
        service.create_fact(s, org.id, cid, "encounters", FactIn(class_code="AMB", status="finished", start_at=clock.now() - timedelta(days=3)))
        service.save_contact(s, org.id, ContactIn(care_stage="pregnancy"), contact=service.get_contact(s, cid))
        service.refresh_care_stages(s, org.id, None)
        assert service.get_contact(s, cid).care_stage == "deceased"
        service.save_contact(s, org.id, ContactIn(deceased=False, care_stage=None), contact=service.get_contact(s, cid))
        assert service.get_contact(s, cid).care_stage == "active"
        s.commit()


def test_fact_fields_checked_per_kind(db, org):
    cid, _ = _save(org.id, given_name="F")
    with org_session(org.id) as s:
        med = service.create_fact(s, org.id, cid, "medications", FactIn(code_system="http://www.nlm.nih.gov/research/umls/rxnorm",
                                                                       code="860975", status="active", last_fill_date=date(2026, 1, 1), days_supply=30))
        assert med.code_system == "rxnorm" and med.next_refill_due == date(2026, 1, 31)
        with pytest.raises(ValidationFailed) as exc:
            service.create_fact(s, org.id, cid, "conditions", FactIn(days_supply=3))
        assert exc.value.field == "days_supply"


def test_delete_keeps_blind_indexes_for_hooks(db, org, session):
    cid, _ = _save(org.id, given_name="D", email="d@example.org", mrn="X1")
    seen = {}

    def hook(s, org_id, contact_id, indexes):
        seen.update(indexes)

    service.register_deletion_hook(hook)
    try:
        with org_session(org.id) as s:
            service.create_fact(s, org.id, cid, "conditions", FactIn(code="E11.9", code_system="icd10cm"))
            expected = service.blind_index(s, org.id, "email", "d@example.org")
            result = service.delete_contact(s, org.id, cid)
            s.commit()
    finally:
        service._DELETION_HOOKS.remove(hook)
    assert seen["email"] == [expected] and result.removed["conditions"] == 1
    session.rollback()
    assert session.get(Contact, cid) is None
    assert session.scalars(select(ContactIdentifier).where(ContactIdentifier.contact_id == cid)).all() == []


def test_export_contains_everything(db, org):
    cid, _ = _save(org.id, given_name="E", family_name="Xport", email="e@example.org")
    with org_session(org.id) as s:
        service.create_fact(s, org.id, cid, "immunizations", FactIn(code_system="cvx", code="140", display="Influenza", occurrence_date=date(2025, 10, 1)))
        data = service.export_contact(s, org.id, cid)
        html = service.export_html(data)
    assert data["contact"]["family_name"] == "Xport"
    assert data["clinical_facts"]["immunizations"][0]["code"] == "140"
    assert "Xport" in html and "Influenza" in html and "<script" not in html
