"""``carepost journeys ...`` through the real entry point (a subprocess on the test's storage), on
SQLCipher and PostgreSQL: validate a definition file offline and against an organization (every
JSON path printed, exit 1), list, show, publish (refused until approved; migrate|drain named on a
second publish), pause, resume, runs of a journey and of a contact, and one tick of the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from carepost.core import clock
from carepost.core.database import org_session
from carepost.core.ids import new_id
from carepost.journeys import service
from carepost.journeys.models import Journey, JourneyRun, JourneyVersion
from tests.test_campaigns_planning import make_contact
from tests.test_journeys_definitions import definition, make_template, person

ROOT = Path(__file__).resolve().parents[1]


def carepost(storage, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **storage.env, "CAREPOST_LOG_JSON": "true", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "carepost.cli", "journeys", *args], check=False, cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=180)


def carepost_here(storage, *args: str) -> subprocess.CompletedProcess:
    """The same command run in this process (the same Typer app and code, without the 3-4 s of
    CPU each new process spends importing the CLI): for the many steps after the first real call."""
    from typer.testing import CliRunner

    from carepost.cli import app

    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["journeys", *args])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def world(org, session):
    with org_session(org.id) as s:
        template = make_template(s, org.id)
        marketing = make_template(s, org.id, purpose="marketing")
        contact = make_contact(s, org.id, "cli@valid.test")
        s.commit()
    return {"org_id": org.id, "slug": org.slug, "template": template, "marketing": marketing, "contact": contact}


@pytest.mark.slow  # each subprocess imports the whole CLI (3-4 s of CPU)
def test_validate_a_definition_file(storage, world, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(definition(world["template"])))
    r = carepost(storage, "validate", str(good))
    assert r.returncode == 0 and "good.json: valid" in r.stdout, r.stdout + r.stderr
    # against the organization: the template is found; in another file, an unknown one is named
    r = carepost(storage, "validate", str(good), "--org", world["slug"])
    assert r.returncode == 0 and "valid" in r.stdout, r.stdout + r.stderr
    bad_def = definition(world["template"])
    bad_def["steps"]["s2"]["duration"] = "0m"
    bad_def["steps"]["s5"].pop("default")
    bad_def["steps"]["s1"]["template_id"] = "0" * 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"definition": bad_def}))
    r = carepost(storage, "validate", str(bad))  # offline: shape and graph only
    assert r.returncode == 1
    assert "steps.s2.duration: A wait must be longer than zero." in r.stdout
    assert "steps.s5.default:" in r.stdout and "steps.s1.template_id" not in r.stdout
    r = carepost(storage, "validate", str(bad), "--org", world["slug"])
    assert r.returncode == 1 and "steps.s1.template_id: No such template in this organization." in r.stdout
    assert "3 problems in bad.json" in r.stderr
    notjson = tmp_path / "broken.json"
    notjson.write_text("{\"purpose\": ")
    r = carepost(storage, "validate", str(notjson))
    assert r.returncode == 2 and "not JSON" in r.stderr


@pytest.mark.slow
def test_list_show_publish_pause_runs_and_tick(storage, world, session):
    org_id = world["org_id"]
    author, compliance = person(org_id), person(org_id)
    with org_session(org_id) as s:
        d = {"purpose": "treatment", "entry": {"type": "event", "event": "appointment.booked"}, "start": "w",
             "steps": {"w": {"type": "wait", "duration": "1h", "next": "n"},
                       "n": {"type": "webhook", "event": "journey.step", "next": "x"}, "x": {"type": "exit"}}}
        row = service.create_journey(s, org_id, {"name": "CLI journey", "definition": d}, author)
        promo = service.create_journey(s, org_id, {"name": "CLI promo", "definition": definition(
            world["marketing"], purpose="marketing")}, author)
        s.commit()
        jid, pid = row.id, promo.id
    slug = world["slug"]
    r = carepost(storage, "list", "--org", slug)
    assert r.returncode == 0 and jid in r.stdout and "CLI journey" in r.stdout and "draft" in r.stdout, r.stderr
    r = carepost_here(storage, "publish", pid, "--org", slug)
    assert r.returncode == 2 and "approval" in r.stderr, r.stdout + r.stderr
    with org_session(org_id) as s:
        service.approve(s, service.get_journey(s, org_id, pid), compliance)
        s.commit()
    r = carepost_here(storage, "publish", pid, "--org", slug)
    assert r.returncode == 0 and "published" in r.stdout, r.stderr
    r = carepost_here(storage, "publish", jid, "--org", slug)
    assert r.returncode == 0 and f"published {jid} v1 (drain; 0 runs migrated): live" in r.stdout, r.stderr
    # a second version: the mode must be named
    with org_session(org_id) as s:
        d2 = json.loads(json.dumps(d))
        d2["steps"]["w"]["duration"] = "2h"
        service.save_definition(s, service.get_journey(s, org_id, jid), d2, author)
        v1 = s.scalars(select(JourneyVersion).where(JourneyVersion.journey_id == jid, JourneyVersion.version == 1)).one()
        c = world["contact"]
        s.add(JourneyRun(id=new_id(), org_id=org_id, journey_id=jid, version=1, version_id=v1.id, contact_id=c,
                         state="waiting", step_id="n", active_key=c, entry_key="cli",
                         wake_at=clock.now() - timedelta(minutes=1)))
        s.commit()
    r = carepost_here(storage, "publish", jid, "--org", slug)
    assert r.returncode == 2 and "migrate or drain" in r.stderr, r.stderr
    r = carepost_here(storage, "publish", jid, "--org", slug, "--mode", "sideways")
    assert r.returncode == 2
    r = carepost_here(storage, "publish", jid, "--org", slug, "--mode", "migrate")
    assert r.returncode == 0 and "v2 (migrate; 1 runs migrated)" in r.stdout, r.stderr
    r = carepost_here(storage, "show", jid, "--org", slug)
    assert r.returncode == 0, r.stderr
    assert "status: live" in r.stdout and "v1  published" in r.stdout and "(migrate)" in r.stdout
    assert "entered 1, active 1" in r.stdout
    r = carepost_here(storage, "runs", jid, "--org", slug)
    assert r.returncode == 0 and world["contact"] in r.stdout and "waiting" in r.stdout, r.stderr
    r = carepost_here(storage, "runs", "--contact", world["contact"], "--org", slug)
    assert r.returncode == 0 and jid in r.stdout, r.stderr
    assert carepost_here(storage, "runs", "--org", slug).returncode == 2
    # paused: the tick leaves the run alone; resumed: it advances it to the end
    assert carepost_here(storage, "pause", jid, "--org", slug).stdout.strip() == f"{jid}: paused"
    r = carepost_here(storage, "tick", "--org", slug)
    assert r.returncode == 0 and "0 runs advanced" in r.stdout, r.stdout + r.stderr
    assert carepost_here(storage, "resume", jid, "--org", slug).stdout.strip() == f"{jid}: live"
    r = carepost_here(storage, "tick", "--org", slug)
    assert r.returncode == 0 and "1 runs advanced" in r.stdout, r.stdout + r.stderr
    session.commit()
    run = session.scalars(select(JourneyRun).where(JourneyRun.journey_id == jid)).one()
    assert (run.state, run.exit_reason) == ("completed", "exit_step")
    # refusals name the problem; nothing changed
    r = carepost_here(storage, "pause", "f" * 32, "--org", slug)
    assert r.returncode == 2 and "No such journey" in r.stderr
    assert session.get(Journey, jid).status == "live"
    from carepost.audit.models import AuditEvent

    actions = {e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.actor_id == "cli"))}
    assert {"journey.published", "journey.paused", "journey.resumed", "journey.runs_read"} <= actions
