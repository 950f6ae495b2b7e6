"""The segments API: parse, count with small-cell suppression and breakdowns, preview masking,
sensitive categories (refused without unmasked-PHI rights, audited), saved segments (dynamic and
snapshot, members, daily counts, uses, cycles), value sets, explain."""

from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy import select

from carepost.accounts.credentials import create_credential

MANAGER = ["segments:read", "segments:manage", "phi:read_masked", "phi:read_unmasked"]
VIEWER = ["segments:read", "phi:read_masked"]


def _headers(session, org_id, scopes, name="segments"):
    cred, secret = create_credential(session, org_id, name=name, scopes=scopes)
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


@pytest.fixture
def clinic(session, org):
    """15 women aged 60 in Boston (3 with HIV), 4 men aged 30 in Austin; 1 deceased woman."""
    from carepost.core.database import org_session
    from carepost.patients import models as pm
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact as _save

    def save_contact(s, org_id, data):
        return _save(s, org_id, ContactIn(**data))

    ids = {"women": [], "men": [], "hiv": []}
    with org_session(org.id) as s:
        for i in range(15):
            r = save_contact(s, org.id, {"given_name": f"Ann{i}", "family_name": "Smith", "email": f"ann{i}@example.test",
                                         "sex": "female", "birth_date": "1966-01-10", "city": "Boston", "postal_code": "02139"})
            ids["women"].append(r.contact.id)
            if i < 3:
                s.add(pm.Condition(org_id=org.id, contact_id=r.contact.id, code_system="icd10cm", code="B20", status="active"))
                ids["hiv"].append(r.contact.id)
            if i < 5:
                s.add(pm.Condition(org_id=org.id, contact_id=r.contact.id, code_system="snomed", code="44054006", status="active"))
        for i in range(4):
            r = save_contact(s, org.id, {"given_name": f"Bob{i}", "family_name": "Jones", "sex": "male",
                                         "birth_date": "1996-01-10", "city": "Austin", "postal_code": "78701"})
            ids["men"].append(r.contact.id)
        r = save_contact(s, org.id, {"given_name": "Dee", "family_name": "Dead", "sex": "female", "birth_date": "1950-01-01",
                                     "deceased": True})
        ids["deceased"] = r.contact.id
        s.commit()
    manager = _headers(session, org.id, MANAGER, "manager")
    viewer = _headers(session, org.id, VIEWER, "viewer")
    outsider = _headers(session, org.id, ["phi:read_masked"], "outsider")
    return org, ids, manager, viewer, outsider


def _events(session, action):
    from carepost.audit.models import AuditEvent

    session.commit()  # a new snapshot (SQLite WAL readers keep theirs until the transaction ends)
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def test_parse_both_ways_and_errors_name_the_position(client, clinic):
    _, _, manager, viewer, outsider = clinic
    r = client.post("/api/v1/segments/parse", json={"text": "age >= 50 AND not has condition icd10:E11.*"}, headers=viewer)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tree"] == {"and": [{"type": "field", "field": "age", "op": ">=", "value": 50},
                                    {"not": {"type": "has", "kind": "condition", "codes": ["icd10:E11.*"]}}]}
    assert body["text"] == "age >= 50 and not has condition icd10:E11.*"
    r = client.post("/api/v1/segments/parse", json={"tree": body["tree"]}, headers=viewer)
    assert r.json()["text"] == body["text"]
    r = client.post("/api/v1/segments/parse", json={"text": "age >= 50 and\n  sex = "}, headers=viewer)
    assert r.status_code == 422
    err = r.json()["error"]
    assert (err["line"], err["column"], err["found"]) == (2, 8, "end of query")
    assert "a name" in err["expected"] and err["message"].startswith("line 2, column 8")
    r = client.post("/api/v1/segments/parse", json={"tree": {"and": [{"type": "field", "field": "age", "op": ">=", "value": "old"}]}},
                    headers=viewer)
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.and[0]"
    assert client.post("/api/v1/segments/parse", json={"text": "age > 1"}, headers=outsider).status_code == 403
    fields = client.get("/api/v1/segments/fields", headers=viewer).json()
    assert set(fields) >= {"demographic", "clinical", "journey", "engagement", "consent"}
    assert any(f.get("field") == "age" and f["type"] == "number" for f in fields["demographic"])


def test_count_small_cells_breakdown_and_deceased(client, clinic):
    _, ids, manager, viewer, _ = clinic
    r = client.post("/api/v1/segments/count", json={"query": "sex = female", "breakdown": "age_band"}, headers=manager)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 15  # the deceased woman is excluded by default
    assert r.json()["breakdown"] == [{"value": "50-64", "count": 15}]
    r = client.post("/api/v1/segments/count", json={"query": "sex = female and deceased = true"}, headers=manager)
    assert r.json()["count"] == 1
    # 4 men: exact for the manager, "fewer than 11" for a viewer without PHI rights
    assert client.post("/api/v1/segments/count", json={"query": "sex = male"}, headers=manager).json()["count"] == 4
    r = client.post("/api/v1/segments/count", json={"query": "sex = male", "breakdown": "zip3"}, headers=viewer)
    assert r.json()["count"] == "fewer than 11" and r.json()["exact"] is False
    assert r.json()["breakdown"] == [{"value": "787", "count": "fewer than 11"}]
    r = client.post("/api/v1/segments/count", json={"query": {"type": "field", "field": "city", "op": "=", "value": "boston"}},
                    headers=viewer)
    assert r.json()["count"] == 15
    assert client.post("/api/v1/segments/count", json={"query": "city = Nowhere"}, headers=viewer).json()["count"] == 0


def test_preview_is_masked_for_viewers_and_audited(client, session, clinic):
    _, ids, manager, viewer, _ = clinic
    r = client.post("/api/v1/segments/preview", json={"query": "sex = male", "limit": 2}, headers=viewer)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["masked"] is True and body["count"] == "fewer than 11" and len(body["contacts"]) == 2
    assert all(c["given_name"].endswith("***") and c["birth_date"] == "1996" for c in body["contacts"])
    r = client.post("/api/v1/segments/preview", json={"query": "sex = male", "limit": 2}, headers=manager)
    assert r.json()["contacts"][0]["given_name"].startswith("Bob") and r.json()["count"] == 4
    events = _events(session, "segment.preview")
    assert len(events) == 2 and set(events[0].details["contact_ids"]) <= set(ids["men"])


def test_sensitive_segments_need_unmasked_rights_and_every_evaluation_is_audited(client, session, clinic):
    _, ids, manager, viewer, _ = clinic
    for query in ('has condition in valueset "hiv"', "has condition icd10:B20", "has condition icd10:B*"):
        r = client.post("/api/v1/segments/count", json={"query": query}, headers=viewer)
        assert r.status_code == 403, (query, r.text)
    assert len(_events(session, "segment.denied")) == 3
    r = client.post("/api/v1/segments/count", json={"query": 'has condition in valueset "hiv"'}, headers=manager)
    assert r.status_code == 200 and r.json()["count"] == 3 and r.json()["sensitive_categories"] == ["hiv"]
    ev = _events(session, "segment.count")
    assert ev and ev[-1].details["sensitive_categories"] == ["hiv"] and ev[-1].details["value_sets"] == ["hiv"]
    # a saved sensitive segment: hidden from the viewer's list, refused when read
    r = client.post("/api/v1/segments", json={"name": "HIV", "query": "has condition icd10:B20"}, headers=manager)
    assert r.status_code == 201 and r.json()["sensitive"] is True
    sid = r.json()["id"]
    assert client.get(f"/api/v1/segments/{sid}", headers=viewer).status_code == 403
    assert sid not in [s["id"] for s in client.get("/api/v1/segments", headers=viewer).json()["data"]]
    assert sid in [s["id"] for s in client.get("/api/v1/segments", headers=manager).json()["data"]]
    # a segment using the sensitive one is sensitive too
    r = client.post("/api/v1/segments", json={"name": "Wrapped", "query": 'in segment "HIV" or sex = male'}, headers=manager)
    assert r.json()["sensitive_categories"] == ["hiv"]
    r = client.post("/api/v1/segments/count", json={"query": "sex = male or diabetes_free = 1"}, headers=viewer)
    assert r.status_code == 422  # unknown field; nothing run
    assert "diabetes_free" in r.json()["error"]["message"]
    # a non-sensitive diabetes query is open to the viewer (5 diabetics: fewer than 11)
    r = client.post("/api/v1/segments/count", json={"query": 'has condition in valueset "diabetes"'}, headers=viewer)
    assert r.status_code == 200 and r.json()["count"] == "fewer than 11" and r.json()["sensitive"] is False


def test_saved_segments_snapshot_members_counts_uses_and_cycles(client, session, clinic):
    org, ids, manager, viewer, _ = clinic
    r = client.post("/api/v1/segments", json={"name": "Women", "description": "all women", "query": "sex = female"},
                    headers=manager)
    assert r.status_code == 201, r.text
    women = r.json()
    assert women["query_text"] == "sex = female" and women["kind"] == "dynamic"
    r = client.post("/api/v1/segments", json={"name": "Snap", "kind": "snapshot", "query": "city = Austin"}, headers=manager)
    snap = r.json()
    assert snap["snapshot_at"] and snap["last_count"] == 4
    # members, paged by id
    page = client.get(f"/api/v1/segments/{women['id']}/members?limit=10", headers=viewer).json()
    assert len(page["data"]) == 10 and page["next_after"] == page["data"][-1]
    rest = client.get(f"/api/v1/segments/{women['id']}/members?limit=10&after={page['next_after']}", headers=viewer).json()
    assert sorted(page["data"] + rest["data"]) == sorted(ids["women"]) and rest["next_after"] is None
    # the snapshot stays frozen while the dynamic segment follows the data
    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(org.id) as s:
        save_contact(s, org.id, ContactIn(given_name="New", sex="male", city="Austin"))
        s.commit()
    assert len(client.get(f"/api/v1/segments/{snap['id']}/members", headers=viewer).json()["data"]) == 4
    assert client.post(f"/api/v1/segments/{snap['id']}/count", headers=manager).json()["count"] == 4
    r = client.patch(f"/api/v1/segments/{snap['id']}", json={"refresh_snapshot": True}, headers=manager)
    assert r.json()["last_count"] == 5
    # daily counts and uses
    assert client.post(f"/api/v1/segments/{women['id']}/count", headers=manager).json()["count"] == 15
    counts = client.get(f"/api/v1/segments/{women['id']}/counts", headers=viewer).json()["data"]
    assert len(counts) == 1 and counts[0]["count"] == 15
    uses = client.get(f"/api/v1/segments/{women['id']}/uses", headers=viewer).json()["data"]
    assert {u["purpose"] for u in uses} == {"members", "count"}
    # membership of another segment; cycles refused with the position
    r = client.post("/api/v1/segments", json={"name": "Older women", "query": 'in segment "Women" and age >= 60'}, headers=manager)
    assert r.status_code == 201 and r.json()["references"] == [women["id"]]
    older = r.json()
    r = client.patch(f"/api/v1/segments/{women['id']}", json={"query": 'sex = female and in segment "Older women"'}, headers=manager)
    assert r.status_code == 422 and "refer to itself" in r.json()["error"]["message"]
    r = client.patch(f"/api/v1/segments/{older['id']}", json={"query": 'in segment "Older women"'}, headers=manager)
    assert r.status_code == 422 and r.json()["error"]["column"] == 1
    assert client.delete(f"/api/v1/segments/{women['id']}", headers=manager).status_code == 409
    assert client.delete(f"/api/v1/segments/{older['id']}", headers=manager).status_code == 204
    assert client.delete(f"/api/v1/segments/{women['id']}", headers=manager).status_code == 204
    assert client.post("/api/v1/segments", json={"name": "x", "query": "sex = male"}, headers=viewer).status_code == 403
    assert [e.target_id for e in _events(session, "segment.create")][:2] == [women["id"], snap["id"]]


def test_value_sets_crud_override_and_use(client, clinic):
    _, ids, manager, viewer, _ = clinic
    body = {"key": "my_dm", "name": "My diabetes", "source": "clinic list",
            "codes": [{"system": "snomed", "code": "44054006"}]}
    r = client.post("/api/v1/value-sets", json=body, headers=manager)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == "1"
    q = {"query": 'has condition in valueset "my_dm"'}
    assert client.post("/api/v1/segments/count", json=q, headers=manager).json()["count"] == 5
    r = client.put("/api/v1/value-sets/my_dm", json={**{k: v for k, v in body.items() if k != "key"},
                                                     "codes": [{"system": "icd10cm", "prefix": "B20"}],
                                                     "sensitive_category": "hiv"}, headers=manager)
    assert r.json()["version"] == "2"
    assert client.post("/api/v1/segments/count", json=q, headers=viewer).status_code == 403  # now sensitive
    assert client.post("/api/v1/segments/count", json=q, headers=manager).json()["count"] == 3
    assert len(client.get("/api/v1/value-sets/my_dm/versions", headers=viewer).json()["data"]) == 2
    # a user set with a shipped key overrides it; deleting it brings the shipped one back
    shipped = client.get("/api/v1/value-sets/diabetes", headers=viewer).json()
    assert shipped["origin"] == "shipped"
    r = client.post("/api/v1/value-sets", json={**body, "key": "diabetes"}, headers=manager)
    assert client.get("/api/v1/value-sets/diabetes", headers=viewer).json()["origin"] == "user"
    assert client.delete("/api/v1/value-sets/diabetes", headers=manager).status_code == 204
    assert client.get("/api/v1/value-sets/diabetes", headers=viewer).json()["origin"] == "shipped"
    found = client.get("/api/v1/value-sets?q=44054006", headers=viewer).json()["data"]
    assert {"diabetes", "my_dm"} >= {v["key"] for v in found} and "diabetes" in {v["key"] for v in found}
    r = client.post("/api/v1/value-sets", json={**body, "key": "bad", "codes": [{"system": "loinc", "code": "abc"}]},
                    headers=manager)
    assert r.status_code == 422 and r.json()["error"]["field"] == "codes.0.code"
    r = client.post("/api/v1/segments/count", json={"query": 'has condition in valueset "nope"'}, headers=manager)
    assert r.status_code == 422 and "unknown value set" in r.json()["error"]["message"]


def test_explain_returns_the_sql_and_the_plan(client, clinic, storage):
    _, _, manager, viewer, _ = clinic
    r = client.post("/api/v1/segments/explain", json={"query": "age >= 50 and has condition snomed:44054006"}, headers=manager)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "conditions" in body["sql"] and "org_id" in body["sql"] and body["plan"]
    assert body["dialect"] == ("sqlite" if storage.backend == "sqlite" else "postgresql")
    assert client.post("/api/v1/segments/explain", json={"query": "age > 1"}, headers=viewer).status_code == 403
    assert date.today()


def test_distance_from_a_location_of_the_organization(client, session, clinic):
    """Women live in Cambridge (02139), men in Austin (78701); the clinic's locations are named in
    queries and resolved when the query runs."""
    org, ids, manager, viewer, _ = clinic
    r = client.post("/api/v1/locations", json={"name": "Main Street Clinic", "postal_code": "02108"}, headers=manager)
    assert r.status_code == 201, r.text
    main = r.json()
    assert main["postal_code"] == "02108"
    assert client.post("/api/v1/locations", json={"name": "x", "postal_code": "02108"}, headers=viewer).status_code == 403
    # bad input names the field; nothing stored
    r = client.post("/api/v1/locations", json={"name": "Nowhere", "postal_code": "00000"}, headers=manager)
    assert r.status_code == 422 and r.json()["error"]["field"] == "postal_code"
    r = client.post("/api/v1/locations", json={"name": "Nowhere", "postal_code": "12"}, headers=manager)
    assert r.status_code == 422 and "postal_code" in r.text
    r = client.post("/api/v1/locations", json={"name": "main  STREET clinic", "postal_code": "78701"}, headers=manager)
    assert r.status_code == 409 and r.json()["error"]["field"] == "name"
    # case folding may lengthen a name ("ß" -> "ss"): the longest name is still stored (found by fuzzing)
    r = client.post("/api/v1/locations", json={"name": "ß" * 120, "postal_code": "78701-1234"}, headers=manager)
    assert r.status_code == 201, r.text
    assert client.delete(f"/api/v1/locations/{r.json()['id']}", headers=manager).status_code == 204

    query = 'within 5 miles of location "Main Street Clinic"'
    parsed = client.post("/api/v1/segments/parse", json={"text": query}, headers=viewer).json()
    assert parsed["tree"] == {"type": "distance", "miles": 5, "location": "Main Street Clinic"}
    assert client.post("/api/v1/segments/parse", json={"tree": parsed["tree"]}, headers=viewer).json()["text"] == query
    assert client.post("/api/v1/segments/count", json={"query": query}, headers=manager).json()["count"] == 15
    r = client.post("/api/v1/segments/count", json={"query": 'within 5 miles of location "Elm Clinic"'}, headers=manager)
    assert r.status_code == 422 and "no location named 'Elm Clinic'" in r.json()["error"]["message"]
    r = client.post("/api/v1/segments/count", json={"query": {"type": "distance", "miles": 5, "zip": "02108",
                                                                "location": "Main Street Clinic"}}, headers=manager)
    assert r.status_code == 422
    # another organization's location of the same name is not this one's
    from carepost.accounts.service import create_organization

    other_org = create_organization(session, "Elsewhere Clinic")
    session.commit()
    other = _headers(session, other_org.id, MANAGER, "other")
    assert client.post("/api/v1/locations", json={"name": "Main Street Clinic", "postal_code": "78701"},
                       headers=other).status_code == 201
    assert client.post("/api/v1/segments/count", json={"query": query}, headers=manager).json()["count"] == 15
    assert [x["id"] for x in client.get("/api/v1/locations", headers=viewer).json()["data"]] == [main["id"]]

    # a saved segment follows the location when it moves; rename and delete wait for the segment
    seg = client.post("/api/v1/segments", json={"name": "Near main", "query": query}, headers=manager).json()
    r = client.put(f"/api/v1/locations/{main['id']}", json={"name": "Main Street Clinic", "postal_code": "78701"},
                   headers=manager)
    assert r.status_code == 200, r.text
    assert client.post(f"/api/v1/segments/{seg['id']}/count", headers=manager).json()["count"] == 4
    r = client.put(f"/api/v1/locations/{main['id']}", json={"name": "Elm Clinic", "postal_code": "78701"}, headers=manager)
    assert r.status_code == 409 and "Near main" in r.json()["error"]["message"]
    assert client.delete(f"/api/v1/locations/{main['id']}", headers=manager).status_code == 409
    assert client.delete(f"/api/v1/segments/{seg['id']}", headers=manager).status_code == 204
    assert client.delete(f"/api/v1/locations/{main['id']}", headers=manager).status_code == 204
    assert [e.target_id for e in _events(session, "location.delete")][-1] == main["id"]
