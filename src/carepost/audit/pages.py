"""The audit log viewer: filter, page through and open events; verify the chain; export.

Every view is itself audited (``audit.read``), like the API. Only the caller's organization's
chain is ever queried (``chain == principal.org_id``).
"""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission
from carepost.audit.api import verify_organization
from carepost.audit.models import AuditEvent
from carepost.audit.service import (
    OUTCOMES,
    EventFilters,
    get_event,
    list_events,
    parse_time,
    record_for,
)
from carepost.core import clock
from carepost.core.errors import ValidationFailed
from carepost.web.rendering import render

router = APIRouter(prefix="/app/audit", include_in_schema=False)

PAGE_SIZE = 50
FILTER_FIELDS = ("action", "actor_id", "outcome", "since", "until", "target_type", "target_id")
_LIMITS = {"action": 81, "actor_id": 64, "outcome": 20, "since": 32, "until": 32, "target_type": 60, "target_id": 200}


def _actors(session, org_id: str) -> dict[str, str]:
    """Readable names for actor ids: the organization's people and API credentials (not PHI)."""
    from carepost.accounts.credentials import list_credentials
    from carepost.accounts.service import list_members

    names: dict[str, str] = {"cli": "Command line (system)"}
    for user, _membership in list_members(session, org_id):
        names[user.id] = user.email
    for cred in list_credentials(session, org_id):
        names[cred.id] = f"API key “{cred.name}”"
    return names


def _actor_label(names: dict[str, str], actor_type: str | None, actor_id: str | None) -> str:
    if actor_id is None:
        return actor_type or "unknown"
    if actor_id in names:
        return names[actor_id]
    return f"{actor_type} {actor_id}" if actor_type else actor_id


def _parse_filters(raw: dict[str, str]) -> tuple[EventFilters, dict[str, str]]:
    errors: dict[str, str] = {}
    for name, limit in _LIMITS.items():
        if len(raw.get(name, "")) > limit:
            errors[name] = f"At most {limit} characters."
    if raw.get("outcome") and raw["outcome"] not in OUTCOMES:
        errors["outcome"] = "Choose success, failure or denied."
    since = until = None
    try:
        since = parse_time(raw.get("since"), "since")
    except ValidationFailed as exc:
        errors["since"] = exc.message
    try:
        until = parse_time(raw.get("until"), "until")
        if until is not None and len(raw["until"].strip()) == 10:
            until += timedelta(days=1)  # a date in the form means "to the end of that day"
    except ValidationFailed as exc:
        errors["until"] = exc.message
    if since and until and since >= until and "until" not in errors:
        errors["until"] = "Must be on or after the start date."
    f = EventFilters(
        action=raw.get("action") or None, actor_id=raw.get("actor_id") or None, outcome=raw.get("outcome") or None,
        target_type=raw.get("target_type") or None, target_id=raw.get("target_id") or None, since=since, until=until,
    )
    return f, errors


def _known_actions(session, org_id: str) -> list[str]:
    return list(session.scalars(
        select(AuditEvent.action).where(AuditEvent.chain == org_id).distinct().order_by(AuditEvent.action).limit(200)
    ))


def _row(names: dict[str, str], e: AuditEvent) -> dict:
    return {
        "id": e.id,
        "seq": e.seq,
        "when": clock.aware(e.occurred_at).strftime("%Y-%m-%d %H:%M:%S"),
        "who": _actor_label(names, e.actor_type, e.actor_id),
        "on_behalf_of": _actor_label(names, None, e.on_behalf_of) if e.on_behalf_of else None,
        "action": e.action,
        "target": " ".join(x for x in (e.target_type, e.target_id) if x) or "—",
        "outcome": e.outcome,
        "ip": e.ip or "—",
    }


@router.get("")
def audit_log(request: Request, principal: Principal = Depends(require(Permission.AUDIT_READ))):
    session = request.state.db
    raw = {name: (request.query_params.get(name) or "").strip() for name in FILTER_FIELDS}
    cursor = (request.query_params.get("cursor") or "").strip()[:200] or None
    filters, errors = _parse_filters(raw)
    rows, next_url = [], None
    names = _actors(session, principal.org_id)
    status = 200
    if not errors:
        try:
            events, next_cursor = list_events(session, principal.org_id, filters, cursor=cursor, limit=PAGE_SIZE)
        except ValidationFailed as exc:  # a stale or edited cursor
            errors[exc.field or "cursor"] = exc.message
            events, next_cursor = [], None
        rows = [_row(names, e) for e in events]
        if next_cursor:
            next_url = "/app/audit?" + urlencode({**{k: v for k, v in raw.items() if v}, "cursor": next_cursor})
    if errors:
        status = 422
    actions = _known_actions(session, principal.org_id)
    record_for(session, principal, request, "audit.read", target_type="audit_log", target_id=principal.org_id,
               outcome="failure" if errors else "success",
               details={"view": "list", "filters": filters.active(), "page": "next" if cursor else "first", "count": len(rows)})
    session.commit()
    export_query = urlencode({k: v for k, v in (("since", filters.since.isoformat() if filters.since else ""),
                                                ("until", filters.until.isoformat() if filters.until else "")) if v})
    return render(request, "audit/list.html", {
        "rows": rows,
        "form": raw,
        "errors": errors,
        "outcomes": OUTCOMES,
        "actors": sorted(names.items(), key=lambda kv: kv[1].lower()),
        "actions": actions,
        "next_url": next_url,
        "paged": cursor is not None,
        "filtered": any(raw.values()),
        "can_export": principal.can(Permission.AUDIT_EXPORT),
        "export_query": ("&" + export_query) if export_query else "",
    }, status_code=status)


@router.get("/events/{event_id}")
def audit_event(event_id: str, request: Request, principal: Principal = Depends(require(Permission.AUDIT_READ))):
    session = request.state.db
    event = get_event(session, principal.org_id, event_id)
    names = _actors(session, principal.org_id)
    record_for(session, principal, request, "audit.read", target_type="audit_event", target_id=event.id,
               details={"view": "detail"})
    session.commit()
    return render(request, "audit/detail.html", {
        "e": event,
        "row": _row(names, event),
        "occurred_at": clock.aware(event.occurred_at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "details_json": json.dumps(event.details or {}, indent=2, sort_keys=True),
    })


@router.post("/verify")
def audit_verify(request: Request, principal: Principal = Depends(require(Permission.AUDIT_READ))):
    result = verify_organization(request.state.db, principal, request)
    template = "audit/_verify_result.html" if request.headers.get("hx-request") else "audit/verify.html"
    return render(request, template, {"result": result})
