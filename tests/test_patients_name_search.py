"""Find a patient by name without storing names in clear (issue 10 item 8): keyed blind indexes
of normalized name tokens, accent- and case-insensitive, through the API and the contacts page;
name search needs the unmasked-PHI permission; contacts stored before it get tokens when next
written or by the reindex task."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import delete, func, select

from carepost.accounts import credentials as creds
from carepost.audit.models import AuditEvent
from carepost.core.database import get_engine, org_session
from carepost.patients import service
from carepost.patients.models import ContactIdentifier
from carepost.patients.schemas import ContactIn
from tests.fixtures.accounts import login_client
from tests.test_patients_import import run_import, synthea_like


@pytest.fixture
def key(session):
    def make(org_id, scopes=("phi:read_masked", "phi:read_unmasked", "phi:write", "contacts:import")):
        cred, secret = creds.create_credential(session, org_id, name="Name search test", scopes=list(scopes))
        session.commit()
        return {"Authorization": f"Bearer {cred.key_id}.{secret}"}

    return make


def _save(org_id, **fields) -> str:
    with org_session(org_id) as s:
        cid = service.save_contact(s, org_id, ContactIn(**fields)).contact.id
        s.commit()
        return cid


def test_tokens_are_normalized():
    assert service.name_tokens("Zoë", None, "Nguyễn-Smith") == ["zoe", "nguyen", "smith"]
    assert service.name_tokens("  JOSÉ  María ") == ["jose", "maria"]
    assert service.name_tokens("O'Brien", "Müller", "Straße") == ["o", "brien", "muller", "strasse"]
    assert service.name_tokens("Łukasz Søren") == ["lukasz", "soren"]
    assert service.name_tokens("", None) == []


def test_name_search_by_blind_index_only(db, org, session):
    zoe = _save(org.id, given_name="Zoë", family_name="Nguyễn", email="zoe@example.org")
    jose = _save(org.id, given_name="José", middle_name="María", family_name="García López")
    other = _save(org.id, given_name="Maria", family_name="Garcia")
    with org_session(org.id) as s:
        assert service.find_contact_ids_by_name(s, org.id, "zoe nguyen") == [zoe]
        assert service.find_contact_ids_by_name(s, org.id, "NGUYEN") == [zoe]
        assert service.find_contact_ids_by_name(s, org.id, "Nguyễn, Zoë") == [zoe]
        assert service.find_contact_ids_by_name(s, org.id, "garcia") == sorted([jose, other])
        assert service.find_contact_ids_by_name(s, org.id, "Garcia Lopez") == [jose]
        assert service.find_contact_ids_by_name(s, org.id, "maria garcia") == sorted([jose, other])
        assert service.find_contact_ids_by_name(s, org.id, "zoe garcia") == []
        assert service.find_contact_ids_by_name(s, org.id, "zo") == []  # whole tokens, not prefixes
        # a renamed patient is found by the new name only
        service.save_contact(s, org.id, ContactIn(family_name="Tran"), contact=service.get_contact(s, zoe))
        s.commit()
        assert service.find_contact_ids_by_name(s, org.id, "zoe nguyen") == []
        assert service.find_contact_ids_by_name(s, org.id, "zoe tran") == [zoe]
        # the rows hold an index only, and the clear name is nowhere in the database
        rows = list(s.scalars(select(ContactIdentifier).where(ContactIdentifier.contact_id == zoe, ContactIdentifier.kind == "name")))
        assert len(rows) == 2 and all(r.value_enc is None and len(r.blind_index) == 64 for r in rows)
        # name tokens are not identifiers shown on the contact
        assert service.contact_dict(s, service.get_contact(s, zoe))["identifiers"] == []
    with get_engine().connect() as conn:
        from carepost.core.database import Base

        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                text = repr(tuple(row)).lower()
                assert "nguy" not in text and "tran'" not in text and "garc" not in text, table.name


def test_contacts_without_tokens_get_them_when_written_or_reindexed(db, org, session):
    old = _save(org.id, given_name="Ada", family_name="Lovelace", email="ada@example.org")
    older = _save(org.id, given_name="Alan", family_name="Turing")
    with org_session(org.id) as s:  # as if stored before name search existed
        s.execute(delete(ContactIdentifier).where(ContactIdentifier.org_id == org.id, ContactIdentifier.kind == "name"))
        s.commit()
        assert service.find_contact_ids_by_name(s, org.id, "lovelace") == []
        service.save_contact(s, org.id, ContactIn(city="London"), contact=service.get_contact(s, old))  # any write
        s.commit()
        assert service.find_contact_ids_by_name(s, org.id, "ada lovelace") == [old]
        assert service.find_contact_ids_by_name(s, org.id, "turing") == []
    from carepost.patients.tasks import reindex_name_tokens

    reindex_name_tokens.call_local(org.id)
    with org_session(org.id) as s:
        assert service.find_contact_ids_by_name(s, org.id, "alan turing") == [older]
        before = s.scalar(select(func.count()).select_from(ContactIdentifier).where(ContactIdentifier.kind == "name"))
        assert service.reindex_names(s, org.id, only_missing=False) == 2
        assert s.scalar(select(func.count()).select_from(ContactIdentifier).where(ContactIdentifier.kind == "name")) == before


def test_imported_patients_are_found_by_name_through_the_api(db, org, session, client, key):
    bundle = synthea_like(seed=41)
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["name"] = [{"use": "official", "family": "Müller-Ödegaard", "given": ["Renée", "Jo"]}]
    assert run_import(org.id, json.dumps(bundle).encode())["status"] == "succeeded"
    h = key(org.id)
    r = client.post("/api/v1/contacts/search", json={"name": "renee muller"}, headers=h)
    assert r.status_code == 200, r.text
    assert [c["family_name"] for c in r.json()["data"]] == ["Müller-Ödegaard"]
    r = client.post("/api/v1/contacts/search", json={"name": "RENÉE ödegaard jo"}, headers=h)
    assert len(r.json()["data"]) == 1
    assert client.post("/api/v1/contacts/search", json={"name": "renee smith"}, headers=h).json()["data"] == []
    # name and another criterion: both must match
    assert client.post("/api/v1/contacts/search", json={"name": "renee", "email": "x@example.org"}, headers=h).json()["data"] == []
    r = client.post("/api/v1/contacts/search", json={"name": "  "}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "name"
    # identifier-like: a masked-only key may not search by name
    r = client.post("/api/v1/contacts/search", json={"name": "renee"}, headers=key(org.id, ("phi:read_masked",)))
    assert r.status_code == 403 and r.json()["error"]["field"] == "name"
    session.rollback()
    event = session.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id, AuditEvent.action == "contact.search")
                            .order_by(AuditEvent.seq)).first()
    assert event.details["by"] == ["name"] and "renee" not in json.dumps(event.details).lower()


def test_contacts_page_name_search(db, org, session, client, make_user):
    cid = _save(org.id, given_name="Zoë", family_name="Nguyễn", email="zoe@example.org")
    _save(org.id, given_name="Zack", family_name="Nguyen-Ho")
    owner = make_user(org, role="owner")
    csrf = login_client(client, owner)
    page = client.get("/app/contacts")
    assert 'name="name"' in page.text
    r = client.post("/app/contacts/search", data={"csrf_token": csrf, "name": "ZOE nguyen"})
    assert r.status_code == 200 and f"/app/contacts/{cid}" in r.text and "Zack" not in r.text
    marketer = make_user(org, role="marketer")  # masked PHI only
    client.cookies.clear()
    csrf = login_client(client, marketer)
    assert 'name="name"' not in client.get("/app/contacts").text
    r = client.post("/app/contacts/search", data={"csrf_token": csrf, "name": "zoe"})
    assert r.status_code == 422 and f"/app/contacts/{cid}" not in r.text and "unmasked" in r.text
