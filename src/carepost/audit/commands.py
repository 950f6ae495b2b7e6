"""``carepost audit verify`` and ``carepost audit export`` (wired in ``carepost.cli``).

Each run is itself audited (actor ``system``/``cli``). Sessions are used one after another,
never two at once (SQLite takes its write lock at BEGIN): resolve the organization, verify or
export in a read-only snapshot, then append the audit event.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from carepost.audit import checkpoints
from carepost.audit.service import parse_time, record
from carepost.core.errors import CarePostError

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2


def _resolve_org(org_ref: str | None):
    """(org id, label) or (None, None); raises CarePostError (field ``org``) when unknown."""
    if not org_ref:
        return None, None
    from carepost.accounts.service import get_organization
    from carepost.core.database import read_only_session

    with read_only_session() as session:
        org = get_organization(session, org_ref)
        return org.id, org.slug


def _chain_labels(chains: list[str]) -> dict[str, str]:
    from sqlalchemy import select

    from carepost.accounts.models import Organization
    from carepost.audit.models import SYSTEM_CHAIN
    from carepost.core.database import read_only_session

    labels = {SYSTEM_CHAIN: "system"}
    ids = [c for c in chains if c != SYSTEM_CHAIN]
    if ids:
        with read_only_session() as session:
            for org_id, slug in session.execute(select(Organization.id, Organization.slug).where(Organization.id.in_(ids))):
                labels[org_id] = slug
    return labels


def _audit_cli(org_id: str | None, action: str, outcome: str, details: dict, target_type: str, target_id: str | None) -> None:
    from carepost.core.database import system_session

    with system_session() as session:
        record(session, org_id=org_id, actor_type="system", actor_id="cli", action=action, outcome=outcome,
               target_type=target_type, target_id=target_id, details=details)
        session.commit()


def run_verify(org_ref: str | None, checkpoint_files: list[Path], out: Console, err: Console) -> int:
    from carepost.audit.verify import verify
    from carepost.core.database import read_only_session

    given: list[checkpoints.Checkpoint] = []
    for path in checkpoint_files:
        try:
            given.extend(checkpoints.load_file(path))
        except checkpoints.CheckpointError as exc:
            err.print(f"[red]error:[/red] --checkpoint: {exc}")
            return EXIT_USAGE
    try:
        org_id, _label = _resolve_org(org_ref)
    except CarePostError as exc:
        err.print(f"[red]error:[/red] --{exc.field or 'org'}: {exc.message}")
        return EXIT_USAGE
    if org_id:
        ignored = [cp for cp in given if cp.chain != org_id]
        if ignored:
            err.print(f"[yellow]note:[/yellow] {len(ignored)} given checkpoint(s) belong to other chains and were not used")

    with err.status("Verifying the audit log…"):
        with read_only_session() as session:
            report = verify(session, org_id=org_id, given=given)
    labels = _chain_labels([c.chain for c in report.chains])

    table = Table("chain", "events", "head seq", "checkpoint", "result", title="Audit chains")
    for c in report.chains:
        cps = ", ".join(f"seq {e['seq']} {e.get('status', '')}".strip() for e in c.checkpoints) or "none"
        verdict = "[green]intact[/green]" if c.ok else f"[red]FAILED: {c.problem.kind}[/red]"
        table.add_row(labels.get(c.chain, c.chain), str(c.events), "-" if c.head_seq is None else str(c.head_seq), cps, verdict)
    out.print(table)
    for c in report.chains:
        if c.anchor:
            signature = "signature valid" if c.anchor.get("signature_valid") else "signature NOT valid"
            out.print(f"{labels.get(c.chain, c.chain)}: starts after seq {c.anchor['seq']} ({c.anchor['removed']} oldest "
                      f"event(s) removed by retention, the last from {c.anchor['occurred_at']}; signed anchor, "
                      f"{signature}, state {c.anchor.get('state', 'valid')})")
        for warning in c.warnings:
            out.print(f"[yellow]warning[/yellow] {labels.get(c.chain, c.chain)}: {warning}")
    if not report.chains:
        out.print("No audit events yet.")

    problem = report.first_problem
    details = {"chains": len(report.chains), "ok": report.ok}
    if problem:
        details.update(problem=problem.kind, first_bad_chain=problem.chain, first_bad_seq=problem.seq,
                       first_bad_event_id=problem.event_id)
    _audit_cli(org_id, "audit.verify", "success" if report.ok else "failure", details, "audit_chain", org_id or "all")

    if problem:
        chain_label = labels.get(problem.chain, problem.chain)
        where = f"chain {chain_label} ({problem.chain})"
        if problem.seq is not None:
            where += f", seq {problem.seq}"
        if problem.event_id:
            where += f", event {problem.event_id}"
        err.print(f"[red]FAILED[/red] first bad event: {where}: {problem.message}", soft_wrap=True)
        for c in report.chains[1:]:
            if c.problem and c.problem is not problem:
                err.print(f"[red]FAILED[/red] also chain {labels.get(c.chain, c.chain)}, seq {c.problem.seq}: {c.problem.message}", soft_wrap=True)
        return EXIT_TAMPERED
    out.print(f"[green]OK[/green] {len(report.chains)} chain(s) intact.")
    return EXIT_OK


def run_export(org_ref: str, since: str | None, until: str | None, fmt: str, output: Path | None, err: Console) -> int:
    from carepost.audit.export import FORMATS, stream_export

    fmt = (fmt or "").lower()
    if fmt not in FORMATS:
        err.print(f"[red]error:[/red] --format: choose one of {', '.join(FORMATS)}")
        return EXIT_USAGE
    try:
        since_at = parse_time(since, "since")
        until_at = parse_time(until, "until")
        org_id, label = _resolve_org(org_ref)
    except CarePostError as exc:
        err.print(f"[red]error:[/red] --{exc.field or 'org'}: {exc.message}")
        return EXIT_USAGE
    if since_at and until_at and since_at >= until_at:
        err.print("[red]error:[/red] --until: must be later than --since")
        return EXIT_USAGE

    details = {"format": fmt, "since": since_at.isoformat() if since_at else None,
               "until": until_at.isoformat() if until_at else None, "destination": "file" if output else "stdout"}
    _audit_cli(org_id, "audit.export", "success", details, "audit_chain", org_id)

    chunks = stream_export(org_id, fmt=fmt, since=since_at, until=until_at)
    if output is None:
        for chunk in chunks:
            sys.stdout.write(chunk)
        sys.stdout.flush()
        return EXIT_OK
    # The export holds who did what in the organization: readable by the owner only.
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    err.print(f"Exported the audit log of {label} to {output}")
    return EXIT_OK
