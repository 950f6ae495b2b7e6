"""``carepost archive ...``: the message archive's word index from the command line.
Imports stay inside the commands so ``carepost --help`` stays fast."""

from __future__ import annotations

import typer
from rich.console import Console

archive_app = typer.Typer(help="The message archive: its keyed word index.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


@archive_app.command("backfill")
def backfill(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rewrite every message's tokens under the current search "
                                 "key, not only the missing ones."),
    batch: int = typer.Option(500, "--batch", min=1, max=10000, help="Messages per transaction."),
) -> None:
    """Fill the archive's word index for messages stored before it existed (or rebuild it).
    Commits per batch: an interrupted run resumes where it stopped. Audited."""
    from carepost.accounts.service import get_organization
    from carepost.archive import index
    from carepost.audit import service as audit
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            org_id = get_organization(session, org).id
        except CarePostError as exc:
            err.print(f"[red]error:[/red] {exc.message}", highlight=False)
            raise typer.Exit(2) from None
    with org_session(org_id) as session:
        messages, tokens = index.backfill(
            session, org_id, batch=batch, rebuild=rebuild,
            progress=lambda m, t: console.print(f"  {m} messages, {t} tokens", highlight=False))
        audit.record(session, org_id=org_id, actor_type="system", actor_id="cli", action="archive.index_backfilled",
                     target_type="archive", details={"messages": messages, "tokens": tokens, "rebuild": rebuild})
        session.commit()
    console.print(f"Indexed {messages} messages ({tokens} tokens).", highlight=False)
