"""Consent REST API: authorization texts (completeness refuses publishing), authorizations
(create by contact or email, revoke, list), topics, subscriptions, suppressions (import/export),
eligibility, settings, reports; validation errors name the field; everything audited."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.accounts import credentials as creds
from carepost.audit.models import AuditEvent
from carepost.core import clock

ALL = ("consent:manage", "phi:read_unmasked", "phi:write", "phi:read_masked")


@pytest.fixture
def key(session):
    def make(org_id, scopes=ALL):
        cred, secret = creds.create_credential(session, org_id, name="Consent test", scopes=list(scopes))
        session.commit()
        return {"Authorization": f"Bearer {cred.key_id}.{secret}"}

    return make


def contact(client, h, email="ann@example.test", **extra):
    r = client.post("/api/v1/contacts", json={"given_name": "Ann", "email": email, **extra}, headers=h)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def actions(session, org_id):
    session.rollback()
    return [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.org_id == org_id).order_by(AuditEvent.seq))]


def test_purposes_and_requirements(client, org, key):
    h = key(org.id, ("messages:send",))
    data = client.get("/api/v1/purposes", headers=h).json()["data"]
    assert {p["key"] for p in data} >= {"treatment", "refill_reminder", "marketing", "marketing_remunerated", "transactional"}
    r = client.post("/api/v1/purposes/requirements", headers=h,
                    json={"purpose": "care_coordination", "remuneration": "cost_related"})
    assert r.status_code == 200 and r.json()["authorization_required"] and r.json()["effective_purpose"] == "marketing_remunerated"
    r = client.post("/api/v1/purposes/requirements", headers=h, json={"purpose": "ads"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "purpose"


def test_new_organizations_start_with_complete_default_texts(client, org, key):
    h = key(org.id)
    texts = client.get("/api/v1/authorization-texts", headers=h).json()["data"]
    assert sorted(t["purpose"] for t in texts) == ["marketing", "marketing_remunerated"]
    for t in texts:
        assert t["status"] == "published" and t["languages"] == ["en", "es"] and t["missing"] == []
        full = client.get(f"/api/v1/authorization-texts/{t['id']}", headers=h).json()
        assert "Bar Clinic" in full["rendered"]["en"] and "Bar Clinic" in full["rendered"]["es"]
        assert "{organization}" not in json.dumps(full)
    remunerated = next(t for t in texts if t["purpose"] == "marketing_remunerated")
    full = client.get(f"/api/v1/authorization-texts/{remunerated['id']}", headers=h).json()
    assert "remuneration" in full["elements"]["en"] and "remuneración" in full["elements"]["es"]["remuneration"]


def test_publishing_refuses_an_incomplete_text_and_keeps_the_current_one(client, org, key, session):
    h = key(org.id)
    current = next(t for t in client.get("/api/v1/authorization-texts?purpose=marketing_remunerated", headers=h).json()["data"])
    full = client.get(f"/api/v1/authorization-texts/{current['id']}", headers=h).json()
    elements = {"en": dict(full["elements"]["en"])}
    del elements["en"]["remuneration"]  # 164.508(a)(3)(ii)
    elements["en"]["redisclosure"] = ""  # 164.508(c)(2)(iii)
    r = client.post("/api/v1/authorization-texts", headers=h, json={"purpose": "marketing_remunerated", "elements": elements})
    assert r.status_code == 201 and r.json()["status"] == "draft" and r.json()["version"] == 2
    missing = {m["element"] for m in r.json()["missing"]}
    assert missing == {"remuneration", "redisclosure"}
    draft_id = r.json()["id"]
    r = client.post(f"/api/v1/authorization-texts/{draft_id}/publish", headers=h)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "incomplete_authorization_text" and err["field"].startswith("elements.en.")
    assert "remuneration" in err["message"]
    # still the old version is current
    texts = client.get("/api/v1/authorization-texts?purpose=marketing_remunerated", headers=h).json()["data"]
    assert {t["version"]: t["status"] for t in texts} == {1: "published", 2: "draft"}
    # completed, it publishes and retires the old one; then it cannot change
    elements["en"]["remuneration"] = full["elements"]["en"]["remuneration"]
    elements["en"]["redisclosure"] = full["elements"]["en"]["redisclosure"]
    assert client.patch(f"/api/v1/authorization-texts/{draft_id}", headers=h, json={"elements": elements}).status_code == 200
    r = client.post(f"/api/v1/authorization-texts/{draft_id}/publish", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "published"
    texts = client.get("/api/v1/authorization-texts?purpose=marketing_remunerated", headers=h).json()["data"]
    assert {t["version"]: t["status"] for t in texts} == {1: "retired", 2: "published"}
    r = client.patch(f"/api/v1/authorization-texts/{draft_id}", headers=h, json={"elements": elements})
    assert r.status_code == 409 and r.json()["error"]["field"] == "text_id"
    assert "authorization_text.publish" in actions(session, org.id)


TEXT_CASES = [
    ({"fr": {"title": "x"}}, "elements"),
    ({"en": {"nonsense": "x"}}, "elements.en.nonsense"),
    ({"en": {"title": "a\x00b"}}, "elements.en.title"),
    ({"en": {"title": "x" * 6000}}, "elements.en.title"),
]


def test_text_bad_input_names_the_field(client, org, key):
    h = key(org.id)
    for elements, field in TEXT_CASES:
        r = client.post("/api/v1/authorization-texts", headers=h, json={"purpose": "marketing", "elements": elements})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (field, r.text)
    r = client.post("/api/v1/authorization-texts", headers=h, json={"purpose": "treatment", "elements": {"en": {}}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "purpose"


def test_authorization_create_list_revoke(client, org, key, session):
    h = key(org.id)
    cid = contact(client, h, preferred_language="es-MX")
    r = client.post("/api/v1/authorizations", json={
        "email": "ANN@example.test", "purpose": "marketing",
        "signature": {"name": "Ann Example", "signed_at": clock.now().isoformat()},
        "expires_at": (clock.now() + timedelta(days=365)).isoformat(),
        "representative": {"name": "Bea Example", "authority": "parent"}}, headers={**h, "User-Agent": "Recorder/1.0"})
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["contact_id"] == cid and a["status"] == "valid" and a["language"] == "es" and a["text_version"] == 1
    assert a["signed_by_representative"] and a["copy_delivered"] == "link" and len(a["text_hash"]) == 64
    assert a["method"] == "api" and a["backdated"] is False and a["scan"] is None
    assert "Ann Example" not in r.text and "Recorder/1.0" not in r.text  # evidence is not echoed
    listed = client.get(f"/api/v1/authorizations?contact_id={cid}", headers=h).json()["data"]
    assert [x["id"] for x in listed] == [a["id"]]
    r = client.post(f"/api/v1/authorizations/{a['id']}/revoke", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "revoked" and r.json()["revoked_by_type"] == "api"
    again = client.post(f"/api/v1/authorizations/{a['id']}/revoke", headers=h)
    assert again.status_code == 200 and again.json()["revoked_at"] == r.json()["revoked_at"]
    r = client.post("/api/v1/eligibility", headers=h, json={"contact_ids": [cid], "purpose": "marketing"})
    assert r.status_code == 200 and r.json()["results"] == {cid: "authorization_revoked"}
    assert r.json()["counts"] == {"authorization_revoked": 1}
    acts = actions(session, org.id)
    assert {"authorization.create", "authorization.list", "authorization.revoke", "eligibility.check"} <= set(acts)
    session.rollback()
    ev = session.scalars(select(AuditEvent).where(AuditEvent.action == "authorization.create")).one()
    assert "Ann" not in json.dumps(ev.details) and "Recorder/1.0" not in json.dumps(ev.details)
    # the evidence export has it all, and is audited
    r = client.get(f"/api/v1/contacts/{cid}/consent/evidence", headers=h)
    assert r.status_code == 200 and "Ann Example" in r.text and "parent" in r.text
    # the API client's own request facts, labelled as the recorder's (issue 9 item 12)
    assert "Recorder/1.0" in r.text and "the staff member or API client who recorded it" in r.text
    assert "matches the stored text" in r.text and "<script" not in r.text
    assert "consent.evidence_export" in actions(session, org.id)


AUTHORIZATION_CASES = [
    ({"purpose": "marketing", "signature": {"name": "A"}}, None),  # neither contact_id nor email
    ({"contact_id": "0" * 32, "purpose": "marketing", "signature": {"name": "A"}}, "contact_id"),
    ({"email": "nobody@example.test", "purpose": "marketing", "signature": {"name": "A"}}, "email"),
    ({"email": "ann@example.test", "purpose": "treatment", "signature": {"name": "A"}}, "purpose"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {}}, "signature"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {"name": "A", "image": "data:image/png;base64,AA=="}}, "signature"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {"image": "data:image/gif;base64,R0lG"}}, "signature.image"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {"name": "A"}, "expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {"name": "A", "signed_at": "2999-01-01T00:00:00Z"}}, "signature.signed_at"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {"name": "A"}, "representative": {"name": "B"}}, "representative.authority"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {"name": "A"}, "text_id": "1" * 32}, "text_id"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {"name": "A"}, "topic_id": "nope"}, "topic_id"),
    ({"email": "ann@example.test", "purpose": "marketing", "signature": {"name": "A"}, "extra": 1}, "extra"),
]


def test_authorization_bad_input_names_the_field_and_stores_nothing(client, org, key, session):
    from carepost.consent.models import Authorization

    h = key(org.id)
    contact(client, h)
    for body, field in AUTHORIZATION_CASES:
        r = client.post("/api/v1/authorizations", headers=h, json=body)
        assert r.status_code in (404, 422), r.text
        if field:
            assert r.json()["error"]["field"] == field, (field, r.text)
        assert "ann@example.test" not in r.text.lower()
    session.rollback()
    assert session.scalar(select(Authorization.id)) is None


def test_text_of_another_purpose_or_a_draft_cannot_be_signed(client, org, key):
    h = key(org.id)
    contact(client, h)
    texts = {t["purpose"]: t["id"] for t in client.get("/api/v1/authorization-texts", headers=h).json()["data"]}
    r = client.post("/api/v1/authorizations", headers=h, json={"email": "ann@example.test", "purpose": "marketing",
                                                               "text_id": texts["marketing_remunerated"], "signature": {"name": "A"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "text_id"
    draft = client.post("/api/v1/authorization-texts", headers=h, json={"purpose": "marketing", "elements": {"en": {"title": "Draft"}}}).json()
    r = client.post("/api/v1/authorizations", headers=h, json={"email": "ann@example.test", "purpose": "marketing",
                                                               "text_id": draft["id"], "signature": {"name": "A"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "text_id"


def test_drawn_signature_and_default_expiry(client, org, key):
    import base64

    h = key(org.id)
    cid = contact(client, h)
    png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
    r = client.post("/api/v1/authorizations", headers=h, json={"contact_id": cid, "purpose": "marketing",
                                                               "signature": {"image": png}})
    assert r.status_code == 201 and r.json()["signature_kind"] == "drawn"
    assert r.json()["expires_at"][:4] == str(clock.now().year + 2)
    r = client.post("/api/v1/authorizations", headers=h, json={"contact_id": cid, "purpose": "marketing",
                                                               "signature": {"name": "Ann"}, "expiration_event": "end_of_treatment"})
    assert r.status_code == 201 and r.json()["expires_at"] is None and r.json()["expiration_event"] == "end_of_treatment"


def test_topics_and_subscriptions(client, org, key, session):
    h = key(org.id)
    cid = contact(client, h)
    # an opt-in topic: double opt-in applies (it does not to opt-out topics, issue 10 item 6)
    r = client.post("/api/v1/topics", headers=h, json={"key": "screenings", "name": "Screenings", "opt_in_required": True})
    assert r.status_code == 201
    tid = r.json()["id"]
    assert client.post("/api/v1/topics", headers=h, json={"key": "screenings", "name": "Again"}).status_code == 409
    assert client.post("/api/v1/topics", headers=h, json={"key": "Bad Key", "name": "x"}).json()["error"]["field"] == "key"
    r = client.put("/api/v1/subscriptions", headers=h, json={"contact_id": cid, "topic_id": "screenings", "status": "unsubscribed"})
    assert r.status_code == 200 and r.json()["status"] == "unsubscribed" and r.json()["topic_id"] == tid
    el = client.post("/api/v1/eligibility", headers=h, json={"contact_ids": [cid], "purpose": "own_products", "topic": "screenings"})
    assert el.json()["results"] == {cid: "unsubscribed_topic"}
    r = client.put("/api/v1/subscriptions", headers=h, json={"contact_id": cid, "topic_id": tid, "status": "subscribed"})
    assert r.json()["status"] == "pending"  # double opt-in by default on an opt-in topic
    r = client.put("/api/v1/subscriptions", headers=h,
                   json={"contact_id": cid, "topic_id": tid, "status": "subscribed", "confirmed": True, "frequency": "weekly"})
    assert r.json()["status"] == "subscribed" and r.json()["frequency"] == "weekly"
    el = client.post("/api/v1/eligibility", headers=h, json={"contact_ids": [cid], "purpose": "own_products", "topic": tid})
    assert el.json()["results"] == {cid: "eligible"}
    subs = client.get(f"/api/v1/subscriptions?contact_id={cid}", headers=h).json()["data"]
    assert subs[0]["topic_id"] == tid
    r = client.patch(f"/api/v1/topics/{tid}", headers=h, json={"archived": True})
    assert r.status_code == 200 and r.json()["archived"]
    assert client.get("/api/v1/topics", headers=h).json()["data"] == []


def test_suppressions_api_and_csv_round_trip(client, org, key, session):
    h = key(org.id)
    masked_only = key(org.id, ("consent:manage",))
    r = client.post("/api/v1/suppressions", headers=h, json={"address": "Hold@Example.test", "reason": "legal_hold"})
    assert r.status_code == 201 and r.json()["address"] == "hold@example.test"
    hold_id = r.json()["id"]
    listed = client.get("/api/v1/suppressions", headers=masked_only).json()["data"]
    assert listed[0]["address"] == "h***@example.test"
    assert client.delete(f"/api/v1/suppressions/{hold_id}", headers=h).status_code == 422
    assert client.delete(f"/api/v1/suppressions/{hold_id}?release_legal_hold=true", headers=h).status_code == 204
    client.post("/api/v1/topics", headers=h, json={"key": "news", "name": "News"})
    csv_body = "address,reason,scope,topic,expires_at\na@example.test,manual,,,\nb@example.test,unsubscribe,,news,\n" \
               "c@example.test,bounce_soft,all,,2099-01-01T00:00:00+00:00\n"
    r = client.post("/api/v1/suppressions/import", headers={**h, "Content-Type": "text/csv"}, content=csv_body)
    assert r.status_code == 200 and r.json() == {"rows": 3, "added": 3, "already_suppressed": 0}
    r = client.post("/api/v1/suppressions/import", headers={**h, "Content-Type": "text/csv"}, content=csv_body)
    assert r.json() == {"rows": 3, "added": 0, "already_suppressed": 3}
    bad = "address,reason\nd@example.test,manual\n=cmd|' /C calc'!A0,manual\ne@example.test,whatever\n"
    r = client.post("/api/v1/suppressions/import", headers={**h, "Content-Type": "text/csv"}, content=bad)
    assert r.status_code == 422
    err = r.json()["error"]
    assert [e["line"] for e in err["errors"]] == [3, 4] and "calc" not in r.text
    assert client.get("/api/v1/suppressions?limit=500", headers=h).json()["data"].__len__() == 3  # nothing half-stored
    export = client.get("/api/v1/suppressions/export", headers=h)
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    assert "b@example.test,unsubscribe,topic,news" in export.text
    assert client.get("/api/v1/suppressions/export", headers=masked_only).status_code == 403
    assert {"suppression.import", "suppression.export", "suppression.delete"} <= set(actions(session, org.id))


def test_eligibility_and_settings_validation(client, org, key):
    h = key(org.id)
    r = client.post("/api/v1/eligibility", headers=h, json={"contact_ids": [], "purpose": "marketing"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "contact_ids"
    r = client.post("/api/v1/eligibility", headers=h, json={"contact_ids": ["0" * 32], "purpose": "marketing", "channel": "sms"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "channel"
    r = client.post("/api/v1/eligibility", headers=h, json={"contact_ids": ["0" * 32], "purpose": "marketing", "topic": "missing"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "topic"
    r = client.patch("/api/v1/consent/settings", headers=h, json={"quiet_hours_start": "21:00"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "quiet_hours_end"
    r = client.patch("/api/v1/consent/settings", headers=h, json={"quiet_hours_start": "25:00"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "quiet_hours_start"
    r = client.patch("/api/v1/consent/settings", headers=h, json={"default_time_zone": "Mars/Olympus"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "default_time_zone"
    r = client.patch("/api/v1/consent/settings", headers=h, json={"frequency_cap_daily": 5, "frequency_cap_weekly": 2})
    assert r.status_code == 422 and r.json()["error"]["field"] == "frequency_cap_daily"
    r = client.patch("/api/v1/consent/settings", headers=h,
                     json={"frequency_cap_daily": 1, "frequency_cap_weekly": 3, "quiet_hours_start": "21:00", "quiet_hours_end": "08:00"})
    assert r.status_code == 200 and r.json()["frequency_cap_weekly"] == 3
    assert client.get("/api/v1/consent/settings", headers=h).json()["quiet_hours_end"] == "08:00"


def test_reports(client, org, key):
    h = key(org.id)
    a, b, c = (contact(client, h, f"r{i}@example.test") for i in range(3))
    soon = (clock.now() + timedelta(days=10)).isoformat()
    ids = []
    for cid, exp in ((a, None), (b, soon), (c, None)):
        body = {"contact_id": cid, "purpose": "marketing", "signature": {"name": "X"}}
        if exp:
            body["expires_at"] = exp
        ids.append(client.post("/api/v1/authorizations", headers=h, json=body).json()["id"])
    client.post(f"/api/v1/authorizations/{ids[2]}/revoke", headers=h)
    r = client.get("/api/v1/consent/reports", headers=h).json()
    assert r["totals"] == {"valid": 2, "expiring_30_days": 1, "revoked_this_month": 1}
    assert r["excluded_contacts"] == {"deceased": 0}
    assert r["rows"][0]["purpose"] == "marketing" and r["rows"][0]["topic"] == "All topics"
    csv_text = client.get("/api/v1/consent/reports?format=csv", headers=h).text
    assert csv_text.splitlines() == ["purpose,topic,valid,expiring_30_days,revoked_this_month", "marketing,All topics,2,1,1"]


def test_permissions(client, org, key):
    h = key(org.id, ("phi:read_masked",))
    assert client.get("/api/v1/authorization-texts", headers=h).status_code == 403
    assert client.post("/api/v1/eligibility", headers=h, json={"contact_ids": ["x"], "purpose": "marketing"}).status_code == 403
    assert client.get("/api/v1/purposes", headers=h).status_code == 200
