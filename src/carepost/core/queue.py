"""The task queue: Huey on SQLite (embedded default) or on Redis (``CAREPOST_QUEUE_URL=redis://``).

The queue carries ids, never PHI (ARCHITECTURE.md section 2 and 5). Three things enforce it:

* results are disabled (``results=False``): a task's return value is never stored;
* every enqueue passes :func:`check_task_args` — ids CarePost issued (:func:`is_issued_id`),
  booleans, ``None`` and enum members (and short lists of those) are accepted, anything else —
  integers included: a phone number, an MRN or a birth date fits in one — raises
  :class:`TaskArgumentRejected` before a byte is written;
* messages are serialized as JSON, not pickle, so the store holds readable references only and a
  process with write access to Redis cannot make a worker run code.

A task carries one more thing, outside its arguments: the **request id** of the HTTP request (or
task) that queued it — a trace id (hex, see ``carepost.app.accepted_request_id``), never PHI —
so the worker's log lines for the task carry the same ``request_id`` as the server's for the
request. A task queued by the scheduler gets an id of its own.

Durable state lives in the database; tasks must be idempotent (a task may run twice when a
worker stops mid-task). Write a task as::

    from carepost.core.queue import huey

    @huey.task(retries=3, retry_delay=10)
    def deliver_message(message_id: str) -> None:
        with system_session() as session:
            ...
            session.commit()

    deliver_message(message.id)      # enqueues; the worker runs it

Each capability's ``tasks.py`` is listed in the composition root (``carepost.assembly.TASK_MODULES``).
"""

from __future__ import annotations

import enum
import json
import re
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from huey import Huey
from huey.registry import Message
from huey.serializer import Serializer
from huey.storage import RedisStorage, SqliteStorage

from carepost.core.config import Settings, get_settings
from carepost.core.ids import is_issued_id
from carepost.core.logging import get_logger

log = get_logger("carepost.queue")

QUEUE_NAME = "carepost"
MAX_LIST_ARGS = 1000  # a batch of ids; a larger batch belongs in the database, referenced by one id


class TaskArgumentRejected(ValueError):
    """A task argument is not an id CarePost issued, a boolean, ``None`` or an enum member."""


def _allowed_scalar(value) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, enum.Enum):  # a closed set of values named in code, not data
        return isinstance(value.value, (int, str)) and len(str(value.value)) <= 64
    if isinstance(value, str):
        return is_issued_id(value)
    return False


def check_task_args(name: str, args: tuple | list, kwargs: dict | None) -> None:
    """Refuse anything that could carry PHI into the queue store. Names the task and the
    position of the bad argument, never its value."""
    items = [(f"argument {i + 1}", v) for i, v in enumerate(args or ())]
    items += [(f"argument {k!r}", v) for k, v in (kwargs or {}).items()]
    for where, value in items:
        if isinstance(value, (list, tuple)):
            if len(value) > MAX_LIST_ARGS:
                raise TaskArgumentRejected(f"task {name}: {where} lists more than {MAX_LIST_ARGS} values")
            if all(_allowed_scalar(v) and not isinstance(v, (list, tuple)) for v in value):
                continue
        elif _allowed_scalar(value):
            continue
        raise TaskArgumentRejected(
            f"task {name}: {where} is a {type(value).__name__} that is not an id CarePost issued; "
            "tasks take ids, booleans or enum members only"
        )


# --------------------------------------------------------------------------- serialization


def _time_to_json(value):
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, timedelta):
        return {"$td": value.total_seconds()}
    return value


def _time_from_json(value):
    if isinstance(value, dict) and "$dt" in value:
        return datetime.fromisoformat(value["$dt"])
    if isinstance(value, dict) and "$td" in value:
        return timedelta(seconds=value["$td"])
    return value


def _message_to_json(message: Message | None):
    if message is None:
        return None
    data = message._asdict()
    for key in ("eta", "expires", "expires_resolved"):
        data[key] = _time_to_json(data.get(key))
    data["on_complete"] = _message_to_json(data.get("on_complete"))
    data["on_error"] = _message_to_json(data.get("on_error"))
    if data.get("chord_config") is not None:
        cid, size, idx, callback = data["chord_config"]
        data["chord_config"] = [cid, size, idx, _message_to_json(callback)]
    data["args"] = [_plain(v) for v in (data.get("args") or ())]
    data["kwargs"] = {k: _plain(v) for k, v in (data.get("kwargs") or {}).items()}
    return data


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _message_from_json(data) -> Message | None:
    if data is None:
        return None
    for key in ("eta", "expires", "expires_resolved"):
        data[key] = _time_from_json(data.get(key))
    data["on_complete"] = _message_from_json(data.get("on_complete"))
    data["on_error"] = _message_from_json(data.get("on_error"))
    if data.get("chord_config") is not None:
        cid, size, idx, callback = data["chord_config"]
        data["chord_config"] = (cid, size, idx, _message_from_json(callback))
    data["args"] = tuple(data.get("args") or ())
    return Message(**{k: v for k, v in data.items() if k in Message._fields})


class JSONMessageSerializer(Serializer):
    """Huey messages as JSON: readable references, no pickle."""

    def _serialize(self, data) -> bytes:
        if isinstance(data, Message):
            body = _message_to_json(data)
            request_id = current_request_id()
            if request_id:
                body["request_id"] = request_id
            return json.dumps(body, separators=(",", ":")).encode()
        # Huey also stores small internal values (revocations with a datetime, lock markers).
        return json.dumps({"$value": data}, default=_time_to_json, separators=(",", ":")).encode()

    def _deserialize(self, data) -> object:
        loaded = json.loads(bytes(data).decode())
        if isinstance(loaded, dict) and set(loaded) == {"$value"}:
            return _revive(loaded["$value"])
        if isinstance(loaded, dict):
            # The consumer thread that dequeues a message also runs it (see run_consumer's hooks).
            _incoming.request_id = _valid_request_id(loaded.pop("request_id", None))
        return _message_from_json(loaded)


_incoming = threading.local()
_REQUEST_ID = re.compile(r"^(?=.{16,64}$)[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*$")


def _valid_request_id(value) -> str | None:
    return value if isinstance(value, str) and _REQUEST_ID.match(value) else None


def current_request_id() -> str | None:
    """The request id bound to this context's log lines (``structlog.contextvars``), if any."""
    import structlog

    return _valid_request_id(structlog.contextvars.get_contextvars().get("request_id"))


def _revive(value):
    if isinstance(value, dict):
        revived = _time_from_json(value)
        return revived if revived is not value else {k: _revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return value


# --------------------------------------------------------------------------- the Huey instance


def is_redis_url(url: str | None) -> bool:
    return bool(url) and url.split(":", 1)[0] in ("redis", "rediss", "unix")


def sqlite_queue_path(settings: Settings) -> Path:
    return settings.data_dir / "queue.db"


def create_storage(settings: Settings):
    url = settings.queue_url
    if is_redis_url(url):
        return RedisStorage(settings.queue_name, url=url)
    if url:
        scheme = urlsplit(url).scheme or url
        raise ValueError(f"CAREPOST_QUEUE_URL: unsupported scheme {scheme!r}; use redis:// or rediss://, or leave it empty for SQLite")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteStorage(settings.queue_name, filename=str(sqlite_queue_path(settings)))


class CarePostHuey(Huey):
    """Huey whose storage follows the current settings (opened on first use, reset by tests)
    and whose every enqueue is checked by :func:`check_task_args`."""

    def __init__(self) -> None:
        self._storage = None
        self._storage_lock = threading.Lock()
        super().__init__(QUEUE_NAME, results=False, utc=True, serializer=JSONMessageSerializer())

    # Huey.__init__ assigns ``self.storage = self.create_storage()``; make that lazy.
    def create_storage(self):
        return None

    @property
    def storage(self):
        with self._storage_lock:
            if self._storage is None:
                self._storage = create_storage(get_settings())
            return self._storage

    @storage.setter
    def storage(self, value) -> None:
        self._storage = value

    def reset_storage(self) -> None:
        """Close and forget the storage (after the configuration changed)."""
        with self._storage_lock:
            if self._storage is not None:
                try:
                    self._storage.close()
                except Exception:  # closing a broken connection must not hide the reset
                    pass
            self._storage = None

    def enqueue(self, task):
        for t in _tasks_of(task):
            check_task_args(t.name, t.args, t.kwargs)
        return super().enqueue(task)

    def enqueue_many(self, tasks: list[tuple]) -> None:
        """Enqueue simple tasks (``task_wrapper.s(...)``, no groups, chords or pipelines), each
        with the request id it carries — ``[(task, request id or None), ...]`` — in ONE write to
        the store: one SQLite transaction, or one Redis pipeline round trip, instead of one per
        task (the API's group accept queues one task per request, under that request's id).
        Every task is checked by :func:`check_task_args` before anything is written; all are
        written or none."""
        import structlog
        from huey import signals

        for task, _ in tasks:
            if _tasks_of(task) != [task]:
                raise ValueError("enqueue_many takes simple tasks only")
            check_task_args(task.name, task.args, task.kwargs)
        if self._immediate:
            for task, request_id in tasks:
                with structlog.contextvars.bound_contextvars(request_id=request_id):
                    self.enqueue(task)
            return
        rows = []
        for task, request_id in tasks:
            if task.expires:
                task.resolve_expires(self.utc)
            self._emit(signals.SIGNAL_ENQUEUED, task)
            with structlog.contextvars.bound_contextvars(request_id=request_id):
                rows.append((self.serialize_task(task), task.priority))
        storage = self.storage
        if isinstance(storage, SqliteStorage):
            with storage.db(commit=True) as cursor:
                cursor.executemany("insert into task (queue, data, priority) values (?, ?, ?)",
                                   [(storage.name, storage.to_blob(data), priority or 0) for data, priority in rows])
        elif isinstance(storage, RedisStorage) and not any(priority for _, priority in rows):
            pipe = storage.conn.pipeline(transaction=True)
            for data, _ in rows:
                pipe.lpush(storage.queue_key, data)
            pipe.execute()
        else:
            for data, priority in rows:
                storage.enqueue(data, priority)


def _tasks_of(task) -> list:
    inner = getattr(task, "tasks", None)
    if inner is not None:  # group / chord
        out = []
        for t in inner:
            out.extend(_tasks_of(t))
        callback = getattr(task, "callback", None)
        return out + (_tasks_of(callback) if callback is not None else [])
    out = [task]
    for attr in ("on_complete", "on_error"):
        nxt = getattr(task, attr, None)
        if nxt is not None:
            out.extend(_tasks_of(nxt))
    return out


huey = CarePostHuey()


def enqueue(task_wrapper, *args, **kwargs) -> None:
    """Enqueue ``task_wrapper(*args, **kwargs)``; same as calling the task, spelled out."""
    task_wrapper(*args, **kwargs)


def pending_count() -> int:
    """Tasks waiting in the queue (reachability check for doctor and /readyz)."""
    return huey.pending_count()


_hooks_installed: list[bool] = []


def install_task_hooks() -> None:
    """Around every task this process runs: its log lines carry the request id that queued it
    (or a new one), the task name and id; the worker's metrics count it (carepost.core.metrics)."""
    if _hooks_installed:
        return
    _hooks_installed.append(True)
    import structlog

    from carepost.core import metrics
    from carepost.core.ids import new_id

    @huey.pre_execute()
    def _bind(task) -> None:
        request_id = getattr(_incoming, "request_id", None) or new_id()
        _incoming.request_id = None
        _incoming.started = time.perf_counter()
        structlog.contextvars.bind_contextvars(request_id=request_id, task=task.name, task_id=task.id)

    @huey.post_execute()
    def _unbind(task, task_value, exc) -> None:
        started = getattr(_incoming, "started", None)
        seconds = time.perf_counter() - started if started else None
        outcome = "error" if exc is not None else "ok"
        metrics.observe_task(task.name, outcome, seconds)
        log.info("task_finished", task_status=outcome, duration_ms=int((seconds or 0) * 1000))
        structlog.contextvars.unbind_contextvars("request_id", "task", "task_id")


def run_consumer(workers: int, shutdown_timeout: float, periodic: bool = True) -> None:
    """Run the Huey consumer in this process until SIGTERM (graceful: running tasks finish, up to
    ``shutdown_timeout`` seconds) or SIGINT (immediate). The caller has assembled the process
    (``carepost.assembly``), which loads every capability's tasks."""
    install_task_hooks()
    settings = get_settings()
    if settings.worker_metrics_port:
        from carepost.core.metrics import serve_worker_metrics

        serve_worker_metrics(settings.worker_metrics_port, settings.host)
    consumer = huey.create_consumer(
        workers=workers,
        worker_type="thread",
        periodic=periodic,
        initial_delay=0.1,
        backoff=1.15,
        max_delay=1.0,
        scheduler_interval=1,
        check_worker_health=True,
        health_check_interval=10,
        shutdown_timeout=shutdown_timeout,
        graceful_signal="TERM",
    )
    consumer.run()
