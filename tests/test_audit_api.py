"""The audit REST API: filters, cursor pagination, export, verify, permission and tenant checks."""

from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from carepost.accounts import credentials as creds
from carepost.audit import checkpoints
from carepost.audit.models import AuditEvent
from carepost.audit.service import record
from carepost.core import clock
from tests.fixtures.accounts import login_client


@pytest.fixture(autouse=True)
def fresh_checkpoints(db):
    shutil.rmtree(checkpoints.checkpoint_dir(), ignore_errors=True)
    yield


@pytest.fixture
def api_key(session):
    def make(org_id, scopes=("audit:read",)):
        cred, secret = creds.create_credential(session, org_id, name="Audit reader", scopes=list(scopes))
        session.commit()
        return {"Authorization": f"Bearer {cred.key_id}.{secret}"}, cred

    return make


def seed(session, org_id, specs):
    """specs: (action, actor_id, outcome, target_type, target_id); one hour apart."""
    out = []
    for action, actor_id, outcome, target_type, target_id in specs:
        out.append(record(session, org_id=org_id, actor_type="user", actor_id=actor_id, action=action, outcome=outcome,
                          target_type=target_type, target_id=target_id, ip="10.1.2.3", request_id="req-1"))
        clock.advance(timedelta(hours=1))
    session.commit()
    return out


SPECS = [
    ("contact.read", "u1", "success", "contact", "c1"),
    ("contact.read", "u2", "success", "contact", "c2"),
    ("auth.login", "u1", "failure", "user", "u1"),
    ("contact.update", "u1", "success", "contact", "c1"),
    ("access.denied", "u2", "denied", "route", "/api/v1/x"),
]


def audit_reads(session, org_id, action="audit.read"):
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.action == action)
                                .order_by(AuditEvent.seq)))


def test_list_newest_first_with_every_field_and_audited(client, session, org, api_key):
    headers, cred = api_key(org.id)
    seeded = seed(session, org.id, SPECS)
    r = client.get("/api/v1/audit-events", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    data = r.json()["data"]
    assert [e["id"] for e in data] == [e.id for e in reversed(seeded)]
    first = data[0]
    assert first["hash"] == seeded[-1].hash and first["prev_hash"] == seeded[-2].hash
    assert (first["ip"], first["request_id"], first["outcome"]) == ("10.1.2.3", "req-1", "denied")
    reads = audit_reads(session, org.id)
    assert len(reads) == 1
    assert (reads[0].actor_type, reads[0].actor_id, reads[0].target_type) == ("api_credential", cred.id, "audit_log")


@pytest.mark.parametrize(
    "query, expected",
    [
        ({"action": "contact.read"}, [1, 0]),
        ({"action": "contact.*"}, [3, 1, 0]),
        ({"actor_id": "u2"}, [4, 1]),
        ({"outcome": "failure"}, [2]),
        ({"target_type": "contact", "target_id": "c1"}, [3, 0]),
    ],
)
def test_filters(client, session, org, api_key, query, expected):
    headers, _ = api_key(org.id)
    seeded = seed(session, org.id, SPECS)
    r = client.get("/api/v1/audit-events", params=query, headers=headers)
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()["data"]] == [seeded[i].id for i in expected]
    assert audit_reads(session, org.id)[0].details["filters"] == query


def test_time_range_filter(client, session, org, api_key):
    headers, _ = api_key(org.id)
    start = clock.now()
    seeded = seed(session, org.id, SPECS)
    since = (start + timedelta(minutes=30)).isoformat()
    until = (start + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = client.get("/api/v1/audit-events", params={"since": since, "until": until}, headers=headers)
    assert [e["id"] for e in r.json()["data"]] == [seeded[2].id, seeded[1].id]


def test_cursor_pagination_walks_every_event_once(client, session, org, api_key):
    headers, _ = api_key(org.id)
    for i in range(7):
        record(session, org_id=org.id, actor_type="user", actor_id="u1", action="contact.read", target_id=str(i))
    session.commit()  # all in one transaction: several share a timestamp only by chance; ids break ties
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, "action": "contact.read"} | ({"cursor": cursor} if cursor else {})
        body = client.get("/api/v1/audit-events", params=params, headers=headers).json()
        seen += [e["id"] for e in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert pages == 3 and len(seen) == 7 and len(set(seen)) == 7
    session.rollback()
    expected = session.scalars(select(AuditEvent.id).where(AuditEvent.chain == org.id, AuditEvent.action == "contact.read")
                               .order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc())).all()
    assert seen == list(expected)


def test_bad_input_names_the_field(client, session, org, api_key):
    headers, _ = api_key(org.id)
    for params, field in [({"outcome": "maybe"}, "outcome"), ({"since": "yesterday"}, "since"), ({"limit": 0}, "limit"),
                          ({"cursor": "not-a-cursor"}, "cursor"), ({"action": "auth\x00"}, "action"),
                          ({"since": "0001-01-01T00:00:00+05:00"}, "since"),
                          ({"since": "2025-02-01", "until": "2025-01-01"}, "until")]:
        r = client.get("/api/v1/audit-events", params=params, headers=headers)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["error"]["field"] == field
        assert "yesterday" not in r.text and "not-a-cursor" not in r.text


def test_cross_tenant_refusal(client, session, org, api_key):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    theirs = seed(session, other.id, SPECS[:2])
    mine = seed(session, org.id, SPECS[2:3])
    headers, _ = api_key(org.id)
    ids = [e["id"] for e in client.get("/api/v1/audit-events", headers=headers).json()["data"]]
    assert ids == [mine[0].id]
    for params in ({"actor_id": "u1"}, {"target_id": "c1"}, {"action": "contact.*"}):
        assert theirs[0].id not in client.get("/api/v1/audit-events", params=params, headers=headers).text
    r = client.get(f"/api/v1/audit-events/{theirs[0].id}", headers=headers)
    assert r.status_code == 404 and theirs[0].id not in r.text
    assert client.get(f"/api/v1/audit-events/{mine[0].id}", headers=headers).json()["hash"] == mine[0].hash
    v = client.post("/api/v1/audit/verify", headers=headers).json()
    assert v["chain"] == org.id
    # Tampering in the other organization does not show up in ours, and theirs is not reported to us.
    session.execute(text("UPDATE audit_events SET action = 'x' WHERE id = :id"), {"id": theirs[0].id})
    session.commit()
    v = client.post("/api/v1/audit/verify", headers=headers).json()
    assert v["ok"] is True and other.id not in json.dumps(v)


def test_permission_required(client, session, org, api_key):
    headers, _ = api_key(org.id, scopes=("messages:read",))
    r = client.get("/api/v1/audit-events", headers=headers)
    assert r.status_code == 403
    assert client.get("/api/v1/audit-events").status_code == 401
    assert client.post("/api/v1/audit/verify", headers=headers).status_code == 403
    # audit:export is not an API scope: a key with audit:read still cannot export.
    headers, _ = api_key(org.id)
    assert client.get("/api/v1/audit-events/export", headers=headers).status_code == 403
    denied = audit_reads(session, org.id, "access.denied")
    assert len(denied) == 3


def test_verify_reports_ok_then_names_the_tampered_event(client, session, org, api_key):
    headers, _ = api_key(org.id)
    seeded = seed(session, org.id, SPECS)
    r = client.post("/api/v1/audit/verify", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["events_checked"] == 5 and body["problem"] is None
    assert body["checkpoints"][0]["status"] == "ok" and body["checkpoints"][0]["source"] == "local checkpoint"
    session.execute(text("UPDATE audit_events SET outcome = 'success' WHERE id = :id"), {"id": seeded[2].id})
    session.commit()
    body = client.post("/api/v1/audit/verify", headers=headers).json()
    assert body["ok"] is False
    assert body["problem"]["kind"] == "altered" and body["problem"]["seq"] == 3 and body["problem"]["event_id"] == seeded[2].id
    assert str(checkpoints.checkpoint_dir()) not in json.dumps(body)  # no server paths
    verifies = audit_reads(session, org.id, "audit.verify")
    assert [v.outcome for v in verifies] == ["success", "failure"]


def test_export_streams_jsonl_and_csv_for_compliance_officer(client, session, org, make_user):
    seed(session, org.id, SPECS)
    officer = make_user(org, role="compliance_officer")
    login_client(client, officer)
    r = client.get("/api/v1/audit-events/export", params={"format": "jsonl"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert r.headers["content-disposition"].startswith("attachment; filename=\"carepost-audit-")
    records = [json.loads(line) for line in r.text.splitlines()]
    events = [x for x in records if x["record_type"] == "event"]
    assert records[-1]["record_type"] == "checkpoint" and records[-1]["event_count"] == len(events)
    assert events[-1]["action"] == "audit.export" and events[-1]["actor_id"] == officer.id
    assert {e["chain"] for e in events} == {org.id}
    # The trailer is an off-site checkpoint that authenticates.
    assert records[-1]["head"]["seq"] == events[-1]["seq"]
    r = client.get("/api/v1/audit-events/export", params={"format": "csv", "since": "2000-01-01T00:00:00Z"})
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows[-1]["record_type"] == "checkpoint" and rows[0]["record_type"] == "event"
    assert r.headers["content-type"].startswith("text/csv")
    r = client.get("/api/v1/audit-events/export", params={"format": "xml"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "format"


def test_export_refused_to_roles_without_audit_export(client, session, org, make_user):
    marketer = make_user(org, role="marketer")
    login_client(client, marketer)
    assert client.get("/api/v1/audit-events/export").status_code == 403
    assert client.get("/api/v1/audit-events").status_code == 403


def test_openapi_documents_the_audit_routes(client):
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert {"/api/v1/audit-events", "/api/v1/audit-events/export", "/api/v1/audit-events/{event_id}", "/api/v1/audit/verify"} <= set(paths)
