"""Appending to the audit log (45 CFR 164.312(b) audit controls, (c) integrity).

Each event's hash is an HMAC over its canonical fields and the previous event's hash, keyed by
the chain's own audit key (wrapped by the master key like every other key). Appending locks the
chain head row first, so two writers can never both extend the same head (no forks).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timezone

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.audit.models import SYSTEM_CHAIN, AuditChainHead, AuditEvent
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.ids import new_id
from carepost.core.logging import scrub_value

GENESIS = "0" * 64
HASHED_FIELDS = (
    "id", "chain", "seq", "org_id", "occurred_at", "actor_type", "actor_id", "on_behalf_of", "action",
    "target_type", "target_id", "outcome", "ip", "user_agent", "request_id", "details", "prev_hash",
)


def _ts(value: datetime) -> str:
    return clock.aware(value).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(event: AuditEvent) -> bytes:
    data = {}
    for name in HASHED_FIELDS:
        value = getattr(event, name)
        data[name] = _ts(value) if isinstance(value, datetime) else value
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def event_hash(key: bytes, event: AuditEvent) -> str:
    return hmac.new(key, canonical(event), hashlib.sha256).hexdigest()


def chain_key(session: Session, chain: str) -> bytes:
    return get_keyring().named_key(session, chain, "audit")


def _lock_head(session: Session, chain: str) -> AuditChainHead:
    locked = session.execute(
        update(AuditChainHead).where(AuditChainHead.chain == chain).values(seq=AuditChainHead.seq)
    ).rowcount
    if not locked:
        try:
            with session.begin_nested():
                session.add(AuditChainHead(chain=chain, seq=0, hash=GENESIS, updated_at=clock.now()))
        except IntegrityError:
            pass  # another writer created it first
        session.execute(update(AuditChainHead).where(AuditChainHead.chain == chain).values(seq=AuditChainHead.seq))
    return session.execute(
        select(AuditChainHead).where(AuditChainHead.chain == chain).with_for_update().execution_options(populate_existing=True)
    ).scalar_one()


def record(
    session: Session,
    *,
    org_id: str | None,
    actor_type: str,
    actor_id: str | None,
    action: str,
    outcome: str = "success",
    target_type: str | None = None,
    target_id: str | None = None,
    on_behalf_of: str | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    request_id: str | None = None,
    details: dict | None = None,
) -> AuditEvent:
    """Append one event in the caller's transaction (it commits or rolls back with the action)."""
    chain = org_id or SYSTEM_CHAIN
    head = _lock_head(session, chain)
    event = AuditEvent(
        chain=chain,
        seq=head.seq + 1,
        org_id=org_id,
        occurred_at=clock.now(),
        actor_type=actor_type,
        actor_id=actor_id,
        on_behalf_of=on_behalf_of,
        action=action,
        target_type=target_type,
        target_id=None if target_id is None else str(target_id)[:200],
        outcome=outcome,
        ip=ip,
        user_agent=(user_agent or None) and user_agent[:300],
        request_id=request_id,
        details=scrub_value(details or {}),
        prev_hash=head.hash,
    )
    event.id = new_id()
    event.hash = event_hash(chain_key(session, chain), event)
    head.seq = event.seq
    head.hash = event.hash
    head.updated_at = event.occurred_at
    session.add(event)
    session.flush()
    return event


def record_for(session: Session, principal, request, action: str, **kwargs) -> AuditEvent:
    """Record an event for an authenticated caller of a web or API request."""
    from carepost.accounts.access import request_context

    ctx = request_context(request) if request is not None else {}
    return record(
        session,
        org_id=principal.org_id,
        actor_type=principal.kind,
        actor_id=principal.actor_id,
        on_behalf_of=principal.on_behalf_of,
        **ctx,
        action=action,
        **kwargs,
    )
