"""The ``carepost`` command (Typer + Rich)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

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
capture_app = typer.Typer(help="The local mail capture of `carepost run` (encrypted at rest).", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(user_app, name="user")
app.add_typer(apikey_app, name="apikey")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(capture_app, name="capture")

console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"carepost {__version__}")
        raise typer.Exit()


# The commands that serve HTTP in their own process; every other one assembles without the router
# modules (carepost.assembly: ``http=False``). ``run`` starts ``serve`` as a child of its own.
HTTP_COMMANDS = frozenset({"serve"})


@app.callback()
def _main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    from carepost.assembly import assemble
    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging
    from carepost.core.ports import NotAssembled

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    try:
        # every command runs on the one composition root (fail closed)
        assemble(http=ctx.invoked_subcommand in HTTP_COMMANDS)
    except NotAssembled as exc:
        fail(f"CarePost could not be assembled: {exc}", code=70)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


# --------------------------------------------------------------------------- init


@app.command()
def init() -> None:
    """Create the data dir, keys and schema; print a one-time link to create the first owner."""
    _initialize(only_first_start=False)


def _initialize(only_first_start: bool) -> None:
    """``init``; ``run`` calls it too but prints a setup link only on the very first start (a
    second link would replace the one ``init`` printed)."""
    from carepost.accounts.service import create_setup_link_if_needed
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.config import get_settings
    from carepost.core.database import system_session

    settings = get_settings()
    from carepost.core.crypto import KeyUnavailable

    try:
        result = initialize_storage(settings)
    except KeyUnavailable as exc:
        fail(str(exc))
    if result.created_master_key:
        console.print(f"Created master key [bold]{settings.resolved_master_key_file}[/bold] (mode 0600). Back it up: without it nothing decrypts.")
    console.print(f"Data dir: {settings.data_dir.resolve()}")
    if only_first_start and not result.created_master_key:
        return
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
    # The /t/ journal's ingester runs as a child process of each serve process, out of its GIL
    # (tracking.journal_ingester); in-process apps (tests) keep the ingester thread.
    os.environ.setdefault("CAREPOST_ENGAGEMENT_INGESTER", "process")
    with _holding_data_dir(settings):
        uvicorn.run(
            "carepost.app:create_app",
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            workers=workers,
            access_log=settings.access_log,
            # Issue 9 item 15: forwarded headers only from the configured proxies (never by default).
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=settings.trusted_proxies or "127.0.0.1",  # unused without proxy_headers
            server_header=False,
            log_config=None,
        )


@contextmanager
def _holding_data_dir(settings):
    """Shared lock on the data dir for serve/worker/run, so offline maintenance refuses to run."""
    from carepost.core.supervisor import DataDirBusy, using_data_dir

    try:
        lock = using_data_dir(settings)
        lock.__enter__()
    except DataDirBusy as exc:
        fail(str(exc))
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


@app.command()
def worker(
    threads: int = typer.Option(None, help="Task threads (default CAREPOST_WORKER_THREADS)."),
    periodic: bool = typer.Option(True, help="Also schedule periodic tasks (maintenance purges)."),
) -> None:
    """Run the task consumer (Huey). SIGTERM lets running tasks finish; SIGINT stops at once."""
    from carepost.core.config import get_settings
    from carepost.core.queue import run_consumer

    settings = get_settings()
    with _holding_data_dir(settings):
        run_consumer(threads or settings.worker_threads, settings.worker_shutdown_timeout, periodic=periodic)


@app.command()
def inbound(
    host: str = typer.Option(None, help="Bind address (default CAREPOST_INBOUND_HOST)."),
    port: int = typer.Option(None, help="Port (default CAREPOST_INBOUND_PORT)."),
) -> None:
    """Run the inbound return-path SMTP server: bounces and complaints for the sending domains."""
    from carepost.core.config import get_settings
    from carepost.delivery.inbound import run_inbound

    settings = get_settings()
    with _holding_data_dir(settings):
        run_inbound(settings, host=host, port=port)


@app.command()
def run(
    demo: bool = typer.Option(False, "--demo", help="Load a synthetic patient population into a \"Demo Clinic (synthetic patients)\" organization (the setup owner belongs to it)."),
) -> None:
    """Run everything on one machine: server, worker, local mail capture, inbound return path and SMTP submission.

    Initializes the data dir first when needed. Captured mail never leaves the machine.
    Ctrl-C or SIGTERM stops all of it; if one part dies, the rest stop and the exit code is non-zero.
    """
    from carepost.core.config import get_settings
    from carepost.core.database import dispose_engine
    from carepost.core.mailcapture import relay_environment
    from carepost.core.supervisor import Supervisor, default_children

    settings = get_settings()
    _initialize(only_first_start=True)
    if demo:
        from carepost.patients.demo import ensure_demo_population

        slug, loaded = ensure_demo_population()
        console.print(f"Demo organization [bold]{slug}[/bold]: " + (f"{loaded} synthetic patients loaded." if loaded else "already loaded."))
    dispose_engine()  # the children open their own connections
    with _holding_data_dir(settings):
        mail_env = relay_environment(settings)  # all outgoing mail goes to the capture
        console.print(
            f"CarePost at [bold]{settings.base_url}[/bold]; outgoing mail is captured by "
            f"{settings.capture_host}:{settings.capture_port} into {settings.resolved_capture_dir}"
        )
        code = Supervisor(default_children(settings, mail_env)).run()
    raise typer.Exit(code)


@app.command()
def doctor() -> None:
    """Check this configuration (keys, encryption, TLS, MFA, migrations, queue); exit 1 on any failure."""
    from carepost.core.config import get_settings
    from carepost.doctor import run_checks, worst

    findings = run_checks(get_settings())
    styles = {"ok": "green", "info": "blue", "warn": "yellow", "fail": "bold red"}
    table = Table("level", "check", "finding", show_lines=False)
    for f in findings:
        table.add_row(f"[{styles[f.level]}]{f.level}[/]", f.check, f.message)
    console.print(table)
    level = worst(findings)
    if level == "fail":
        err.print(f"[red]{sum(f.level == 'fail' for f in findings)} check(s) failed.[/red]")
        raise typer.Exit(1)
    console.print("No failures." + (" Read the warnings." if level == "warn" else ""))


# --------------------------------------------------------------------------- capture


@capture_app.command("list")
def capture_list() -> None:
    """The captured messages still kept (oldest first): file, time, envelope, subject."""
    from email.parser import BytesHeaderParser
    from email.policy import default as default_policy

    from carepost.core.config import get_settings
    from carepost.core.mailcapture import CaptureKeys, capture_files, read_capture
    from carepost.core.masterkeys import DecryptionFailed, KeyUnavailable

    settings = get_settings()
    files = capture_files(settings.resolved_capture_dir)
    if not files:
        console.print(f"No captured mail in {settings.resolved_capture_dir}.")
        return
    keys = CaptureKeys.load(settings)
    table = Table("file", "from", "to", "subject", show_lines=False)
    for path in files:
        try:
            headers = BytesHeaderParser(policy=default_policy).parsebytes(read_capture(path, keys))
        except (DecryptionFailed, KeyUnavailable) as exc:
            table.add_row(path.name, "", "", f"[red]{exc}[/red]")
            continue
        table.add_row(path.name, str(headers.get("X-CarePost-Capture-Mail-From", "")),
                      ", ".join(str(v) for v in headers.get_all("X-CarePost-Capture-Rcpt-To", [])),
                      str(headers.get("Subject", "")))
    console.print(table)
    console.print(f"Kept for {settings.capture_retention_hours:g} hours (CAREPOST_CAPTURE_RETENTION_HOURS).")


@capture_app.command("show")
def capture_show(
    name: str = typer.Argument(..., help="File name as `carepost capture list` shows it (or `last`)."),
    out: Path | None = typer.Option(None, "--out", help="Write the message (.eml) to this file (0600) instead of the terminal."),
) -> None:
    """Print one captured message in clear (or write it to a file to open in a mail client)."""
    import os

    from carepost.core.config import get_settings
    from carepost.core.mailcapture import capture_files, read_capture
    from carepost.core.masterkeys import DecryptionFailed, KeyUnavailable

    settings = get_settings()
    files = capture_files(settings.resolved_capture_dir)
    if name == "last":
        path = files[-1] if files else None
    else:
        path = next((p for p in files if p.name == name or p.name == f"{name}.eml.enc"), None)
    if path is None:
        fail(f"no captured message {name!r} in {settings.resolved_capture_dir}")
    try:
        data = read_capture(path)
    except (DecryptionFailed, KeyUnavailable) as exc:
        fail(str(exc))
    if out is not None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        console.print(f"Written to {out}; it is in clear: delete it when done.")
        return
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


# --------------------------------------------------------------------------- keys


@keys_app.command("rotate")
def keys_rotate(
    reencrypt: bool = typer.Option(False, "--reencrypt", help="Queue the re-encryption job: old data-key versions are re-encrypted and retired."),
    data_only: bool = typer.Option(False, "--data-only", help="Add data-key versions only; keep the master key (works with CAREPOST_MASTER_KEY)."),
) -> None:
    """Rotate the master key: re-wrap every key, add a data-key version for new writes.
    Old ciphertexts keep decrypting; running processes switch within CAREPOST_KEY_REFRESH_SECONDS."""
    from sqlalchemy import func, select

    from carepost.audit.service import record
    from carepost.core.config import get_settings
    from carepost.core.crypto import KeyUnavailable, OrgKey, get_keyring, rotate_master_key
    from carepost.core.database import session_factory, system_session

    from carepost.models import load_all_models

    load_all_models()
    settings = get_settings()
    if data_only:
        with system_session() as session:
            added = get_keyring().rotate_keys(session, "data")
            record(session, org_id=None, actor_type="system", actor_id="cli", action="keys.data_rotated",
                   target_type="data_key", target_id="all", details={"data_key_versions_added": len(added)})
            session.commit()
        console.print(f"New data-key version for {len(added)} owner(s). Running processes use it within "
                      f"{settings.key_refresh_seconds}s.")
    else:
        try:
            old_id, new_id_, rewrapped = rotate_master_key(settings, session_factory())
        except KeyUnavailable as exc:
            fail(f"{exc} (or use --data-only to rotate data keys alone)")
        with system_session() as session:
            orgs = session.scalar(select(func.count(func.distinct(OrgKey.org_id))).where(OrgKey.kind == "data"))
            record(session, org_id=None, actor_type="system", actor_id="cli", action="keys.master_rotated",
                   target_type="master_key", target_id=new_id_,
                   details={"old_key_id": old_id, "new_key_id": new_id_, "rewrapped_count": rewrapped, "data_key_versions_added": orgs})
            session.commit()
        console.print(f"Master key rotated: {old_id} -> [bold]{new_id_}[/bold]")
        console.print(f"Re-wrapped {rewrapped} key(s); new data-key version for {orgs} owner(s). Back up {settings.resolved_master_key_file} now.")
        console.print(f"Running serve and worker processes pick up the new master key at once and the new data-key "
                      f"version within {settings.key_refresh_seconds}s; no restart needed.")
    if reencrypt:
        from carepost.core.tasks import reencrypt_data_keys

        reencrypt_data_keys()
        console.print("Re-encryption job queued: `carepost keys status` shows when old versions are retired.")


@keys_app.command("retire")
def keys_retire(
    grace: int | None = typer.Option(None, "--grace", min=0, help="Seconds the newest version must have existed (default: twice CAREPOST_KEY_REFRESH_SECONDS)."),
) -> None:
    """Re-encrypt ciphertexts of old data-key versions now, then retire (destroy) the versions nothing needs."""
    from carepost.audit.service import record
    from carepost.core.database import session_factory, system_session
    from carepost.core.reencrypt import reencrypt_and_retire

    from carepost.models import load_all_models

    load_all_models()
    report = reencrypt_and_retire(session_factory(), grace_seconds=grace)
    with system_session() as session:
        record(session, org_id=None, actor_type="system", actor_id="cli", action="keys.data_retired",
               target_type="data_key", target_id="all", details=report.as_dict())
        session.commit()
    console.print(f"Scanned {report.scanned} ciphertext(s) in {report.columns} column(s); re-encrypted {report.reencrypted}.")
    for owner, version in report.retired:
        console.print(f"Retired data key {owner} v{version} (key material destroyed).")
    for owner, version, why in report.kept:
        console.print(f"Kept data key {owner} v{version}: {why}.")
    if report.undecodable:
        err.print(f"[yellow]{report.undecodable} ciphertext(s) could not be opened; the versions they name are kept.[/yellow]")


@keys_app.command("rotate-secret")
def keys_rotate_secret(
    kind: str = typer.Argument(..., help="audit, portal, consent, forms or verp"),
) -> None:
    """Add a new version of a secret (audit chain MACs, portal links, consent tokens, form tokens,
    VERP return paths) for every owner. New MACs use it; MACs made before keep verifying."""
    from sqlalchemy import select

    from carepost.audit.service import record
    from carepost.core.crypto import NAMED_SECRET_KINDS, OrgKey, get_keyring
    from carepost.core.database import system_session

    from carepost.models import load_all_models

    if kind not in NAMED_SECRET_KINDS:
        fail(f"kind must be one of {', '.join(NAMED_SECRET_KINDS)}")
    load_all_models()
    with system_session() as session:
        owners = sorted(set(session.scalars(select(OrgKey.org_id).where(OrgKey.kind == kind)).all()))
        added = get_keyring().rotate_keys(session, kind, owners)
        record(session, org_id=None, actor_type="system", actor_id="cli", action="keys.secret_rotated",
               target_type="secret", target_id=kind, details={"kind": kind, "versions_added_count": len(added)})
        session.commit()
    console.print(f"New {kind} secret version for {len(added)} owner(s).")


@keys_app.command("rotate-index")
def keys_rotate_index(
    org: list[str] = typer.Option(None, "--org", help="Only this organization id (repeatable); default every organization."),
    resume: bool = typer.Option(False, "--resume", help="Skip organizations whose index key was rotated in the last 24 hours (finish an interrupted run)."),
) -> None:
    """Rotate blind-index keys: a new index-key version per organization and a re-index of every
    index column (contacts, name tokens, source ids, suppressions, authorizations, recipients,
    recipient keys, portal messages) in one transaction per organization. Look-ups keep working."""
    from carepost.audit.service import record
    from carepost.core.database import session_factory
    from carepost.core.reindex import resume_since, rotate_index_keys

    from carepost.models import load_all_models

    load_all_models()

    def audit(session, done) -> None:
        record(session, org_id=done.org_id, actor_type="system", actor_id="cli", action="keys.index_rotated",
               target_type="index_key", target_id=done.org_id, details=done.as_dict())

    report = rotate_index_keys(session_factory(), org or None, skip_rotated_since=resume_since() if resume else None,
                               on_done=audit)
    for done in report.rotated:
        console.print(f"Organization {done.org_id}: index key v{done.old_version} -> [bold]v{done.new_version}[/bold], "
                      f"{done.total} index(es) re-indexed in {done.seconds:.2f}s.")
    for org_id, why in report.skipped:
        console.print(f"Skipped {org_id}: {why}.")
    if org and any(why == "no index key" for _, why in report.skipped):
        fail("unknown organization (no index key)")


@keys_app.command("status")
def keys_status() -> None:
    """Every key version: owner, kind, version, state (current, previous, retired), master key."""
    from carepost.core.database import read_only_session
    from carepost.core.reencrypt import key_status

    from carepost.models import load_all_models

    load_all_models()
    with read_only_session() as session:
        rows = key_status(session)
    table = Table("owner", "kind", "version", "state", "master key", "created", "retired")
    for r in rows:
        table.add_row(r["owner"], r["kind"], str(r["version"]), r["state"], r["master_key_id"],
                      r["created_at"].strftime("%Y-%m-%d %H:%M"), r["retired_at"].strftime("%Y-%m-%d %H:%M") if r["retired_at"] else "")
    console.print(table)
    index = {r["owner"]: r["version"] for r in rows if r["kind"] == "index" and r["owner"] != "system"}
    for owner, version in sorted(index.items()):
        console.print(f"Blind-index version of {owner}: {version}")


@keys_app.command("rekey-database")
def keys_rekey_database() -> None:
    """Offline: re-encrypt the SQLCipher database file under a new key. Stop CarePost first."""
    from carepost.audit.service import record
    from carepost.core.config import get_settings
    from carepost.core.database import dispose_engine, system_session
    from carepost.core.rekey import RekeyError, rekey_database
    from carepost.core.supervisor import DataDirBusy

    from carepost.models import load_all_models

    load_all_models()
    settings = get_settings()
    dispose_engine()
    try:
        result = rekey_database(settings)
    except (RekeyError, DataDirBusy) as exc:
        fail(str(exc))
    dispose_engine()
    with system_session() as session:
        record(session, org_id=None, actor_type="system", actor_id="cli", action="keys.database_rekeyed",
               target_type="database", target_id=result.database.name,
               details={"pages_count": result.pages, "recovered": result.recovered})
        session.commit()
    if result.recovered:
        console.print(f"Finished an interrupted re-key of {result.database}.")
    else:
        console.print(f"Re-keyed {result.database} ({result.pages} pages). The new key is in {settings.data_dir / 'database.key'}; back it up.")


# --------------------------------------------------------------------------- backup and restore


def _read_passphrase(enabled: bool) -> bytes | None:
    if not enabled:
        return None
    value = sys.stdin.readline().rstrip("\r\n").encode()
    if len(value) < 12:
        fail("the passphrase (first line of standard input) must be at least 12 characters")
    return value


@app.command()
def backup(
    output: Path = typer.Argument(..., help="The archive to write (mode 0600), outside the data dir."),
    passphrase_stdin: bool = typer.Option(
        False, "--passphrase-stdin", help="Encrypt under a passphrase read from standard input instead of a key derived from the master key."),
) -> None:
    """Online, consistent, encrypted backup of the data dir (the database snapshot, database.key,
    audit checkpoints, TLS keys); never the master key. See docs/backup.md."""
    from carepost.audit.service import record
    from carepost.core.backup import BackupError, create_backup
    from carepost.core.config import get_settings
    from carepost.core.crypto import KeyUnavailable
    from carepost.core.database import system_session

    settings = get_settings()
    try:
        result = create_backup(settings, output, passphrase=_read_passphrase(passphrase_stdin))
    except (BackupError, KeyUnavailable, OSError) as exc:
        fail(f"backup failed: {exc}")
    with system_session() as session:
        record(session, org_id=None, actor_type="system", actor_id="cli", action="backup.created",
               target_type="backup", target_id=output.name,
               details={"files_count": len(result.files), "bytes": result.bytes_written})
        session.commit()
    console.print(f"Wrote {result.path} ({result.bytes_written:,} bytes, {len(result.files)} files, "
                  f"{result.seconds:.1f} s). The master key is not in it: keep it separately.")
    if not settings.is_sqlite:
        console.print("The database is PostgreSQL: back it up with pg_dump or base backups (docs/backup.md).")


@app.command()
def restore(
    archive: Path = typer.Argument(..., exists=True, dir_okay=False, help="An archive written by `carepost backup`."),
    passphrase_stdin: bool = typer.Option(False, "--passphrase-stdin", help="Read the archive's passphrase from standard input."),
) -> None:
    """Restore a backup into a fresh data dir (CAREPOST_DATA_DIR); its master key must be there
    already (copy master.key in, or set CAREPOST_MASTER_KEY). Then run `carepost audit verify`."""
    from carepost.core.backup import BackupError, restore_backup
    from carepost.core.config import get_settings

    settings = get_settings()
    try:
        result = restore_backup(settings, archive, passphrase=_read_passphrase(passphrase_stdin))
    except (BackupError, OSError) as exc:
        fail(f"restore failed: {exc}")
    console.print(f"Restored {len(result.files)} files into {result.data_dir} in {result.seconds:.1f} s"
                  + ("; the database opens and passes its integrity checks." if result.database_ok else "."))
    console.print("Next: `carepost audit verify` (and `carepost doctor`).")


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


# --------------------------------------------------------------------------- people


@user_app.command("create")
def user_create(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    email: str = typer.Option(..., "--email", help="The person's email address (their sign-in name)."),
    role: str = typer.Option(..., "--role", help="owner, admin, compliance_officer, marketer, analyst, developer or read_only."),
    name: str = typer.Option("", "--name", help="Display name."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input instead of printing an enrollment link."
    ),
) -> None:
    """Add a person to an organization; prints a one-time enrollment link unless --password-stdin."""
    from carepost.accounts.service import create_member, get_organization
    from carepost.core.config import get_settings
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    with system_session() as session:
        try:
            organization = get_organization(session, org)
            user, link = create_member(
                session, organization.id, email=email, role=role, display_name=name, password=password,
                base_url=get_settings().base_url, audit={"actor_type": "system", "actor_id": "cli"},
            )
        except CarePostError as exc:
            fail(f"{exc.field}: {exc.message}" if exc.field else exc.message)
        session.commit()
        if link is None and password is None:
            console.print(f"{user.email} already has an account: an invitation was emailed; they join by accepting it.")
            return
        console.print(f"Added {user.email} to {organization.slug} as {role} (user id {user.id}).")
        if link:
            console.print("Send them this one-time enrollment link (shown once) to choose a password and set up MFA:")
            console.print(f"  [bold]{link}[/bold]", soft_wrap=True)
        elif password is not None:
            console.print("They set up two-step sign-in (TOTP) at their first sign-in.")


@user_app.command("list")
def user_list(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """List the people of an organization."""
    from carepost.accounts.service import get_organization, list_members
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            organization = get_organization(session, org)
        except CarePostError as exc:
            fail(exc.message)
        table = Table("email", "name", "role", "status", "MFA", "id")
        for user, membership in list_members(session, organization.id):
            status = "active" if user.is_active and user.password_hash else ("invited" if user.is_active else "inactive")
            table.add_row(user.email, user.display_name, membership.role, status,
                          "on" if user.totp_confirmed_at else "off", user.id)
        console.print(table)


@user_app.command("reset-mfa")
def user_reset_mfa(email: str = typer.Option(..., "--email", help="The person's email address.")) -> None:
    """Remove every second factor of a person (TOTP, security keys, recovery codes) and end their
    sessions; they set up a new one at the next sign-in. Run on the server only; audited in each
    of their organizations."""
    from sqlalchemy import select

    from carepost.accounts.models import User
    from carepost.accounts.service import normalize_email, reset_mfa
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            user = session.scalar(select(User).where(User.email == normalize_email(email)))
        except CarePostError as exc:
            fail(f"{exc.field}: {exc.message}" if exc.field else exc.message)
        if user is None:
            fail("email: no person with this email address.")
        reset_mfa(session, user, reason="cli", audit={"actor_type": "system", "actor_id": "cli"})
        session.commit()
        console.print(f"Second factor of {user.email} reset; they set up a new one at their next sign-in.")


# --------------------------------------------------------------------------- API credentials


@apikey_app.command("create")
def apikey_create(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    name: str = typer.Option(..., "--name", help="What the credential is for."),
    scope: list[str] = typer.Option([], "--scope", help="An API scope (repeat for several), e.g. messages:send."),
    expires_days: int = typer.Option(None, "--expires-days", help="Days until it expires (default: never)."),
    sandbox: bool = typer.Option(False, "--sandbox", help="Test traffic: nothing is delivered."),
    rate_limit: int = typer.Option(None, "--rate-limit", help="Requests per minute (default: CAREPOST_RATE_LIMIT_PER_MINUTE)."),
) -> None:
    """Create an API credential and print its secret (shown once, stored only as a hash)."""
    from carepost.accounts.credentials import create_credential
    from carepost.accounts.permissions import API_SCOPES
    from carepost.accounts.service import get_organization
    from carepost.audit.service import record
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            organization = get_organization(session, org)
            cred, secret = create_credential(
                session, organization.id, name=name, scopes=scope, created_by="cli",
                expires_in_days=expires_days, sandbox=sandbox, rate_limit_per_minute=rate_limit,
            )
        except CarePostError as exc:
            fail(f"{exc.field}: {exc.message}" if exc.field else exc.message)
        record(session, org_id=organization.id, actor_type="system", actor_id="cli", action="api_credential.create",
               target_type="api_credential", target_id=cred.id,
               details={"key_id": cred.key_id, "scopes": list(cred.scopes), "sandbox": cred.sandbox})
        session.commit()
    console.print(f"Created API credential [bold]{cred.name}[/bold] in {organization.slug}.")
    console.print(f"key id:  {cred.key_id}")
    console.print(f"secret:  {secret}", soft_wrap=True, highlight=False)
    console.print(f"bearer:  {cred.key_id}.{secret}", soft_wrap=True, highlight=False)
    console.print(f"scopes:  {' '.join(cred.scopes) or '(none: only GET /api/v1/me)'}")
    if not cred.scopes:
        err.print(f"hint: grant scopes with --scope; available: {', '.join(sorted(API_SCOPES))}")
    console.print("The secret is shown only now. Store it in your secret manager.")


@apikey_app.command("list")
def apikey_list(org: str = typer.Option(..., "--org", help="Organization slug or id.")) -> None:
    """List an organization's API credentials (never their secrets)."""
    from carepost.accounts.credentials import credential_view, list_credentials
    from carepost.accounts.service import get_organization
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            organization = get_organization(session, org)
        except CarePostError as exc:
            fail(exc.message)
        table = Table()
        table.add_column("key id", no_wrap=True, min_width=28)
        for heading in ("name", "scopes", "status", "created", "expires", "last used"):
            table.add_column(heading)
        for cred in list_credentials(session, organization.id):
            v = credential_view(cred)
            table.add_row(
                v["key_id"], v["name"] + (" (sandbox)" if v["sandbox"] else ""), " ".join(v["scopes"]), v["status"],
                v["created_at"].strftime("%Y-%m-%d"), v["expires_at"].strftime("%Y-%m-%d") if v["expires_at"] else "never",
                v["last_used_at"].strftime("%Y-%m-%d %H:%M") if v["last_used_at"] else "never",
            )
        console.print(table)


@apikey_app.command("revoke")
def apikey_revoke(
    key_id: str = typer.Argument(..., help="The key id (cpk_...)."),
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
) -> None:
    """Revoke an API credential and its OAuth access tokens."""
    from carepost.accounts.credentials import get_credential_by_key_id, revoke_credential
    from carepost.accounts.service import get_organization
    from carepost.audit.service import record
    from carepost.core.database import system_session
    from carepost.core.errors import CarePostError

    with system_session() as session:
        try:
            organization = get_organization(session, org)
            cred = get_credential_by_key_id(session, organization.id, key_id)
        except CarePostError as exc:
            fail(exc.message)
        tokens = revoke_credential(session, cred)
        record(session, org_id=organization.id, actor_type="system", actor_id="cli", action="api_credential.revoke",
               target_type="api_credential", target_id=cred.id, details={"key_id": cred.key_id, "tokens_revoked": tokens})
        session.commit()
    console.print(f"Revoked {key_id} ({tokens} access token(s) revoked).")


# --------------------------------------------------------------------------- audit


@audit_app.command("verify")
def audit_verify(
    org: str = typer.Option(None, "--org", help="Organization slug or id (default: every chain)."),
    checkpoint: list[Path] = typer.Option(
        None, "--checkpoint", help="Extra checkpoint: a checkpoint file or an audit export (repeatable)."
    ),
) -> None:
    """Verify the audit hash chains; exit 1 naming the first bad event."""
    from carepost.audit.commands import run_verify

    raise typer.Exit(run_verify(org, list(checkpoint or []), console, err))


@audit_app.command("export")
def audit_export(
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    since: str = typer.Option(None, "--since", help="ISO 8601 start (inclusive), e.g. 2025-01-01."),
    until: str = typer.Option(None, "--until", help="ISO 8601 end (exclusive)."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or csv."),
    output: Path = typer.Option(None, "--output", "-o", help="File to write (mode 0600); default stdout."),
) -> None:
    """Export an organization's audit events (all fields, hashes, checkpoint trailer)."""
    from carepost.audit.commands import run_export

    raise typer.Exit(run_export(org, since, until, fmt, output, err))


# --------------------------------------------------------------------------- patients


@app.command("import")
def import_(
    files: list[Path] = typer.Argument(..., help="FHIR Bundle JSON, bulk-data NDJSON or CSV files."),
    org: str = typer.Option(..., "--org", help="Organization slug or id."),
    fmt: str = typer.Option("auto", "--format", help="auto, fhir, ndjson or csv."),
    mapping: str = typer.Option(None, "--mapping", help="Saved CSV column mapping (name or id)."),
    delimiter: str = typer.Option(None, "--delimiter", help="CSV delimiter (default: detected)."),
    encoding: str = typer.Option(None, "--encoding", help="CSV encoding: utf-8, utf-8-sig, latin-1 or cp1252 (default: detected)."),
    date_format: str = typer.Option(None, "--date-format", help="CSV date format such as %m/%d/%Y (default: common formats)."),
) -> None:
    """Import patients and clinical facts; exits non-zero with a summary when any record failed."""
    from carepost.patients.commands import import_files

    raise typer.Exit(import_files(org, files, format=fmt, mapping=mapping, delimiter=delimiter, encoding=encoding,
                                  date_format=date_format, console=console))


# --------------------------------------------------------------------------- delivery

from carepost.delivery.commands import domain_app  # noqa: E402

app.add_typer(domain_app, name="domain")

from carepost.segments.commands import segment_app  # noqa: E402

app.add_typer(segment_app, name="segment")

from carepost.tracking.commands import analytics_app  # noqa: E402

app.add_typer(analytics_app, name="analytics")

from carepost.campaigns.commands import campaign_app  # noqa: E402

app.add_typer(campaign_app, name="campaign")

from carepost.compliance.commands import compliance_app  # noqa: E402

app.add_typer(compliance_app, name="compliance")

from carepost.retention.commands import retention_app  # noqa: E402

app.add_typer(retention_app, name="retention")

from carepost.ehr.commands import ehr_app  # noqa: E402

app.add_typer(ehr_app, name="ehr")


@app.command()
def mllp(
    host: str = typer.Option(None, help="Bind address (default CAREPOST_MLLP_HOST)."),
    port: int = typer.Option(None, help="Port (default CAREPOST_MLLP_PORT)."),
    processes: int = typer.Option(1, min=1, max=64, help="Listener processes sharing the port (SO_REUSEPORT, Linux)."),
) -> None:
    """Run the HL7 v2 listener (MLLP, TLS with CAREPOST_MLLP_CERT_FILE): ADT and SIU messages become contact events."""
    from carepost.core.config import get_settings
    from carepost.ehr.commands import run_mllp

    settings = get_settings()
    with _holding_data_dir(settings):
        code = run_mllp(settings, host=host, port=port, processes=processes)
    raise typer.Exit(code)


from carepost.journeys.commands import journeys_app  # noqa: E402

app.add_typer(journeys_app, name="journeys")

from carepost.archive.commands import archive_app  # noqa: E402

app.add_typer(archive_app, name="archive")  # the message archive's word index (issue 16 item 8)


@app.command()
def smtp(
    self_signed: bool = typer.Option(
        False, "--self-signed", help="Without CAREPOST_SMTP_SUBMISSION_CERT_FILE: use a self-signed certificate kept in the data dir."
    ),
) -> None:
    """Run SMTP submission for applications: STARTTLS required, AUTH with API credentials (key id and secret)."""
    from carepost.core.config import get_settings
    from carepost.delivery.commands import run_smtp

    settings = get_settings()
    with _holding_data_dir(settings):
        code = run_smtp(settings, self_signed=self_signed)
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
