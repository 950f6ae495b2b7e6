"""Group acceptance of single-message API requests (issue 17: ``POST /api/v1/messages`` at a
constant 200 requests/s on one server).

Why: one message accepted alone costs ~20 ms of server CPU, nearly all of it per transaction
(organization settings and sending domain read, key and blind-index set-up, the eligibility
query, the archive index INSERT, the audit head lock, the commit and its checkpoint), while
``accept_batch`` stores a message for ~0.6 ms. On SQLCipher every request also holds the
database's write lock (``BEGIN IMMEDIATE``) for all of that, so requests run one after another.

How: the pattern of a database group commit. A request waits on its event loop (an ``asyncio``
future) while ONE thread accepts the waiting requests a group at a time (at most
:data:`MAX_GROUP`, in arrival order): it checks each one exactly as alone (``prepare_message``,
its Idempotency-Key), stores all that passed in ONE transaction (``store_messages``, one
``message.create`` audit event per message, one commit), queues their delivery, then answers
them and takes the requests that arrived meanwhile. Under light load a group is one request.

What each caller still gets, as alone:

* its 202 only after its message is committed (stored, encrypted), its delivery queued;
* its own error: a request that fails its checks (the field named as alone) or whose
  Idempotency-Key was used with another request (409) is answered that error and left out of the
  group; the same key twice in one group answers the first request's message to the second;
* all or nothing per request: if storing the group fails (a concurrent request of another
  process with the same Idempotency-Key, a database error), nothing of the group is kept and
  every request of it is accepted again alone, by its own thread, on the path it always took.

Nothing but message ids leaves a request: no content enters a queue payload or a log line.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from carepost.core.errors import CarePostError, Conflict
from carepost.core.logging import get_logger

log = get_logger(__name__)

MAX_GROUP = 100  # requests accepted in one transaction


@dataclass(eq=False)
class Pending:
    """One request waiting in the group: its inputs, then its answer."""

    principal: Any  # accounts.access.Principal
    body: Any  # schemas.MessageIn
    idempotency_key: str | None
    context: dict  # request_context(request): where it came from, for its audit event
    request_id: str | None = None  # the request's trace id: its delivery task carries it to the worker
    message_id: str | None = None
    created: bool = False
    error: BaseException | None = None
    checked: bool = False  # its error is its own (its checks failed), whatever becomes of the group
    alone: bool = False  # the group failed: accept this request alone
    loop: Any = None  # the event loop the request waits on, and its future
    future: Any = None

    @property
    def answered(self) -> bool:
        return self.message_id is not None or self.error is not None


class AcceptGroup:
    """The waiting requests and the one thread accepting them. A request waits on its event
    loop (an ``asyncio`` future), not in a thread of the pool: one thread hand-off per group
    instead of two per request, and no thread per waiting request competing for the GIL."""

    def __init__(self, max_group: int = MAX_GROUP) -> None:
        self.max_group = max_group
        self._lock = threading.Lock()
        self._pending: list[Pending] = []
        self._leading = False
        self._executor: ThreadPoolExecutor | None = None

    async def submit(self, item: Pending) -> Pending:
        """Accept ``item`` with whatever requests wait beside it; returns it answered (or marked
        ``alone``) once its group's transaction has committed."""
        loop = asyncio.get_running_loop()
        item.loop, item.future = loop, loop.create_future()
        with self._lock:
            self._pending.append(item)
            start = not self._leading
            self._leading = True
            if start and self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carepost-accept")
        if start:
            try:
                self._executor.submit(self._drain)
            except RuntimeError:  # the process is shutting down: each waiting request goes alone
                with self._lock:
                    stranded, self._pending, self._leading = self._pending, [], False
                _alone(stranded)
                _answer(stranded)
        # Shielded: a client that hangs up does not withdraw a request its group is storing.
        await asyncio.shield(item.future)
        return item

    def _drain(self) -> None:
        """The accepting thread: groups one after another until no request waits."""
        while True:
            with self._lock:
                group = self._pending[:self.max_group]
                del self._pending[:self.max_group]
                if not group:
                    self._leading = False
                    return
            try:
                accept_group(group)
            except BaseException as exc:  # noqa: BLE001 - answered below: each request is accepted again alone
                log.error("accept_group_failed", error_type=type(exc).__name__, requests_count=len(group))
                _alone(group)
            finally:
                _answer(group)


def _answer(group: list[Pending]) -> None:
    """Wake the requests of ``group`` on their event loops (one call per loop)."""
    by_loop: dict = {}
    for item in group:
        by_loop.setdefault(item.loop, []).append(item.future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures)
        except RuntimeError:  # that event loop is closed: nobody waits any more
            pass


def _resolve(futures: list) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def accept_group(group: list[Pending]) -> None:
    """Accept the requests of ``group`` (see the module docstring); never raises for a request's
    own fault. A request left unanswered is marked ``alone``."""
    by_org: dict[str, list[Pending]] = {}
    for item in group:
        by_org.setdefault(item.principal.org_id, []).append(item)
    for org_id, items in by_org.items():
        try:
            _accept_org(org_id, items)
        except Exception:  # noqa: BLE001 - each request is accepted again alone, and fails there if it must
            _alone(items)


def _alone(items: list[Pending]) -> None:
    """The group's transaction did not commit: every request but those that failed their own
    checks is accepted again alone (answers are only set after the commit)."""
    for item in items:
        if item.message_id is None and not item.checked:
            item.error, item.alone = None, True


def _accept_org(org_id: str, items: list[Pending]) -> None:
    from carepost.audit.service import record_many
    from carepost.core.database import org_session
    from carepost.delivery import messages as svc
    from carepost.delivery.tasks import enqueue_delivery_each

    with org_session(org_id) as session:
        org_settings = svc.delivery_settings(session, org_id)
        domain_cache: dict = {}
        checked: list[tuple[Pending, Any, str | None]] = []
        for item in items:
            try:
                key = svc.check_idempotency_key(item.idempotency_key)
                prepared = svc.prepare_message(session, org_id, item.body, org_settings=org_settings,
                                               domain_cache=domain_cache, sandbox=item.principal.sandbox)
            except CarePostError as exc:
                item.error, item.checked = exc, True
                continue
            checked.append((item, prepared, key))
        hashes = {key: svc.idempotency_hash(key) for _, _, key in checked if key is not None}
        existing = _earlier_messages(session, org_id, set(hashes.values()))
        to_store: list[tuple[Pending, Any, str | None]] = []
        first_of_key: dict[str, tuple[Pending, Any]] = {}
        replays: list[tuple[Pending, Any]] = []
        for item, prepared, key in checked:
            if key is not None:
                earlier = existing.get(hashes[key])
                earlier_request_hash = earlier.request_hash if earlier is not None else None
                if earlier is None and key in first_of_key:
                    earlier_item, earlier_prepared = first_of_key[key]
                    earlier, earlier_request_hash = earlier_item, earlier_prepared.request_hash
                if earlier is not None:
                    if earlier_request_hash != prepared.request_hash:
                        item.error = Conflict("This Idempotency-Key was used with a different request.",
                                              field="Idempotency-Key", code="idempotency_conflict")
                    else:
                        replays.append((item, earlier))
                    continue
                first_of_key[key] = (item, prepared)
            to_store.append((item, prepared, key))
        # store_messages takes one author and one sandbox flag: one call per (author, sandbox).
        stored: dict[int, Any] = {}
        authors: dict[tuple, list[int]] = {}
        for i, (item, _, _) in enumerate(to_store):
            authors.setdefault((item.principal.actor_id, bool(item.principal.sandbox)), []).append(i)
        for (actor_id, sandbox), indexes in authors.items():
            rows = svc.store_messages(session, org_id, [to_store[i][1] for i in indexes], source="api",
                                      created_by=actor_id, sandbox=sandbox,
                                      idempotency_keys=[to_store[i][2] for i in indexes])
            stored.update(zip(indexes, rows))
        if to_store:
            record_many(session, [dict(
                org_id=org_id, actor_type=item.principal.kind, actor_id=item.principal.actor_id,
                on_behalf_of=item.principal.on_behalf_of, **item.context, action="message.create",
                target_type="message", target_id=stored[i].id,
                details={"recipients_count": len(item.body.to) + len(item.body.cc) + len(item.body.bcc),
                         "purpose": stored[i].purpose, "security": stored[i].security,
                         "contains_phi": stored[i].contains_phi, "sandbox": stored[i].sandbox},
            ) for i, (item, _, _) in enumerate(to_store)])
        session.commit()
    for i, (item, _, _) in enumerate(to_store):
        item.message_id, item.created = stored[i].id, True
    for item, earlier in replays:
        item.message_id = earlier.message_id if isinstance(earlier, Pending) else earlier.id
    # A replay is queued again too (see delivery.api.send_message). One task per request, under
    # the request's id: this thread has none of the requests' context, and a worker's log lines
    # for the task must carry the id of the request that queued it (core.queue). All of the
    # group's tasks are written to the queue at once.
    enqueue_delivery_each([(item.message_id, item.request_id) for item in items if item.message_id is not None])


def _earlier_messages(session, org_id: str, key_hashes: set[str]) -> dict[str, Any]:
    """The organization's messages stored earlier under these Idempotency-Key hashes: ``{key
    hash: row with .id and .request_hash}``, in ONE statement (was one per key). On SQLite the
    hashes are one JSON parameter LEFT JOINed to ``messages`` on the unique (org_id,
    idempotency_key) index: the keys stay the outer loop, one index probe each, whatever the
    planner's statistics — ``org_id = ? AND idempotency_key IN (...)`` walks the organization's
    org_id index (every message) when SQLite has none or stale ones."""
    import json

    from sqlalchemy import and_, bindparam, func, select

    from carepost.delivery.models import Message

    if not key_hashes:
        return {}
    columns = (Message.idempotency_key, Message.id, Message.request_hash)
    if session.get_bind().dialect.name == "sqlite":
        wanted = func.json_each(bindparam(None, json.dumps(sorted(key_hashes)))).table_valued("value").alias("wanted")
        query = select(*columns).select_from(wanted).outerjoin(
            Message, and_(Message.org_id == org_id, Message.idempotency_key == wanted.c.value))
    else:
        query = select(*columns).where(Message.org_id == org_id, Message.idempotency_key.in_(sorted(key_hashes)))
    return {row.idempotency_key: row for row in session.execute(query) if row.id is not None}


_group = AcceptGroup()


async def submit(principal, body, idempotency_key: str | None, context: dict) -> Pending:
    """Accept one API message in a group (see the module docstring)."""
    from carepost.core.queue import current_request_id

    return await _group.submit(Pending(principal, body, idempotency_key, context,
                                       request_id=current_request_id()))
