"""Import jobs: encrypted upload storage in the database, format detection, running an import,
the error report.

An upload is stored as encrypted chunks (:class:`ImportChunk`) so any worker can read it and
nothing lands on the web server's disk. Running a job is idempotent: a job that already finished
is left alone; one interrupted half-way starts over (re-import updates by source id, never
duplicates). When a job ends its chunks are deleted — the upload is PHI and is not kept.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import CarePostError, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.core.logging import get_logger
from carepost.patients.fhir import ErrorSink, FhirImporter, FileFailure, ImportStats
from carepost.patients.models import ImportChunk, ImportJob, ImportRecordError

log = get_logger("carepost.patients.imports")

CHUNK_BYTES = 1024 * 1024
DETECT_BYTES = 1024 * 1024  # enough for a long NDJSON line (a resource with a photo) to be recognized
MAX_STORED_ERRORS = 10000
FORMATS = ("auto", "fhir", "ndjson", "csv")
FINISHED = ("succeeded", "completed_with_errors", "failed")
TERMINAL_STATUSES = FINISHED


# --------------------------------------------------------------------------- jobs and uploads


def create_job(session: Session, org_id: str, *, format: str = "auto", filename: str | None = None,
               created_by: str | None = None, mapping_id: str | None = None, options: dict | None = None) -> ImportJob:
    if format not in FORMATS:
        raise ValidationFailed("format must be one of auto, fhir, ndjson, csv.", field="format")
    job = ImportJob(id=new_id(), org_id=org_id, format=format, status="uploading", created_by=created_by,
                    mapping_id=mapping_id, options=options or {}, counts={})
    if filename:
        job.filename_enc = get_keyring().encrypt(session, org_id, "import_jobs", "filename", job.id, filename[:255])
    session.add(job)
    session.flush()
    return job


def job_filename(session: Session, job: ImportJob) -> str | None:
    return get_keyring().decrypt_text(session, job.org_id, "import_jobs", "filename", job.id, job.filename_enc)


def get_job(session: Session, import_id: str) -> ImportJob:
    job = session.get(ImportJob, import_id) if is_id(import_id) else None
    if job is None or (session.info.get("org_id") and job.org_id != session.info["org_id"]):
        raise NotFound("No such import.", field="import_id")
    return job


def list_jobs(session: Session, org_id: str, limit: int = 50) -> list[ImportJob]:
    return list(session.scalars(select(ImportJob).where(ImportJob.org_id == org_id).order_by(ImportJob.created_at.desc()).limit(limit)))


class UploadTooLarge(CarePostError):
    status_code = 413
    code = "payload_too_large"


class ChunkWriter:
    """Buffers bytes and stores them as encrypted 1 MiB chunks of a job."""

    def __init__(self, session: Session, job: ImportJob, max_bytes: int | None = None):
        self.session = session
        self.job = job
        self.max_bytes = max_bytes
        self.buffer = bytearray()
        self.seq = session.scalar(select(func.count()).select_from(ImportChunk).where(ImportChunk.import_id == job.id)) or 0
        self.size = job.size_bytes or 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise UploadTooLarge(f"The file is larger than the upload limit of {self.max_bytes} bytes (CAREPOST_MAX_UPLOAD_BYTES).",
                                 field="file")
        self.buffer.extend(data)
        while len(self.buffer) >= CHUNK_BYTES:
            self._store(bytes(self.buffer[:CHUNK_BYTES]))
            del self.buffer[:CHUNK_BYTES]

    def _store(self, data: bytes) -> None:
        chunk = ImportChunk(id=new_id(), org_id=self.job.org_id, import_id=self.job.id, seq=self.seq)
        chunk.data_enc = get_keyring().encrypt(self.session, self.job.org_id, "import_chunks", "data", chunk.id, data)
        self.session.add(chunk)
        self.seq += 1
        self.session.flush()

    def close(self) -> None:
        if self.buffer:
            self._store(bytes(self.buffer))
            self.buffer.clear()
        self.job.size_bytes = self.size
        self.session.flush()


def store_upload(session: Session, job: ImportJob, chunks: Iterable[bytes], max_bytes: int | None = None) -> int:
    writer = ChunkWriter(session, job, max_bytes)
    for data in chunks:
        writer.write(data)
    writer.close()
    return writer.size


def discard_upload(session: Session, job: ImportJob) -> None:
    session.execute(delete(ImportChunk).where(ImportChunk.org_id == job.org_id, ImportChunk.import_id == job.id))


class StoredFile(io.RawIOBase):
    """Reads a stored upload back, decrypting one chunk at a time (memory stays flat)."""

    def __init__(self, session: Session, job: ImportJob, on_read: Callable[[int], None] | None = None):
        self.session = session
        self.job = job
        self.seq = 0
        self.current = b""
        self.pos = 0
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.pos >= len(self.current):
            row = self.session.execute(
                select(ImportChunk.id, ImportChunk.data_enc).where(ImportChunk.import_id == self.job.id, ImportChunk.seq == self.seq)
            ).first()
            if row is None:
                return 0
            self.current = get_keyring().decrypt(self.session, self.job.org_id, "import_chunks", "data", row.id, row.data_enc)
            self.pos = 0
            self.seq += 1
        n = min(len(buffer), len(self.current) - self.pos)
        buffer[:n] = self.current[self.pos : self.pos + n]
        self.pos += n
        if self.on_read:
            self.on_read(n)
        return n


class CountingFile(io.RawIOBase):
    """Wraps a local file to report bytes read (CLI progress)."""

    def __init__(self, raw: IO[bytes], on_read: Callable[[int], None] | None):
        self.raw = raw
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n and self.on_read:
            self.on_read(n)
        return n or 0

    def close(self) -> None:
        self.raw.close()
        super().close()


# --------------------------------------------------------------------------- detection


def detect_format(head: bytes) -> str:
    """``fhir`` (a JSON document), ``ndjson`` or ``csv``, from the first bytes of a file."""
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text:
        raise FileFailure("The file is empty.", field="file")
    if text[:1] == b"[":
        raise FileFailure("A JSON array is not a FHIR format: send a Bundle or NDJSON (one resource per line).", field="file")
    if text[:1] != b"{":
        return "csv"
    first_line, newline, rest = text.partition(b"\n")
    if newline and rest.strip():
        import json

        try:
            json.loads(first_line)
            return "ndjson"
        except ValueError:
            return "fhir"
    return "fhir"


# --------------------------------------------------------------------------- running


class DbErrorSink(ErrorSink):
    """Record errors as rows of the job's error report; counts and progress on the job."""

    def __init__(self, session: Session, job: ImportJob, progress: Callable[[ImportStats], None] | None = None):
        self.session = session
        self.job = job
        self.seq = 0  # failures
        self.warnings = 0
        self.rows = 0  # report rows stored (errors and warnings share the order)
        self.progress = progress

    def _row(self, severity: str, reason: str, line, resource, field) -> None:
        self.rows += 1
        if self.rows <= MAX_STORED_ERRORS:
            self.session.add(ImportRecordError(org_id=self.job.org_id, import_id=self.job.id, seq=self.rows, line=line,
                                               resource=resource and resource[:200], field=field and field[:200], reason=reason[:500],
                                               severity=severity))

    def error(self, *, reason: str, line: int | None = None, resource: str | None = None, field: str | None = None) -> None:
        self.seq += 1
        self.job.error_count = self.seq
        self._row("error", reason, line, resource, field)

    def warning(self, *, reason: str, line: int | None = None, resource: str | None = None, field: str | None = None) -> None:
        self.warnings += 1
        self.job.warning_count = self.warnings
        self._row("warning", reason, line, resource, field)

    def checkpoint(self, stats: ImportStats) -> None:
        self.job.counts = stats.as_dict()
        self.job.processed = stats.processed
        if self.progress:
            self.progress(stats)


@dataclass
class Progress:
    """Bytes read across the passes of an import, for progress bars."""

    total: int
    passes: int = 2
    done: int = 0
    callback: Callable[[int, int], None] | None = None

    def read(self, n: int) -> None:
        self.done += n
        if self.callback:
            self.callback(min(self.done, self.total * self.passes), self.total * self.passes)


def run_job(session: Session, import_id: str, *, opener: Callable[[], IO[bytes]] | None = None,
            progress: Progress | None = None, validate: bool = True) -> ImportJob:
    """Run one import job to its end in ``session`` (scoped to the job's organization). Commits
    as it goes. ``opener`` reads the file from elsewhere than stored chunks (the CLI's local
    file)."""
    job = get_job(session, import_id)
    if job.status in FINISHED:
        return job
    # A run that was interrupted starts over: its errors and counts are replaced.
    session.execute(delete(ImportRecordError).where(ImportRecordError.org_id == job.org_id, ImportRecordError.import_id == job.id))
    job.status = "running"
    job.started_at = clock.now()
    job.counts, job.processed, job.error_count, job.warning_count, job.failure = {}, 0, 0, 0, None
    session.commit()

    if opener is None:
        def opener():
            return io.BufferedReader(StoredFile(session, job, progress.read if progress else None), buffer_size=256 * 1024)

    sink = DbErrorSink(session, job)
    stats: ImportStats | None = None
    run_id = new_id()  # marks rows written by this run: a second record for the same source is a duplicate
    try:
        fmt = job.format
        if fmt == "auto":
            with opener() as f:
                fmt = detect_format(f.read(DETECT_BYTES))
            if progress:
                progress.done = 0
            job.format = fmt
        if fmt == "csv":
            from carepost.patients.csvimport import CsvImporter

            importer = CsvImporter(session, job.org_id, run_id, sink, mapping=_mapping_of(session, job), options=job.options or {})
            if progress:
                progress.passes = 1
            stats = importer.run(opener)
        else:
            fhir = FhirImporter(session, job.org_id, run_id, sink, validate=validate)
            stats = fhir.import_ndjson(opener) if fmt == "ndjson" else fhir.import_json(opener)
        job.status = "completed_with_errors" if sink.seq else "succeeded"
        stats.patients, stats.patients_without_email = patient_counts(session, job.org_id, run_id)
    except (FileFailure, CarePostError) as exc:
        session.rollback()
        job = get_job(session, import_id)
        job.status = "failed"
        job.failure = exc.message[:1000]
        sink.job = job
    except Exception as exc:  # a bug or an outage: keep what committed, say so without details
        session.rollback()
        log.error("import_failed", import_id=import_id, error_type=type(exc).__name__)
        job = get_job(session, import_id)
        job.status = "failed"
        job.failure = "The import stopped because of an internal error; records imported before it were kept."
    if stats is not None:
        job.counts = stats.as_dict()
        job.processed = stats.processed
    job.error_count = max(job.error_count or 0, sink.seq)
    job.warning_count = max(job.warning_count or 0, sink.warnings)
    job.finished_at = clock.now()
    discard_upload(session, job)
    from carepost.audit.service import record

    record(session, org_id=job.org_id, actor_type="system", actor_id="import", on_behalf_of=job.created_by,
           action="import.finish", target_type="import", target_id=job.id, outcome="success" if job.status != "failed" else "failure",
           details={"status": job.status, "format": job.format, "created": (job.counts or {}).get("created", 0),
                    "updated": (job.counts or {}).get("updated", 0), "failed": (job.counts or {}).get("failed", 0),
                    "warnings": job.warning_count or 0})
    session.commit()
    return job


def patient_counts(session: Session, org_id: str, run_id: str) -> tuple[int, int]:
    """(patients this import created or updated, how many of them have no email address): the
    summary counts people, not records, and says who cannot be emailed yet."""
    from sqlalchemy import exists

    from carepost.patients.models import Contact, ContactIdentifier

    patients = session.scalar(select(func.count()).select_from(Contact).where(
        Contact.org_id == org_id, Contact.last_import_id == run_id)) or 0
    has_email = exists().where(ContactIdentifier.org_id == org_id, ContactIdentifier.contact_id == Contact.id,
                               ContactIdentifier.kind == "email")
    without = session.scalar(select(func.count()).select_from(Contact).where(
        Contact.org_id == org_id, Contact.last_import_id == run_id, ~has_email)) or 0
    return patients, without


def _mapping_of(session: Session, job: ImportJob):
    from carepost.patients.csvimport import get_mapping

    return get_mapping(session, job.mapping_id) if job.mapping_id else None


def job_dict(session: Session, job: ImportJob, *, with_errors: int = 20) -> dict:
    errors = []
    if with_errors:
        errors = [error_dict(e) for e in session.scalars(
            select(ImportRecordError).where(ImportRecordError.import_id == job.id).order_by(ImportRecordError.seq).limit(with_errors))]
    return {
        "id": job.id,
        "format": job.format,
        "status": job.status,
        "size_bytes": job.size_bytes,
        "processed": job.processed,
        "counts": job.counts or {},
        "patients": (job.counts or {}).get("patients", 0),
        "patients_without_email": (job.counts or {}).get("patients_without_email", 0),
        "error_count": job.error_count,
        "warning_count": job.warning_count or 0,
        "errors": errors,
        "failure": job.failure,
        "created_at": clock.aware(job.created_at).isoformat(),
        "started_at": job.started_at and clock.aware(job.started_at).isoformat(),
        "finished_at": job.finished_at and clock.aware(job.finished_at).isoformat(),
        "error_report": f"/api/v1/imports/{job.id}/errors",
    }


def error_dict(e: ImportRecordError) -> dict:
    return {"line": e.line, "resource": e.resource, "field": e.field, "reason": e.reason, "severity": e.severity or "error"}


def error_report_csv(session: Session, job: ImportJob) -> Iterable[str]:
    """The error report as CSV lines (line, resource, field, reason, severity), streamed: failures
    (``error``, not imported) and records kept with a flagged value (``warning``)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["line", "resource", "field", "reason", "severity"])
    yield out.getvalue()
    last = 0
    while True:
        rows = list(session.scalars(select(ImportRecordError).where(ImportRecordError.import_id == job.id, ImportRecordError.seq > last)
                                    .order_by(ImportRecordError.seq).limit(1000)))
        if not rows:
            break
        out = io.StringIO()
        writer = csv.writer(out)
        for e in rows:
            writer.writerow([e.line or "", e.resource or "", e.field or "", e.reason, e.severity or "error"])
        last = rows[-1].seq
        yield out.getvalue()


def import_local_file(session: Session, org_id: str, path, *, format: str = "auto", mapping_id: str | None = None,
                      options: dict | None = None, created_by: str = "cli",
                      on_progress: Callable[[int, int], None] | None = None) -> ImportJob:
    """Import a file from the local disk (the CLI): the job records status and errors; the file
    is read in place, not copied into the database."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise NotFound("No such file.", field="file")
    job = create_job(session, org_id, format=format, filename=path.name, created_by=created_by, mapping_id=mapping_id, options=options)
    job.size_bytes = path.stat().st_size
    job.status = "queued"
    session.commit()
    progress = Progress(total=max(job.size_bytes, 1), callback=on_progress)

    def opener():
        return io.BufferedReader(CountingFile(open(path, "rb", buffering=0), progress.read), buffer_size=256 * 1024)

    return run_job(session, job.id, opener=opener, progress=progress)
