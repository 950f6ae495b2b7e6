"""Export (JSONL, CSV) for a time range, with the checkpoint trailer, and the
``carepost audit verify`` / ``carepost audit export`` commands."""

from __future__ import annotations

import csv
import io
import json
import shutil
import stat
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from carepost.audit import checkpoints
from carepost.audit.export import stream_export
from carepost.audit.models import AuditEvent
from carepost.audit.service import EVENT_FIELDS, chain_key, event_hash, record
from carepost.core import clock


@pytest.fixture(autouse=True)
def fresh_checkpoints(db):
    shutil.rmtree(checkpoints.checkpoint_dir(), ignore_errors=True)
    yield


def append(session, org_id, n, action="contact.read", step=None):
    out = []
    for i in range(n):
        out.append(record(session, org_id=org_id, actor_type="user", actor_id="u1", action=action,
                          target_type="contact", target_id=f"c{i}", user_agent="=HYPERLINK(\"x\")"))
        if step:
            clock.advance(step)
    session.commit()
    return out


def run_cli(*args):
    """The CLI in-process. Its logging setup binds the runner's stderr, which is closed after
    the invocation, so logging is put back afterwards."""
    from carepost.cli import app
    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    try:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        configure_logging(get_settings().log_level, get_settings().log_json)


def test_jsonl_export_has_every_field_and_a_checkpoint_trailer(session, org):
    events = append(session, org.id, 3)
    lines = "".join(stream_export(org.id, fmt="jsonl")).splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["record_type"] for r in records] == ["event"] * 3 + ["checkpoint"]
    first = records[0]
    assert set(EVENT_FIELDS) <= set(first) and first["id"] == events[0].id and first["hash"] == events[0].hash
    trailer = records[-1]
    assert trailer["event_count"] == 3
    assert trailer["checkpoint"]["seq"] == 3 and trailer["head"]["seq"] == 3
    # The export is exact: every hash can be recomputed from the exported fields.
    key = chain_key(session, org.id)
    for r in records[:-1]:
        clone = AuditEvent(**{k: v for k, v in r.items() if k not in ("record_type", "occurred_at")})
        clone.occurred_at = datetime.strptime(r["occurred_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert event_hash(key, clone) == r["hash"]


def test_csv_export_and_formula_cells(session, org):
    append(session, org.id, 2)
    body = "".join(stream_export(org.id, fmt="csv"))
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [r["record_type"] for r in rows] == ["event", "event", "checkpoint"]
    assert rows[0]["user_agent"].startswith("'=")  # not a live formula in a spreadsheet
    assert json.loads(rows[0]["details"]) == {}
    trailer = json.loads(rows[-1]["details"])
    assert trailer["head"]["seq"] == 2 and rows[-1]["seq"] == "2"


def test_export_time_range(session, org):
    start = clock.now()
    append(session, org.id, 6, step=timedelta(hours=1))
    since, until = start + timedelta(minutes=90), start + timedelta(hours=4, minutes=30)
    lines = [json.loads(x) for x in "".join(stream_export(org.id, since=since, until=until)).splitlines()]
    assert [r["seq"] for r in lines if r["record_type"] == "event"] == [3, 4, 5]
    assert lines[-1]["event_count"] == 3 and lines[-1]["since"].startswith(since.strftime("%Y-%m-%dT%H:%M"))


def test_export_is_scoped_to_one_chain(session, org):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    append(session, org.id, 2)
    append(session, other.id, 3, action="other.secret")
    body = "".join(stream_export(org.id))
    assert "other.secret" not in body and other.id not in body


def test_cli_verify_ok_and_audited(session, org):
    append(session, org.id, 3)
    result = run_cli("audit", "verify", "--org", org.slug)
    assert result.exit_code == 0, result.output
    assert "intact" in result.output
    session.rollback()
    ev = session.scalar(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.action == "audit.verify"))
    assert (ev.actor_type, ev.actor_id, ev.outcome) == ("system", "cli", "success")


def test_cli_verify_all_chains_fails_naming_first_bad_event(session, org):
    events = append(session, org.id, 4)
    session.execute(text("UPDATE audit_events SET action = 'contact.list' WHERE id = :id"), {"id": events[1].id})
    session.commit()
    result = run_cli("audit", "verify")
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "FAILED" in out and "seq 2" in out and events[1].id in out and "altered" in out
    session.rollback()
    ev = session.scalar(select(AuditEvent).where(AuditEvent.chain == "system", AuditEvent.action == "audit.verify"))
    assert ev.outcome == "failure" and ev.details["first_bad_event_id"] == events[1].id


def test_cli_verify_with_exported_checkpoint_detects_truncation(session, org, tmp_path):
    append(session, org.id, 3)
    export_file = tmp_path / "audit.jsonl"
    assert run_cli("audit", "export", "--org", org.slug, "--output", str(export_file)).exit_code == 0
    csv_file = tmp_path / "audit.csv"
    assert run_cli("audit", "export", "--org", org.slug, "--format", "csv", "-o", str(csv_file)).exit_code == 0
    assert stat.S_IMODE(export_file.stat().st_mode) == 0o600
    # Truncate the newest events, rewind the head consistently and remove this machine's checkpoint.
    session.execute(text("DELETE FROM audit_events WHERE chain = :c AND seq >= 3"), {"c": org.id})
    session.execute(text("UPDATE audit_chain_heads SET seq = 2, hash = (SELECT hash FROM audit_events "
                         "WHERE chain = :c AND seq = 2) WHERE chain = :c"), {"c": org.id})
    session.commit()
    checkpoints.checkpoint_path(org.id).unlink()
    assert run_cli("audit", "verify", "--org", org.slug).exit_code == 0  # no evidence left here
    # Each export recorded itself (seq 4, then seq 5) before writing its trailer.
    for f, recorded in ((export_file, 4), (csv_file, 5)):
        assert checkpoints.load_file(f)[-1].seq == recorded
        result = run_cli("audit", "verify", "--org", org.slug, "--checkpoint", str(f))
        assert result.exit_code == 1, result.output
        out = " ".join(result.output.split())
        assert "truncated" in out and f"records seq {recorded}" in out


def test_cli_export_stdout_range_and_audit_event(session, org):
    start = clock.now()
    append(session, org.id, 4, step=timedelta(days=1))
    until = (start + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    result = run_cli("audit", "export", "--org", org.id, "--until", until)
    assert result.exit_code == 0
    records = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["seq"] for r in records if r["record_type"] == "event"] == [1, 2]
    session.rollback()
    ev = session.scalar(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.action == "audit.export"))
    assert (ev.actor_type, ev.actor_id, ev.details["format"]) == ("system", "cli", "jsonl")


def test_cli_bad_input_names_the_option(session, org, tmp_path):
    r = run_cli("audit", "export", "--org", "no-such-org")
    assert r.exit_code == 2 and "--org" in r.output
    r = run_cli("audit", "export", "--org", org.slug, "--since", "last tuesday")
    assert r.exit_code == 2 and "--since" in r.output
    r = run_cli("audit", "export", "--org", org.slug, "--format", "xml")
    assert r.exit_code == 2 and "--format" in r.output
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"hello": 1}')
    r = run_cli("audit", "verify", "--checkpoint", str(bogus))
    assert r.exit_code == 2 and "--checkpoint" in r.output
    session.rollback()
    assert session.scalar(select(AuditEvent.id).where(AuditEvent.action == "audit.export")) is None
