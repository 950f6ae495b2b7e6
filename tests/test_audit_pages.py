"""The audit log viewer (/app/audit) through the real sign-in: filters, paging, detail, verify."""

from __future__ import annotations

import re
import shutil
from datetime import timedelta

import pytest
from sqlalchemy import select, text

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
def officer_client(client, org, make_user):
    officer = make_user(org, role="compliance_officer")
    csrf = login_client(client, officer)
    return client, officer, csrf


def seed(session, org_id, n, action="contact.read", actor_id="u1"):
    out = [record(session, org_id=org_id, actor_type="user", actor_id=actor_id, action=action,
                  target_type="contact", target_id=f"c{i}", ip="10.9.8.7") for i in range(n)]
    session.commit()
    return out


def event_ids(html):
    return re.findall(r'data-event-id="([0-9a-f]{32})"', html)


def test_list_filters_and_detail(officer_client, session, org):
    client, officer, _ = officer_client
    reads = seed(session, org.id, 2)
    seed(session, org.id, 1, action="contact.update", actor_id=officer.id)
    r = client.get("/app/audit")
    assert r.status_code == 200, r.text
    assert "contact.update" in r.text and officer.email in r.text  # actor shown by email
    r = client.get("/app/audit", params={"action": "contact.read"})
    assert event_ids(r.text) == [reads[1].id, reads[0].id]
    r = client.get("/app/audit", params={"actor_id": officer.id, "action": "contact.*"})
    assert len(event_ids(r.text)) == 1
    d = client.get(f"/app/audit/events/{reads[0].id}")
    assert d.status_code == 200
    assert reads[0].hash in d.text and reads[0].prev_hash in d.text and "10.9.8.7" in d.text
    session.rollback()
    views = session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.action == "audit.read")).all()
    assert {v.details.get("view") for v in views} == {"list", "detail"}
    assert all(v.actor_id == officer.id for v in views)


def test_date_range_and_bad_dates(client, session, org, make_user):
    seed(session, org.id, 1)
    clock.advance(timedelta(days=3))
    late = seed(session, org.id, 1, action="contact.export")
    login_client(client, make_user(org, role="compliance_officer"))
    today = clock.now().strftime("%Y-%m-%d")
    r = client.get("/app/audit", params={"since": today, "until": today, "action": "contact.*"})
    assert event_ids(r.text) == [late[0].id]
    r = client.get("/app/audit", params={"since": "31/12/2025"})
    assert r.status_code == 422 and 'id="since-error"' in r.text
    r = client.get("/app/audit", params={"cursor": "garbage"})
    assert r.status_code == 422 and "cursor" in r.text


def test_pagination_with_cursor(officer_client, session, org):
    client, _, _ = officer_client
    seed(session, org.id, 55, action="contact.read")
    first = client.get("/app/audit", params={"action": "contact.read"})
    ids = event_ids(first.text)
    assert len(ids) == 50
    older = re.search(r'href="(/app/audit\?[^"]*cursor=[^"]+)" rel="next"', first.text).group(1).replace("&amp;", "&")
    second = client.get(older)
    more = event_ids(second.text)
    assert len(more) == 5 and not set(ids) & set(more)
    assert 'rel="next"' not in second.text


def test_verify_button_htmx_and_plain(officer_client, session, org):
    client, _, csrf = officer_client
    seeded = seed(session, org.id, 3)
    r = client.post("/app/audit/verify", headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
    assert r.status_code == 200 and "Chain intact" in r.text and "<html" not in r.text
    session.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": seeded[1].id})
    session.commit()
    r = client.post("/app/audit/verify", data={"csrf_token": csrf})
    assert r.status_code == 200 and "<html" in r.text
    assert "verification failed" in r.text and f"seq {seeded[1].seq} missing" in r.text
    assert client.post("/app/audit/verify", data={}).status_code == 403  # CSRF required


def test_viewer_refused_without_audit_read_and_scoped(client, session, org, make_user):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    theirs = seed(session, other.id, 1, action="other.thing")
    marketer = make_user(org, role="marketer")
    login_client(client, marketer)
    assert client.get("/app/audit").status_code == 403
    client.cookies.clear()
    officer = make_user(org, role="compliance_officer")
    login_client(client, officer)
    assert "other.thing" not in client.get("/app/audit").text
    assert client.get(f"/app/audit/events/{theirs[0].id}").status_code == 404


def test_export_links_for_officer_and_viewer_closed_to_api_keys(client, session, org, make_user):
    from carepost.accounts import credentials as creds

    officer = make_user(org, role="compliance_officer")
    login_client(client, officer)
    page = client.get("/app/audit").text
    assert 'data-testid="export-csv"' in page and 'data-testid="export-jsonl"' in page
    client.cookies.clear()
    # The web UI is for people: an API key holding audit:read uses the REST API instead.
    cred, secret = creds.create_credential(session, org.id, name="Reader", scopes=["audit:read"])
    session.commit()
    headers = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    assert client.get("/app/audit", headers=headers).status_code == 401
    assert client.get("/api/v1/audit-events", headers=headers).status_code == 200
