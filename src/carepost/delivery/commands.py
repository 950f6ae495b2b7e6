"""``carepost domain ...`` and ``carepost smtp``: sending domains from the command line, and SMTP
submission. Imports stay inside the commands so ``carepost --help`` stays fast."""

from __future__ import annotations

import typer
from rich.table import Table

from carepost.core.console import console, err, fail

domain_app = typer.Typer(help="Sending domains: DKIM keys and the DNS records to publish.", no_args_is_help=True)


def _print_records(view: dict) -> None:
    console.print(f"Publish these DNS records for [bold]{view['domain']}[/bold]:\n")
    records = view["records"] if view.get("verified") else [view["ownership_record"], *view["records"]]
    for record in records:
        console.print(f"[bold]{record['purpose']}[/bold]  {record['type']}  {record['name']}")
        console.print(f"  {record['value']}", soft_wrap=True, highlight=False)
        if record.get("note"):
            console.print(f"  [dim]{record['note']}[/dim]")
        console.print()


@domain_app.command("add")
def domain_add(
    domain: str = typer.Argument(..., help="The domain to send from, e.g. bar.example."),
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    no_ed25519: bool = typer.Option(False, "--no-ed25519", help="RSA-2048 only, no second (Ed25519) DKIM signature."),
) -> None:
    """Add a sending domain (new DKIM keys, private keys encrypted) and print its DNS records."""
    from carepost.accounts.service import get_organization
    from carepost.audit.service import record
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError
    from carepost.delivery import service

    with system_session() as session:
        try:
            organization = get_organization(session, org)
            row = service.create_sending_domain(session, organization.id, domain, ed25519=not no_ed25519)
        except CarePostError as exc:
            fail(f"{exc.field}: {exc.message}" if exc.field else exc.message)
        record(session, org_id=organization.id, actor_type="system", actor_id="cli", action="sending_domain.create",
               target_type="sending_domain", target_id=row.id, details={"domain": row.domain, "ownership": "claimed"})
        session.commit()
        view = service.domain_view(row)
    _print_records(view)
    console.print("Nothing can be sent from the domain until its ownership record is found.")
    console.print(f"Then run: carepost domain check {view['domain']} --org {organization.slug}")


@domain_app.command("check")
def domain_check(
    domain: str = typer.Argument(..., help="The sending domain."),
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
) -> None:
    """Look the domain's records up live; exit 1 when any does not check out."""
    import asyncio

    from carepost.accounts.service import get_organization
    from carepost.audit.service import record
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError
    from carepost.delivery import service

    with system_session() as session:
        try:
            organization = get_organization(session, org)
        except CarePostError as exc:
            fail(exc.message)
        org_id = organization.id
        session.commit()
    with org_session(org_id) as session:
        try:
            row = service.get_sending_domain(session, domain)
        except CarePostError as exc:
            fail(exc.message)
        records = service.records_to_check(row)
        session.commit()  # nothing stays open while DNS answers
        results = asyncio.run(service.check_dns(records))
        row = service.get_sending_domain(session, domain)
        was_verified = service.is_verified(row)
        service.apply_checks(session, row, results)
        record(session, org_id=org_id, actor_type="system", actor_id="cli", action="sending_domain.check",
               target_type="sending_domain", target_id=row.id,
               details={"dns_ok": row.dns_ok, "failed": [r.purpose for r in results if not r.ok]})
        verified = service.is_verified(row)
        if verified and not was_verified:
            record(session, org_id=org_id, actor_type="system", actor_id="cli", action="sending_domain.verify",
                   target_type="sending_domain", target_id=row.id, details={"domain": row.domain, "via": "cli"})
        ownership = (row.check_results or {}).get(service.OWNERSHIP) or {}
        session.commit()
        ok = row.dns_ok
    table = Table("record", "name", "result", "detail")
    for r in results:
        detail = ownership.get("detail", r.detail) if r.purpose == service.OWNERSHIP else r.detail
        table.add_row(r.purpose, r.name, "[green]pass[/green]" if r.ok and (r.purpose != service.OWNERSHIP or verified)
                      else "[red]fail[/red]", detail)
    console.print(table)
    if not verified:
        err.print("Ownership is not proven: nothing can be sent from this domain until the ownership record is found.")
        raise typer.Exit(1)
    if not ok:
        err.print("Some records do not check out yet. Sending is allowed but flagged until they do.")
        raise typer.Exit(1)
    console.print("All records check out.")


@domain_app.command("list")
def domain_list(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """List an organization's sending domains and whether their DNS records check out."""
    from carepost.accounts.service import get_organization
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError
    from carepost.delivery import service

    with system_session() as session:
        try:
            org_id = get_organization(session, org).id
        except CarePostError as exc:
            fail(exc.message)
    table = Table("domain", "ownership", "DKIM selector", "DNS", "checked", "id")
    with org_session(org_id) as session:
        for row in service.list_sending_domains(session):
            checked = row.checked_at.strftime("%Y-%m-%d %H:%M") if row.checked_at else "never"
            table.add_row(row.domain, "[green]proven[/green]" if service.is_verified(row) else "[red]not proven[/red]",
                          row.selector, "[green]ok[/green]" if row.dns_ok else "[yellow]not verified[/yellow]",
                          checked, row.id)
    console.print(table)


@domain_app.command("records")
def domain_records(
    domain: str = typer.Argument(..., help="The sending domain."),
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
) -> None:
    """Print the DNS records of a sending domain again."""
    from carepost.accounts.service import get_organization
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError
    from carepost.delivery import service

    with system_session() as session:
        try:
            org_id = get_organization(session, org).id
        except CarePostError as exc:
            fail(exc.message)
    with org_session(org_id) as session:
        try:
            view = service.domain_view(service.get_sending_domain(session, domain))
        except CarePostError as exc:
            fail(exc.message)
    _print_records(view)


def run_smtp(settings, *, self_signed: bool) -> int:
    """``carepost smtp``: SMTP submission until SIGTERM/SIGINT."""
    from carepost.delivery import submission

    try:
        submission.serve(settings, self_signed=self_signed)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    return 0
