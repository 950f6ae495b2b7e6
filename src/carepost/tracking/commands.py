"""``carepost analytics ...``: recount an organization's rollups from its message events (old data
sent before the rollups existed, or after a repair). Imports stay inside the command so
``carepost --help`` stays fast."""

from __future__ import annotations

from datetime import UTC, datetime

import typer

from carepost.core.console import console, fail

analytics_app = typer.Typer(help="Analytics: recount the rollups of old data.", no_args_is_help=True)


@analytics_app.command("rebuild")
def rebuild(
    org: str = typer.Option(None, "--org", help="Organization slug or id (default: every organization)."),
    from_day: str = typer.Option(None, "--from", help="Replace the rollups from this UTC day on (YYYY-MM-DD) "
                                                      "with a recount of every figure stored events give."),
    since: str = typer.Option(None, "--since", hidden=True, help="The same as --from (older name)."),
) -> None:
    """Recount the analytics rollups from the stored events, in the database (set-wise), one
    transaction per organization. With --from DAY the rollups from that day on are *replaced*:
    delivery figures (message events), opens and clicks (engagement events; organizations in
    privacy mode keep theirs, they have no events) and conversions (contact events); unsubscribes
    are kept as counted. Without --from, the delivery figures of all time are replaced (opens,
    clicks, unsubscribes and conversions stay as they are). Events arriving meanwhile are counted
    once: see docs/analytics.md."""
    from carepost.accounts.service import get_organization
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError
    from carepost.tracking import rebuild as recount

    day = from_day or since
    start = None
    if day:
        try:
            start = datetime.fromisoformat(day).replace(tzinfo=UTC)
        except ValueError:
            fail("--from is a day as YYYY-MM-DD.", 2)
        if start != start.replace(hour=0, minute=0, second=0, microsecond=0):
            fail("--from is a day as YYYY-MM-DD.", 2)
    org_id, label = None, "every organization"
    if org:
        with system_session() as session:
            try:
                organization = get_organization(session, org)
            except CarePostError as exc:
                fail(exc.message)
            org_id, label = organization.id, organization.slug
    families = recount.FAMILIES if start is not None else (recount.DELIVERY,)
    result = recount.rebuild(system_session, org_id=org_id, start=start, families=families)
    counted = sum(result.events.values())
    detail = ", ".join(f"{family} {n}" for family, n in result.events.items())
    rows = f"; {result.rows} rollup rows" if result.rows is not None else ""
    console.print(f"{counted} events counted into the rollups of {label} ({detail}{rows})", highlight=False)


@analytics_app.command("fold")
def fold() -> None:
    """Fold the appended analytics increments of every organization into the rollups now (what the
    worker does every minute; each chunk one transaction, safe beside a running worker)."""
    from carepost.core.database import system_session
    from carepost.tracking.rollups import fold_all

    chunks = fold_all(system_session)
    console.print(f"{chunks} chunks of increments folded into the rollups", highlight=False)
