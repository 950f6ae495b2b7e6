"""``carepost compliance ...``: the compliance center from the command line.
Imports stay inside the commands so ``carepost --help`` stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from carepost.core.console import console, fail

compliance_app = typer.Typer(help="The compliance center: de-identified exports, reports, training reminders.",
                             no_args_is_help=True)


@compliance_app.command("report")
def report(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    out: Path = typer.Option(..., "--out", help="File to write (mode 0600): .csv, .pdf or .json."),
    start: str = typer.Option(None, "--start", help="First day (YYYY-MM-DD); default 29 days before --end."),
    end: str = typer.Option(None, "--end", help="Last day (YYYY-MM-DD); default today."),
) -> None:
    """Write the compliance report (PHI access, unusual volume, protection, consent, MFA, dormant
    accounts and keys, expiring keys, audit chain, training) as CSV, PDF or JSON; audited."""
    import json

    from carepost.accounts.service import get_organization
    from carepost.audit.service import record
    from carepost.compliance import reports
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError

    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("csv", "pdf", "json"):
        fail("--out: name a .csv, .pdf or .json file", 2)
    with system_session() as session:
        try:
            org_id = get_organization(session, org).id
        except CarePostError as exc:
            fail(exc.message, 2)
    with org_session(org_id) as session:
        try:
            rep = reports.build(session, org_id, start, end)
        except CarePostError as exc:
            fail(f"--{exc.field}: {exc.message}" if exc.field else exc.message, 2)
        record(session, org_id=org_id, actor_type="system", actor_id=None, action="compliance.report.generated",
               target_type="organization", target_id=org_id,
               details={"period_start": rep["period_start"], "period_end": rep["period_end"], "format": fmt})
        session.commit()
    data = (reports.to_csv(rep) if fmt == "csv" else reports.to_pdf(rep) if fmt == "pdf"
            else json.dumps(rep, indent=2).encode())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    console.print(f"Wrote the compliance report {rep['period_start']} to {rep['period_end']} ({fmt}) to {out}; "
                  f"{rep['protection']['without_verified_protection']} PHI messages without verified protection, "
                  f"audit chain {'verified' if rep['audit_chain']['ok'] else 'FAILED'}.", highlight=False)


@compliance_app.command("remind")
def remind(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """Email the people whose policy and training acknowledgement is missing or ends soon (the
    daily task does this too; at most once a week per person)."""
    from carepost.accounts.service import get_organization
    from carepost.compliance.training import send_reminders
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            org_id = get_organization(session, org).id
        except CarePostError as exc:
            fail(exc.message, 2)
    with org_session(org_id) as session:
        reminded = send_reminders(session, org_id)
        session.commit()
    console.print(f"Reminded {len(reminded)} people.", highlight=False)


@compliance_app.command("deidentify")
def deidentify(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    segment: str = typer.Option(..., "--segment", help="The saved segment's id."),
    out: Path = typer.Option(..., "--out", help="File to write (mode 0600): .jsonl, or .zip for CSV."),
    fmt: str = typer.Option(None, "--format", help="jsonl or csv (default: from the file name; .zip or .csv is csv)."),
) -> None:
    """Export a segment's contacts and clinical facts de-identified by the Safe Harbor method
    (45 CFR 164.514(b)(2)); audited as the command line (system) user."""
    from carepost.accounts.service import get_organization
    from carepost.compliance import service
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError
    from carepost.segments.service import SYSTEM

    fmt = fmt or ("csv" if out.suffix.lower() in (".zip", ".csv") else "jsonl")
    with system_session() as session:
        try:
            org_id = get_organization(session, org).id
        except CarePostError as exc:
            fail(exc.message, 2)
    with org_session(org_id) as session:
        try:
            job = service.create_export(session, org_id, segment, fmt, SYSTEM)
        except CarePostError as exc:
            fail(f"{exc.field}: {exc.message}" if exc.field else exc.message, 2)
        session.commit()
        job_id = job.id
        job = service.run_export(session, org_id, job_id)
        if job.status != "succeeded":
            fail(job.failure or "the export failed")
        _name, _media, data = service.download(session, org_id, job_id, SYSTEM)
        session.commit()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    console.print(f"Wrote {job.subject_count} subjects and {job.fact_count} facts ({fmt}) to {out}; "
                  f"export {job_id}, sha256 {job.sha256}.", highlight=False)


@compliance_app.command("evidence")
def evidence_pack(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    out: Path = typer.Option(..., "--out", help="The pack to write (a ZIP, mode 0600)."),
) -> None:
    """Build the signed evidence pack for an auditor (issue 16 item 11): configuration, doctor,
    controls mapped to 164.308/310/312/316, audit chain verification, retention and holds, consent,
    keys, delivery protection, risk-analysis inputs; Ed25519-signed manifest. Prints the key's
    fingerprint. Audited as the command line (system) user."""
    from carepost.accounts.service import get_organization
    from carepost.compliance import evidence
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            org_id = get_organization(session, org).id
        except CarePostError as exc:
            fail(f"--org: {exc.message}", 2)
    with org_session(org_id) as session:
        pack = evidence.build_pack(session, org_id, actor_type="system", actor_id="cli")
        session.commit()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pack.content)
    console.print(f"Wrote the evidence pack to {out} ({len(pack.files)} files, manifest sha256 {pack.manifest_sha256}).",
                  highlight=False)
    console.print(f"Signed with Ed25519 key {pack.fingerprint}", highlight=False)
    console.print("Give the auditor this fingerprint separately; they check the pack with "
                  "`carepost compliance verify-evidence FILE --key FINGERPRINT`.", highlight=False)


@compliance_app.command("verify-evidence")
def verify_evidence(
    file: Path = typer.Argument(..., help="The evidence pack (ZIP)."),
    key: str = typer.Option(None, "--key", help="The signing key's fingerprint, as the organization gave it."),
) -> None:
    """Check an evidence pack offline: the Ed25519 signature of its manifest, then every file's
    SHA-256. Exit 0 if it verifies; 1 naming the file at fault."""
    from carepost.compliance import evidence

    try:
        data = file.read_bytes()
    except OSError as exc:
        fail(f"FILE: cannot read {file}: {exc.strerror}", 2)
    try:
        result = evidence.verify_pack(data, expect_fingerprint=key)
    except evidence.PackRefused as exc:
        fail(f"REFUSED: {exc}")
    console.print(f"OK: {result.files} files match the manifest signed by Ed25519 key {result.fingerprint} "
                  f"({result.organization.get('name')}, {result.generated_at}).", highlight=False)
    if not key:
        console.print("Compare the key fingerprint with the one the organization gave you (or pass --key).",
                      highlight=False)
