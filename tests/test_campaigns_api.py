"""The campaigns API (issue 14 item 6) and the CLI: the workflow through real signed-in people
(a marketer submits, a compliance officer approves, the marketer launches), self-approval and
unapproved launches refused, 422s naming the field, the compliance report and the calendar,
permission denials (audited), another organization's campaign a 404, the OpenAPI document —
on SQLCipher and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from carepost.core import clock
from carepost.core.database import org_session
from tests.fixtures.accounts import login_client
from tests.test_campaigns_service import make_contact, make_segment, make_template

MANAGER = ["campaigns:read", "campaigns:manage", "phi:read_masked"]
READER = ["campaigns:read"]


def _headers(session, org_id, scopes, name):
    cred, secret = create_credential(session, org_id, name=name, scopes=scopes)
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


@pytest.fixture
def shop(sender, session):
    org_id = sender.org_id
    with org_session(org_id) as s:
        contacts = [make_contact(s, org_id, f"ok{i}@valid.test", sign=True) for i in range(3)]
        contacts.append(make_contact(s, org_id, "noauth@valid.test"))
        seg = make_segment(s, org_id, name="Springfield")
        version = make_template(s, org_id)
        s.commit()
    return {"org_id": org_id, "segment": seg, "version": version, "contacts": contacts,
            "manager": _headers(session, org_id, MANAGER, "manager"),
            "reader": _headers(session, org_id, READER, "reader")}


def body(shop, **over) -> dict:
    data = {"name": "Flu clinic", "purpose": "marketing", "segment_id": shop["segment"],
            "template_version_id": shop["version"], "from_address": "news@bar.example"}
    data.update(over)
    return data


def _audit(session, action):
    from carepost.audit.models import AuditEvent

    session.commit()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def test_crud_with_an_api_key_and_bad_input_named(client, shop, session):
    h = shop["manager"]
    r = client.post("/api/v1/campaigns", json=body(shop, from_name="Bar Clinic"), headers=h)
    assert r.status_code == 201, r.text
    camp = r.json()
    assert camp["status"] == "draft" and camp["approval_required"] is True and camp["from_name"] == "Bar Clinic"
    cid = camp["id"]
    for over, field in (({"segment_id": "0" * 32}, "segment_id"), ({"template_version_id": "1" * 32}, "template_version_id"),
                        ({"throttle_per_hour": 0}, "throttle_per_hour"),
                        ({"schedule_kind": "at", "send_at": "2001-01-01T00:00:00Z"}, "send_at"),
                        ({"schedule_kind": "at", "send_at": "2099-01-01T09:00:00", "time_zone": "Nowhere/City"}, "time_zone"),
                        ({"schedule_kind": "local", "local_time": "24:61", "local_date": "2099-01-01"}, "local_time"),
                        ({"colour": "red"}, "colour")):
        r = client.post("/api/v1/campaigns", json=body(shop, **over), headers=h)
        assert r.status_code == 422, (over, r.text)
        assert field in str(r.json()["error"].get("field")), (over, r.json())
    r = client.get("/api/v1/campaigns", headers=shop["reader"])
    assert r.status_code == 200 and [c["id"] for c in r.json()["campaigns"]] == [cid]
    r = client.patch(f"/api/v1/campaigns/{cid}", json={"throttle_per_hour": 500}, headers=h)
    assert r.status_code == 200 and r.json()["throttle_per_hour"] == 500
    r = client.patch(f"/api/v1/campaigns/{cid}", json={"throttle_per_hour": -1}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "throttle_per_hour"
    r = client.get(f"/api/v1/campaigns/{cid}", headers=shop["reader"])
    assert r.status_code == 200 and [e["action"] for e in r.json()["history"]] == ["created", "updated"]
    assert _audit(session, "campaign.read")
    # a reader cannot change anything; the refusal is audited
    r = client.post("/api/v1/campaigns", json=body(shop), headers=shop["reader"])
    assert r.status_code == 403
    r = client.post(f"/api/v1/campaigns/{cid}/submit", headers=shop["reader"])
    assert r.status_code == 403
    assert _audit(session, "access.denied")
    # an API key cannot approve (campaigns:approve is no API scope) nor launch
    r = client.post(f"/api/v1/campaigns/{cid}/approve", json={}, headers=h)
    assert r.status_code == 403
    r = client.post(f"/api/v1/campaigns/{cid}/launch", headers=h)
    assert r.status_code == 403
    r = client.delete(f"/api/v1/campaigns/{cid}", headers=h)
    assert r.status_code == 204
    assert client.get(f"/api/v1/campaigns/{cid}", headers=h).status_code == 404


def test_another_organizations_campaign_is_a_404(client, shop, session):
    from carepost.accounts.service import create_organization

    r = client.post("/api/v1/campaigns", json=body(shop), headers=shop["manager"])
    cid = r.json()["id"]
    other = create_organization(session, "Other Clinic")
    session.commit()
    theirs = _headers(session, other.id, MANAGER, "theirs")
    for method, path, payload in (("get", "", None), ("patch", "", {"name": "Mine now"}), ("delete", "", None),
                                  ("post", "/submit", None), ("get", "/report", None),
                                  ("post", "/schedule", {"schedule_kind": "now"})):
        kwargs = {"headers": theirs}
        if payload is not None:
            kwargs["json"] = payload
        r = client.request(method.upper(), f"/api/v1/campaigns/{cid}{path}", **kwargs)
        assert r.status_code == 404, (method, path, r.text)
    assert client.get("/api/v1/campaigns", headers=theirs).json()["campaigns"] == []
    # and their segment or template version cannot be used by us
    r = client.post("/api/v1/campaigns", json=body(shop, name="x"), headers=theirs)
    assert r.status_code == 422 and r.json()["error"]["field"] == "segment_id"
    assert client.get(f"/api/v1/campaigns/{cid}", headers=shop["manager"]).json()["name"] == "Flu clinic"


def test_marketer_submits_compliance_approves_marketer_launches(app, client, shop, session, make_user):
    org_id = shop["org_id"]
    marketer, compliance = make_user(org_id, "marketer"), make_user(org_id, "compliance_officer")
    client.headers["X-CSRF-Token"] = login_client(client, marketer)
    with TestClient(app, base_url="http://localhost:8000") as other:
        other.headers["X-CSRF-Token"] = login_client(other, compliance)

        r = client.post("/api/v1/campaigns", json=body(shop), headers={})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        r = client.post(f"/api/v1/campaigns/{cid}/launch")
        assert r.status_code == 409 and r.json()["error"]["code"] == "approval_required"
        r = client.post(f"/api/v1/campaigns/{cid}/submit", json={"comment": "Ready"})
        assert r.status_code == 200 and r.json()["status"] == "submitted"
        r = client.post(f"/api/v1/campaigns/{cid}/approve", json={})
        assert r.status_code == 403  # the marketer holds no campaigns:approve

        # compliance reads the pre-launch report, then approves
        r = other.get(f"/api/v1/campaigns/{cid}/report")
        assert r.status_code == 200, r.text
        rep = r.json()
        assert rep["kind"] == "compliance" and rep["audience"] == 4 and rep["eligible"] == 3
        assert rep["excluded"] == {"no_authorization": 1} and rep["phi_categories"] == ["demographics"]
        assert rep["sample"]["masked"] is False and "Hello Pat" in rep["sample"]["html"]
        r = other.post(f"/api/v1/campaigns/{cid}/reject", json={"comment": ""})
        assert r.status_code == 422 and r.json()["error"]["field"] == "comment"
        r = other.post(f"/api/v1/campaigns/{cid}/approve", json={"comment": "Fine"})
        assert r.status_code == 200 and r.json()["status"] == "approved" and r.json()["approval_current"]

        # the marketer's report: masked sample, small counts suppressed
        r = client.get(f"/api/v1/campaigns/{cid}/report")
        assert r.status_code == 200 and r.json()["sample"]["masked"] is True and r.json()["exact"] is False

        # an edit of an approved field returns it to draft; launching then is refused
        r = client.patch(f"/api/v1/campaigns/{cid}", json={"track_clicks": False})
        assert r.status_code == 200 and r.json()["status"] == "draft"
        assert client.post(f"/api/v1/campaigns/{cid}/launch").status_code == 409
        client.post(f"/api/v1/campaigns/{cid}/submit", json={})
        assert other.post(f"/api/v1/campaigns/{cid}/approve", json={}).status_code == 200
        send_at = (clock.now() + timedelta(days=1)).isoformat()
        r = client.post(f"/api/v1/campaigns/{cid}/schedule", json={"schedule_kind": "at", "send_at": send_at})
        assert r.status_code == 200 and r.json()["status"] == "scheduled"
        r = client.post(f"/api/v1/campaigns/{cid}/launch")
        assert r.status_code == 200 and r.json()["status"] == "planning", r.text
        assert client.delete(f"/api/v1/campaigns/{cid}").status_code == 409
        r = client.get(f"/api/v1/campaigns/{cid}/report")
        assert r.status_code == 200 and r.json()["kind"] == "progress" and r.json()["status"] == "planning"
        r = client.post(f"/api/v1/campaigns/{cid}/pause")
        assert r.status_code == 200 and r.json()["status"] == "paused"
        r = client.post(f"/api/v1/campaigns/{cid}/resume")
        assert r.status_code == 200 and r.json()["status"] == "planning"
        r = client.post(f"/api/v1/campaigns/{cid}/cancel", json={"comment": "Wrong week"})
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = client.post(f"/api/v1/campaigns/{cid}/resume")
        assert r.status_code == 409 and r.json()["error"]["field"] == "status"
        history = [e["action"] for e in client.get(f"/api/v1/campaigns/{cid}").json()["history"]]
        assert history == ["created", "submitted", "approved", "updated", "returned_to_draft", "submitted",
                           "approved", "scheduled", "launched", "paused", "resumed", "cancelled"]
    assert [e.actor_id for e in _audit(session, "campaign.approved")] == [compliance.id, compliance.id]
    samples = _audit(session, "campaign.sample_render")
    assert [e.details["masked"] for e in samples] == [False, True]


def test_a_submitter_cannot_approve_their_own_campaign(client, shop, session, make_user):
    owner = make_user(shop["org_id"], "owner")
    client.headers["X-CSRF-Token"] = login_client(client, owner)
    cid = client.post("/api/v1/campaigns", json=body(shop)).json()["id"]
    assert client.post(f"/api/v1/campaigns/{cid}/submit", json={}).status_code == 200
    r = client.post(f"/api/v1/campaigns/{cid}/approve", json={})
    assert r.status_code == 403 and r.json()["error"]["code"] == "self_approval"
    denied = _audit(session, "campaign.approved")
    assert denied and denied[-1].outcome == "denied"


def test_calendar_and_settings(client, shop, session):
    h = shop["manager"]
    day = clock.now() + timedelta(days=2)
    for i, days in enumerate((0, 2, 40)):
        r = client.post("/api/v1/campaigns", json=body(shop, name=f"C{i}", schedule_kind="at",
                                                      send_at=(day + timedelta(days=days)).isoformat()), headers=h)
        assert r.status_code == 201, r.text
    start, end = day.date().isoformat(), (day + timedelta(days=10)).date().isoformat()
    r = client.get(f"/api/v1/campaigns/calendar?start={start}&end={end}", headers=shop["reader"])
    assert r.status_code == 200, r.text
    cal = r.json()
    assert [c["name"] for c in cal["campaigns"]] == ["C0", "C1"] and cal["overlap_days"] == 7
    assert [w["names"] for w in cal["overlaps"]] == [["C0", "C1"]]
    assert cal["overlaps"][0]["overlap"] == "fewer than 11"  # the reader holds no unmasked rights
    r = client.get(f"/api/v1/campaigns/calendar?start={end}&end={start}", headers=shop["reader"])
    assert r.status_code == 422 and r.json()["error"]["field"] == "end"
    assert client.get("/api/v1/campaigns/settings", headers=shop["reader"]).json()["overlap_days"] == 7
    r = client.put("/api/v1/campaigns/settings", json={"overlap_days": 3}, headers=h)
    assert r.status_code == 403  # org:manage
    admin = _headers(session, shop["org_id"], ["org:manage"], "admin")
    r = client.put("/api/v1/campaigns/settings", json={"overlap_days": 3, "approval_required_purposes": []}, headers=admin)
    assert r.status_code == 200 and r.json()["overlap_days"] == 3
    r = client.post("/api/v1/campaigns", json=body(shop, name="No approval now"), headers=h)
    assert r.json()["approval_required"] is False
    r = client.put("/api/v1/campaigns/settings", json={"overlap_days": 91}, headers=admin)
    assert r.status_code == 422 and r.json()["error"]["field"] == "overlap_days"


def test_the_openapi_document_lists_every_campaign_route(client):
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    for path in ("/api/v1/campaigns", "/api/v1/campaigns/{campaign_id}", "/api/v1/campaigns/calendar",
                 "/api/v1/campaigns/settings", "/api/v1/campaigns/{campaign_id}/report"):
        assert path in paths, path
    for action in ("submit", "approve", "reject", "schedule", "launch", "pause", "resume", "cancel"):
        assert "post" in paths[f"/api/v1/campaigns/{{campaign_id}}/{action}"], action


def test_cli_list_show_and_launch_refused_until_approved(shop, session):
    from typer.testing import CliRunner

    from carepost.accounts.models import Organization
    from carepost.cli import app as cli

    slug = session.get(Organization, shop["org_id"]).slug
    with org_session(shop["org_id"]) as s:
        from tests.test_campaigns_service import person, values

        from carepost.campaigns import service

        c = service.create_campaign(s, shop["org_id"], values(shop["segment"], shop["version"], name="CLI flu"),
                                    person(shop["org_id"], "marketer"))
        s.commit()
        cid = c.id
    runner = CliRunner()
    r = runner.invoke(cli, ["campaign", "list", "--org", slug])
    assert r.exit_code == 0 and cid in r.output and "CLI flu" in r.output, r.output
    r = runner.invoke(cli, ["campaign", "show", cid, "--org", slug])
    assert r.exit_code == 0 and "status: draft" in r.output and "created" in r.output, r.output
    r = runner.invoke(cli, ["campaign", "launch", cid, "--org", slug, "--no-wait"])
    assert r.exit_code == 2 and "approval" in r.output, r.output
    r = runner.invoke(cli, ["campaign", "show", "f" * 32, "--org", slug])
    assert r.exit_code == 2


def test_cli_launch_follows_a_real_worker_to_completion(storage, shop, session, tmp_path):
    """``carepost campaign launch`` queues planning; a real ``carepost worker`` process plans and
    materializes the campaign while the command's progress bar follows it to ``completed``."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from carepost.accounts.models import Organization
    from carepost.campaigns import service
    from carepost.campaigns.models import Campaign, CampaignRecipient
    from carepost.cli import app as cli
    from tests.test_campaigns_service import person, values

    org_id = shop["org_id"]
    slug = session.get(Organization, org_id).slug
    with org_session(org_id) as s:
        treat = make_template(s, org_id, purpose="treatment", name="Reminder")
        c = service.create_campaign(s, org_id, values(shop["segment"], treat, name="Worker run", purpose="treatment"),
                                    person(org_id, "marketer"))
        assert not c.approval_required
        s.commit()
        cid = c.id
    log = open(tmp_path / "worker.log", "w")
    env = {**os.environ, **storage.env, "CAREPOST_LOG_JSON": "true"}
    worker = subprocess.Popen([sys.executable, "-m", "carepost.cli", "worker", "--threads", "1", "--no-periodic"],
                              cwd=str(Path(__file__).resolve().parents[1]), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        r = CliRunner().invoke(cli, ["campaign", "launch", cid, "--org", slug, "--timeout", "120"])
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
    assert r.exit_code == 0, r.output + (tmp_path / "worker.log").read_text()[-3000:]
    assert "planned" in r.output and "materialized" in r.output and "sent (any outcome)" in r.output  # the bar's rows
    assert "planned 4, excluded 0, materialized 4" in r.output, r.output
    # valid.test has no mail server: every message got its final outcome (bounced) at delivery
    assert "other outcomes 4" in r.output, r.output
    session.commit()
    assert session.get(Campaign, cid).status in ("sending", "completed")
    assert session.scalar(select(CampaignRecipient.id).where(CampaignRecipient.campaign_id == cid,
                                                             CampaignRecipient.message_id.is_(None))) is None
