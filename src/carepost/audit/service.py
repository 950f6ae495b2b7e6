"""Appending to the audit log (45 CFR 164.312(b) audit controls, (c) integrity).

Each event's hash is an HMAC over its canonical fields and the previous event's hash, keyed by
the chain's own audit key (wrapped by the master key like every other key). Appending locks the
chain head row first, so two writers can never both extend the same head (no forks).

After the transaction commits, the newest append of each chain is checkpointed to a file
outside the database (``checkpoints``), so deleting the newest events is detectable too.
Reading (``list_events``, ``get_event``) always names the chain: audit events are not
``OrgScoped``, the caller's organization is applied explicitly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import event as sa_event
from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction

from carepost.audit import checkpoints
from carepost.audit.models import SYSTEM_CHAIN, AuditChainHead, AuditEvent
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.core.logging import get_logger, scrub_value

log = get_logger("carepost.audit")

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
        .execution_options(synchronize_session=False)  # the row is re-read below (populate_existing)
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
    return record_many(session, [dict(
        org_id=org_id, actor_type=actor_type, actor_id=actor_id, action=action, outcome=outcome,
        target_type=target_type, target_id=target_id, on_behalf_of=on_behalf_of, ip=ip, user_agent=user_agent,
        request_id=request_id, details=details,
    )])[0]


def record_many(session: Session, items: list[dict]) -> list[AuditEvent]:
    """Append several events (each a dict of :func:`record`'s keyword arguments), in order, in the
    caller's transaction; each chain's head is locked once and its key looked up once."""
    heads: dict[str, tuple[AuditChainHead, int, bytes]] = {}
    events = []
    for fields in items:
        chain = fields.get("org_id") or SYSTEM_CHAIN
        if chain not in heads:
            head = _lock_head(session, chain)
            heads[chain] = (head, *get_keyring().named_key_version(session, chain, "audit"))
        head, key_version, key = heads[chain]
        user_agent = fields.get("user_agent")
        target_id = fields.get("target_id")
        event = AuditEvent(
            chain=chain,
            seq=head.seq + 1,
            org_id=fields.get("org_id"),
            occurred_at=clock.now(),
            actor_type=fields["actor_type"],
            actor_id=fields.get("actor_id"),
            on_behalf_of=fields.get("on_behalf_of"),
            action=fields["action"],
            target_type=fields.get("target_type"),
            target_id=None if target_id is None else str(target_id)[:200],
            outcome=fields.get("outcome") or "success",
            ip=fields.get("ip"),
            user_agent=(user_agent or None) and user_agent[:300],
            request_id=fields.get("request_id"),
            details=scrub_value(fields.get("details") or {}),
            prev_hash=head.hash,
        )
        event.id = new_id()
        event.key_version = key_version
        event.hash = event_hash(key, event)
        head.seq = event.seq
        head.hash = event.hash
        head.updated_at = event.occurred_at
        session.add(event)
        events.append(event)
    session.flush()
    for event in events:
        _remember_append(session, event, heads[event.chain][2])
    return events


# --------------------------------------------------------------------------- group commit of audited reads
#
# An audited read (``GET /api/v1/contacts/{id}``) writes nothing but its audit event. Appending
# that event in the request's own transaction makes every read take SQLite's write lock for the
# whole request (reading, decrypting, rendering). Instead the read runs in a read-only
# transaction, and its event is handed to ``record_committed``: concurrent requests' events are
# appended in one transaction (the chain head locked once, one commit, one checkpoint), and each
# caller returns only after the transaction holding its event committed and its checkpoint was
# written. The response is sent after that, as before; if the append fails, the caller gets the
# exception and no response with the data.


class AuditAppendFailed(RuntimeError):
    """The audit event of a read could not be committed; the read must not be answered."""


class _Queued:
    __slots__ = ("fields", "done", "event_id", "error")

    def __init__(self, fields: dict) -> None:
        self.fields = fields
        self.done = False
        self.event_id: str | None = None
        self.error: BaseException | None = None


class _GroupAppender:
    """Leader/follower group commit: the first caller to find no write under way becomes the
    leader and appends everything queued (its own event included) in one transaction; callers
    arriving meanwhile wait, and the next leader takes all of them. A failed group is retried
    one event at a time, so one bad event fails only its own caller."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Queued] = []
        self._busy = False

    def append(self, fields: dict) -> str:
        item = _Queued(fields)
        with self._cond:
            self._queue.append(item)
            while not item.done and self._busy:
                self._cond.wait()
            if item.done:
                return self._outcome(item)
            self._busy = True
            batch, self._queue = self._queue, []
        try:
            self._write_all(batch)
        finally:
            with self._cond:
                self._busy = False
                for queued in batch:
                    queued.done = True
                self._cond.notify_all()
        return self._outcome(item)

    @staticmethod
    def _outcome(item: _Queued) -> str:
        if item.error is not None or item.event_id is None:
            raise AuditAppendFailed("the audit event could not be recorded") from item.error
        return item.event_id

    def _write_all(self, batch: list[_Queued]) -> None:
        try:
            self._write(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                log.error("audit_append_failed", error_type=type(exc).__name__)
                return
        for queued in batch:
            try:
                self._write([queued])
            except Exception as exc:
                queued.error = exc
                log.error("audit_append_failed", error_type=type(exc).__name__)

    @staticmethod
    def _write(batch: list[_Queued]) -> None:
        from carepost.core.database import system_session

        with system_session() as session:
            ids = _append_rows(session, [queued.fields for queued in batch])
            session.commit()  # the checkpoint is written in after_commit, before this returns
        for queued, event_id in zip(batch, ids):
            queued.event_id = event_id


class _EventRow:
    """An audit event's columns as attributes (what ``canonical`` hashes and the checkpoint
    bookkeeping reads), for events written without ORM objects."""

    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


_GROUP_STATEMENTS: dict[str, object] = {}


def _group_statements() -> dict[str, object]:
    """The group commit's Core statements, built once (their values bound per execution): no
    statement construction or cache-key walk of a new statement per group."""
    if not _GROUP_STATEMENTS:
        events_table, heads_table = AuditEvent.__table__, AuditChainHead.__table__
        chain = bindparam("head_chain")
        _GROUP_STATEMENTS.update(
            lock=update(heads_table).where(heads_table.c.chain == chain).values(seq=heads_table.c.seq),
            read=select(heads_table.c.seq, heads_table.c.hash).where(heads_table.c.chain == chain).with_for_update(),
            insert=insert(events_table),
            advance=update(heads_table).where(heads_table.c.chain == chain).values(
                seq=bindparam("head_seq"), hash=bindparam("head_hash"), updated_at=bindparam("head_at")),
        )
    return _GROUP_STATEMENTS


def _head_locked_by_select(conn) -> bool:
    """Does ``SELECT ... FOR UPDATE`` alone lock the chain head in this transaction? On PostgreSQL
    it takes the row lock; on SQLite a transaction begun ``IMMEDIATE`` (the default, see
    ``core.database``) already holds the single writer lock. Otherwise (a deferred SQLite
    transaction) the no-op ``UPDATE`` takes the lock first, as :func:`_lock_head` does."""
    if conn.dialect.name == "postgresql":
        return True
    return conn.dialect.name == "sqlite" and conn.get_execution_options().get("sqlite_begin", "IMMEDIATE") == "IMMEDIATE"


def _append_rows(session: Session, items: list[dict]) -> list[str]:
    """:func:`record_many` without ORM objects, for the read group commit (issue 11 item 6): the
    chain head locked (``SELECT ... FOR UPDATE``, after a no-op ``UPDATE`` where that alone would
    not lock it), the same canonical fields and HMAC chain, one INSERT of all events (executemany)
    and one UPDATE of each chain head, and the same checkpoint after commit. Returns the event ids
    in order."""
    statements = _group_statements()
    conn = session.connection()
    select_locks = _head_locked_by_select(conn)
    heads: dict[str, list] = {}  # chain -> [seq, hash, key_version, key]
    rows: list[dict] = []
    events: list[_EventRow] = []
    for fields in items:
        chain = fields.get("org_id") or SYSTEM_CHAIN
        if chain not in heads:
            if not select_locks and not conn.execute(statements["lock"], {"head_chain": chain}).rowcount:
                _lock_head(session, chain)  # creates the head (rare: the chain's first event)
                session.flush()
            head_row = conn.execute(statements["read"], {"head_chain": chain}).one_or_none()
            if head_row is None:
                _lock_head(session, chain)  # creates the head (rare: the chain's first event)
                session.flush()
                head_row = conn.execute(statements["read"], {"head_chain": chain}).one()
            heads[chain] = [head_row[0], head_row[1], *get_keyring().named_key_version(session, chain, "audit")]
        head = heads[chain]
        user_agent = fields.get("user_agent")
        target_id = fields.get("target_id")
        values = {
            "id": new_id(), "chain": chain, "seq": head[0] + 1, "org_id": fields.get("org_id"),
            "occurred_at": clock.now(), "actor_type": fields["actor_type"], "actor_id": fields.get("actor_id"),
            "on_behalf_of": fields.get("on_behalf_of"), "action": fields["action"],
            "target_type": fields.get("target_type"),
            "target_id": None if target_id is None else str(target_id)[:200],
            "outcome": fields.get("outcome") or "success", "ip": fields.get("ip"),
            "user_agent": (user_agent or None) and user_agent[:300], "request_id": fields.get("request_id"),
            "details": scrub_value(fields.get("details") or {}), "prev_hash": head[1], "key_version": head[2],
        }
        event = _EventRow(values)
        values["hash"] = event.hash = event_hash(head[3], event)
        head[0], head[1] = values["seq"], values["hash"]
        rows.append(values)
        events.append(event)
    conn.execute(statements["insert"], rows)
    last = {}
    for event in events:
        last[event.chain] = event
    for chain, event in last.items():
        conn.execute(statements["advance"], {"head_chain": chain, "head_seq": event.seq, "head_hash": event.hash,
                                             "head_at": event.occurred_at})
    for event in events:
        _remember_append(session, event, heads[event.chain][3])
    return [event.id for event in events]


_appender = _GroupAppender()


def append_many(session: Session, items: list[dict]) -> list[str]:
    """:func:`record_many` without ORM objects — the same chain, HMACs and checkpoint, one INSERT
    of all events — for a bulk writer that needs only the ids (a retention purge's chunk of
    ``contact.delete`` events), in the caller's transaction. Returns the event ids in order."""
    return _append_rows(session, items)


def record_committed(**fields) -> str:
    """Append one event (:func:`record`'s keyword arguments, without a session) in a transaction
    of its own, grouped with other callers' events; returns the event id once it is committed
    and checkpointed. Raises :class:`AuditAppendFailed` when it could not be."""
    return _appender.append(fields)


def record_read(principal, request, action: str, **kwargs) -> str:
    """:func:`record_for` for a request that wrote nothing: the event is committed (grouped with
    concurrent requests' events) before this returns; call it after the read's own transaction
    ended and before answering."""
    from carepost.accounts.access import request_context

    ctx = request_context(request) if request is not None else {}
    return record_committed(
        org_id=principal.org_id,
        actor_type=principal.kind,
        actor_id=principal.actor_id,
        on_behalf_of=principal.on_behalf_of,
        **ctx,
        action=action,
        **kwargs,
    )


# --------------------------------------------------------------------------- reading

EVENT_FIELDS = (
    "id", "chain", "seq", "org_id", "occurred_at", "actor_type", "actor_id", "on_behalf_of", "action",
    "target_type", "target_id", "outcome", "ip", "user_agent", "request_id", "details", "prev_hash", "hash",
)
OUTCOMES = ("success", "failure", "denied")
MAX_PAGE = 200


def event_to_dict(event: AuditEvent) -> dict:
    """Every field, times in the exact form the hash covers."""
    out = {}
    for name in EVENT_FIELDS:
        value = getattr(event, name)
        out[name] = _ts(value) if isinstance(value, datetime) else value
    return out


def parse_time(value: str | datetime | None, field: str) -> datetime | None:
    """ISO 8601 date or date-time; no zone means UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValidationFailed("Use an ISO 8601 date or date-time, e.g. 2025-01-31T08:00:00Z.", field=field) from None
    try:
        return clock.aware(parsed).astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise ValidationFailed("This date is out of range.", field=field) from None


def encode_cursor(event: AuditEvent) -> str:
    raw = f"{_ts(event.occurred_at)}|{event.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, event_id = raw.split("|", 1)
        when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed("The cursor is not one this API returned.", field="cursor") from None
    if not is_id(event_id):
        raise ValidationFailed("The cursor is not one this API returned.", field="cursor")
    return when, event_id


@dataclass
class EventFilters:
    action: str | None = None
    actor_id: str | None = None
    outcome: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def active(self) -> dict:
        """The filters in use, for the audit event that records the read (names and ids, no PHI)."""
        out = {}
        for name, value in self.__dict__.items():
            if value not in (None, ""):
                out[name] = _ts(value) if isinstance(value, datetime) else value
        return out


def list_events(
    session: Session, chain: str, filters: EventFilters | None = None, *, cursor: str | None = None, limit: int = 50
) -> tuple[list[AuditEvent], str | None]:
    """One page of a chain's events, newest first, with the cursor of the next page.

    ``chain`` is required: audit events are not ``OrgScoped`` (the system chain belongs to no
    organization), so the caller's organization is applied here, explicitly."""
    f = filters or EventFilters()
    if f.outcome and f.outcome not in OUTCOMES:
        raise ValidationFailed(f"Outcome must be one of {', '.join(OUTCOMES)}.", field="outcome")
    for name in ("action", "actor_id", "target_type", "target_id"):
        value = getattr(f, name)
        if value and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValidationFailed("Control characters are not allowed.", field=name)
    limit = max(1, min(int(limit), MAX_PAGE))
    stmt = select(AuditEvent).where(AuditEvent.chain == chain)
    if f.action:
        if f.action.endswith("*"):
            prefix = f.action[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            stmt = stmt.where(AuditEvent.action.like(prefix + "%", escape="\\"))
        else:
            stmt = stmt.where(AuditEvent.action == f.action)
    for name in ("actor_id", "outcome", "target_type", "target_id"):
        value = getattr(f, name)
        if value:
            stmt = stmt.where(getattr(AuditEvent, name) == value)
    if f.since is not None:
        stmt = stmt.where(AuditEvent.occurred_at >= f.since)
    if f.until is not None:
        stmt = stmt.where(AuditEvent.occurred_at < f.until)
    if cursor:
        when, event_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(AuditEvent.occurred_at < when, and_(AuditEvent.occurred_at == when, AuditEvent.id < event_id))
        )
    stmt = stmt.order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def get_event(session: Session, chain: str, event_id: str) -> AuditEvent:
    """One event of ``chain``; another chain's event is "not found", never "forbidden"."""
    event = None
    if is_id(event_id):
        event = session.scalar(select(AuditEvent).where(AuditEvent.chain == chain, AuditEvent.id == event_id))
    if event is None:
        raise NotFound("No such audit event.", field="event_id")
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


# --------------------------------------------------------------------------- checkpoints after commit
#
# ``record`` notes each append in ``session.info``; when the outermost transaction commits, the
# newest append of each chain becomes that chain's checkpoint file (see ``checkpoints``). Appends
# made inside a savepoint that rolls back, or a transaction that rolls back, are forgotten.

_PENDING = "carepost_audit_pending"  # chain -> list of appends (transaction, seq, hash, id, time, key)
_BASE_OK = "carepost_audit_checkpoint_base"  # chain -> may this transaction advance the file?
_HANDED_OVER = "carepost_audit_checkpoints_handed_over"  # a list: the caller writes them (see below)


def hand_over_checkpoints(session: Session, into: list) -> None:
    """Let the caller write this session's checkpoints after its commit instead of ``after_commit``:
    they are signed at the commit and appended to ``into``, and the caller must pass them to
    :func:`write_checkpoints` before anything answers for the events they cover (the rule of
    ``checkpoints``: a response is sent only once the file covers its event). The HL7 listener
    does this so that the ``fsync`` of one group's checkpoint overlaps the next group's work while
    that group's ACKs still wait for it."""
    session.info[_HANDED_OVER] = into


def write_checkpoints(signed: list) -> None:
    """Write checkpoints handed over by :func:`hand_over_checkpoints` (in commit order; the file
    only moves forward). Never raises: the data is committed, ``verify`` reports a stale file."""
    for cp in signed:
        try:
            checkpoints.write_committed(cp)
        except Exception as exc:  # noqa: BLE001
            log.error("audit_checkpoint_write_failed", chain=cp.chain, error_type=type(exc).__name__)


def _current_transaction(session: Session) -> SessionTransaction | None:
    return session.get_nested_transaction() or session.get_transaction()


def _remember_append(session: Session, event: AuditEvent, key: bytes) -> None:
    base = session.info.setdefault(_BASE_OK, {})
    if event.chain not in base:
        base[event.chain] = _file_continues_chain(session, event.chain, key, event.seq, event.prev_hash)
    session.info.setdefault(_PENDING, {}).setdefault(event.chain, []).append(
        (_current_transaction(session), event.seq, event.hash, event.id, _ts(event.occurred_at), key)
    )


_STORED_HASH = select(AuditEvent.__table__.c.hash).where(AuditEvent.__table__.c.chain == bindparam("chain"),
                                                        AuditEvent.__table__.c.seq == bindparam("seq"))


def _file_continues_chain(session: Session, chain: str, key: bytes, first_seq: int, prev_hash: str) -> bool:
    """Does this machine's checkpoint still name an event of the chain we are extending?

    If not, the log was truncated or rewritten after the checkpoint: keep the file as evidence
    (``verify`` reports it) instead of advancing it over the gap. Checked once per chain and
    transaction, while the chain head is locked; usually without a query (the file names the
    event we link to).
    """
    try:
        cp = checkpoints.read_local(chain)
    except checkpoints.CheckpointError:
        log.error("audit_checkpoint_unreadable", chain=chain)
        return False
    if cp is None:
        return True
    # The current key first (the usual case: no query); the other live versions only when it
    # does not verify (a checkpoint signed before a key rotation).
    if cp.chain != chain or not (checkpoints.mac_ok(key, cp) or any(
            checkpoints.mac_ok(k, cp) for _, k in get_keyring().named_keys(session, chain, "audit") if k != key)):
        log.error("audit_checkpoint_invalid", chain=chain)
        return False
    if cp.seq == first_seq - 1:
        ok = hmac.compare_digest(cp.hash, prev_hash)
    elif cp.seq >= first_seq:
        ok = False  # the file is ahead of the database: newest events were deleted
    else:
        # The file is behind the head (the HL7 listener writes a group's checkpoint while the next
        # group appends): the event it names must still be there. A Core statement — that event
        # was committed before the file named it, so nothing pending needs flushing first.
        stored = session.connection().execute(_STORED_HASH, {"chain": chain, "seq": cp.seq}).scalar()
        ok = stored is not None and hmac.compare_digest(stored, cp.hash)
    if not ok:
        log.error("audit_checkpoint_diverged", chain=chain, checkpoint_seq=cp.seq, head_seq=first_seq - 1)
    return ok


def _within(tx: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while tx is not None:
        if tx is ancestor:
            return True
        tx = tx.parent
    return False


@sa_event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    pending = session.info.get(_PENDING)
    if not pending:
        return
    for chain in list(pending):
        pending[chain] = [a for a in pending[chain] if not _within(a[0], previous_transaction)]
        if not pending[chain]:
            del pending[chain]


@sa_event.listens_for(Session, "after_commit")
def _write_checkpoints(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint committed; the outer transaction may still roll back
    pending = session.info.pop(_PENDING, None)
    base = session.info.pop(_BASE_OK, {})
    if not pending:
        return
    for chain, appends in pending.items():
        if not appends or not base.get(chain, False):
            continue
        _tx, seq, hash_, event_id, occurred_at, key = max(appends, key=lambda a: a[1])
        try:
            cp = checkpoints.sign(key, chain=chain, seq=seq, hash=hash_, event_id=event_id, occurred_at=occurred_at)
            handed_over = session.info.get(_HANDED_OVER)
            if handed_over is not None:
                handed_over.append(cp)  # the caller writes it before answering (hand_over_checkpoints)
                continue
            checkpoints.write_committed(cp)
        except Exception as exc:  # the data is committed: never fail the caller; verify reports a stale checkpoint
            log.error("audit_checkpoint_write_failed", chain=chain, error_type=type(exc).__name__)


@sa_event.listens_for(Session, "after_transaction_end")
def _clear_on_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_PENDING, None)
        session.info.pop(_BASE_OK, None)
