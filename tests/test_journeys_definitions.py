"""Journey definitions (issue 15 items 1, 4 and "Bad input"), on SQLCipher and PostgreSQL:
every bad input the issue names is refused with the JSON path at fault; references are looked up
in the caller's organization only; versions are immutable once published; approval rules
(marketing purpose, sensitive segment; never by the author); publish migrate vs drain recorded;
pause, resume, archive; the analytics over runs and run steps."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.accounts.access import Principal
from carepost.accounts.permissions import Permission
from carepost.core import clock
from carepost.core.database import org_session
from carepost.core.errors import Conflict, PermissionDenied, ValidationFailed
from carepost.core.ids import new_id
from carepost.journeys import analytics, service
from carepost.journeys.models import (
    JourneyRun,
    JourneyRunStep,
    JourneyVersion,
    step_key,
)
from carepost.journeys.validation import (
    DefinitionInvalid,
    parse_definition,
    validate_definition,
)
from tests.test_campaigns_planning import make_contact, make_segment


def person(org_id, user_id=None, *perms) -> Principal:
    perms = perms or tuple(Permission)
    user_id = user_id or new_id()
    return Principal(kind="user", org_id=org_id, actor_id=user_id, user_id=user_id,
                     permissions=frozenset(perms), mfa_verified=True)


def make_template(s, org_id, *, purpose="treatment", html="<p>Hello {{ first_name }}, please call us.</p>"):
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn

    t = content.create_template(s, org_id, TemplateIn(name=f"T {purpose} {new_id()[-8:]}", subject="From your clinic",
                                                      purpose=purpose, contains_phi=False, html=html, language="en"))
    s.flush()
    return t.id, content.current_version(s, t).version


def definition(template, **over) -> dict:
    tid, ver = template
    d = {
        "purpose": "treatment",
        "entry": {"type": "event", "event": "appointment.booked"},
        "reentry": {"mode": "after", "days": 30},
        "goal": {"event": "appointment.attended", "within_days": 14},
        "start": "s1",
        "steps": {
            "s1": {"type": "send", "template_id": tid, "template_version": ver, "next": "s2"},
            "s2": {"type": "wait", "duration": "2d", "next": "s3"},
            "s3": {"type": "wait_until", "time": "09:00", "weekdays": [1, 2, 3, 4, 5], "next": "s4"},
            "s4": {"type": "wait_event", "event": "form.submitted", "timeout": "3d", "next": "s5",
                   "timeout_next": "s6"},
            "s5": {"type": "branch", "cases": [
                {"when": {"kind": "attribute", "field": "sex", "op": "eq", "value": "female"}, "next": "s7"},
                {"when": {"kind": "engagement", "step": "s1", "is": "opened"}, "next": "s7"}], "default": "s8"},
            "s6": {"type": "split", "variants": [{"name": "A", "weight": 50, "next": "s7"},
                                                 {"name": "B", "weight": 50, "next": "s8"}]},
            "s7": {"type": "update", "action": "set_field", "field": "stage", "value": "active", "next": "s8"},
            "s8": {"type": "notify", "role": "care_team", "text": "A patient finished the follow-up.", "next": "s9"},
            "s9": {"type": "webhook", "event": "journey.step", "next": "s10"},
            "s10": {"type": "exit"},
        },
        "layout": {"s1": {"x": 100, "y": 80}},
    }
    d.update(over)
    return d


@pytest.fixture
def world(org):
    with org_session(org.id) as s:
        template = make_template(s, org.id)
        marketing = make_template(s, org.id, purpose="marketing")
        diag = make_template(s, org.id, purpose="treatment",
                             html="<p>{% for c in active_conditions %}{{ c.name }}{% endfor %}</p>")
        segment = make_segment(s, org.id, name="Springfield")
        sensitive = make_segment(s, org.id, 'has condition in valueset "hiv"', name="HIV care")
        contacts = [make_contact(s, org.id, f"p{i}@valid.test") for i in range(3)]
        s.commit()
    return {"org_id": org.id, "template": template, "marketing": marketing, "diag": diag, "segment": segment,
            "sensitive": sensitive, "contacts": contacts}


def paths(s, org_id, d) -> dict[str, str]:
    return {e["path"]: e["message"] for e in validate_definition(s, org_id, d)}


def test_a_full_definition_is_valid_and_parses_to_typed_steps(world):
    org_id = world["org_id"]
    with org_session(org_id) as s:
        d = definition(world["template"])
        assert validate_definition(s, org_id, d) == []
        typed = parse_definition(d)
        assert type(typed.steps["s4"]).__name__ == "WaitEventStep" and typed.entry.event == "appointment.booked"
        assert typed.reentry.days == 30 and typed.exit_on == ["unsubscribe", "revocation"]
        # each entry kind
        for entry in ({"type": "segment", "segment_id": world["segment"]},
                      {"type": "date", "field": "appointment.start", "offset": "-48h"},
                      {"type": "date", "field": "birth_date", "offset": "0d", "anniversary": True, "at": "09:00"},
                      {"type": "date", "field": "screening_due:colorectal_cancer_screening", "offset": "1y"},
                      {"type": "event", "event": "patient.discharged", "where": {"encounter_class": "inpatient"}}):
            assert validate_definition(s, org_id, definition(world["template"], entry=entry)) == [], entry


BAD = [
    # (what, change to the definition, path named)
    ("cycle without a wait", lambda d: d["steps"].update(
        s7={"type": "update", "action": "set_field", "field": "stage", "value": "x", "next": "s5"}), "steps.s5"),
    ("wait of zero", lambda d: d["steps"]["s2"].update(duration="0m"), "steps.s2.duration"),
    ("negative wait", lambda d: d["steps"]["s2"].update(duration="-2d"), "steps.s2.duration"),
    ("malformed wait", lambda d: d["steps"]["s2"].update(duration="two days"), "steps.s2.duration"),
    ("zero timeout", lambda d: d["steps"]["s4"].update(timeout="0h"), "steps.s4.timeout"),
    ("wait_event without timeout", lambda d: d["steps"]["s4"].pop("timeout"), "steps.s4.timeout"),
    ("unknown field in a step", lambda d: d["steps"]["s1"].update(colour="red"), "steps.s1.colour"),
    ("unknown top-level field", lambda d: d.update(priority=1), "priority"),
    ("unknown contact field", lambda d: d["steps"]["s5"]["cases"][0]["when"].update(field="shoe_size"),
     "steps.s5.cases[0].when.field"),
    ("unknown custom attribute", lambda d: d["steps"]["s5"]["cases"][0]["when"].update(field="attr.nope"),
     "steps.s5.cases[0].when.field"),
    ("unknown settable field", lambda d: d["steps"]["s7"].update(field="email"), "steps.s7.field"),
    ("unknown entry event", lambda d: d["entry"].update(event="spaceship.landed"), "entry.event"),
    ("malformed event name", lambda d: d["entry"].update(event="Not An Event"), "entry.event"),
    ("unknown wait event", lambda d: d["steps"]["s4"].update(event="pizza.delivered"), "steps.s4.event"),
    ("unknown goal event", lambda d: d["goal"].update(event="lottery.won"), "goal.event"),
    ("unknown step type", lambda d: d["steps"]["s9"].update(type="teleport"), "steps.s9.type"),
    ("unknown next step", lambda d: d["steps"]["s2"].update(next="s99"), "steps.s2.next"),
    ("missing next", lambda d: d["steps"]["s2"].pop("next"), "steps.s2.next"),
    ("unknown start", lambda d: d.update(start="nowhere"), "start"),
    ("unknown branch target", lambda d: d["steps"]["s5"]["cases"][1].update(next="zz"), "steps.s5.cases[1].next"),
    ("unknown engagement step", lambda d: d["steps"]["s5"]["cases"][1]["when"].update(step="s77"),
     "steps.s5.cases[1].when.step"),
    ("engagement on a wait", lambda d: d["steps"]["s5"]["cases"][1]["when"].update(step="s2"),
     "steps.s5.cases[1].when.step"),
    ("branch without default", lambda d: d["steps"]["s5"].pop("default"), "steps.s5.default"),
    ("split not summing to 100", lambda d: d["steps"]["s6"]["variants"][0].update(weight=30), "steps.s6.variants"),
    ("unreachable step", lambda d: d["steps"].update(orphan={"type": "exit"}), "steps.orphan"),
    ("loop without an exit", lambda d: d["steps"].update(
        s9={"type": "webhook", "event": "journey.step", "next": "s2"}), "steps.s10"),
    ("unknown template", lambda d: d["steps"]["s1"].update(template_id="0" * 32), "steps.s1.template_id"),
    ("unknown template version", lambda d: d["steps"]["s1"].update(template_version=9), "steps.s1.template_version"),
    ("unknown segment", lambda d: d.update(entry={"type": "segment", "segment_id": "1" * 32}), "entry.segment_id"),
    ("unknown topic", lambda d: d.update(topic_id="2" * 32), "topic_id"),
    ("unknown purpose", lambda d: d.update(purpose="fun"), "purpose"),
    ("unknown entry type", lambda d: d.update(entry={"type": "moon"}), "entry.type"),
    ("notice with merge fields", lambda d: d["steps"]["s8"].update(text="{{ given_name }} was discharged"),
     "steps.s8.text"),
    ("notice with PHI", lambda d: d["steps"]["s8"].update(text="Patient with HIV discharged 03/14/2026"),
     "steps.s8.text"),
    ("notice to nobody", lambda d: d["steps"]["s8"].pop("role"), "steps.s8.role"),
    ("notice to a stranger", lambda d: d["steps"]["s8"].update(role=None, user_id="3" * 32), "steps.s8.user_id"),
    ("bad re-entry", lambda d: d["reentry"].pop("days"), "reentry.days"),
    ("bad weekday", lambda d: d["steps"]["s3"].update(weekdays=[0]), "steps.s3.weekdays[0]"),
    ("bad local time", lambda d: d["steps"]["s3"].update(time="25:00"), "steps.s3.time"),
    ("bad offset", lambda d: d.update(entry={"type": "date", "field": "refill_due", "offset": "soon"}), "entry.offset"),
    ("unknown date field", lambda d: d.update(entry={"type": "date", "field": "wedding_day"}), "entry.field"),
    ("ordering op on text", lambda d: d["steps"]["s5"]["cases"][0]["when"].update(op="gt"),
     "steps.s5.cases[0].when.op"),
    ("layout of an unknown step", lambda d: d["layout"].update(s42={"x": 1, "y": 2}), "layout.s42"),
]


@pytest.mark.parametrize("what,change,path", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_naming_the_json_path(world, what, change, path):
    org_id = world["org_id"]
    with org_session(org_id) as s:
        d = copy.deepcopy(definition(world["template"]))
        change(d)
        found = paths(s, org_id, d)
        assert path in found, (what, found)
        # the message never echoes the text of a notice
        assert all("HIV" not in m and "given_name" not in m for m in found.values())


def test_template_phi_lint_per_purpose_and_a_step_limit(world):
    org_id = world["org_id"]
    with org_session(org_id) as s:
        # a template printing diagnoses may go out for treatment, not for marketing
        d = definition(world["diag"])
        assert validate_definition(s, org_id, d) == []
        found = paths(s, org_id, definition(world["diag"], purpose="marketing"))
        assert "steps.s1.template_version" in found and "diagnosis" in found["steps.s1.template_version"]
        # 200 steps at most
        many = {f"w{i}": {"type": "wait", "duration": "1d", "next": f"w{i + 1}"} for i in range(200)}
        many["w200"] = {"type": "exit"}
        found = paths(s, org_id, {"purpose": "treatment", "entry": {"type": "event", "event": "form.submitted"},
                                  "start": "w0", "steps": many})
        assert list(found) == ["steps"] and "200" in found["steps"]
        # a definition that is not an object, and one missing everything
        assert paths(s, org_id, []) == {"": "A definition is a JSON object."}
        assert {"purpose", "entry", "start"} <= set(paths(s, org_id, {"steps": {}}))


def test_references_are_looked_up_in_the_callers_organization_only(world, session):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    with org_session(other.id) as s:
        found = paths(s, other.id, definition(world["template"], entry={"type": "segment",
                                                                        "segment_id": world["segment"]}))
    assert {"steps.s1.template_id", "entry.segment_id"} <= set(found)


def test_an_organizations_own_events_are_known(world):
    from carepost.tracking import conversions

    org_id = world["org_id"]
    with org_session(org_id) as s:
        d = definition(world["template"], entry={"type": "event", "event": "vaccine.reminder_due"})
        assert "entry.event" in paths(s, org_id, d)
        conversions.record_event(s, org_id, name="vaccine.reminder_due", contact_id=world["contacts"][0])
        s.flush()
        assert validate_definition(s, org_id, d) == []


def _create(s, org_id, d, who, name="Post-visit follow-up"):
    return service.create_journey(s, org_id, {"name": name, "definition": d}, who)


def test_versions_are_immutable_once_published_and_publish_modes_are_recorded(world):
    org_id = world["org_id"]
    author = person(org_id)
    with org_session(org_id) as s:
        row = _create(s, org_id, definition(world["template"]), author)
        assert row.status == "draft" and service.get_version(s, row).version == 1
        # an invalid definition changes nothing
        with pytest.raises(DefinitionInvalid) as exc:
            service.save_definition(s, row, definition(world["template"], start="zz"), author)
        assert exc.value.field == "definition.start"
        assert exc.value.to_dict()["errors"][0]["field"] == "definition.start"
        # editing the draft changes version 1 in place
        d2 = definition(world["template"])
        d2["steps"]["s2"]["duration"] = "3d"
        assert service.save_definition(s, row, d2, author).version == 1
        ver, migrated = service.publish(s, row, author)
        assert (ver.version, ver.migration_mode, migrated, row.status, row.current_version) == (1, "drain", 0, "live", 1)
        with pytest.raises(Conflict):
            service.publish(s, row, author)
        # a run on version 1 at s4, one at s2
        runs = [JourneyRun(id=new_id(), org_id=org_id, journey_id=row.id, version=1, version_id=ver.id,
                           contact_id=c, state="waiting", step_id=step, active_key=c, entry_key=new_id())
                for c, step in zip(world["contacts"], ("s4", "s2"))]
        s.add_all(runs)
        s.flush()
        # a save after publishing starts version 2; version 1 keeps its definition
        d3 = definition(world["template"])
        d3["steps"].pop("s3")
        d3["steps"]["s2"]["next"] = "s4"
        d3["steps"]["s2"]["duration"] = "1d"
        d3["steps"]["s4"]["timeout"] = "5d"
        d3["steps"]["s1"]["next"] = "s4"
        d3["steps"].pop("s2")
        v2 = service.save_definition(s, row, d3, author)
        assert v2.version == 2
        assert s.get(JourneyVersion, ver.id).definition["steps"]["s2"]["duration"] == "3d"
        # a second publish must say what happens to the runs
        with pytest.raises(ValidationFailed) as exc:
            service.publish(s, row, author)
        assert exc.value.field == "mode"
        v2, migrated = service.publish(s, row, author, mode="migrate")
        assert (v2.migration_mode, migrated) == ("migrate", 1)
        s.refresh(runs[0])
        s.refresh(runs[1])
        assert (runs[0].version, runs[0].version_id) == (2, v2.id)  # s4 exists in version 2
        assert runs[1].version == 1  # s2 is gone there: it drains on version 1
        v3 = service.save_definition(s, row, definition(world["template"]), author)
        v3, migrated = service.publish(s, row, author, mode="drain")
        assert (v3.version, v3.migration_mode, migrated, row.current_version) == (3, "drain", 0, 3)
        s.refresh(runs[0])
        assert runs[0].version == 2


def test_approval_rules_marketing_purpose_and_sensitive_segment(world):
    org_id = world["org_id"]
    author, compliance = person(org_id), person(org_id)
    marketer = person(org_id, None, Permission.JOURNEYS_MANAGE, Permission.JOURNEYS_READ)
    with org_session(org_id) as s:
        treat = _create(s, org_id, definition(world["template"]), author, "Treatment")
        assert service.approval_reasons(s, org_id, service.get_version(s, treat).definition) == []
        service.publish(s, treat, author)  # no approval needed
        promo = _create(s, org_id, definition(world["marketing"], purpose="marketing"), author, "Promo")
        with pytest.raises(Conflict) as exc:
            service.publish(s, promo, author)
        assert exc.value.code == "approval_required" and "marketing" in exc.value.message
        with pytest.raises(PermissionDenied):
            service.approve(s, promo, marketer)  # no campaigns:approve
        with pytest.raises(PermissionDenied) as exc:
            service.approve(s, promo, author)  # the author never approves
        assert exc.value.code == "self_approval"
        ver = service.approve(s, promo, compliance)
        assert ver.approved_by == compliance.user_id
        # a change of the draft voids the approval
        d = definition(world["marketing"], purpose="marketing")
        d["steps"]["s2"]["duration"] = "4d"
        service.save_definition(s, promo, d, author)
        assert service.get_version(s, promo).approved_at is None
        with pytest.raises(Conflict):
            service.publish(s, promo, author)
        service.approve(s, promo, compliance)
        ver, _ = service.publish(s, promo, author)
        assert ver.published_at is not None and promo.status == "live"
        # a sensitive segment (entry or branch) needs approval whatever the purpose
        d = definition(world["template"], entry={"type": "segment", "segment_id": world["sensitive"]})
        assert service.approval_reasons(s, org_id, d) == ["sensitive_segment"]
        d = definition(world["template"])
        d["steps"]["s5"]["cases"][0]["when"] = {"kind": "segment", "segment_id": world["sensitive"]}
        sens = _create(s, org_id, d, author, "Sensitive branch")
        with pytest.raises(Conflict) as exc:
            service.publish(s, sens, author)
        assert exc.value.code == "approval_required"
        service.approve(s, sens, compliance)
        service.publish(s, sens, author)


def test_approval_follows_the_organizations_campaign_rules_too(world):
    from carepost.campaigns.service import set_campaign_settings

    org_id = world["org_id"]
    author, compliance = person(org_id), person(org_id)
    with org_session(org_id) as s:
        treat = definition(world["template"])
        assert service.approval_reasons(s, org_id, treat) == []
        set_campaign_settings(s, org_id, {"approval_required_purposes": ["marketing", "treatment"]})
        assert service.approval_reasons(s, org_id, treat) == ["purpose_rule"]
        set_campaign_settings(s, org_id, {"approval_required_purposes": [], "approval_required_for_all": True})
        assert service.approval_reasons(s, org_id, treat) == ["all_sends"]
        # marketing needs approval whatever the organization's settings
        assert service.approval_reasons(s, org_id, definition(world["marketing"], purpose="marketing")) == \
            ["marketing_purpose"]
        row = _create(s, org_id, treat, author, "Every send approved")
        with pytest.raises(Conflict) as exc:
            service.publish(s, row, author)
        assert exc.value.code == "approval_required"
        service.approve(s, row, compliance)
        service.publish(s, row, author)


def test_pause_resume_archive_and_delete(world):
    org_id = world["org_id"]
    who = person(org_id)
    with org_session(org_id) as s:
        row = _create(s, org_id, definition(world["template"]), who)
        with pytest.raises(Conflict):
            service.pause(s, row)  # a draft is not live
        draft = _create(s, org_id, definition(world["template"]), who, "Never published")
        service.delete_journey(s, draft)
        ver, _ = service.publish(s, row, who)
        service.pause(s, row)
        assert row.status == "paused"
        with pytest.raises(Conflict):
            service.pause(s, row)
        service.resume(s, row)
        assert row.status == "live"
        with pytest.raises(Conflict) as exc:
            service.delete_journey(s, row)
        assert exc.value.code == "published"
        c = world["contacts"][0]
        s.add(JourneyRun(id=new_id(), org_id=org_id, journey_id=row.id, version=1, version_id=ver.id, contact_id=c,
                         state="waiting", step_id="s2", active_key=c, entry_key="e1"))
        s.flush()
        assert service.archive(s, row) == 1
        run = s.scalars(select(JourneyRun).where(JourneyRun.journey_id == row.id)).one()
        assert (run.state, run.exit_reason, run.active_key) == ("exited", "removed", None)
        with pytest.raises(Conflict):
            service.save_definition(s, row, definition(world["template"]), who)
        with pytest.raises(Conflict):
            service.resume(s, row)


def test_analytics_count_runs_steps_exits_goal_drop_off_and_messages(world):
    """Runs and run steps inserted through the models as the engine leaves them (the engine's own
    tests drive real runs); message metrics from tracking's rollups under the step's key."""
    from carepost.tracking import rollups

    org_id = world["org_id"]
    who = person(org_id)
    with org_session(org_id) as s:
        contacts = world["contacts"] + [make_contact(s, org_id, f"q{i}@valid.test") for i in range(9)]
        row = _create(s, org_id, definition(world["template"]), who)
        ver, _ = service.publish(s, row, who)
        now = clock.now()
        # path per contact: steps executed, and where the run is now / how it ended
        plans = (
            [(["s1", "s2"], "waiting", "s2", None)] * 4  # waiting in s2
            + [(["s1", "s2", "s3", "s4"], "waiting", "s4", None)] * 3
            + [(["s1", "s2", "s3", "s4", "s5", "s7", "s8", "s9", "s10"], "completed", "s10", "exit_step")] * 2
            + [(["s1", "s2", "s3", "s4"], "exited", "s4", "goal")] * 2
            + [(["s1"], "exited", "s1", "unsubscribe")] * 1)
        for contact, (steps, state, at, reason) in zip(contacts, plans, strict=True):
            run = JourneyRun(id=new_id(), org_id=org_id, journey_id=row.id, version=1, version_id=ver.id,
                             contact_id=contact, state=state, step_id=at, entry_key=new_id(), seq=len(steps),
                             active_key=contact if state == "waiting" else None, entered_at=now,
                             ended_at=now if reason else None, exit_reason=reason,
                             converted_at=now if reason == "goal" else None)
            s.add(run)
            s.flush()
            for seq, sid in enumerate(steps, start=1):
                step_type = definition(world["template"])["steps"][sid]["type"]
                s.add(JourneyRunStep(id=new_id(), org_id=org_id, run_id=run.id, journey_id=row.id, version_id=ver.id,
                                     step_id=sid, step_type=step_type, seq=seq,
                                     status="sent" if step_type == "send" else "done",
                                     reason="case0" if sid == "s5" else None))
        key = step_key(ver.id, "s1")
        rollups.add(s, org_id=org_id, at=now, metric="accepted", n=12, source="journey", journey_step_id=key)
        rollups.add(s, org_id=org_id, at=now, metric="opened_human", n=5, source="journey", journey_step_id=key)
        s.commit()
        out = analytics.journey_analytics(s, row)
        assert (out["entered"], out["active"], out["reached_goal"]) == (12, 7, 2)
        assert out["exited"] == {"exit_step": 2, "goal": 2, "unsubscribe": 1}
        steps = {n["id"]: n for n in out["steps"]}
        assert list(steps)[:3] == ["s1", "s2", "s3"]
        assert (steps["s1"]["reached"], steps["s2"]["reached"], steps["s4"]["reached"], steps["s10"]["reached"]) == \
            (12, 11, 7, 2)
        assert (steps["s2"]["now"], steps["s4"]["now"], steps["s1"]["now"]) == (4, 3, 0)
        assert steps["s1"]["drop_off"] == 1 and steps["s1"]["left_here"] == {"unsubscribe": 1}
        assert steps["s4"]["drop_off"] == 0 and steps["s4"]["left_here"] == {"goal": 2}
        assert steps["s1"]["messages"] == {"accepted": 12, "opened_human": 5}
        assert steps["s1"]["outcomes"] == {"sent": 12} and steps["s5"]["outcomes"] == {"done:case0": 2}
        edges = {(e["from"], e["to"]): e["runs"] for e in out["edges"]}
        assert edges[("s1", "s2")] == 11 and edges[("s4", "s5")] == 2 and edges[("s5", "s7")] == 2
        # a viewer without unmasked rights sees 1..10 people as <11
        masked = analytics.mask(out)
        assert masked["entered"] == 12 and masked["active"] == "<11" and masked["reached_goal"] == "<11"
        assert {n["id"]: n for n in masked["steps"]}["s4"]["now"] == "<11"
        # a later day: the journey's figures do not depend on the date range
        clock.advance(timedelta(days=3))
        assert analytics.journey_analytics(s, row)["steps"][0]["messages"]["accepted"] == 12


def test_analytics_over_runs_the_engine_moved(sender, session):
    """Real runs: events start them (tracking's record_event -> the engine's entries), the tick
    advances them (a send, a wait, a branch on sex), a goal event ends one; the figures and the
    send step's message metrics (tracking's rollups under the step's key) follow."""
    from carepost.journeys import engine
    from tests.test_journeys_engine import record

    org_id = sender.org_id
    who = person(org_id)
    with org_session(org_id) as s:
        tid, ver = make_template(s, org_id)
        d = {"purpose": "treatment", "entry": {"type": "event", "event": "appointment.booked"},
             "goal": {"event": "appointment.attended", "within_days": 30}, "start": "send",
             "steps": {"send": {"type": "send", "template_id": tid, "template_version": ver, "next": "wait"},
                       "wait": {"type": "wait", "duration": "1d", "next": "sex"},
                       "sex": {"type": "branch", "cases": [{"when": {"kind": "attribute", "field": "sex", "op": "eq",
                                                                     "value": "female"}, "next": "done"}],
                               "default": "later"},
                       "later": {"type": "wait", "duration": "7d", "next": "done"},
                       "done": {"type": "exit"}}}
        row = _create(s, org_id, d, who, "Follow-up")
        ver_row, _ = service.publish(s, row, who)
        women = [make_contact(s, org_id, f"w{i}@valid.test", sex="female") for i in range(3)]
        men = [make_contact(s, org_id, f"m{i}@valid.test", sex="male") for i in range(2)]
        s.commit()
        jid, vid = row.id, ver_row.id
    engine.forget_definitions()
    for cid in women + men:
        record(org_id, cid)
    assert engine.run_tick(org_id, enqueue=False).runs == 5  # each sent, now waiting a day
    record(org_id, men[0], name="appointment.attended")  # the goal ends one run at once
    engine.run_tick(org_id, now=clock.now() + timedelta(days=1, minutes=1), enqueue=False)
    with org_session(org_id) as s:
        out = analytics.journey_analytics(s, service.get_journey(s, org_id, jid))
    assert (out["entered"], out["active"], out["reached_goal"]) == (5, 1, 1)
    assert out["exited"] == {"exit_step": 3, "goal": 1}
    steps = {n["id"]: n for n in out["steps"]}
    assert [n["id"] for n in out["steps"]] == ["send", "wait", "sex", "later", "done"]
    assert (steps["send"]["reached"], steps["wait"]["reached"], steps["sex"]["reached"]) == (5, 5, 4)
    assert (steps["later"]["now"], steps["done"]["reached"]) == (1, 3)
    assert steps["wait"]["left_here"] == {"goal": 1} and steps["wait"]["drop_off"] == 0
    assert steps["send"]["outcomes"] == {"sent": 5}
    assert steps["send"]["messages"].get("accepted") == 5, steps["send"]["messages"]
    edges = {(e["from"], e["to"]): e["runs"] for e in out["edges"]}
    assert edges == {("send", "wait"): 5, ("wait", "sex"): 4, ("sex", "done"): 3, ("sex", "later"): 1}
    assert out["start"] == "send" and out["shown_version"] == 1
    with org_session(org_id) as s:
        assert s.scalar(select(JourneyRunStep.version_id).where(JourneyRunStep.journey_id == jid).limit(1)) == vid
