"""``carepost segment ...``: count a query, print its tree or its SQL plan, keep daily counts.
Imports stay inside the commands so ``carepost --help`` stays fast."""

from __future__ import annotations

import json

import typer

from carepost.accounts.commands import organization
from carepost.core.console import console, fail

segment_app = typer.Typer(help="Segments: count a query, see how it compiles, keep daily counts.", no_args_is_help=True)


@segment_app.command("count")
def count(
    query: str = typer.Argument(..., help='The query, e.g. "age >= 65 and has condition icd10:E11.*".'),
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    explain: bool = typer.Option(False, "--explain", help="Also print the SQL and the database's plan."),
) -> None:
    """Count the contacts a query selects and print the time it took (parse, compile, run)."""
    import time

    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.segments import service

    org_id, slug = organization(org)
    with org_session(org_id) as session:
        started = time.perf_counter()
        try:
            result = service.count(session, org_id, query, service.SYSTEM)
        except CarePostError as exc:
            fail(exc.message, 2)
        elapsed = time.perf_counter() - started
        plan = service.explain(session, org_id, query, service.SYSTEM) if explain else None
        session.commit()  # the audit event of a sensitive query
    console.print(f"{result['count']} contacts in {slug}  ({elapsed * 1000:.1f} ms)", highlight=False)
    if result["sensitive"]:
        console.print(f"sensitive: {', '.join(result['sensitive_categories'])} (evaluation audited)", highlight=False)
    if plan:
        console.print(plan["sql"], soft_wrap=True, highlight=False)
        for line in plan["plan"]:
            console.print(f"  {line}", soft_wrap=True, highlight=False)


@segment_app.command("parse")
def parse(query: str = typer.Argument(..., help="The query in the segment language.")) -> None:
    """Print a query's JSON tree (or where it is wrong)."""
    from carepost.segments import language

    try:
        tree = language.strip_positions(language.parse(query))
    except language.SegmentQueryError as exc:
        fail(exc.message, 2)
    console.print_json(json.dumps(tree))


@segment_app.command("daily-counts")
def daily_counts(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """Count every saved segment of the organization and keep today's figure (run once a day)."""
    from carepost.core.database import org_session
    from carepost.segments import service

    org_id, slug = organization(org)
    with org_session(org_id) as session:
        n = service.record_daily_counts(session, org_id)
        session.commit()
    console.print(f"Counted {n} segments in {slug}.", highlight=False)
