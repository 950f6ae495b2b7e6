"""``carepost journeys ...``: list, show, validate a definition file, publish, pause, resume, tick, runs.

The same rules as the API (a journey that needs approval is refused until compliance approved it
in the UI or the API; a second publish names ``--mode migrate|drain``). ``validate FILE`` checks a
JSON definition: offline (shape and graph) without ``--org``, against the organization's
templates, segments, topics and events with it; it prints every problem with its JSON path and
exits 1. ``tick`` advances the due runs once (what the worker's periodic task does). Changes are
recorded in the audit log as the CLI operator. Imports stay inside the commands so
``carepost --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from carepost.accounts.commands import organization_id
from carepost.core.console import console, err, fail

journeys_app = typer.Typer(help="Journeys: list, show, validate, publish, pause, tick, runs.", no_args_is_help=True)


def _print(line: str) -> None:
    console.print(line, soft_wrap=True, highlight=False, markup=False)


def operator(org_id: str):
    """The CLI operator as a principal: every permission of the organization, recorded as ``cli``."""
    from carepost.accounts.access import Principal
    from carepost.accounts.permissions import Permission

    return Principal(kind="system", org_id=org_id, actor_id="cli", permissions=frozenset(Permission))


def _audit(session, org_id: str, action: str, row, **details) -> None:
    from carepost.audit.service import record

    record(session, org_id=org_id, actor_type="system", actor_id="cli", action=action, target_type="journey",
           target_id=row.id, details={"status": row.status, **details})


def _report(exc) -> None:
    """A refusal: every path of an invalid definition, else the message."""
    from carepost.journeys.validation import DefinitionInvalid

    if isinstance(exc, DefinitionInvalid):
        for e in exc.errors:
            err.print(f"{e['path'] or '(definition)'}: {e['message']}", soft_wrap=True, highlight=False, markup=False)
    fail(exc.message.replace("[", "\\["), 2)


@journeys_app.command("list")
def list_(org: str = typer.Option(..., "--org", help="Organization slug or id."),
          status: str = typer.Option(None, "--status", help="Only journeys in this state (draft, live, paused, "
                                     "archived).")) -> None:
    """The organization's journeys, newest first (one line each)."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.journeys import service

    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            rows = service.list_journeys(session, org_id, status=status)
        except CarePostError as exc:
            _report(exc)
        lines = []
        for r in rows:
            d = service.journey_dict(session, r, with_definition=False)
            lines.append(f"{r.id}  {r.status:<8} live v{r.current_version or '-':<4} latest v{d['latest_version']:<4}"
                         f"{'draft ' if d['draft'] else '      '}{d['purpose'] or '-':<22} {r.name}")
    for line in lines or ["no journeys"]:
        _print(line)


@journeys_app.command("show")
def show(journey_id: str = typer.Argument(..., help="The journey id."),
         org: str = typer.Option(..., "--org", help="Organization slug or id."),
         definition: bool = typer.Option(False, "--definition", help="Print the newest version's definition (JSON).")
         ) -> None:
    """A journey, its versions and its figures (entered, now at each step, exited, goal)."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.journeys import analytics, service

    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            row = service.get_journey(session, org_id, journey_id)
        except CarePostError as exc:
            _report(exc)
        data = service.journey_dict(session, row)
        versions = [service.version_dict(v, with_definition=False) for v in service.list_versions(session, row)]
        figures = analytics.journey_analytics(session, row)
    for key in ("id", "name", "status", "purpose", "entry_type", "current_version", "latest_version",
                "approval_required", "approved"):
        _print(f"{key}: {data[key] if data[key] is not None else '-'}")
    if data["approval_reasons"]:
        _print(f"approval needed for: {', '.join(data['approval_reasons'])}")
    _print("versions:")
    for v in versions:
        state = f"published {v['published_at']} ({v['migration_mode']})" if v["published"] else "draft"
        approved = f", approved by {v['approved_by']}" if v["approved_by"] else ""
        _print(f"  v{v['version']}  {state}{approved}")
    _print(f"entered {figures['entered']}, active {figures['active']}, reached goal {figures['reached_goal']}, "
           f"exited {', '.join(f'{k} {n}' for k, n in sorted(figures['exited'].items())) or 'none'}")
    for s in figures["steps"]:
        _print(f"  {s['id']:<20} {s['type'] or '?':<11} reached {s['reached']:<7} now {s['now']:<7} "
               f"drop-off {s['drop_off']}")
    if definition:
        _print(json.dumps(data["latest"]["definition"], indent=2, sort_keys=True))


@journeys_app.command("validate")
def validate(file: Path = typer.Argument(..., help="A JSON file holding a definition (or {\"definition\": ...}).",
                                         exists=False),
             org: str = typer.Option(None, "--org", help="Check references against this organization (templates, "
                                     "segments, topics, events); without it only the shape and the graph.")) -> None:
    """Check a definition file; print every problem with its JSON path (exit 1 when any)."""
    from carepost.journeys.validation import validate_definition

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {type(exc).__name__}", 2)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{file} is not JSON (line {exc.lineno}, column {exc.colno}).", 2)
    if isinstance(data, dict) and set(data) == {"definition"}:
        data = data["definition"]
    if org:
        from carepost.core.database import org_session

        org_id = organization_id(org)
        with org_session(org_id) as session:
            errors = validate_definition(session, org_id, data)
    else:
        errors = validate_definition(None, None, data)
    if errors:
        for e in errors:
            _print(f"{e['path'] or '(definition)'}: {e['message']}")
        fail(f"{len(errors)} problem{'s' if len(errors) != 1 else ''} in {file.name}", 1)
    _print(f"{file.name}: valid" + ("" if org else " (shape and graph; pass --org to check references)"))


@journeys_app.command("publish")
def publish(journey_id: str = typer.Argument(..., help="The journey id."),
            org: str = typer.Option(..., "--org", help="Organization slug or id."),
            version: int = typer.Option(None, "--version", help="The version (default: the newest)."),
            mode: str = typer.Option(None, "--mode", help="With a live version: migrate (runs move to the same step "
                                     "of the new version) or drain (runs finish on their version).")) -> None:
    """Publish the draft version (refused until approved when it needs approval)."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.journeys import service

    if mode is not None and mode not in ("migrate", "drain"):
        fail("--mode is migrate or drain.", 2)
    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            row = service.get_journey(session, org_id, journey_id)
            ver, migrated = service.publish(session, row, operator(org_id), number=version, mode=mode)
        except CarePostError as exc:
            session.rollback()
            _report(exc)
        _audit(session, org_id, "journey.published", row, version=ver.version, mode=ver.migration_mode,
               migrated=migrated)
        session.commit()
        _print(f"published {row.id} v{ver.version} ({ver.migration_mode}; {migrated} runs migrated): {row.status}")


def _transition(journey_id: str, org: str, fn_name: str, action: str) -> None:
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.journeys import service

    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            row = service.get_journey(session, org_id, journey_id)
            result = getattr(service, fn_name)(session, row)
        except CarePostError as exc:
            session.rollback()
            _report(exc)
        details = {"runs_ended": result} if isinstance(result, int) else {}
        _audit(session, org_id, f"journey.{action}", row, **details)
        session.commit()
        _print(f"{row.id}: {row.status}")


@journeys_app.command("pause")
def pause(journey_id: str = typer.Argument(..., help="The journey id."),
          org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """Pause a live journey: no run enters or advances until resumed."""
    _transition(journey_id, org, "pause", "paused")


@journeys_app.command("resume")
def resume(journey_id: str = typer.Argument(..., help="The journey id."),
           org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """Resume a paused journey."""
    _transition(journey_id, org, "resume", "resumed")


@journeys_app.command("archive")
def archive(journey_id: str = typer.Argument(..., help="The journey id."),
            org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """Archive a journey; its open runs end (reason removed)."""
    _transition(journey_id, org, "archive", "archived")


@journeys_app.command("runs")
def runs(journey_id: str = typer.Argument(None, help="The journey id (or --contact)."),
         org: str = typer.Option(..., "--org", help="Organization slug or id."),
         contact: str = typer.Option(None, "--contact", help="The runs of one contact (id) in every journey."),
         state: str = typer.Option(None, "--state", help="active, waiting, completed, exited or failed."),
         limit: int = typer.Option(100, "--limit", min=1, max=1000)) -> None:
    """Runs of a journey or of a contact (contact ids, steps and states; audited)."""
    from carepost.audit.service import record
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.journeys import service

    if (journey_id is None) == (contact is None):
        fail("name a journey id or --contact, not both.", 2)
    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            if journey_id is not None:
                row = service.get_journey(session, org_id, journey_id)
                rows = service.list_runs(session, org_id, journey_id=row.id, state=state, limit=limit)
                target = ("journey", row.id)
            else:
                from carepost.patients.service import get_contact

                get_contact(session, contact)
                rows = service.list_runs(session, org_id, contact_id=contact, state=state, limit=limit)
                target = ("contact", contact)
        except CarePostError as exc:
            _report(exc)
        record(session, org_id=org_id, actor_type="system", actor_id="cli", action="journey.runs_read",
               target_type=target[0], target_id=target[1], details={"returned": len(rows)})
        session.commit()
        lines = [f"{r.id}  {r.journey_id}  v{r.version:<3} {r.contact_id}  {r.state:<9} {r.step_id or '-':<16} "
                 f"{service._iso(r.entered_at)}  {r.exit_reason or ''}" for r in rows]
    for line in lines or ["no runs"]:
        _print(line)


@journeys_app.command("tick")
def tick(org: str = typer.Option(None, "--org", help="Only this organization's runs (default: all).")) -> None:
    """Advance the due runs once (what the worker's periodic task does) and say how many steps ran."""
    from carepost.journeys import engine

    org_id = organization_id(org) if org else None
    result = engine.run_tick(org_id=org_id)
    _print(f"tick: {result}")
