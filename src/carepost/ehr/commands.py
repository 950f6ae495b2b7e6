"""``carepost mllp`` and ``carepost ehr ...``: the HL7 v2 listener, the MLLP connections of an
organization and its error queue. Imports stay inside the commands so ``carepost --help`` stays
fast."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

ehr_app = typer.Typer(help="Events in from clinical systems: MLLP connections and the error queue.",
                      no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def run_mllp(settings, *, host: str | None, port: int | None) -> int:
    """``carepost mllp``: the listener until SIGTERM/SIGINT."""
    from carepost.ehr import mllp

    try:
        mllp.serve(settings, host=host, port=port)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 1
    return 0


def _org_id(org: str) -> str:
    from carepost.accounts.service import get_organization
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            return get_organization(session, org).id
        except CarePostError as exc:
            _fail(exc.message)
    return ""


def _audit(session, org_id: str, action: str, **kwargs) -> None:
    from carepost.audit.service import record

    record(session, org_id=org_id, actor_type="system", actor_id=None, action=action, user_agent="carepost-cli",
           **kwargs)


@ehr_app.command("connection-add")
def connection_add(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    name: str = typer.Option(..., "--name", help="What the sending system is (\"Epic ADT feed\")."),
    facility: list[str] = typer.Option(..., "--facility", help="An MSH-4 sending facility (namespace id); repeat for more."),
    mrn_system: str = typer.Option(None, "--mrn-system", help="Identifier system of PID-3 MRNs (default: any MRN system)."),
    time_zone: str = typer.Option("UTC", "--time-zone", help="IANA time zone of HL7 times without an offset."),
) -> None:
    """Allow a system to send HL7 v2 over MLLP; prints its MSH-8 credential once."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.ehr import service

    org_id = _org_id(org)
    with org_session(org_id) as session:
        try:
            conn, credential = service.create_connection(session, org_id, name=name, sending_facilities=list(facility),
                                                         mrn_system=mrn_system, time_zone=time_zone)
        except CarePostError as exc:
            _fail(f"{exc.field}: {exc.message}" if exc.field else exc.message, 2)
        _audit(session, org_id, "mllp_connection.create", target_type="mllp_connection", target_id=conn.id,
               details={"key_id": conn.key_id, "facilities": len(conn.sending_facilities)})
        session.commit()
        console.print(f"MLLP connection {conn.id} ({conn.name}) for facilities {', '.join(conn.sending_facilities)}.",
                      highlight=False)
        console.print("Put this credential in MSH-8 (Security) of every message; it is not shown again:", highlight=False)
        console.print(f"  {credential}", highlight=False, soft_wrap=True)


@ehr_app.command("connections")
def connections(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """The organization's MLLP connections."""
    from carepost.core.database import org_session
    from carepost.ehr import service

    org_id = _org_id(org)
    table = Table("id", "name", "key id", "facilities", "MRN system", "time zone", "revoked")
    with org_session(org_id) as session:
        for conn in service.list_connections(session, org_id):
            out = service.connection_out(conn)
            table.add_row(out["id"], out["name"], out["key_id"], ", ".join(out["sending_facilities"]),
                          out["mrn_system"] or "any", out["time_zone"], out["revoked_at"] or "")
    console.print(table)


@ehr_app.command("connection-revoke")
def connection_revoke(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    connection_id: str = typer.Argument(..., help="The connection's id."),
) -> None:
    """Revoke an MLLP connection (listeners refuse it within seconds)."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.ehr import service

    org_id = _org_id(org)
    with org_session(org_id) as session:
        try:
            conn = service.get_connection(session, org_id, connection_id)
        except CarePostError as exc:
            _fail(exc.message)
        service.revoke_connection(session, conn)
        _audit(session, org_id, "mllp_connection.revoke", target_type="mllp_connection", target_id=conn.id,
               details={"key_id": conn.key_id})
        session.commit()
    console.print(f"Revoked {connection_id}.", highlight=False)


@ehr_app.command("errors")
def errors(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    status: str = typer.Option("error", "--status", help="error, recorded, ignored, discarded or all."),
    limit: int = typer.Option(100, "--limit", min=1, max=1000),
) -> None:
    """Messages received from clinical systems; by default the error queue (reasons, never content)."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.ehr import service

    org_id = _org_id(org)
    table = Table("id", "received", "source", "type", "control id", "status", "reason", "field", "attempts")
    with org_session(org_id) as session:
        try:
            rows = service.list_messages(session, org_id, status=None if status == "all" else status, limit=limit)
        except CarePostError as exc:
            _fail(exc.message, 2)
        for row in rows:
            out = service.message_out(row)
            table.add_row(out["id"], out["received_at"] or "", out["source"], out["message_type"],
                          out["control_id"] or "", out["status"], out["reason"] or "", out["field"] or "",
                          str(out["attempts"]))
    console.print(table)
    console.print(f"{len(rows)} messages", highlight=False)


@ehr_app.command("retry")
def retry(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    message_ids: list[str] = typer.Argument(None, help="Messages to retry; none: the whole error queue (up to 1000)."),
) -> None:
    """Process messages of the error queue again; exit 1 when some still fail."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.ehr import service

    org_id = _org_id(org)
    recorded = failing = 0
    with org_session(org_id) as session:
        try:
            rows = [service.get_message(session, org_id, m) for m in message_ids] if message_ids else \
                list(reversed(service.list_messages(session, org_id, status="error", limit=1000)))
        except CarePostError as exc:
            _fail(exc.message)
        for row in rows:
            try:
                outcome = service.retry_message(session, org_id, row, actor_type="system", actor_id=None)
            except CarePostError as exc:
                _fail(f"{row.id}: {exc.message}")
            if outcome.status == "recorded":
                recorded += 1
            else:
                failing += 1
                console.print(f"{row.id}: {outcome.text}", highlight=False)
        session.commit()
    console.print(f"{recorded} recorded, {failing} still in the error queue", highlight=False)
    raise typer.Exit(1 if failing else 0)
