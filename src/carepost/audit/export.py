"""Exporting an organization's audit events as JSONL or CSV, streaming.

Every field is exported, hashes included, so an auditor can follow the chain outside CarePost.
The last record is a trailer (``record_type: "checkpoint"``) holding

* ``checkpoint`` — this machine's checkpoint file of the chain (see ``checkpoints``), and
* ``head`` — the chain head at export time, signed the same way,

so an export doubles as an off-site checkpoint: ``carepost audit verify --checkpoint EXPORT``
later proves that no event up to ``head`` was deleted since.

Events are read in pages from one database snapshot and written as they come (constant memory).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.audit import checkpoints
from carepost.audit.models import AuditChainHead, AuditEvent
from carepost.audit.service import EVENT_FIELDS, event_to_dict
from carepost.audit.verify import _existing_chain_key, begin_snapshot
from carepost.core import clock
from carepost.core.database import read_only_session
from carepost.core.logging import get_logger

log = get_logger("carepost.audit.export")

FORMATS = ("jsonl", "csv")
CSV_COLUMNS = ("record_type",) + EVENT_FIELDS
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
_FLUSH_BYTES = 64 * 1024
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value) -> str:
    """CSV cells that a spreadsheet would run as formulas get a leading quote (OWASP CSV injection).
    The JSONL export is byte-exact; use it to recompute hashes."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"))
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv_line(values) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow([_csv_cell(v) for v in values])
    return buf.getvalue()


def _trailer(session: Session, chain: str, local: checkpoints.Checkpoint | None, *, since, until, count: int) -> dict:
    head = session.execute(select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.chain == chain)).first()
    signed_head = None
    key = _existing_chain_key(session, chain)
    if head is not None and head.seq and key is not None:
        newest = session.execute(
            select(AuditEvent.id, AuditEvent.occurred_at).where(AuditEvent.chain == chain, AuditEvent.seq == head.seq)
        ).first()
        signed_head = checkpoints.sign(
            key, chain=chain, seq=head.seq, hash=head.hash,
            event_id=newest.id if newest else None,
            occurred_at=checkpoints.timestamp(newest.occurred_at) if newest else None,
        ).to_dict()
    return {
        "record_type": "checkpoint",
        "chain": chain,
        "since": checkpoints.timestamp(since) if since else None,
        "until": checkpoints.timestamp(until) if until else None,
        "exported_at": checkpoints.timestamp(clock.now()),
        "event_count": count,
        "checkpoint": local.to_dict() if local else None,
        "head": signed_head,
    }


def write_export(
    session: Session,
    chain: str,
    *,
    fmt: str = "jsonl",
    since: datetime | None = None,
    until: datetime | None = None,
    local: checkpoints.Checkpoint | None = None,
) -> Iterator[str]:
    """Yield the export in chunks. ``since`` is inclusive, ``until`` exclusive."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    stmt = select(AuditEvent).where(AuditEvent.chain == chain)
    if since is not None:
        stmt = stmt.where(AuditEvent.occurred_at >= since)
    if until is not None:
        stmt = stmt.where(AuditEvent.occurred_at < until)
    stmt = stmt.order_by(AuditEvent.seq).execution_options(yield_per=500)

    chunk: list[str] = []
    size = 0
    if fmt == "csv":
        chunk.append(_csv_line(CSV_COLUMNS))
    count = 0
    for event in session.scalars(stmt):
        data = event_to_dict(event)
        session.expunge(event)
        if fmt == "jsonl":
            line = json.dumps({"record_type": "event", **data}, separators=(",", ":")) + "\n"
        else:
            line = _csv_line(["event"] + [data[name] for name in EVENT_FIELDS])
        chunk.append(line)
        size += len(line)
        count += 1
        if size >= _FLUSH_BYTES:
            yield "".join(chunk)
            chunk, size = [], 0
    trailer = _trailer(session, chain, local, since=since, until=until, count=count)
    if fmt == "jsonl":
        chunk.append(json.dumps(trailer, separators=(",", ":")) + "\n")
    else:
        row = {name: None for name in EVENT_FIELDS}
        head = trailer["head"] or trailer["checkpoint"] or {}
        row.update(chain=chain, seq=head.get("seq"), hash=head.get("hash"), details=json.dumps(trailer, sort_keys=True))
        chunk.append(_csv_line(["checkpoint"] + [row[name] for name in EVENT_FIELDS]))
    yield "".join(chunk)


def stream_export(chain: str, *, fmt: str = "jsonl", since: datetime | None = None, until: datetime | None = None) -> Iterator[str]:
    """``write_export`` in a read-only snapshot of its own (for streaming HTTP responses and the CLI).

    The checkpoint file is read before the snapshot begins, so it never names an event the
    snapshot cannot see."""
    try:
        local = checkpoints.read_local(chain)
    except checkpoints.CheckpointError:
        log.error("audit_checkpoint_unreadable", chain=chain)
        local = None
    with read_only_session() as session:
        begin_snapshot(session)
        yield from write_export(session, chain, fmt=fmt, since=since, until=until, local=local)
