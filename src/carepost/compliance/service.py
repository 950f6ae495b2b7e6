"""De-identified exports (Safe Harbor, 45 CFR 164.514(b)(2)) of a saved segment.

A job is created (:func:`create_export`, audited with who, which segment and the format), run by
the worker (:func:`run_export`, ``tasks.run_deidentified_export``) or in process by the CLI, and
downloaded (:func:`download`, audited). The file is encrypted at rest under the organization's
data key until the job is deleted.

Set-based read: the runner reads the ``contacts`` table and the clinical fact tables of patients
directly (chunks of :data:`CHUNK` contact ids, one query per table), as segments do, instead of
one service call per contact; it decrypts identifiers only to feed the known-value guard
(:mod:`carepost.compliance.deidentify`), never to write them.

Output:

* ``jsonl``: one line per subject, ``{"subject_id", "birth_year", "age", ..., "facts": [...]}``;
* ``csv``: a ZIP archive with ``subjects.csv`` and ``facts.csv`` (joined on ``subject_id``) and
  ``README.txt`` (the method and the ZIP3 source).

Subjects come out in random order (CarePost ids sort by creation time; their order would say
who was added first).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
import zipfile
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.audit.service import record
from carepost.compliance import deidentify
from carepost.compliance.models import DeidentifiedExport
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.core.logging import get_logger
from carepost.patients.models import FACT_MODELS, Contact
from carepost.segments import service as segments
from carepost.segments.service import Actor

log = get_logger("carepost.compliance")

FORMATS = ("csv", "jsonl")
CHUNK = 500
TABLE = DeidentifiedExport.__tablename__
MEDIA_TYPES = {"csv": "application/zip", "jsonl": "application/x-ndjson"}
EXTENSIONS = {"csv": "zip", "jsonl": "jsonl"}


def _audit(session: Session, org_id: str, actor: Actor, action: str, job: DeidentifiedExport, details: dict,
           outcome: str = "success") -> None:
    record(session, org_id=org_id, actor_type=actor.kind, actor_id=actor.id, on_behalf_of=actor.on_behalf_of,
           action=action, target_type="deidentified_export", target_id=job.id, outcome=outcome,
           details=details, **(actor.context or {}))


def create_export(session: Session, org_id: str, segment_id: str, fmt: str, actor: Actor) -> DeidentifiedExport:
    """A queued job for ``segment_id`` (a saved segment of ``org_id``); the caller commits and
    starts it. An unknown segment (or another organization's) is refused naming ``segment_id``."""
    if fmt not in FORMATS:
        raise ValidationFailed("Choose csv or jsonl.", field="format")
    try:
        seg = segments.get_segment(session, org_id, segment_id, actor) if is_id(segment_id) else None
    except NotFound:
        seg = None
    if seg is None:
        raise ValidationFailed("No such segment in this organization.", field="segment_id")
    job = DeidentifiedExport(id=new_id(), org_id=org_id, segment_id=seg.id, format=fmt, status="queued",
                             created_by=actor.id, created_at=clock.now())
    session.add(job)
    session.flush([job])
    _audit(session, org_id, actor, "compliance.deidentified_export.requested", job,
           {"segment_id": seg.id, "format": fmt, "sensitive_categories": list(seg.sensitive_categories or [])})
    return job


def get_export(session: Session, org_id: str, export_id: str) -> DeidentifiedExport:
    job = session.scalar(select(DeidentifiedExport).where(DeidentifiedExport.org_id == org_id,
                                                         DeidentifiedExport.id == export_id)) if is_id(export_id) else None
    if job is None:
        raise NotFound("No such de-identified export.", field="export_id")
    return job


def list_exports(session: Session, org_id: str, limit: int = 100) -> list[DeidentifiedExport]:
    return list(session.scalars(select(DeidentifiedExport).where(DeidentifiedExport.org_id == org_id)
                                .order_by(DeidentifiedExport.created_at.desc(), DeidentifiedExport.id).limit(limit)))


def export_dict(job: DeidentifiedExport) -> dict:
    def ts(v: datetime | None) -> str | None:
        return clock.aware(v).isoformat() if v else None

    return {"id": job.id, "segment_id": job.segment_id, "format": job.format, "status": job.status,
            "subject_count": job.subject_count, "fact_count": job.fact_count,
            "suppressed_values": job.suppressed_values, "size_bytes": job.size_bytes, "sha256": job.sha256,
            "failure": job.failure, "created_by": job.created_by, "created_at": ts(job.created_at),
            "started_at": ts(job.started_at), "finished_at": ts(job.finished_at),
            "download": f"/api/v1/compliance/deidentified-exports/{job.id}/download" if job.status == "succeeded" else None}


# --------------------------------------------------------------------------- the run


def _subjects(session: Session, org_id: str, seg, actor: Actor, today) -> tuple[list[tuple[dict, list[dict]]], int]:
    """Every member of ``seg`` as (subject row, fact rows), and the number of values suppressed."""
    from carepost.patients.service import contact_dicts

    guard = deidentify.Guard()
    out: list[tuple[dict, list[dict]]] = []
    after = None
    while True:
        ids, after = segments.members(session, org_id, seg, actor, after=after, limit=CHUNK)
        if ids:
            contacts = list(session.scalars(select(Contact).where(Contact.org_id == org_id, Contact.id.in_(ids))
                                            .order_by(Contact.id)))
            views = {v["id"]: v for v in contact_dicts(session, contacts)}
            facts: dict[str, list[tuple[str, object]]] = {}
            loaded: list[object] = list(contacts)
            for kind, model in FACT_MODELS.items():
                for fact in session.scalars(select(model).where(model.org_id == org_id, model.contact_id.in_(ids))
                                            .order_by(model.contact_id, model.id)):
                    facts.setdefault(fact.contact_id, []).append((kind, fact))
                    loaded.append(fact)
            for contact in contacts:
                guard.know(views.get(contact.id))
                pseudonym = deidentify.new_pseudonym()
                subject = deidentify.subject_row(contact, pseudonym, today, guard)
                rows = [deidentify.fact_row(kind, fact, pseudonym, guard) for kind, fact in facts.get(contact.id, [])]
                out.append((subject, rows))
            for obj in loaded:  # keep the session's identity map small over a large segment
                session.expunge(obj)
        if after is None:
            break
    guard.know(None)
    secrets.SystemRandom().shuffle(out)
    return out, guard.suppressed


def _readme(job: DeidentifiedExport, subjects: int, facts: int) -> str:
    zip3 = deidentify.restricted_zip3()
    return (
        "De-identified export (HIPAA Safe Harbor, 45 CFR 164.514(b)(2))\n\n"
        f"Subjects: {subjects}\nClinical facts: {facts}\nProduced (year): {clock.now().year}\n\n"
        "The 18 identifiers of 164.514(b)(2)(i) are removed: no names, no geography smaller than a state\n"
        "except the first three ZIP digits (000 where that area holds 20,000 people or fewer), years only\n"
        "for every date, ages over 89 as \"90+\" without a birth year, no contact details, record, plan,\n"
        "account, licence, device or vehicle numbers, URLs, IP addresses, biometrics or photos, and no\n"
        "free text. subject_id is a random pseudonym made for this export only; no key linking it to a\n"
        "person is kept.\n\n"
        f"Restricted ZIP3 list ({zip3['census']} Census): {', '.join(sorted(zip3['zip3']))}\n"
        f"Source: {zip3['source']}\n"
    )


def _csv(rows: list[dict], fields: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def build_file(job: DeidentifiedExport, subjects: list[tuple[dict, list[dict]]]) -> bytes:
    facts = sum(len(f) for _, f in subjects)
    if job.format == "jsonl":
        lines = [json.dumps({**s, "facts": f}, separators=(",", ":"), default=str) for s, f in subjects]
        return ("\n".join(lines) + ("\n" if lines else "")).encode()
    buf = io.BytesIO()
    fixed = (1980, 1, 1, 0, 0, 0)  # no timestamp inside the archive
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, text in (("subjects.csv", _csv([s for s, _ in subjects], deidentify.SUBJECT_FIELDS)),
                           ("facts.csv", _csv([r for _, f in subjects for r in f], deidentify.FACT_FIELDS)),
                           ("README.txt", _readme(job, len(subjects), facts))):
            z.writestr(zipfile.ZipInfo(name, fixed), text)
    return buf.getvalue()


def run_export(session: Session, org_id: str, export_id: str) -> DeidentifiedExport:
    """Run a queued job to its end (idempotent: a finished job is left alone; one interrupted
    mid-run starts over). Commits."""
    job = get_export(session, org_id, export_id)
    if job.status in ("succeeded", "failed"):
        return job
    job.status, job.started_at = "running", clock.now()
    session.commit()
    actor = Actor("system", None, frozenset(segments.SYSTEM.permissions), on_behalf_of=job.created_by)
    try:
        seg = segments.get_segment(session, org_id, job.segment_id)
        subjects, suppressed = _subjects(session, org_id, seg, actor, clock.now().date())
        data = build_file(job, subjects)
        job = get_export(session, org_id, export_id)
        job.content_enc = get_keyring().encrypt(session, org_id, TABLE, "content", job.id, data)
        job.sha256 = hashlib.sha256(data).hexdigest()
        job.size_bytes = len(data)
        job.subject_count = len(subjects)
        job.fact_count = sum(len(f) for _, f in subjects)
        job.suppressed_values = suppressed
        job.status, job.finished_at = "succeeded", clock.now()
        segments.record_use(session, seg, actor, "deidentified_export")
        _audit(session, org_id, actor, "compliance.deidentified_export.completed", job,
               {"segment_id": job.segment_id, "format": job.format, "subjects": job.subject_count,
                "facts": job.fact_count, "suppressed_values": suppressed, "sha256": job.sha256})
        session.commit()
    except Exception as exc:
        session.rollback()
        job = get_export(session, org_id, export_id)
        job.status, job.finished_at = "failed", clock.now()
        job.failure = f"The export stopped ({type(exc).__name__}); start a new one."
        _audit(session, org_id, actor, "compliance.deidentified_export.completed", job,
               {"segment_id": job.segment_id, "error_type": type(exc).__name__}, outcome="failure")
        session.commit()
        log.warning("deidentified_export_failed", export_id=export_id, error_type=type(exc).__name__)
        if not isinstance(exc, (NotFound, ValidationFailed)):
            raise
    return job


def download(session: Session, org_id: str, export_id: str, actor: Actor) -> tuple[str, str, bytes]:
    """(file name, media type, bytes) of a finished job; audited. The caller commits."""
    job = get_export(session, org_id, export_id)
    if job.status != "succeeded" or job.content_enc is None:
        raise Conflict(f"The export is {job.status}; download it once it has succeeded.", field="export_id")
    data = get_keyring().decrypt(session, org_id, TABLE, "content", job.id, job.content_enc)
    _audit(session, org_id, actor, "compliance.deidentified_export.downloaded", job,
           {"segment_id": job.segment_id, "subjects": job.subject_count, "sha256": job.sha256})
    return f"deidentified-{job.id}.{EXTENSIONS[job.format]}", MEDIA_TYPES[job.format], data
