"""Removing a chain's oldest audit events under a retention schedule, without breaking verification.

The audit log is a hash chain: every event links to the previous one's hash, and verification
walks it from the start. Deleting from the middle breaks it; so removal only ever cuts a
*prefix* (seq 1..N, then N+1..M on a later run), and writes an :class:`AuditChainAnchor` naming
the last removed event (seq, hash, id, time) in the same transaction as the deletes.
Verification (:mod:`carepost.audit.verify`) then starts from the anchor: the first remaining
event must be ``anchor.seq + 1`` and link to ``anchor.hash``.

Why this keeps tampering detectable:

* the anchor is MACed under a key derived (HKDF) from the chain's audit key for this purpose
  alone — a database-only attacker cannot write one, and a head checkpoint (another derived key)
  cannot be replayed as one;
* an older genuine anchor left in place after deleting more events gives ``missing``; a deleted
  anchor gives ``missing`` from seq 1; events deleted after the anchor still give ``missing`` /
  ``broken_link``;
* the cut never passes an event that must stay (newer than the cutoff, covered by a legal hold,
  or the chain's newest event, which the head row names): everything after such an event stays
  too, because the chain can only be shortened from its start.

The caller (the retention purge) records what was removed in the chain itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from carepost.audit.models import AuditChainAnchor, AuditChainHead, AuditEvent
from carepost.audit.service import _ts
from carepost.core import clock
from carepost.core.crypto import get_keyring, hkdf

FORMAT = "carepost-audit-anchor/1"


def anchor_key(chain_key: bytes) -> bytes:
    return hkdf(chain_key, "carepost/audit-purge-anchor/v1")


def _payload(chain: str, seq: int, hash_: str, event_id: str, occurred_at: str, removed: int, written_at: str) -> bytes:
    return json.dumps({"format": FORMAT, "chain": chain, "seq": seq, "hash": hash_, "event_id": event_id,
                       "occurred_at": occurred_at, "removed": removed, "written_at": written_at},
                      sort_keys=True, separators=(",", ":")).encode()


def anchor_mac(chain_key: bytes, a: AuditChainAnchor) -> str:
    body = _payload(a.chain, a.seq, a.hash, a.event_id, a.occurred_at, a.removed, a.written_at)
    return hmac.new(anchor_key(chain_key), body, hashlib.sha256).hexdigest()


def anchor_ok(keys: dict[int, bytes], a: AuditChainAnchor) -> bool:
    """Is the anchor authentic under one of the chain's live audit key versions?"""
    return any(hmac.compare_digest(anchor_mac(k, a), a.mac) for k in keys.values())


def get_anchor(session: Session, chain: str) -> AuditChainAnchor | None:
    return session.get(AuditChainAnchor, chain)


def anchor_dict(a: AuditChainAnchor | None) -> dict | None:
    if a is None:
        return None
    return {"seq": a.seq, "event_id": a.event_id, "occurred_at": a.occurred_at, "removed": a.removed,
            "written_at": a.written_at}


@dataclass(frozen=True)
class Keep:
    """Events a removal must not pass: ``everything`` (an organization-wide hold), events whose
    ``target_id`` is one of ``targets``, events that occurred within one of ``days`` (inclusive
    date ranges), and events for which ``about`` — a SQL condition on ``audit_events`` supplied by
    the caller (the retention purge: events about a held patient's, message's or campaign's
    records, :mod:`carepost.retention.held`) — is true. This layer knows no other capability's
    tables; the condition brings them."""

    everything: bool = False
    targets: frozenset[str] = frozenset()
    days: tuple[tuple[date, date], ...] = ()
    about: Any = field(default=None, compare=False)


@dataclass
class Removed:
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    through_seq: int | None = None


def removable_through(session: Session, chain: str, cutoff: datetime, keep: Keep = Keep(), *,
                      upto: int | None = None) -> int:
    """The highest seq that may be removed: every event up to it occurred before ``cutoff``, none
    is kept, and it is not the chain's newest event. 0 (or the anchor's seq) when nothing may go.
    ``upto``: look no further than this seq (a purge chunk: the hold test then runs on one
    chunk's events, through the ``(chain, seq)`` index, not on the whole chain)."""
    anchor = get_anchor(session, chain)
    start = anchor.seq if anchor else 0
    if keep.everything:
        return start
    head = session.scalar(select(AuditChainHead.seq).where(AuditChainHead.chain == chain)) or 0
    bound = head  # the newest event stays: the head row names it
    stops = [AuditEvent.occurred_at >= cutoff]
    if keep.targets:
        stops.append(AuditEvent.target_id.in_(sorted(keep.targets)))
    if keep.about is not None:
        stops.append(keep.about)
    tz = clock.now().tzinfo
    for lo, hi in keep.days:
        stops.append(AuditEvent.occurred_at.between(datetime.combine(lo, datetime.min.time(), tzinfo=tz),
                                                    datetime.combine(hi, datetime.max.time(), tzinfo=tz)))
    window = [AuditEvent.chain == chain, AuditEvent.seq > start]
    if upto is not None:
        window.append(AuditEvent.seq <= upto)
    first_stop = session.scalar(select(func.min(AuditEvent.seq)).where(*window, or_(*stops)))
    if first_stop is not None:
        bound = min(bound, first_stop)
    return max(start, bound - 1)


def remove_oldest(session: Session, chain: str, cutoff: datetime, keep: Keep = Keep(), *, limit: int = 2000) -> Removed:
    """Remove up to ``limit`` of the chain's oldest removable events (see :func:`removable_through`)
    and move the anchor to the last one, in the caller's transaction (commit both or neither)."""
    out = Removed()
    anchor = get_anchor(session, chain)
    start = anchor.seq if anchor else 0
    last_wanted = start + max(1, int(limit))
    through = min(removable_through(session, chain, cutoff, keep, upto=last_wanted), last_wanted)
    if through <= start:
        return out
    last = session.scalar(select(AuditEvent).where(AuditEvent.chain == chain, AuditEvent.seq == through))
    first_at = session.scalar(select(AuditEvent.occurred_at).where(AuditEvent.chain == chain, AuditEvent.seq == start + 1))
    if last is None or first_at is None:
        return out  # a gap where the chain should continue: leave it for verification to report
    last_seq, last_hash, last_id, last_at = last.seq, last.hash, last.id, last.occurred_at
    out.count = session.execute(delete(AuditEvent).where(AuditEvent.chain == chain, AuditEvent.seq > start,
                                                         AuditEvent.seq <= through)).rowcount or 0
    version, key = get_keyring().named_key_version(session, chain, "audit")
    if anchor is None:
        anchor = AuditChainAnchor(chain=chain, removed=0)
        session.add(anchor)
    anchor.seq, anchor.hash, anchor.event_id, anchor.occurred_at = last_seq, last_hash, last_id, _ts(last_at)
    anchor.removed = (anchor.removed or 0) + out.count
    anchor.written_at, anchor.key_version = _ts(clock.now()), version
    anchor.mac = anchor_mac(key, anchor)
    session.flush()
    out.first, out.last, out.through_seq = first_at, last_at, through
    return out


def time_span(session: Session, chain: str, first_seq: int, last_seq: int) -> tuple[datetime | None, datetime | None]:
    """When the events ``first_seq`` and ``last_seq`` occurred (None, None when the range is empty)."""
    if last_seq < first_seq:
        return None, None
    rows = dict(session.execute(select(AuditEvent.seq, AuditEvent.occurred_at).where(
        AuditEvent.chain == chain, AuditEvent.seq.in_([first_seq, last_seq]))).all())
    return rows.get(first_seq), rows.get(last_seq)
