"""``carepost compliance ...``: the compliance center from the command line.
Imports stay inside the commands so ``carepost --help`` stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

compliance_app = typer.Typer(help="The compliance center: de-identified exports.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


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
            _fail(exc.message, 2)
    with org_session(org_id) as session:
        try:
            job = service.create_export(session, org_id, segment, fmt, SYSTEM)
        except CarePostError as exc:
            _fail(f"{exc.field}: {exc.message}" if exc.field else exc.message, 2)
        session.commit()
        job_id = job.id
        job = service.run_export(session, org_id, job_id)
        if job.status != "succeeded":
            _fail(job.failure or "the export failed")
        _name, _media, data = service.download(session, org_id, job_id, SYSTEM)
        session.commit()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    console.print(f"Wrote {job.subject_count} subjects and {job.fact_count} facts ({fmt}) to {out}; "
                  f"export {job_id}, sha256 {job.sha256}.", highlight=False)
