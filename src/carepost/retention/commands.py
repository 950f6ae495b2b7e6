"""``carepost retention ...``: schedules, legal holds, purges and destruction certificates from
the command line (acting as the system user). Imports stay inside the commands so
``carepost --help`` stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from carepost.accounts.commands import organization_id
from carepost.core.console import console, fail

retention_app = typer.Typer(help="Retention: schedules, legal holds, purges, destruction certificates.",
                            no_args_is_help=True)


def _actor():
    from carepost.retention.service import Actor

    return Actor("system", "cli")


@retention_app.command("schedules")
def schedules(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """Show every record class's schedule."""
    from carepost.core.database import org_session
    from carepost.retention import service

    org_id = organization_id(org)
    with org_session(org_id) as s:
        rows = service.list_schedules(s, org_id)
    table = Table("class", "min days", "max days", "legal min", "purged", "configured by")
    for r in rows:
        table.add_row(r["record_class"], str(r["min_days"] or "-"), str(r["max_days"] or "never"),
                      str(r["legal_min_days"] or "-"), "yes" if r["purged"] else "no", r["configured_by"] or "-")
    console.print(table)


@retention_app.command("set-schedule")
def set_schedule(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    record_class: str = typer.Option(..., "--class", help="Record class (carepost retention schedules lists them)."),
    min_days: int = typer.Option(..., "--min-days", help="Keep at least this many days."),
    max_days: int = typer.Option(..., "--max-days", help="Purge after this many days."),
    inactive_months: int = typer.Option(None, "--inactive-months", help="Contacts class only."),
    disable: bool = typer.Option(False, "--disable", help="Keep the schedule but purge nothing of this class."),
) -> None:
    """Set a record class's minimum and maximum retention (audited as the command line)."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.retention import service

    org_id = organization_id(org)
    with org_session(org_id) as s:
        try:
            service.set_schedule(s, org_id, record_class, min_days=min_days, max_days=max_days,
                                 inactive_months=inactive_months, enabled=not disable, actor=_actor())
        except CarePostError as exc:
            fail(f"{exc.field}: {exc}" if exc.field else str(exc))
        s.commit()
    console.print(f"{record_class}: kept {min_days} to {max_days} days")


@retention_app.command("holds")
def holds(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """List legal holds."""
    from carepost.core.database import org_session
    from carepost.retention import service

    org_id = organization_id(org)
    with org_session(org_id) as s:
        rows = [service.hold_dict(h) for h in service.list_holds(s, org_id)]
    table = Table("id", "scope", "matter", "status", "placed by", "approved by")
    for h in rows:
        table.add_row(h["id"], h["scope"], h["matter"], h["status"], h["placed_by"], h["approved_by"] or "-")
    console.print(table)


@retention_app.command("purge")
def purge_cmd(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would go; delete nothing."),
    chunk: int = typer.Option(2000, "--chunk", min=1, max=50000, help="Records deleted per transaction."),
    pause: float = typer.Option(0.0, "--pause", min=0.0, help="Seconds to wait between chunks (throttle)."),
    duty: float | None = typer.Option(None, "--duty", min=0.01, max=1.0,
                                      help="Share of wall time the purge works (default CAREPOST_RETENTION_PURGE_DUTY; 1 = no rest)."),
    take_over_after: float = typer.Option(120.0, "--take-over-after", min=0.0,
                                          help="Resume a stopped run after this many seconds without progress."),
) -> None:
    """Purge what passed its maximum retention (or resume a stopped purge), destroy the keys of
    emptied months, and write the signed destruction certificate."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.retention import purge

    org_id = organization_id(org)
    if dry_run:
        with org_session(org_id) as s:
            result = purge.plan(s, org_id)
        console.print_json(json.dumps(result))
        return
    try:
        run = purge.run_purge(org_id, _actor(), chunk=chunk, pause=pause, duty=duty,
                              stale_seconds=take_over_after)
    except CarePostError as exc:
        fail(str(exc), 2)
    for record_class, e in run["progress"].items():
        console.print(f"{record_class}: {e['count']} deleted"
                      + (f", keys destroyed: {', '.join(e['keys'])}" if e.get("keys") else ""))
    console.print(f"run {run['id']} finished; certificate {run['certificate_id']}")


@retention_app.command("certificate")
def certificate(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    run: str = typer.Option(..., "--run", help="The purge run's id."),
    out: Path = typer.Option(..., "--out", help="File to write the signed JSON to."),
) -> None:
    """Write a purge run's signed destruction certificate."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.retention import purge

    org_id = organization_id(org)
    with org_session(org_id) as s:
        try:
            bundle = purge.certificate_bundle(s, org_id, run)
        except CarePostError as exc:
            fail(str(exc))
    out.write_text(json.dumps(bundle, indent=2))
    console.print(f"wrote {out}")


@retention_app.command("verify-certificate")
def verify_certificate(
    path: Path = typer.Argument(..., help="A certificate written by `carepost retention certificate` or downloaded."),
    public_key: str = typer.Option(None, "--public-key", help="The organization's published key (base64) to pin."),
) -> None:
    """Check a destruction certificate's signature offline (no database needed)."""
    from carepost.retention.purge import verify_bundle

    try:
        bundle = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read {path}: {exc}")
    ok, why = verify_bundle(bundle, public_key)
    if not ok:
        fail(f"NOT VALID: {why}", 3)
    console.print(f"valid: {why}")
