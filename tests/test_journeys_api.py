"""The journeys API (issue 15 items 4, 5, 7 and "Bad input"), on SQLCipher and PostgreSQL:
CRUD with an API key, a bad definition a 422 naming every JSON path, validate, versions immutable
after publish, publish migrate|drain, pause/resume/archive, the approval workflow through real
signed-in people (a marketer writes, a compliance officer approves; the author never approves),
runs per journey and per contact (audited), analytics masked below 11 people, permission
denials, another organization's journey a 404, and the routes in the OpenAPI document."""

from __future__ import annotations

import copy

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from carepost.core import clock
from carepost.core.database import org_session
from carepost.core.ids import new_id
from carepost.journeys.models import JourneyRun, JourneyRunStep
from tests.fixtures.accounts import login_client
from tests.test_campaigns_planning import make_contact, make_segment
from tests.test_journeys_definitions import definition, make_template

MANAGER = ["journeys:read", "journeys:manage", "phi:read_masked"]
READER = ["journeys:read"]


def _headers(session, org_id, scopes, name):
    cred, secret = create_credential(session, org_id, name=name, scopes=scopes)
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


@pytest.fixture
def shop(org, session):
    with org_session(org.id) as s:
        template = make_template(s, org.id)
        marketing = make_template(s, org.id, purpose="marketing")
        segment = make_segment(s, org.id, name="Springfield")
        contacts = [make_contact(s, org.id, f"p{i}@valid.test") for i in range(3)]
        s.commit()
    return {"org_id": org.id, "template": template, "marketing": marketing, "segment": segment, "contacts": contacts,
            "manager": _headers(session, org.id, MANAGER, "manager"),
            "reader": _headers(session, org.id, READER, "reader")}


def _audit(session, action):
    from carepost.audit.models import AuditEvent

    session.commit()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def test_crud_versions_publish_modes_pause_resume_archive(client, shop, session):
    h = shop["manager"]
    d = definition(shop["template"])
    r = client.post("/api/v1/journeys", json={"name": "After the visit", "definition": d}, headers=h)
    assert r.status_code == 201, r.text
    j = r.json()
    jid = j["id"]
    assert (j["status"], j["latest_version"], j["draft"], j["current_version"], j["approval_required"]) == \
        ("draft", 1, True, None, False)
    assert j["latest"]["definition"] == d
    # list and read (a reader may)
    r = client.get("/api/v1/journeys", headers=shop["reader"])
    assert r.status_code == 200 and [x["id"] for x in r.json()["journeys"]] == [jid]
    assert client.get(f"/api/v1/journeys/{jid}", headers=shop["reader"]).json()["versions"][0]["version"] == 1
    # rename
    r = client.patch(f"/api/v1/journeys/{jid}", json={"name": "After the appointment"}, headers=h)
    assert r.status_code == 200 and r.json()["name"] == "After the appointment"
    # publish version 1
    r = client.post(f"/api/v1/journeys/{jid}/publish", json={}, headers=h)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["current_version"], r.json()["live"]["migration_mode"]) == ("live", 1, "drain")
    assert client.post(f"/api/v1/journeys/{jid}/publish", json={}, headers=h).status_code == 409
    # a run at s4 (as the engine leaves one)
    with org_session(shop["org_id"]) as s:
        c = shop["contacts"][0]
        from carepost.journeys.models import JourneyVersion

        v1_id = s.scalars(select(JourneyVersion.id).where(JourneyVersion.journey_id == jid)).one()
        s.add(JourneyRun(id=new_id(), org_id=shop["org_id"], journey_id=jid, version=1, version_id=v1_id,
                         contact_id=c, state="waiting", step_id="s4", active_key=c, entry_key="e1"))
        s.commit()
    # a new definition is version 2; version 1 is unchanged
    d2 = copy.deepcopy(d)
    d2["steps"]["s2"]["duration"] = "5d"
    r = client.post(f"/api/v1/journeys/{jid}/versions", json={"definition": d2}, headers=h)
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["published"] is False
    assert client.get(f"/api/v1/journeys/{jid}/versions/1", headers=h).json()["definition"] == d
    assert [v["version"] for v in client.get(f"/api/v1/journeys/{jid}/versions", headers=h).json()["versions"]] == [1, 2]
    # a live version: the caller must choose migrate or drain
    r = client.post(f"/api/v1/journeys/{jid}/publish", json={}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "mode"
    r = client.post(f"/api/v1/journeys/{jid}/publish", json={"mode": "sideways"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "mode"
    r = client.post(f"/api/v1/journeys/{jid}/publish", json={"mode": "migrate"}, headers=h)
    assert r.status_code == 200 and r.json()["migrated_runs"] == 1 and r.json()["live"]["migration_mode"] == "migrate"
    published = _audit(session, "journey.published")
    assert [(e.details["version"], e.details["mode"], e.details["migrated"]) for e in published] == \
        [(1, "drain", 0), (2, "migrate", 1)]
    # pause, resume, archive
    assert client.post(f"/api/v1/journeys/{jid}/pause", headers=h).json()["status"] == "paused"
    r = client.post(f"/api/v1/journeys/{jid}/pause", headers=h)
    assert r.status_code == 409 and r.json()["error"]["field"] == "status"
    assert client.post(f"/api/v1/journeys/{jid}/resume", headers=h).json()["status"] == "live"
    assert client.delete(f"/api/v1/journeys/{jid}", headers=h).status_code == 409
    assert client.post(f"/api/v1/journeys/{jid}/archive", headers=h).json()["status"] == "archived"
    assert _audit(session, "journey.archived")[0].details == {"status": "archived", "runs_ended": 1}
    # a draft never published is deleted
    r = client.post("/api/v1/journeys", json={"name": "Scratch", "definition": d}, headers=h)
    assert client.delete(f"/api/v1/journeys/{r.json()['id']}", headers=h).status_code == 204
    assert client.get(f"/api/v1/journeys/{r.json()['id']}", headers=h).status_code == 404
    for action in ("journey.created", "journey.updated", "journey.version_saved", "journey.paused",
                   "journey.resumed", "journey.deleted"):
        assert _audit(session, action), action


def test_bad_definitions_are_422s_naming_every_json_path(client, shop, session):
    h = shop["manager"]
    bad = definition(shop["template"])
    bad["steps"]["s2"]["duration"] = "0h"
    bad["steps"]["s5"].pop("default")
    bad["entry"]["event"] = "spaceship.landed"
    bad["steps"]["s7"]["next"] = "s5"  # s5 -> s7 -> s5: a cycle without a wait
    r = client.post("/api/v1/journeys", json={"name": "Broken", "definition": bad}, headers=h)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    fields = [e["field"] for e in error["errors"]]
    assert {"definition.steps.s2.duration", "definition.steps.s5.default", "definition.entry.event"} <= set(fields)
    assert error["field"] == fields[0] and error["code"] == "invalid_definition"
    # nothing was stored
    assert client.get("/api/v1/journeys", headers=h).json()["journeys"] == []
    # the cycle is named once the branch has its default again
    bad["steps"]["s5"]["default"] = "s8"
    r = client.post("/api/v1/journeys/validate", json={"definition": bad}, headers=shop["reader"])
    assert r.status_code == 422
    assert "definition.steps.s5" in [e["field"] for e in r.json()["error"]["errors"]]
    # validate a good one: 200 with the approval it would need
    r = client.post("/api/v1/journeys/validate", json={"definition": definition(shop["marketing"], purpose="marketing")},
                    headers=shop["reader"])
    assert r.status_code == 200 and r.json() == {"valid": True, "errors": [], "approval_reasons": ["marketing_purpose"]}
    # unknown body fields, a definition that is no object, one that is too big
    r = client.post("/api/v1/journeys", json={"name": "x", "definition": definition(shop["template"]), "colour": 1},
                    headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "colour"
    r = client.post("/api/v1/journeys", json={"name": "x", "definition": [1, 2]}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("definition")
    huge = definition(shop["template"])
    huge["layout"] = {"s1": {"x": 1, "y": 1}}
    huge["description"] = "x" * 300_000
    r = client.post("/api/v1/journeys", json={"name": "x", "definition": huge}, headers=h)
    assert r.status_code in (413, 422)
    # a bad draft save leaves the stored version as it was
    r = client.post("/api/v1/journeys", json={"name": "Good", "definition": definition(shop["template"])}, headers=h)
    jid = r.json()["id"]
    r = client.post(f"/api/v1/journeys/{jid}/versions", json={"definition": bad}, headers=h)
    assert r.status_code == 422
    assert client.get(f"/api/v1/journeys/{jid}/versions/1", headers=h).json()["definition"] == \
        definition(shop["template"])
    # PHI in a staff notice is refused without echoing it
    phi = definition(shop["template"])
    phi["steps"]["s8"]["text"] = "Jane Doe 555-123-4567 has HIV"
    r = client.post(f"/api/v1/journeys/{jid}/versions", json={"definition": phi}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "definition.steps.s8.text"
    assert "Jane" not in r.text and "555" not in r.text


def test_marketer_writes_compliance_approves_the_author_never(app, client, shop, session, make_user):
    org_id = shop["org_id"]
    marketer, compliance = make_user(org_id, "marketer"), make_user(org_id, "compliance_officer")
    client.headers["X-CSRF-Token"] = login_client(client, marketer)
    with TestClient(app, base_url="http://localhost:8000") as other:
        other.headers["X-CSRF-Token"] = login_client(other, compliance)
        d = definition(shop["marketing"], purpose="marketing")
        r = client.post("/api/v1/journeys", json={"name": "Flu season offers", "definition": d})
        assert r.status_code == 201, r.text
        jid = r.json()["id"]
        assert r.json()["approval_required"] and r.json()["approval_reasons"] == ["marketing_purpose"]
        r = client.post(f"/api/v1/journeys/{jid}/publish", json={})
        assert r.status_code == 409 and r.json()["error"]["code"] == "approval_required"
        assert client.post(f"/api/v1/journeys/{jid}/approve", json={}).status_code == 403  # no campaigns:approve
        # an API key cannot approve either (campaigns:approve is no API scope)
        assert client.post(f"/api/v1/journeys/{jid}/approve", json={}, headers=shop["manager"]).status_code == 403
        # compliance approves; the marketer publishes
        r = other.post(f"/api/v1/journeys/{jid}/approve", json={"comment": "Authorization texts checked"})
        assert r.status_code == 200 and r.json()["approved"] is True
        r = client.post(f"/api/v1/journeys/{jid}/publish", json={})
        assert r.status_code == 200 and r.json()["status"] == "live"
        assert r.json()["live"]["approved_by"] == compliance.id
        # compliance writes version 2 itself: it cannot approve its own work
        owner = make_user(org_id, "owner")
        with TestClient(app, base_url="http://localhost:8000") as third:
            third.headers["X-CSRF-Token"] = login_client(third, owner)
            d2 = copy.deepcopy(d)
            d2["steps"]["s2"]["duration"] = "3d"
            assert third.post(f"/api/v1/journeys/{jid}/versions", json={"definition": d2}).status_code == 201
            r = third.post(f"/api/v1/journeys/{jid}/approve", json={})
            assert r.status_code == 403 and r.json()["error"]["code"] == "self_approval"
            assert other.post(f"/api/v1/journeys/{jid}/approve", json={}).status_code == 200
            # withdrawn again by compliance: publishing is refused
            assert other.post(f"/api/v1/journeys/{jid}/reject", json={"comment": "Wrong topic"}).status_code == 200
            r = third.post(f"/api/v1/journeys/{jid}/publish", json={"mode": "drain"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "approval_required"
    approvals = _audit(session, "journey.approved")
    assert [(e.actor_id, e.outcome) for e in approvals] == [(compliance.id, "success"), (owner.id, "denied"),
                                                            (compliance.id, "success")]


def test_runs_per_journey_and_per_contact_and_analytics(client, shop, session):
    h = shop["manager"]
    r = client.post("/api/v1/journeys", json={"name": "Runs", "definition": definition(shop["template"])}, headers=h)
    jid = r.json()["id"]
    client.post(f"/api/v1/journeys/{jid}/publish", json={}, headers=h)
    org_id = shop["org_id"]
    with org_session(org_id) as s:
        from carepost.journeys.models import JourneyVersion

        vid = s.scalars(select(JourneyVersion.id).where(JourneyVersion.journey_id == jid)).one()
        ids = []
        for i, c in enumerate(shop["contacts"]):
            run = JourneyRun(id=new_id(), org_id=org_id, journey_id=jid, version=1, version_id=vid, contact_id=c,
                             state="waiting" if i else "completed", step_id="s2" if i else "s10",
                             active_key=c if i else None, entry_key=f"e{i}", entered_at=clock.now(),
                             ended_at=None if i else clock.now(), exit_reason=None if i else "exit_step")
            s.add(run)
            s.flush()
            s.add(JourneyRunStep(id=new_id(), org_id=org_id, run_id=run.id, journey_id=jid, version_id=vid,
                                 step_id="s1", step_type="send", seq=1, status="sent"))
            ids.append(run.id)
        s.commit()
    r = client.get(f"/api/v1/journeys/{jid}/runs", headers=h)
    assert r.status_code == 200 and {x["id"] for x in r.json()["runs"]} == set(ids)
    r = client.get(f"/api/v1/journeys/{jid}/runs?state=waiting&step_id=s2", headers=h)
    assert len(r.json()["runs"]) == 2
    assert client.get(f"/api/v1/journeys/{jid}/runs?state=sleeping", headers=h).status_code == 422
    page = client.get(f"/api/v1/journeys/{jid}/runs?limit=2", headers=h).json()
    rest = client.get(f"/api/v1/journeys/{jid}/runs?limit=2&after={page['next_after']}", headers=h).json()
    assert len(page["runs"]) == 2 and len(rest["runs"]) == 1
    assert {x["id"] for x in page["runs"] + rest["runs"]} == set(ids)
    c = shop["contacts"][0]
    r = client.get(f"/api/v1/journeys/runs?contact_id={c}", headers=h)
    assert r.status_code == 200 and [x["journey_id"] for x in r.json()["runs"]] == [jid]
    assert r.json()["runs"][0]["steps"][0]["step_id"] == "s1"
    assert client.get(f"/api/v1/journeys/runs?contact_id={'0' * 32}", headers=h).status_code == 404
    # which patient is in which journey is PHI: a reader without phi:read_masked is refused
    assert client.get(f"/api/v1/journeys/{jid}/runs", headers=shop["reader"]).status_code == 403
    assert client.get(f"/api/v1/journeys/runs?contact_id={c}", headers=shop["reader"]).status_code == 403
    reads = _audit(session, "journey.runs_read")
    assert [e.target_type for e in reads] == ["journey"] * 4 + ["contact"]
    # analytics: exact with phi:read_unmasked, masked below 11 people without
    unmasked = _headers(session, org_id, ["journeys:read", "phi:read_unmasked"], "unmasked")
    r = client.get(f"/api/v1/journeys/{jid}/analytics", headers=unmasked)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["entered"], out["active"], out["exited"]) == (3, 2, {"exit_step": 1})
    steps = {n["id"]: n for n in out["steps"]}
    assert (steps["s1"]["reached"], steps["s2"]["now"], steps["s1"]["outcomes"]) == (3, 2, {"sent": 3})
    masked = client.get(f"/api/v1/journeys/{jid}/analytics", headers=shop["reader"]).json()
    assert masked["masked"] and masked["entered"] == "<11"


def test_another_organizations_journey_is_a_404(client, shop, session):
    from carepost.accounts.service import create_organization

    r = client.post("/api/v1/journeys", json={"name": "Ours", "definition": definition(shop["template"])},
                    headers=shop["manager"])
    jid = r.json()["id"]
    other = create_organization(session, "Other Clinic")
    session.commit()
    theirs = _headers(session, other.id, MANAGER, "theirs")
    for method, path, payload in (("get", "", None), ("patch", "", {"name": "Mine now"}), ("delete", "", None),
                                  ("get", "/versions", None), ("get", "/versions/1", None),
                                  ("post", "/versions", {"definition": definition(shop["template"])}),
                                  ("post", "/publish", {}), ("post", "/pause", None), ("post", "/resume", None),
                                  ("post", "/archive", None), ("get", "/runs", None), ("get", "/analytics", None)):
        kwargs = {"headers": theirs}
        if payload is not None:
            kwargs["json"] = payload
        r = client.request(method.upper(), f"/api/v1/journeys/{jid}{path}", **kwargs)
        assert r.status_code == 404, (method, path, r.text)
    assert client.get("/api/v1/journeys", headers=theirs).json()["journeys"] == []
    r = client.get(f"/api/v1/journeys/runs?contact_id={shop['contacts'][0]}", headers=theirs)
    assert r.status_code == 404
    # our template and segment cannot be used by them
    r = client.post("/api/v1/journeys/validate", headers=theirs, json={"definition": definition(
        shop["template"], entry={"type": "segment", "segment_id": shop["segment"]})})
    assert r.status_code == 422
    assert {"definition.steps.s1.template_id", "definition.entry.segment_id"} <= \
        {e["field"] for e in r.json()["error"]["errors"]}
    assert client.get(f"/api/v1/journeys/{jid}", headers=shop["manager"]).json()["name"] == "Ours"


def test_the_routes_are_in_the_openapi_document(client):
    doc = client.get("/api/v1/openapi.json").json()
    paths = doc["paths"]
    for path in ("/api/v1/journeys", "/api/v1/journeys/validate", "/api/v1/journeys/runs",
                 "/api/v1/journeys/{journey_id}", "/api/v1/journeys/{journey_id}/versions",
                 "/api/v1/journeys/{journey_id}/versions/{version}", "/api/v1/journeys/{journey_id}/publish",
                 "/api/v1/journeys/{journey_id}/pause", "/api/v1/journeys/{journey_id}/resume",
                 "/api/v1/journeys/{journey_id}/archive", "/api/v1/journeys/{journey_id}/approve",
                 "/api/v1/journeys/{journey_id}/reject", "/api/v1/journeys/{journey_id}/runs",
                 "/api/v1/journeys/{journey_id}/analytics"):
        assert path in paths, path


@pytest.mark.slow
def test_schemathesis_over_the_journeys_routes_finds_nothing(app, shop, session):
    """The live OpenAPI document, journeys routes only, fuzzed in-process with a key holding every
    API scope: no 5xx, no undocumented status or content type, every response as documented."""
    import os

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks

    from carepost.accounts.permissions import API_SCOPES

    examples = int(os.environ.get("CAREPOST_FUZZ_EXAMPLES_JOURNEYS", "25"))
    cred, secret = create_credential(session, shop["org_id"], name="Fuzzer", scopes=sorted(API_SCOPES),
                                     rate_limit_per_minute=100_000)
    session.commit()
    headers = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    # every other case names a real journey (and contact), so the fuzz gets past the 404s
    from fastapi.testclient import TestClient as _Client

    with _Client(app, base_url="http://localhost:8000") as c:
        r = c.post("/api/v1/journeys", json={"name": "Fuzzed", "definition": definition(shop["template"])},
                   headers=headers)
        assert r.status_code == 201, r.text
        real = r.json()["id"]
        assert c.post(f"/api/v1/journeys/{real}/publish", json={}, headers=headers).status_code == 200
    counter = {"n": 0}
    statuses: dict[int, int] = {}
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    selected = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                checks.response_schema_conformance]
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith("/api/v1/journeys"):
            continue
        operations += 1

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            counter["n"] += 1
            if counter["n"] % 2:
                if case.path_parameters and "journey_id" in case.path_parameters:
                    case.path_parameters["journey_id"] = real
                if case.query and "contact_id" in case.query:
                    case.query["contact_id"] = shop["contacts"][0]
            response = case.call_and_validate(headers=headers, checks=selected)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every failure is reported below
            failures[operation.label] = str(exc)[:1500]
    assert operations >= 17
    assert {200, 404, 422} <= set(statuses), statuses  # the fuzz reached real journeys, not only misses
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in sorted(failures.items()))
