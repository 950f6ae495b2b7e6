"""``carepost mllp`` and ``carepost ehr ...``: the HL7 v2 listener, the MLLP connections of an
organization and its error queue. Imports stay inside the commands so ``carepost --help`` stays
fast."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from carepost.accounts.commands import organization_id
from carepost.core.console import console, err, fail

ehr_app = typer.Typer(help="Events in from clinical systems: MLLP connections and the error queue.",
                      no_args_is_help=True)


def run_mllp(settings, *, host: str | None, port: int | None, processes: int = 1) -> int:
    """``carepost mllp``: the listener until SIGTERM/SIGINT."""
    from carepost.ehr import mllp

    try:
        mllp.serve(settings, host=host, port=port, processes=processes)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 1
    return 0


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
    client_cert_sha256: str = typer.Option(None, "--client-cert-sha256",
                                           help="Pin the connection to the TLS client certificate with this SHA-256."),
    client_cert: Path = typer.Option(None, "--client-cert", help="Pin the connection to this client certificate "
                                     "(PEM or DER file; its SHA-256 is kept)."),
) -> None:
    """Allow a system to send HL7 v2 over MLLP; prints its MSH-8 credential once."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.ehr import service

    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            pin = _pin_value(client_cert_sha256, client_cert)
            conn, credential = service.create_connection(session, org_id, name=name, sending_facilities=list(facility),
                                                         mrn_system=mrn_system, time_zone=time_zone,
                                                         client_cert_sha256=pin)
        except CarePostError as exc:
            fail(f"{exc.field}: {exc.message}" if exc.field else exc.message, 2)
        _audit(session, org_id, "mllp_connection.create", target_type="mllp_connection", target_id=conn.id,
               details={"key_id": conn.key_id, "facilities": len(conn.sending_facilities),
                        "client_cert_pinned": conn.client_cert_sha256 is not None})
        session.commit()
        console.print(f"MLLP connection {conn.id} ({conn.name}) for facilities {', '.join(conn.sending_facilities)}.",
                      highlight=False)
        console.print("Put this credential in MSH-8 (Security) of every message; it is not shown again:", highlight=False)
        console.print(f"  {credential}", highlight=False, soft_wrap=True)


def _pin_value(sha256: str | None, cert_file: Path | None) -> str | None:
    from carepost.core.errors import ValidationFailed
    from carepost.ehr import service

    if sha256 and cert_file:
        raise ValidationFailed("Give --client-cert-sha256 or --client-cert, not both.", field="client_cert")
    if cert_file is not None:
        try:
            data = cert_file.read_bytes()
        except OSError:
            raise ValidationFailed("The certificate file cannot be read.", field="client_cert") from None
        return service.certificate_fingerprint(data)
    return service.check_certificate_fingerprint(sha256)


@ehr_app.command("connection-pin")
def connection_pin(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    connection_id: str = typer.Option(..., "--id", help="The MLLP connection's id."),
    client_cert_sha256: str = typer.Option(None, "--client-cert-sha256", help="SHA-256 of the client certificate."),
    client_cert: Path = typer.Option(None, "--client-cert", help="The client certificate (PEM or DER file)."),
    clear: bool = typer.Option(False, "--clear", help="Remove the pin: any certificate of the client CAs is taken."),
) -> None:
    """Bind an MLLP connection to one TLS client certificate (mutual TLS), or remove the binding."""
    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.ehr import service

    if clear == bool(client_cert_sha256 or client_cert):
        fail("client_cert: give --client-cert-sha256 or --client-cert, or --clear.", 2)
    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            conn = service.get_connection(session, org_id, connection_id)
            service.pin_client_certificate(session, conn, None if clear else _pin_value(client_cert_sha256, client_cert))
        except CarePostError as exc:
            fail(f"{exc.field}: {exc.message}" if exc.field else exc.message, 2)
        _audit(session, org_id, "mllp_connection.pin", target_type="mllp_connection", target_id=conn.id,
               details={"key_id": conn.key_id, "client_cert_sha256": conn.client_cert_sha256})
        session.commit()
        console.print(f"MLLP connection {conn.id}: " + (f"pinned to the client certificate {conn.client_cert_sha256}."
                                                        if conn.client_cert_sha256 else "not pinned."), highlight=False)


@ehr_app.command("connections")
def connections(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """The organization's MLLP connections."""
    from carepost.core.database import org_session
    from carepost.ehr import service

    org_id = organization_id(org)
    table = Table("id", "name", "key id", "facilities", "MRN system", "time zone", "client cert SHA-256", "revoked")
    with org_session(org_id) as session:
        for conn in service.list_connections(session, org_id):
            out = service.connection_out(conn)
            table.add_row(out["id"], out["name"], out["key_id"], ", ".join(out["sending_facilities"]),
                          out["mrn_system"] or "any", out["time_zone"], out["client_cert_sha256"] or "",
                          out["revoked_at"] or "")
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

    org_id = organization_id(org)
    with org_session(org_id) as session:
        try:
            conn = service.get_connection(session, org_id, connection_id)
        except CarePostError as exc:
            fail(exc.message)
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

    org_id = organization_id(org)
    table = Table("id", "received", "source", "type", "control id", "status", "reason", "field", "attempts")
    with org_session(org_id) as session:
        try:
            rows = service.list_messages(session, org_id, status=None if status == "all" else status, limit=limit)
        except CarePostError as exc:
            fail(exc.message, 2)
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

    org_id = organization_id(org)
    recorded = failing = queued = 0
    with org_session(org_id) as session:
        try:
            rows = [service.get_message(session, org_id, m) for m in message_ids] if message_ids else \
                list(reversed(service.list_messages(session, org_id, status="error", limit=1000)))
        except CarePostError as exc:
            fail(exc.message)
        for row in rows:
            try:
                outcome = service.retry_message(session, org_id, row, actor_type="system", actor_id=None)
            except CarePostError as exc:
                fail(f"{row.id}: {exc.message}")
            if outcome.status == "recorded":
                recorded += 1
            elif outcome.status == "queued":  # an id-only resource: read again by the worker
                queued += 1
            else:
                failing += 1
                console.print(f"{row.id}: {outcome.text}", highlight=False)
        session.commit()
    console.print(f"{recorded} recorded, {failing} still in the error queue"
                  + (f", {queued} queued to be read again from the FHIR server" if queued else ""), highlight=False)
    raise typer.Exit(1 if failing else 0)


@ehr_app.command("fhir-server")
def fhir_server(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    base_url: str = typer.Option(None, "--base-url", help="FHIR R4 base URL of the EHR (https)."),
    token_url: str = typer.Option(None, "--token-url", help="SMART Backend Services token endpoint (https)."),
    client_id: str = typer.Option(None, "--client-id", help="The client id the EHR registered for CarePost."),
    algorithm: str = typer.Option("ES384", "--algorithm", help="ES384 or RS384 (the client assertion's signature)."),
    scope: str = typer.Option(None, "--scope", help="SMART scopes (default system/Appointment.read "
                              "system/Encounter.read)."),
    new_key: bool = typer.Option(False, "--new-key", help="Make a new signing key (register the new JWKS)."),
) -> None:
    """Show, or set (with --base-url, --token-url and --client-id), the FHIR server id-only
    notifications are read back from; prints CarePost's public key as a JWKS for the EHR."""
    import json

    from carepost.core.database import org_session
    from carepost.core.errors import CarePostError
    from carepost.ehr import fhir_fetch

    org_id = organization_id(org)
    with org_session(org_id) as session:
        if base_url or token_url or client_id:
            try:
                row = fhir_fetch.configure(session, org_id, base_url=base_url, token_url=token_url,
                                           client_id=client_id, algorithm=algorithm, scope=scope, new_key=new_key)
            except CarePostError as exc:
                fail(f"{exc.field}: {exc.message}" if exc.field else exc.message, 2)
            _audit(session, org_id, "ehr_fhir_server.set", target_type="ehr_fhir_server", target_id=row.id,
                   details={"key_id": row.key_id, "algorithm": row.algorithm})
            session.commit()
        else:
            row = fhir_fetch.get_server(session, org_id)
            if row is None:
                fail("fhir_server: no FHIR server is set for this organization (give --base-url, --token-url and "
                     "--client-id).", 1)
        out = fhir_fetch.server_out(row)
    console.print(f"FHIR server {out['base_url']}, token endpoint {out['token_url']}, client id {out['client_id']}, "
                  f"{out['algorithm']} key {out['key_id']}.", highlight=False, soft_wrap=True)
    console.print("Register this JWKS with the EHR for that client id:", highlight=False)
    console.print(json.dumps(out["jwks"]), highlight=False, soft_wrap=True)
