"""REST routes of the audit log: list, read, export, verify — always the caller's organization.

Audit events are not ``OrgScoped`` (the system chain belongs to no organization), so every
query here names ``chain == principal.org_id`` explicitly; another organization's event is
"not found". Reading, exporting and verifying the log are themselves audited.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission
from carepost.audit import schemas
from carepost.audit.service import (
    EventFilters,
    event_to_dict,
    get_event,
    list_events,
    parse_time,
    record_for,
)
from carepost.core import clock
from carepost.core.errors import ValidationFailed

router = APIRouter(prefix="/api/v1", tags=["audit"])

Outcome = Literal["success", "failure", "denied"]


def filters_from(
    action: str | None = Query(None, max_length=81, description="Exact action, or a prefix ending in `*` (`auth.*`)."),
    actor_id: str | None = Query(None, max_length=64),
    outcome: Outcome | None = Query(None),
    target_type: str | None = Query(None, max_length=60),
    target_id: str | None = Query(None, max_length=200),
    since: datetime | None = Query(None, description="Inclusive, ISO 8601; no zone means UTC."),
    until: datetime | None = Query(None, description="Exclusive, ISO 8601; no zone means UTC."),
) -> EventFilters:
    f = EventFilters(
        action=action or None, actor_id=actor_id or None, outcome=outcome, target_type=target_type or None,
        target_id=target_id or None, since=parse_time(since, "since"), until=parse_time(until, "until"),
    )
    if f.since and f.until and f.since >= f.until:
        raise ValidationFailed("until must be later than since.", field="until")
    return f


@router.get("/audit-events", response_model=schemas.AuditEventPage, summary="List audit events (newest first)")
def list_audit_events(
    request: Request,
    filters: EventFilters = Depends(filters_from),
    cursor: str | None = Query(None, max_length=200, description="`next_cursor` of the previous page."),
    limit: int = Query(50, ge=1, le=200),
    principal: Principal = Depends(require(Permission.AUDIT_READ)),
) -> dict:
    session = request.state.db
    events, next_cursor = list_events(session, principal.org_id, filters, cursor=cursor, limit=limit)
    data = [event_to_dict(e) for e in events]
    record_for(session, principal, request, "audit.read", target_type="audit_log", target_id=principal.org_id,
               details={"filters": filters.active(), "page": "next" if cursor else "first", "count": len(data)})
    session.commit()
    return {"data": data, "next_cursor": next_cursor}


def _export_format(format: Literal["jsonl", "csv"] = Query("jsonl")) -> str:
    return format


@router.get(
    "/audit-events/export",
    summary="Export audit events as JSONL or CSV (streamed, with a checkpoint trailer)",
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}},
)
def export_audit_events(
    request: Request,
    fmt: str = Depends(_export_format),
    since: datetime | None = Query(None, description="Inclusive, ISO 8601."),
    until: datetime | None = Query(None, description="Exclusive, ISO 8601."),
    principal: Principal = Depends(require(Permission.AUDIT_EXPORT)),
) -> StreamingResponse:
    from carepost.audit.export import MEDIA_TYPES, stream_export

    since_at, until_at = parse_time(since, "since"), parse_time(until, "until")
    if since_at and until_at and since_at >= until_at:
        raise ValidationFailed("until must be later than since.", field="until")
    session = request.state.db
    record_for(session, principal, request, "audit.export", target_type="audit_log", target_id=principal.org_id,
               details={"format": fmt, "since": since_at.isoformat() if since_at else None,
                        "until": until_at.isoformat() if until_at else None})
    session.commit()  # the export's own event is in the export, and its trailer
    filename = f"carepost-audit-{principal.org_id}-{clock.now().strftime('%Y%m%dT%H%M%SZ')}.{fmt}"
    return StreamingResponse(
        stream_export(principal.org_id, fmt=fmt, since=since_at, until=until_at),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/audit-events/{event_id}", response_model=schemas.AuditEventOut, summary="Read one audit event")
def read_audit_event(event_id: str, request: Request, principal: Principal = Depends(require(Permission.AUDIT_READ))) -> dict:
    session = request.state.db
    event = get_event(session, principal.org_id, event_id)
    data = event_to_dict(event)
    record_for(session, principal, request, "audit.read", target_type="audit_event", target_id=event.id)
    session.commit()
    return data


def verify_organization(session, principal: Principal, request: Request) -> dict:
    """Verify the caller's chain and audit that it was done; shared by the API and the UI.

    The request's session is committed first (on SQLite it holds the write lock since the
    caller was authenticated), the chain is read in a read-only snapshot of its own, and the
    result is then recorded through the request's session."""
    from carepost.audit.verify import verify
    from carepost.core.database import read_only_session

    session.commit()
    with read_only_session() as ro:
        report = verify(ro, org_id=principal.org_id)
    result = report.chains[0]
    details = {"ok": result.ok, "events_checked": result.events}
    if result.problem:
        details.update(problem=result.problem.kind, first_bad_seq=result.problem.seq, first_bad_event_id=result.problem.event_id)
    record_for(session, principal, request, "audit.verify", outcome="success" if result.ok else "failure",
               target_type="audit_chain", target_id=principal.org_id, details=details)
    session.commit()
    out = result.to_dict()
    out["verified_at"] = clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return out


@router.post("/audit/verify", response_model=schemas.VerifyResultOut, summary="Verify the organization's audit chain")
def verify_audit_chain(request: Request, principal: Principal = Depends(require(Permission.AUDIT_READ))) -> dict:
    return verify_organization(request.state.db, principal, request)
