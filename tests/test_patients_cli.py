"""``carepost import --org ORG FILE...``: FHIR and CSV files, summary, exit codes."""

from __future__ import annotations

import json

from sqlalchemy import func, select
from typer.testing import CliRunner

from carepost.patients.models import Condition, Contact, ImportJob


def run_cli(*args):
    from carepost.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_import_fhir_and_csv_files(db, org, session, tmp_path):
    from carebundle import generate_bundle, to_json

    bundle = tmp_path / "synthea.json"
    bundle.write_text(to_json(generate_bundle(profile="hypertension", seed=9)))
    csv_file = tmp_path / "practice.csv"
    csv_file.write_text("Account Number,First Name,Last Name,DOB,Email\n900,Ann,Lee,02/03/1970,ann@example.org\n901,Bo,Kim,1981-07-08,\n")
    result = run_cli("import", "--org", org.slug, str(bundle), str(csv_file))
    assert result.exit_code == 0, result.output
    assert "synthea.json" in result.output and "practice.csv" in result.output and "succeeded" in result.output
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Contact)) == 3
    assert session.scalar(select(func.count()).select_from(Condition)) > 0
    jobs = session.scalars(select(ImportJob)).all()
    assert {j.status for j in jobs} == {"succeeded"} and all(j.created_by == "cli" for j in jobs)
    # importing again updates, never duplicates
    assert run_cli("import", "--org", org.slug, str(bundle), str(csv_file)).exit_code == 0
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Contact)) == 3


def test_failed_records_exit_non_zero_with_summary(db, org, tmp_path):
    f = tmp_path / "bad.ndjson"
    f.write_text("\n".join([
        json.dumps({"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"}),
        json.dumps({"resourceType": "Condition", "id": "c9", "subject": {"reference": "Patient/ghost"}}),
    ]) + "\n")
    result = run_cli("import", "--org", org.slug, str(f))
    assert result.exit_code == 1
    assert "Condition/c9" in result.output and "completed_with_errors" in result.output


def test_unreadable_file_and_unknown_org(db, org, tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('{"resourceType": "Bundle", "type": "collection", "entry": [')
    result = run_cli("import", "--org", org.slug, str(f))
    assert result.exit_code == 2 and "not valid JSON" in result.output
    assert run_cli("import", "--org", "no-such-org", str(f)).exit_code == 2
    assert run_cli("import", "--org", org.slug, str(tmp_path / "missing.csv")).exit_code == 2
