"""``carepost import``: FHIR Bundle JSON, NDJSON or CSV files into one organization, with a
Rich progress bar per file and a summary; the exit code is non-zero when any record failed."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn


def import_files(org: str, files: list[Path], *, format: str = "auto", mapping: str | None = None,
                 delimiter: str | None = None, encoding: str | None = None, date_format: str | None = None,
                 console: Console | None = None) -> int:
    """Returns the exit code: 0 when every record of every file was imported, 1 when any record
    failed (the error report says which and why), 2 when a file could not be read at all."""
    from sqlalchemy import select

    from carepost.accounts.service import get_organization
    from carepost.core.database import org_session, system_session
    from carepost.core.errors import CarePostError
    from carepost.patients import imports
    from carepost.patients.models import CsvMapping, ImportRecordError

    console = console or Console()
    err = Console(stderr=True)
    with system_session() as s:
        try:
            org_obj = get_organization(s, org)
        except CarePostError as exc:
            err.print(f"[red]error:[/red] {exc.message}")
            return 2
        org_id = org_obj.id
    mapping_id = None
    if mapping:
        with org_session(org_id) as s:
            mapping_id = s.scalar(select(CsvMapping.id).where(CsvMapping.org_id == org_id, (CsvMapping.name == mapping) | (CsvMapping.id == mapping)))
        if mapping_id is None:
            err.print(f"[red]error:[/red] no CSV mapping {mapping!r} in this organization")
            return 2
    options = {k: v for k, v in {"delimiter": delimiter, "encoding": encoding, "date_format": date_format}.items() if v}
    summary: list[str] = []
    worst = 0
    for path in files:
        with org_session(org_id) as session, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(path.name, total=max(path.stat().st_size * 2, 1) if path.is_file() else 1)
            try:
                job = imports.import_local_file(session, org_id, path, format=format, mapping_id=mapping_id, options=options,
                                                on_progress=lambda done, total: bar.update(task, completed=done, total=total))
            except CarePostError as exc:
                summary.append(f"{path.name}: [red]failed[/red]")
                err.print(f"[red]{path}:[/red] {exc.message}")
                worst = 2
                continue
            counts = job.counts or {}
            status = {"succeeded": "[green]succeeded[/green]", "failed": "[red]failed[/red]"}.get(job.status, f"[yellow]{job.status}[/yellow]")
            summary.append(f"{path.name}: {status}: {counts.get('patients', 0)} patients "
                           f"({counts.get('patients_without_email', 0)} without an email address); records: "
                           f"{counts.get('created', 0)} created, {counts.get('updated', 0)} updated, "
                           f"{counts.get('skipped', 0)} skipped, {job.error_count} failed, "
                           f"{job.warning_count or 0} kept with warnings (import {job.id})")
            if job.failure:
                err.print(f"[red]{path}:[/red] {job.failure}")
                worst = 2
            if job.error_count or job.warning_count:
                if job.error_count:
                    worst = max(worst, 1)
                rows = session.scalars(select(ImportRecordError).where(ImportRecordError.import_id == job.id)
                                       .order_by(ImportRecordError.seq).limit(10)).all()
                for e in rows:
                    where = " ".join(x for x in (f"line {e.line}" if e.line else "", e.resource or "") if x)
                    err.print(f"  {path.name}: {e.severity or 'error'}: {where}{' ' + e.field if e.field else ''}: {e.reason}")
                reported = (job.error_count or 0) + (job.warning_count or 0)
                if reported > len(rows):
                    err.print(f"  ... {reported - len(rows)} more in the error report of import {job.id}")
    for line in summary:
        console.print(line, soft_wrap=True)
    return worst
