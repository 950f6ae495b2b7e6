"""The ``carepost`` command (Typer + Rich)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from carepost import __version__

app = typer.Typer(help="CarePost: HIPAA-compliant email for healthcare.", no_args_is_help=True, add_completion=False)
org_app = typer.Typer(help="Organizations (tenants).", no_args_is_help=True)
user_app = typer.Typer(help="People who use CarePost.", no_args_is_help=True)
apikey_app = typer.Typer(help="API credentials.", no_args_is_help=True)
keys_app = typer.Typer(help="Encryption keys.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(user_app, name="user")
app.add_typer(apikey_app, name="apikey")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")

console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"carepost {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


# --------------------------------------------------------------------------- init


@app.command()
def init() -> None:
    """Create the data dir, keys and schema; print a one-time link to create the first owner."""
    from carepost.accounts.service import create_setup_link_if_needed
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.config import get_settings
    from carepost.core.database import system_session

    settings = get_settings()
    result = initialize_storage(settings)
    if result.created_master_key:
        console.print(f"Created master key [bold]{settings.resolved_master_key_file}[/bold] (mode 0600). Back it up: without it nothing decrypts.")
    console.print(f"Data dir: {settings.data_dir.resolve()}")
    with system_session() as session:
        link = create_setup_link_if_needed(session, settings.base_url)
        session.commit()
    if link:
        console.print("\nOpen this one-time link to create the first owner account (valid for 24 hours):")
        console.print(f"  [bold]{link}[/bold]\n", soft_wrap=True)
    else:
        console.print("Already set up: sign in at " + settings.base_url + "/app/login")


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default CAREPOST_HOST)."),
    port: int = typer.Option(None, help="Port (default CAREPOST_PORT)."),
    workers: int = typer.Option(1, help="Server processes."),
) -> None:
    """Run the web UI and REST API (ASGI, uvicorn)."""
    import uvicorn

    from carepost.core.config import get_settings

    settings = get_settings()
    uvicorn.run(
        "carepost.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        access_log=False,
        proxy_headers=True,
        server_header=False,
        log_config=None,
    )


# --------------------------------------------------------------------------- organizations


@org_app.command("create")
def org_create(name: str) -> None:
    """Create an organization and print its slug (used by every --org)."""
    from carepost.accounts.service import create_organization
    from carepost.audit.service import record
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            org = create_organization(session, name)
        except CarePostError as exc:
            fail(exc.message)
        record(session, org_id=org.id, actor_type="system", actor_id="cli", action="organization.create",
               target_type="organization", target_id=org.id)
        session.commit()
        console.print(org.slug)


@org_app.command("list")
def org_list() -> None:
    """List organizations."""
    from carepost.accounts.service import list_organizations
    from carepost.core.database import system_session

    with system_session() as session:
        table = Table("slug", "name", "id", "created")
        for org in list_organizations(session):
            table.add_row(org.slug, org.name, org.id, org.created_at.strftime("%Y-%m-%d"))
        console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
