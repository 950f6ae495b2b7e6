"""The journey pages (issue 15 item 6) without a browser, on both databases: every starter
validates once its templates (and segment) are chosen; the list, the editor, the validation
endpoint, saving a draft, publishing and pausing through the real sign-in; permissions, CSRF,
cross-tenant 404s, no PHI in URLs; the contact page's journey timeline. The browser flow is
tests/test_ui_journeys.py."""

from __future__ import annotations

import re

import pytest

from carepost.core.database import org_session
from carepost.journeys import starters
from tests.fixtures.accounts import login_client
from tests.test_campaigns_planning import make_contact, make_segment


def make_templates(s, org_id) -> dict[str, tuple[str, int]]:
    """One template per purpose the starters use: purpose -> (template id, version)."""
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn

    out = {}
    for purpose in ("treatment", "refill_reminder", "health_care_operations"):
        t = content.create_template(s, org_id, TemplateIn(
            name=f"Journey {purpose}", subject="A message from your clinic", purpose=purpose, contains_phi=False,
            html="<p>Hello {{ first_name }}, please call us.</p>", language="en"))
        s.flush()
        out[purpose] = (t.id, content.current_version(s, t).version)
    return out


def filled_starter(key: str, templates: dict, segment_id: str | None) -> dict:
    starter = starters.get_starter(key)
    definition = starters.starter_definition(key)
    slots = starters.slots(definition)
    return starters.fill(definition, {sid: templates[starter.purpose] for sid in slots["templates"]},
                         segment_id if slots["segment"] else None)


def test_every_starter_is_valid_once_its_templates_are_chosen(org, session):
    from carepost.journeys.validation import validate_definition

    assert {s.key for s in starters.list_starters()} == {
        "appointment_reminder", "post_discharge", "refill_reminder", "annual_wellness_visit", "flu_season",
        "new_patient_onboarding"}
    with org_session(org.id) as s:
        templates = make_templates(s, org.id)
        segment = make_segment(s, org.id, name="Adults due a flu shot")
        s.commit()
        for starter in starters.list_starters():
            assert starter.purpose in ("treatment", "refill_reminder", "health_care_operations"), starter.key
            assert starter.definition["purpose"] == starter.purpose
            raw = starters.starter_definition(starter.key)
            # as shipped, the empty template slots are named by the validation
            problems = validate_definition(s, org.id, raw)
            assert problems and all(p["path"].startswith(("steps.", "entry.segment_id")) for p in problems), problems
            assert validate_definition(s, org.id, filled_starter(starter.key, templates, segment)) == [], starter.key
        # the appointment reminder: 7 days, 2 days and 2 hours before the appointment
        d = starters.starter_definition("appointment_reminder")
        assert d["entry"] == {"type": "date", "field": "appointment.start", "offset": "-7d"}
        assert [d["steps"][s]["timeout"] for s in ("wait_2d", "wait_2h")] == ["5d", "46h"]  # -7d+5d = -2d; -2d+46h = -2h


# --------------------------------------------------------------------------- the pages

def _definition(templates, *, wait="2d") -> dict:
    """A small valid journey: on a booked appointment, send, wait, send, exit."""
    tid, ver = templates["treatment"]
    return {"purpose": "treatment", "entry": {"type": "event", "event": "appointment.booked"},
            "reentry": {"mode": "never"}, "exit_on": ["unsubscribe", "revocation"], "start": "s1",
            "steps": {"s1": {"type": "send", "template_id": tid, "template_version": ver, "next": "s2"},
                      "s2": {"type": "wait", "duration": wait, "next": "s3"},
                      "s3": {"type": "send", "template_id": tid, "template_version": ver, "next": "s4"},
                      "s4": {"type": "exit"}},
            "layout": {"s1": {"x": 60, "y": 60}, "s2": {"x": 310, "y": 60}}}


@pytest.fixture
def clinic(org):
    with org_session(org.id) as s:
        templates = make_templates(s, org.id)
        s.commit()
    return {"templates": templates}


def _json_post(client, url, csrf, body):
    return client.post(url, json=body, headers={"X-CSRF-Token": csrf, "Accept": "application/json"})


def test_editor_validates_saves_publishes_with_a_choice_and_pauses(client, org, make_user, clinic, session):
    import json
    import re

    from carepost.journeys.models import Journey, JourneyVersion

    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    r = client.get("/app/journeys")
    assert r.status_code == 200 and r.text.count('data-testid="starter"') == 6
    assert 'href="/app/journeys/new?starter=appointment_reminder"' in r.text
    r = client.get("/app/journeys/new?starter=flu_season")
    assert r.status_code == 200
    assert '<script src="/static/vendor/drawflow-0.0.60.min.js" defer></script>' in r.text
    data = json.loads(re.search(r'<script type="application/json" id="journey-data">(.*?)</script>', r.text, re.DOTALL).group(1))
    assert data["definition"]["entry"] == {"type": "segment", "segment_id": None}
    assert data["hints"]["invite"] and data["urls"]["save"] == "/app/journeys"
    assert {t["id"] for t in data["choices"]["templates"]} == {t for t, _ in clinic["templates"].values()}
    assert "appointment.booked" in data["choices"]["events"] and "care_team" in data["choices"]["roles"]
    assert client.get("/app/journeys/new?starter=nope").status_code == 422

    # the validation endpoint names each problem with its step
    bad = _definition(clinic["templates"], wait="0d")
    bad["steps"]["s9"] = {"type": "exit"}  # unreachable
    r = _json_post(client, "/app/journeys/validate", csrf, {"definition": bad})
    assert r.status_code == 200 and r.json()["valid"] is False
    by_path = {e["path"]: e for e in r.json()["errors"]}
    assert by_path["steps.s2.duration"]["step"] == "s2"
    assert any(e["step"] == "s9" for e in r.json()["errors"]), r.json()
    # a branch without a default; a cycle without a wait
    branchy = _definition(clinic["templates"])
    branchy["steps"]["s2"] = {"type": "branch", "cases": [{"when": {"kind": "engagement", "step": "s1", "is": "opened"},
                                                          "next": "s3"}]}
    errs = _json_post(client, "/app/journeys/validate", csrf, {"definition": branchy}).json()["errors"]
    assert [e for e in errs if e["path"] == "steps.s2.default" and e["step"] == "s2"], errs
    loop = _definition(clinic["templates"])
    loop["steps"]["s3"]["next"] = "s1"
    errs = _json_post(client, "/app/journeys/validate", csrf, {"definition": loop}).json()["errors"]
    assert errs and any("wait" in e["message"] or "exit" in e["message"] for e in errs), errs

    # saving an invalid journey: 422 with every problem, nothing stored
    r = _json_post(client, "/app/journeys", csrf, {"name": "Reminders", "definition": bad})
    assert r.status_code == 422 and {p["path"] for p in r.json()["error"]["problems"]} >= {"steps.s2.duration"}
    session.rollback()
    assert session.query(Journey).count() == 0
    r = _json_post(client, "/app/journeys", csrf, {"name": "", "definition": _definition(clinic["templates"])})
    assert r.status_code == 422 and r.json()["error"]["field"] == "name"
    # valid: version 1, a draft
    r = _json_post(client, "/app/journeys", csrf, {"name": "Reminders", "definition": _definition(clinic["templates"])})
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    assert r.json()["edit_url"] == f"/app/journeys/{jid}/edit"
    r = client.get(f"/app/journeys/{jid}/edit")
    assert r.status_code == 200 and 'name="mode" value="drain"' in r.text and 'data-testid="mode-migrate"' not in r.text
    r = _json_post(client, f"/app/journeys/{jid}/draft", csrf, {"name": "Appointment reminders",
                                                                 "definition": _definition(clinic["templates"], wait="3d")})
    assert r.status_code == 200 and r.json()["version"] == 1
    r = client.post(f"/app/journeys/{jid}/publish", data={"csrf_token": csrf, "mode": "drain"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/app/journeys/{jid}?done=published"
    session.rollback()
    row = session.get(Journey, jid)
    assert row.status == "live" and row.current_version == 1 and row.name == "Appointment reminders"

    # the running view and its counts
    r = client.get(f"/app/journeys/{jid}")
    assert r.status_code == 200 and 'data-testid="pause"' in r.text and "/static/journeys-editor.js" in r.text
    counts = client.get(f"/app/journeys/{jid}/counts").json()
    assert counts["totals"]["entered"] == 0 and set(counts["steps"]) == {"s1", "s2", "s3", "s4"}
    assert "messages" in counts["steps"]["s1"] and "messages" not in counts["steps"]["s2"]

    # a second version: the editor asks migrate or drain; publishing without a choice is refused
    r = _json_post(client, f"/app/journeys/{jid}/draft", csrf, {"name": "Appointment reminders",
                                                                 "definition": _definition(clinic["templates"], wait="4d")})
    assert r.status_code == 200 and r.json()["version"] == 2
    r = client.get(f"/app/journeys/{jid}/edit")
    assert 'data-testid="mode-migrate"' in r.text and 'data-testid="mode-drain"' in r.text
    r = client.post(f"/app/journeys/{jid}/publish", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 422 and 'data-testid="page-error"' in r.text and "migrate or drain" in r.text
    r = client.post(f"/app/journeys/{jid}/publish", data={"csrf_token": csrf, "mode": "migrate"}, follow_redirects=False)
    assert r.status_code == 303
    session.rollback()
    v2 = session.query(JourneyVersion).filter_by(journey_id=jid, version=2).one()
    assert v2.migration_mode == "migrate" and v2.published_at is not None

    # pause and resume
    r = client.post(f"/app/journeys/{jid}/pause", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("?done=paused")
    r = client.get(f"/app/journeys/{jid}?done=paused")
    assert 'data-testid="resume"' in r.text and "Paused" in r.text
    r = client.post(f"/app/journeys/{jid}/pause", data={"csrf_token": csrf})
    assert r.status_code == 409 and "cannot be paused" in r.text
    r = client.post(f"/app/journeys/{jid}/resume", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    session.rollback()
    assert session.get(Journey, jid).status == "live"
    r = client.get("/app/journeys")
    assert "Appointment reminders" in r.text and 'data-testid="journey-status">live' in r.text

    # every change is audited with the journey id
    actions = audit_actions(session, org.id, marketer.id)
    for action in ("journey.created", "journey.updated", "journey.version_saved", "journey.published", "journey.paused",
                   "journey.resumed"):
        assert action in actions, actions


def audit_actions(session, org_id, actor_id):
    from sqlalchemy import select

    from carepost.audit.models import AuditEvent

    session.rollback()
    return list(session.scalars(select(AuditEvent.action).where(AuditEvent.chain == org_id,
                                                                AuditEvent.actor_id == actor_id)))


def _journey(s, org_id, templates, name="Reminders") -> str:
    from carepost.journeys import service

    class _P:  # the service records who acted; a system principal for arranging
        user_id = None
        on_behalf_of = None
        actor_id = "system"

        def can(self, _):
            return True

    row = service.create_journey(s, org_id, {"name": name, "definition": _definition(templates)}, _P())
    service.publish(s, row, _P())
    s.flush()
    return row.id


def test_csrf_permissions_and_other_organizations(client, org, make_user, clinic, session):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    with org_session(other.id) as s:
        foreign = _journey(s, other.id, make_templates(s, other.id))
        s.commit()
    with org_session(org.id) as s:
        own = _journey(s, org.id, clinic["templates"])
        s.commit()
    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    body = {"name": "X", "definition": _definition(clinic["templates"])}
    # CSRF: the JSON routes want the header, the forms the field
    assert client.post("/app/journeys", json=body).status_code == 403
    assert client.post("/app/journeys/validate", json=body).status_code == 403
    assert client.post(f"/app/journeys/{own}/draft", json=body).status_code == 403
    assert client.post(f"/app/journeys/{own}/pause", data={}).status_code == 403
    assert client.post(f"/app/journeys/{own}/publish", data={"csrf_token": "wrong"}).status_code == 403
    # another organization's journey: 404 on every route, the same as an unknown id
    for method, url in (("get", f"/app/journeys/{foreign}"), ("get", f"/app/journeys/{foreign}/edit"),
                        ("get", f"/app/journeys/{foreign}/counts"), ("get", f"/app/journeys/{'0' * 32}")):
        assert getattr(client, method)(url).status_code == 404, url
    assert _json_post(client, f"/app/journeys/{foreign}/draft", csrf, body).status_code == 404
    for action in ("publish", "pause", "resume"):
        assert client.post(f"/app/journeys/{foreign}/{action}", data={"csrf_token": csrf}).status_code == 404
    assert foreign not in client.get("/app/journeys").text
    session.rollback()
    from carepost.journeys.models import Journey

    assert session.get(Journey, foreign).status == "live"
    # an analyst (journeys:read, not journeys:manage) sees the list and the running view, edits nothing
    client.cookies.clear()
    analyst = make_user(org, role="analyst")
    csrf = login_client(client, analyst)
    r = client.get("/app/journeys")
    assert r.status_code == 200 and 'data-testid="new-journey"' not in r.text and "starter-picker" not in r.text
    r = client.get(f"/app/journeys/{own}")
    assert r.status_code == 200 and 'data-testid="pause"' not in r.text and 'data-testid="edit-journey"' not in r.text
    assert client.get(f"/app/journeys/{own}/counts").status_code == 200
    assert client.get(f"/app/journeys/{own}/edit").status_code == 403
    assert client.get("/app/journeys/new").status_code == 403
    assert _json_post(client, "/app/journeys/validate", csrf, body).status_code == 403
    assert client.post(f"/app/journeys/{own}/pause", data={"csrf_token": csrf}).status_code == 403
    assert client.post(f"/app/journeys/{own}/approve", data={"csrf_token": csrf}).status_code == 403
    # care team (no journeys:read): nothing
    client.cookies.clear()
    login_client(client, make_user(org, role="care_team"))
    assert client.get("/app/journeys").status_code == 403
    assert client.get(f"/app/journeys/{own}").status_code == 403


def _run(s, org_id, journey_id, contact_id, *, state, step, steps=(), entered=None, reason=None, converted=False):
    from datetime import timedelta

    from carepost.core import clock
    from carepost.core.ids import new_id
    from carepost.journeys.models import JourneyRun, JourneyRunStep, JourneyVersion

    ver = s.query(JourneyVersion).filter_by(journey_id=journey_id, version=1).one()
    at = entered or clock.now() - timedelta(days=3)
    run = JourneyRun(id=new_id(), org_id=org_id, journey_id=journey_id, version=1, version_id=ver.id,
                     contact_id=contact_id, state=state, step_id=step, entry_key=new_id(), entered_at=at,
                     active_key=contact_id if state in ("active", "waiting") else None, seq=len(steps),
                     ended_at=None if state in ("active", "waiting") else clock.now(), exit_reason=reason,
                     converted_at=clock.now() if converted else None,
                     wake_at=clock.now() + timedelta(days=1) if state == "waiting" else None)
    s.add(run)
    s.flush()
    for i, (sid, kind, status) in enumerate(steps, start=1):
        s.add(JourneyRunStep(org_id=org_id, run_id=run.id, journey_id=journey_id, version_id=ver.id, step_id=sid,
                             step_type=kind, seq=i, status=status, at=at + timedelta(hours=i)))
    s.flush()
    return run.id


def test_contact_page_shows_the_patients_journeys_and_counts_follow_the_runs(client, org, make_user, clinic, session):
    with org_session(org.id) as s:
        jid = _journey(s, org.id, clinic["templates"], name="Post-visit follow-up")
        ana = make_contact(s, org.id, "ana.journey@valid.test", given_name="Anabel")
        beto = make_contact(s, org.id, "beto.journey@valid.test", given_name="Beto")
        _run(s, org.id, jid, ana, state="waiting", step="s2", steps=[("s1", "send", "sent"), ("s2", "wait", "done")])
        _run(s, org.id, jid, beto, state="exited", step="s4", reason="goal", converted=True,
             steps=[("s1", "send", "sent"), ("s2", "wait", "done"), ("s3", "send", "excluded")])
        s.commit()
    owner = make_user(org, role="owner")  # unmasked: exact counts and dates
    login_client(client, owner)
    r = client.get(f"/app/contacts/{ana}")
    assert r.status_code == 200
    section = r.text.split('data-testid="section-journeys"', 1)[1].split("</section>", 1)[0]
    assert "Post-visit follow-up (version 1): waiting until " in section and ", then step s2; entered" in section
    assert f'href="/app/journeys/{jid}"' in section
    assert "step s1 (Send email) — sent" in section and "step s2 (Wait) — done" in section
    assert "Beto" not in section and "s3" not in section  # only this patient's runs

    counts = client.get(f"/app/journeys/{jid}/counts").json()
    assert counts["masked"] is False
    assert counts["totals"] == {"entered": 2, "active": 1, "exited": 1, "goal": 1, "exited_by_reason": {"goal": 1}}
    assert counts["steps"]["s2"]["now"] == 1 and counts["steps"]["s1"]["executed"] == 2
    assert counts["steps"]["s1"]["messages"]["sent"] == 2 and counts["steps"]["s3"]["messages"]["excluded"] == 1
    r = client.get("/app/journeys")
    row = r.text.split(f'data-journey="{jid}"', 1)[1].split("</tr>", 1)[0]
    assert 'data-testid="row-active">1<' in row and 'data-testid="row-entered">2<' in row

    # a masked viewer: small counts as "<11", the timeline's dates as years
    client.cookies.clear()
    marketer = make_user(org, role="marketer")
    login_client(client, marketer)
    counts = client.get(f"/app/journeys/{jid}/counts").json()
    assert counts["masked"] is True and counts["totals"]["entered"] == "<11" and counts["steps"]["s4"]["now"] == 0
    r = client.get(f"/app/contacts/{ana}")
    section = r.text.split('data-testid="section-journeys"', 1)[1].split("</section>", 1)[0]
    assert ", then step s2" in section and not re.search(r"\d{4}-\d{2}-\d{2}", section)


def test_no_phi_in_urls_of_the_journey_pages(client, org, make_user, clinic, session):
    with org_session(org.id) as s:
        jid = _journey(s, org.id, clinic["templates"])
        ana = make_contact(s, org.id, "ana.private@valid.test", given_name="Anabelle", family_name="Quintero")
        _run(s, org.id, jid, ana, state="active", step="s1")
        s.commit()
    owner = make_user(org, role="owner")
    login_client(client, owner)
    seen = []
    for url in ("/app/journeys", f"/app/journeys/{jid}", f"/app/journeys/{jid}/edit", "/app/journeys/new",
                f"/app/contacts/{ana}"):
        r = client.get(url)
        assert r.status_code == 200, url
        seen += re.findall(r'(?:href|action|src)="([^"]*)"', r.text)
    urls = [u for u in seen if "journeys" in u]
    assert urls and not [u for u in urls if re.search(r"ana\.private|Anabelle|Quintero|@", u, re.IGNORECASE)]
    counts = client.get(f"/app/journeys/{jid}/counts").text
    assert "Anabelle" not in counts and "ana.private" not in counts and ana not in counts


def test_a_marketing_journey_is_published_only_after_compliance_approves_it_on_the_page(client, org, make_user, clinic,
                                                                                         session):
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn

    with org_session(org.id) as s:
        t = content.create_template(s, org.id, TemplateIn(
            name="Cooking class", subject="A class for you", purpose="marketing", contains_phi=False,
            html="<p>Join our cooking class.</p>", language="en"))
        s.commit()
        tid = t.id
    definition = _definition({"treatment": (tid, 1)})
    definition["purpose"] = "marketing"
    marketer = make_user(org, role="marketer")
    officer = make_user(org, role="compliance_officer")
    csrf = login_client(client, marketer)
    r = _json_post(client, "/app/journeys", csrf, {"name": "Cooking class", "definition": definition})
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    r = client.get(f"/app/journeys/{jid}/edit")
    assert 'data-testid="approval-note"' in r.text and "marketing purpose" in r.text
    r = client.post(f"/app/journeys/{jid}/publish", data={"csrf_token": csrf, "mode": "drain"})
    assert r.status_code == 409 and "needs approval by compliance" in r.text
    r = client.get(f"/app/journeys/{jid}")
    assert 'data-testid="approval"' in r.text and "awaiting approval" in r.text and 'data-testid="approve"' not in r.text
    assert 'data-testid="row-approval">awaiting approval<' in client.get("/app/journeys").text
    assert client.post(f"/app/journeys/{jid}/approve", data={"csrf_token": csrf}).status_code == 403  # not compliance

    client.cookies.clear()
    ocsrf = login_client(client, officer)
    r = client.get(f"/app/journeys/{jid}?version=1")
    assert r.status_code == 200 and 'data-testid="approve"' in r.text and 'data-testid="edit-journey"' not in r.text
    r = client.post(f"/app/journeys/{jid}/approve", data={"csrf_token": ocsrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/app/journeys/{jid}?version=1&done=approved"
    r = client.get(r.headers["location"])
    assert "Approved" in r.text and 'data-testid="reject"' in r.text

    client.cookies.clear()
    csrf = login_client(client, marketer)
    r = client.post(f"/app/journeys/{jid}/publish", data={"csrf_token": csrf, "mode": "drain"}, follow_redirects=False)
    assert r.status_code == 303
    assert "journey.approved" in audit_actions(session, org.id, officer.id)


def test_the_author_cannot_approve_their_own_version(client, org, make_user, clinic, session):
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn

    with org_session(org.id) as s:
        t = content.create_template(s, org.id, TemplateIn(
            name="Offer", subject="An offer", purpose="marketing", contains_phi=False, html="<p>Offer.</p>",
            language="en"))
        s.commit()
        tid = t.id
    definition = _definition({"treatment": (tid, 1)})
    definition["purpose"] = "marketing"
    owner = make_user(org, role="owner")  # holds journeys:manage and campaigns:approve
    csrf = login_client(client, owner)
    jid = _json_post(client, "/app/journeys", csrf, {"name": "Offer", "definition": definition}).json()["id"]
    r = client.get(f"/app/journeys/{jid}")
    assert "You wrote this version" in r.text and 'data-testid="approve"' not in r.text
    r = client.post(f"/app/journeys/{jid}/approve", data={"csrf_token": csrf})
    assert r.status_code == 403 and "cannot approve" in r.text
    session.rollback()
    from carepost.journeys.models import JourneyVersion

    assert session.query(JourneyVersion).filter_by(journey_id=jid).one().approved_at is None
    denied = [a for a in audit_actions(session, org.id, owner.id) if a == "journey.approved"]
    assert denied  # the refusal is audited (outcome denied)
