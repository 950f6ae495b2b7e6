"""``carepost analytics ...``: recount an organization's rollups from its message events (old data
sent before the rollups existed, or after a repair). Imports stay inside the command so
``carepost --help`` stays fast."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.console import Console

analytics_app = typer.Typer(help="Analytics: recount the rollups of old data.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@analytics_app.command("rebuild")
def rebuild(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    since: str = typer.Option(None, "--since", help="Only add events from this UTC day on (YYYY-MM-DD), "
                                                    "keeping the rollups already counted; default: recount all."),
) -> None:
    """Recount the delivery figures (accepted, excluded, sent, delivered, secured, deferred, bounced,
    failed, complained, portal views) of an organization from its message events, in one
    transaction. Without --since the organization's delivery rollups are replaced; opens, clicks,
    unsubscribes and conversions, which their owners count as they come, stay as they are. With
    --since, only events from that day on are added: use it for events older rollups never saw."""
    from rich.progress import Progress

    from carepost.accounts.service import get_organization
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError
    from carepost.tracking import analytics

    start = None
    if since:
        try:
            start = datetime.fromisoformat(since).replace(tzinfo=UTC)
        except ValueError:
            _fail("--since is a day as YYYY-MM-DD.", 2)
    with system_session() as session:
        try:
            organization = get_organization(session, org)
        except CarePostError as exc:
            _fail(exc.message)
        org_id, slug = organization.id, organization.slug
    with org_session(org_id) as session, Progress(console=console, transient=True) as progress:
        task = progress.add_task("counting events", total=None)
        counted = analytics.rebuild(session, org_id, since=start,
                                    progress=lambda n: progress.advance(task, n))
        session.commit()
    console.print(f"{counted} events counted into the rollups of {slug}", highlight=False)
