"""``carepost campaign ...``: list and show campaigns, launch one and follow it to the end.

``launch`` applies the same rules as the API (a campaign that needs approval is refused until
compliance approved it), queues planning, then follows planned, materialized and sent counts with
a progress bar until the campaign completes, is paused or cancelled, or every message has its
outcome (a worker must be running:
``carepost worker`` or ``carepost run``). It is recorded in the audit log as the CLI operator.
Imports stay inside the commands so ``carepost --help`` stays fast.
"""

from __future__ import annotations

import time

import typer

from carepost.accounts.commands import organization_id
from carepost.core.console import console, fail

campaign_app = typer.Typer(help="Campaigns: list, show, launch with a progress bar.", no_args_is_help=True)


def operator(org_id: str):
    """The CLI operator as a principal: every permission of the organization, recorded as ``cli``."""
    from carepost.accounts.access import Principal
    from carepost.accounts.permissions import Permission

    return Principal(kind="system", org_id=org_id, actor_id="cli", permissions=frozenset(Permission))


@campaign_app.command("list")
def list_(org: str = typer.Option(..., "--org", help="Organization slug or id."),
          status: str = typer.Option(None, "--status", help="Only campaigns in this state.")) -> None:
    """The organization's campaigns, newest first (one line each)."""
    from carepost.campaigns import service
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError

    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            rows = service.list_campaigns(session, org_id, status=status)
        except CarePostError as exc:
            fail(exc.message, 2)
        lines = [f"{r.id}  {r.status:<10} {r.purpose:<22} {service._iso(r.send_at) or '-':<25} "
                 f"planned {r.planned_count:<8} excluded {r.excluded_count:<8} {r.name}" for r in rows]
    for line in lines or ["no campaigns"]:
        console.print(line, soft_wrap=True, highlight=False, markup=False)


@campaign_app.command("show")
def show(campaign_id: str = typer.Argument(..., help="The campaign id."),
         org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """A campaign, its workflow history (without comments) and its progress."""
    from carepost.campaigns import service
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError

    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            row = service.get_campaign(session, org_id, campaign_id)
        except CarePostError as exc:
            fail(exc.message, 2)
        data = service.campaign_dict(session, row)
        history = service.events_of(session, row)
        progress = service.progress(session, row)
    for key in ("id", "name", "status", "purpose", "segment_id", "template_version_id", "schedule_kind", "send_at",
                "approval_required", "approved_by", "approved_at", "launched_at"):
        console.print(f"{key}: {data[key] if data[key] is not None else '-'}", highlight=False)
    console.print("history:", highlight=False)
    for ev in history:
        console.print(f"  {ev['at']}  {ev['action']}  by {ev['actor'] or 'system'}", highlight=False)
    console.print(f"planned {progress['planned']}, excluded {progress['excluded']}, materialized "
                  f"{progress['materialized']}, sent {progress['sent']}", highlight=False)


def _snapshot(org_id: str, campaign_id: str) -> dict:
    from carepost.campaigns import service
    from carepost.core.database import org_session

    with org_session(org_id) as session:
        row = service.get_campaign(session, org_id, campaign_id)
        return service.progress(session, row)


def _all_out(snap: dict) -> bool:
    """Nothing is left to follow: the campaign was paused or cancelled, or planning finished,
    every recipient was materialized and every message has its outcome (sent, delivered,
    bounced, failed...). A ``completed`` campaign has materialized everyone, but its last
    messages may still be queued for delivery: follow them to their outcome too."""
    if snap["status"] in ("paused", "cancelled"):
        return True
    if snap["status"] == "completed":
        return snap["finished"] >= snap["materialized"]
    return (snap["status"] == "sending" and snap["plan_finished_at"] is not None
            and snap["materialized"] >= snap["planned"] and snap["finished"] >= snap["materialized"])


def follow(org_id: str, campaign_id: str, *, timeout: float, interval: float = 0.5) -> dict:
    """Show planned / materialized / sent counts until the campaign is done (or ``timeout``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    snap = _snapshot(org_id, campaign_id)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        planned = bar.add_task("planned", total=None)
        materialized = bar.add_task("materialized", total=None)
        sent = bar.add_task("sent (any outcome)", total=None)
        while True:
            done_planning = snap["plan_finished_at"] is not None
            total = snap["planned"] if done_planning else None
            bar.update(planned, completed=snap["planned"] + snap["excluded"],
                       total=(snap["planned"] + snap["excluded"]) if done_planning else None)
            bar.update(materialized, completed=snap["materialized"], total=total)
            bar.update(sent, completed=snap["finished"], total=total)
            if _all_out(snap) or time.monotonic() > deadline:
                return snap
            time.sleep(interval)
            snap = _snapshot(org_id, campaign_id)


@campaign_app.command("launch")
def launch(campaign_id: str = typer.Argument(..., help="The campaign id."),
           org: str = typer.Option(..., "--org", help="Organization slug or id."),
           wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the progress until it is done."),
           timeout: float = typer.Option(3600.0, "--timeout", help="Stop following after this many seconds.")) -> None:
    """Launch an approved campaign (planning starts at once) and follow it with a progress bar."""
    from carepost.audit.service import record
    from carepost.campaigns import service
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError

    org_id = organization_id(org)
    principal = operator(org_id)
    with org_session(org_id) as session:
        try:
            row = service.launch(session, service.get_campaign(session, org_id, campaign_id), principal)
        except CarePostError as exc:
            session.rollback()
            fail(exc.message, 2)
        record(session, org_id=org_id, actor_type="system", actor_id="cli", action="campaign.launched",
               target_type="campaign", target_id=row.id, details={"status": row.status})
        session.commit()
        status = row.status
    service.start_work(org_id, campaign_id, status)
    console.print(f"launched {campaign_id}: {status}", highlight=False)
    if not wait:
        return
    snap = follow(org_id, campaign_id, timeout=timeout)
    console.print(f"{snap['status']}: planned {snap['planned']}, excluded {snap['excluded']}, materialized "
                  f"{snap['materialized']}, sent {snap['sent']}, other outcomes {snap['finished'] - snap['sent']} "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(snap['messages'].items())) or 'none'})", highlight=False)
    if not _all_out(snap):
        fail(f"still {snap['status']} after {timeout:.0f} s (is a worker running?)", 3)
