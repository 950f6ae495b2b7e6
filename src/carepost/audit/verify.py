"""Verifying the audit chains (45 CFR 164.312(b) audit controls, (c)(2) integrity).

For each chain, in seq order and streaming (a chain can hold millions of events):

1. seq runs 1..n without gaps or duplicates            -> ``missing`` / ``duplicate``
2. each event's HMAC, recomputed with the chain key,
   matches its stored hash                              -> ``reordered`` / ``inserted`` / ``altered``
3. each event's ``prev_hash`` is the previous hash      -> ``broken_link``
4. ``audit_chain_heads`` names the newest event         -> ``head_mismatch``
5. every checkpoint (this machine's file, and any given
   with ``--checkpoint``) is authentic and the chain
   still holds the event it names                      -> ``checkpoint_invalid`` / ``truncated`` /
                                                           ``checkpoint_mismatch``
6. a chain whose oldest events a retention purge removed
   starts at its anchor (:mod:`carepost.audit.pruning`):
   the anchor authenticates, and the first remaining
   event is its seq + 1 and links to its hash          -> ``anchor_invalid`` / ``missing`` /
                                                           ``broken_link``

Verification stops a chain at its first bad event and names it (chain, seq, id, what is wrong):
everything after a break is unproven anyway.

Consistency: checkpoint files are read *before* the database snapshot starts (they are written
after commit and only move forward, so they never describe a state newer than the snapshot), and
on PostgreSQL the chain is read in one REPEATABLE READ snapshot, so concurrent appends never
look like tampering.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.audit import checkpoints, pruning
from carepost.audit.checkpoints import Checkpoint
from carepost.audit.models import AuditChainHead, AuditEvent
from carepost.audit.service import GENESIS, event_hash
from carepost.core.crypto import KeyUnavailable, OrgKey, get_keyring

# How far from its position a reordered event's original seq is searched for (HMAC trials).
REORDER_SEARCH = 1000
STREAM_BATCH = 1000


@dataclass
class Problem:
    kind: str
    chain: str
    seq: int | None
    event_id: str | None
    message: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chain": self.chain, "seq": self.seq, "event_id": self.event_id, "message": self.message}


@dataclass
class ChainResult:
    chain: str
    events: int = 0
    newest_seq: int = 0
    newest_hash: str | None = None
    head_seq: int | None = None
    checkpoints: list[dict] = field(default_factory=list)
    anchor: dict | None = None  # where the chain starts after a retention purge
    problem: Problem | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict:
        return {
            "chain": self.chain,
            "ok": self.ok,
            "events_checked": self.events,
            "newest_seq": self.newest_seq,
            "head_seq": self.head_seq,
            "checkpoints": self.checkpoints,
            "anchor": self.anchor,
            "problem": self.problem.to_dict() if self.problem else None,
            "warnings": self.warnings,
        }


@dataclass
class VerifyReport:
    chains: list[ChainResult]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains)

    @property
    def first_problem(self) -> Problem | None:
        return next((c.problem for c in self.chains if c.problem), None)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "chains": [c.to_dict() for c in self.chains]}


def begin_snapshot(session: Session) -> None:
    """Start the session's transaction as one consistent snapshot (PostgreSQL REPEATABLE READ).

    SQLite transactions are snapshots already (WAL). Call before the session's first query: on a
    session whose transaction has begun the isolation level can no longer be chosen (SQLAlchemy
    would only warn "Connection is already established" and read without the snapshot), so that
    is refused with a ``RuntimeError`` naming the fix."""
    if session.get_bind().dialect.name == "postgresql":
        if session.in_transaction():
            raise RuntimeError("audit verification needs a session of its own (its transaction not begun): it "
                               "reads the chain in one REPEATABLE READ snapshot; use read_only_session()")
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def _existing_chain_keys(session: Session, chain: str) -> dict[int, bytes] | None:
    """Every live version of the chain's audit key (a rotation adds one; events keep theirs)."""
    exists = session.scalar(select(OrgKey.id).where(OrgKey.org_id == chain, OrgKey.kind == "audit"))
    if exists is None:
        return None
    return dict(get_keyring().named_keys(session, chain, "audit"))


def _existing_chain_key(session: Session, chain: str) -> bytes | None:
    """The chain's audit key, without creating one (verification never writes)."""
    exists = session.scalar(select(OrgKey.id).where(OrgKey.org_id == chain, OrgKey.kind == "audit"))
    if exists is None:
        return None
    return get_keyring().named_key(session, chain, "audit")


def _events(session: Session, chain: str) -> Iterator[AuditEvent]:
    stmt = (
        select(AuditEvent)
        .where(AuditEvent.chain == chain)
        .order_by(AuditEvent.seq, AuditEvent.id)
        .execution_options(yield_per=STREAM_BATCH)
    )
    for event in session.scalars(stmt):
        yield event
        session.expunge(event)  # keep memory flat on long chains


def _with_next(items: Iterable[AuditEvent]) -> Iterator[tuple[AuditEvent, AuditEvent | None]]:
    it = iter(items)
    try:
        cur = next(it)
    except StopIteration:
        return
    for nxt in it:
        yield cur, nxt
        cur = nxt
    yield cur, None


def _written_as_seq(key: bytes, event: AuditEvent) -> int | None:
    """The seq an event's hash was made with, if it is not its present seq (a moved event).

    Only run on an event that failed, nearest positions first: REORDER_SEARCH HMACs at most."""
    present = event.seq
    try:
        lo, hi = max(1, present - REORDER_SEARCH), present + REORDER_SEARCH
        for candidate in sorted(range(lo, hi + 1), key=lambda s: abs(s - present)):
            if candidate == present:
                continue
            event.seq = candidate
            if hmac.compare_digest(event_hash(key, event), event.hash):
                return candidate
        return None
    finally:
        event.seq = present


def _describe(event: AuditEvent) -> str:
    return f"event seq {event.seq} (id {event.id})"


def _verify_chain(session: Session, chain: str, cps: list[Checkpoint], result: ChainResult) -> ChainResult:
    head = session.execute(select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.chain == chain)).first()
    result.head_seq = head.seq if head else None
    try:
        keys = _existing_chain_keys(session, chain)
        key = keys[max(keys)] if keys else None
    except KeyUnavailable as exc:
        result.problem = Problem("key_unavailable", chain, None, None, f"the chain key cannot be unwrapped: {exc}")
        return result

    # The retention anchor: the chain starts after the last event a purge removed.
    anchor = pruning.get_anchor(session, chain)
    start_seq, start_hash = 0, GENESIS
    if anchor is not None:
        # ``signature_valid``: the anchor's MAC; ``state``: valid, anchor_invalid, or — set below when
        # the first remaining event does not continue from it — missing / broken_link.
        result.anchor = {**pruning.anchor_dict(anchor), "signature_valid": True, "state": "valid"}
        if not keys or not pruning.anchor_ok(keys, anchor):
            result.anchor.update(signature_valid=False, state="anchor_invalid")
            result.problem = Problem(
                "anchor_invalid", chain, anchor.seq, anchor.event_id,
                f"the retention anchor (events up to seq {anchor.seq} removed) does not authenticate: it was "
                "written or altered without the chain's key, so the removal of the chain's start is not proven",
            )
            return result
        start_seq, start_hash = anchor.seq, anchor.hash

    # Checkpoints first: a forged one must not be trusted for anything.
    want: dict[int, list[Checkpoint]] = {}
    entries: list[tuple[Checkpoint, dict]] = []
    for cp in cps:
        entry = {"source": cp.source, "seq": cp.seq, "written_at": cp.written_at}
        result.checkpoints.append(entry)
        entries.append((cp, entry))
        if key is None and cp.chain == chain:
            entry["status"] = "unverifiable"
            result.problem = Problem(
                "key_missing", chain, cp.seq, cp.event_id,
                f"a checkpoint ({cp.source}) records seq {cp.seq} but the chain's audit key is missing: the chain "
                "and its key were deleted (or the checkpoint belongs to another installation)",
            )
            return result
        if cp.chain != chain or key is None or not any(checkpoints.mac_ok(k, cp) for k in keys.values()):
            entry["status"] = "invalid"
            result.problem = Problem(
                "checkpoint_invalid", chain, cp.seq, cp.event_id,
                f"checkpoint {cp.source or ''} (seq {cp.seq}) does not authenticate: it was altered, forged, "
                "or belongs to another chain or installation",
            )
            return result
        if cp.seq <= start_seq:
            # Its event was removed by a retention purge: only the anchor's own event can be compared.
            if cp.seq == start_seq and not hmac.compare_digest(cp.hash, start_hash):
                entry["status"] = "mismatch"
                result.problem = Problem(
                    "checkpoint_mismatch", chain, cp.seq, cp.event_id,
                    f"the retention anchor names another event at seq {cp.seq} than the checkpoint written at "
                    f"{cp.written_at}: the log was rewritten",
                )
                return result
            entry["status"] = "removed_by_retention"
            continue
        entry["status"] = "pending"
        want.setdefault(cp.seq, []).append(cp)
    if not cps:
        result.warnings.append(
            "no checkpoint for this chain: deletion of its newest events cannot be ruled out "
            "(pass an exported checkpoint with --checkpoint)"
        )

    if key is None:
        first = session.scalar(select(AuditEvent).where(AuditEvent.chain == chain).order_by(AuditEvent.seq).limit(1))
        if first is not None or (head and head.seq):
            result.problem = Problem(
                "key_missing", chain, first.seq if first else None, first.id if first else None,
                "the chain's audit key is missing from the database: no event can be authenticated",
            )
            return result

    prev: AuditEvent | None = None
    prev_hash = start_hash
    result.newest_seq, result.newest_hash = start_seq, (start_hash if start_seq else None)
    for event, nxt in _with_next(_events(session, chain)):
        expected = (prev.seq + 1) if prev else start_seq + 1
        problem = _check_event(keys.get(event.key_version or 1) if keys else None, chain, event, nxt, prev, prev_hash,
                               expected, anchored=start_seq > 0)
        if problem:
            result.problem = problem
            if result.anchor is not None and prev is None and problem.kind in ("missing", "broken_link"):
                result.anchor["state"] = problem.kind  # the chain does not continue from its anchor
            return result
        for cp in want.get(event.seq, []):
            if not hmac.compare_digest(cp.hash, event.hash):
                result.problem = Problem(
                    "checkpoint_mismatch", chain, event.seq, event.id,
                    f"{_describe(event)} is not the event the checkpoint written at {cp.written_at} recorded at this "
                    f"position (id {cp.event_id}): the log was rewritten after the checkpoint",
                )
                return result
        result.events += 1
        prev, prev_hash = event, event.hash
        result.newest_seq, result.newest_hash = event.seq, event.hash

    # The head row must name the newest event.
    if head is None:
        if result.newest_seq:
            result.problem = Problem(
                "head_mismatch", chain, result.newest_seq, prev.id if prev else None,
                "the chain head row is missing although the chain has events",
            )
            return result
    elif head.seq != result.newest_seq or (result.newest_seq and head.hash != result.newest_hash):
        missing_from = result.newest_seq + 1
        if head.seq > result.newest_seq:
            msg = f"the chain head records seq {head.seq} but the newest event is seq {result.newest_seq}: " \
                  f"events from seq {missing_from} on were deleted"
            result.problem = Problem("truncated", chain, missing_from, None, msg)
        else:
            msg = f"the chain head (seq {head.seq}) does not match the newest event (seq {result.newest_seq}): " \
                  "the head row was altered"
            result.problem = Problem("head_mismatch", chain, result.newest_seq, prev.id if prev else None, msg)
        return result

    # Every checkpoint must be at or before the newest event (truncation, even with a rewound head).
    for cp, entry in sorted(entries, key=lambda pair: -pair[0].seq):
        if cp.seq > result.newest_seq:
            entry["status"] = "ahead_of_log"
            first_missing = result.newest_seq + 1
            gap = f"seq {cp.seq}" if first_missing == cp.seq else f"seq {first_missing}..{cp.seq}"
            named = f" (seq {cp.seq} was event {cp.event_id})" if cp.event_id else ""
            result.problem = Problem(
                "truncated", chain, first_missing, cp.event_id if first_missing == cp.seq else None,
                f"the log ends at seq {result.newest_seq} but the checkpoint written at {cp.written_at} "
                f"({cp.source}) records seq {cp.seq}: events {gap} were deleted{named}",
            )
            return result
        if entry["status"] == "pending":
            entry["status"] = "ok"
    return result


def _check_event(
    key: bytes | None, chain: str, event: AuditEvent, nxt: AuditEvent | None, prev: AuditEvent | None,
    prev_hash: str, expected: int, anchored: bool = False,
) -> Problem | None:
    if event.seq > expected:
        gap = f"seq {expected}" if event.seq == expected + 1 else f"seq {expected}..{event.seq - 1}"
        return Problem(
            "missing", chain, event.seq, event.id,
            f"{gap} missing before {_describe(event)}: events were deleted",
        )
    if event.seq < expected:
        return Problem("duplicate", chain, event.seq, event.id, f"{_describe(event)} repeats a seq already used")
    if key is None:
        return Problem("key_missing", chain, event.seq, event.id,
                       f"{_describe(event)} names audit key version {event.key_version}, which is not in the database")
    authentic = hmac.compare_digest(event_hash(key, event), event.hash)
    if not authentic:
        original = _written_as_seq(key, event)
        if original is not None:
            return Problem(
                "reordered", chain, event.seq, event.id,
                f"{_describe(event)} was written as seq {original}: events were reordered or renumbered",
            )
        if nxt is not None and hmac.compare_digest(nxt.prev_hash, prev_hash) and nxt.prev_hash != event.hash:
            return Problem(
                "inserted", chain, event.seq, event.id,
                f"{_describe(event)} is not part of the chain: the next event links past it (forged or inserted)",
            )
        return Problem(
            "altered", chain, event.seq, event.id,
            f"{_describe(event)} does not match its hash: its contents were altered (or it was forged)",
        )
    if not hmac.compare_digest(event.prev_hash, prev_hash):
        before = f"seq {prev.seq}" if prev else ("the retention anchor" if anchored else "the start of the chain")
        return Problem(
            "broken_link", chain, event.seq, event.id,
            f"{_describe(event)} does not link to {before}: an event before it was replaced or removed",
        )
    return None


def chains_to_verify(session: Session, org_id: str | None, given: list[Checkpoint]) -> list[str]:
    if org_id is not None:
        return [org_id]
    found = set(session.scalars(select(AuditChainHead.chain)))
    found.update(session.scalars(select(AuditEvent.chain).distinct()))
    found.update(checkpoints.local_chains())
    found.update(cp.chain for cp in given)
    return sorted(found)


def verify(session: Session, *, org_id: str | None = None, given: list[Checkpoint] | None = None) -> VerifyReport:
    """Verify one organization's chain, or every chain (``org_id=None``).

    ``session`` must not have begun its transaction yet: checkpoint files are read first, then
    the chains in one snapshot. Given checkpoints of other chains are ignored when ``org_id`` is set.
    """
    given = list(given or [])
    local: dict[str, Checkpoint | None | Exception] = {}
    for chain in ([org_id] if org_id else checkpoints.local_chains()):
        try:
            local[chain] = checkpoints.read_local(chain)
        except checkpoints.CheckpointError as exc:
            local[chain] = exc
    begin_snapshot(session)
    results = []
    for chain in chains_to_verify(session, org_id, given):
        result = ChainResult(chain=chain)
        mine = local.get(chain)
        if isinstance(mine, Exception):
            result.problem = Problem("checkpoint_invalid", chain, None, None, f"this machine's checkpoint is unreadable: {mine}")
            results.append(result)
            continue
        cps = [cp for cp in given if cp.chain == chain] + ([mine] if mine else [])
        results.append(_verify_chain(session, chain, cps, result))
    return VerifyReport(results)
