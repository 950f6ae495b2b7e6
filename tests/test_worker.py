"""The task queue: ids-only arguments, JSON messages, and a real ``carepost worker`` process
consuming from the SQLite queue and from Redis, on both databases."""

from __future__ import annotations

import enum
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from carepost.core.ids import new_id
from carepost.core.queue import huey

ROOT = Path(__file__).resolve().parent.parent
huey_task = huey.task


def redis_test_url() -> str | None:
    """CAREPOST_TEST_REDIS_URL, else the local default when it answers."""
    url = os.environ.get("CAREPOST_TEST_REDIS_URL")
    if url:
        return url
    import redis

    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/1", socket_connect_timeout=0.5).ping()
        return "redis://127.0.0.1:6379/1"
    except redis.RedisError:
        return None


@pytest.fixture
def queue_env(db, monkeypatch):
    """A queue of this test's own (unique name), on the SQLite queue in the data dir unless the
    test sets CAREPOST_QUEUE_URL through the returned dict before using it."""
    from carepost.core.config import reset_settings
    from carepost.core.queue import huey

    env = {"CAREPOST_QUEUE_NAME": "t" + uuid.uuid4().hex[:12]}

    def apply(extra: dict | None = None) -> dict:
        env.update(extra or {})
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        reset_settings()
        huey.reset_storage()
        return env

    apply()
    yield apply
    if not env.get("CAREPOST_QUEUE_URL", "redis").startswith("amqp"):
        huey.flush()  # leave no keys behind in a shared Redis
    huey.reset_storage()
    monkeypatch.undo()
    reset_settings()
    huey.reset_storage()


# --------------------------------------------------------------------------- argument guard


class Channel(enum.StrEnum):
    EMAIL = "email"


def test_ids_booleans_and_enums_are_accepted():
    from carepost.core.queue import check_task_args

    check_task_args("t", (new_id(), True, None, Channel.EMAIL, [new_id(), new_id()]), {"org_id": new_id(), "retry": False})


@pytest.mark.parametrize(
    "value",
    [
        5551234567,  # a phone number
        19800101,  # a birth date
        123456789,  # an SSN
        3,
        "0" * 32,
        "f" * 32,
        hashlib.md5(b"jane.doe@example.org").hexdigest(),  # PHI in id clothing
        "19800101" + "0" * 24,
        new_id().upper(),
        [new_id(), 42],
    ],
    ids=["phone", "birth-date", "ssn", "small-int", "zeros", "effs", "md5-of-email", "date-prefix", "upper", "list-with-int"],
)
def test_integers_and_hex_that_carepost_did_not_issue_are_rejected(value):
    """Issue 9 item 20: only the id format CarePost issues (core/ids.new_id: a millisecond time
    since 2025 and random bits) passes; any integer and any other 32-hex value is refused."""
    from carepost.core.queue import TaskArgumentRejected, check_task_args

    with pytest.raises(TaskArgumentRejected, match="argument 1"):
        check_task_args("send", (value,), {})


def test_every_task_enqueued_by_carepost_passes_the_guard():
    """Every task CarePost defines takes ids only (or nothing): call each through huey's
    enqueue path with ids from new_id and nothing is refused."""
    import inspect

    from carepost.assembly import assemble
    from carepost.core.queue import check_task_args, huey

    assemble()
    checked = 0
    for name, task_class in huey._registry._registry.items():
        if not task_class.__module__.startswith("carepost."):
            continue  # tasks these tests define
        func = inspect.getclosurevars(task_class.execute).nonlocals["func"]
        params = [p for p in inspect.signature(func).parameters.values()
                  if p.default is inspect.Parameter.empty]
        args = tuple([new_id()] if p.annotation in ("list[str]", list) else new_id() for p in params)
        check_task_args(name, args, {})
        for p in params:
            assert p.annotation in ("str", "list[str]"), f"{name}: {p.name} is {p.annotation}"
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    "value",
    [
        "jane.doe@example.org",
        "Jane Doe",
        "123-45-6789",
        "email",  # a bare word is not an enum member: use the Enum
        {"id": "0" * 32},
        1.5,
        b"\x00" * 32,
        ["0" * 32, "Jane Doe"],
        ["0" * 32] * 1001,
    ],
)
def test_anything_else_is_rejected_without_echoing_it(value):
    from carepost.core.queue import TaskArgumentRejected, check_task_args

    with pytest.raises(TaskArgumentRejected) as exc:
        check_task_args("send", (value,), {})
    message = str(exc.value)
    assert "send" in message and "argument 1" in message
    for fragment in ("jane", "Jane", "123-45", "\\x00"):
        assert fragment not in message


def test_keyword_arguments_are_checked_too():
    from carepost.core.queue import TaskArgumentRejected, check_task_args

    with pytest.raises(TaskArgumentRejected, match="argument 'email'"):
        check_task_args("send", (), {"email": "jane@example.org"})


def test_enqueueing_phi_raises_and_stores_nothing(queue_env):
    from carepost.accounts.tasks import purge_expired_credentials
    from carepost.core.queue import TaskArgumentRejected, huey

    with pytest.raises(TaskArgumentRejected):
        purge_expired_credentials("jane@example.org")
    assert huey.pending_count() == 0


def test_queue_store_holds_json_with_ids_only(queue_env):
    from carepost.core.config import get_settings
    from carepost.core.queue import huey, sqlite_queue_path

    @huey.task(name="probe_task_for_serializer")
    def probe(message_id: str, retry: bool, channel: Channel) -> None:
        pass

    try:
        mid = new_id()
        probe(mid, True, Channel.EMAIL)
        settings = get_settings()
        with sqlite3.connect(sqlite_queue_path(settings)) as conn:
            rows = conn.execute("SELECT data FROM task WHERE queue = ?", (settings.queue_name,)).fetchall()
        assert len(rows) == 1
        stored = json.loads(bytes(rows[0][0]))  # JSON, not pickle
        assert stored["args"] == [mid, True, "email"]
        assert stored["kwargs"] == {}
        # And it comes back as a runnable task.
        task = huey.dequeue()
        assert task.args == (mid, True, "email")
    finally:
        probe.unregister()


def test_redis_url_selects_redis_storage(queue_env):
    from huey.storage import RedisStorage, SqliteStorage

    from carepost.core.queue import huey

    assert isinstance(huey.storage, SqliteStorage)
    url = redis_test_url()
    if url is None:
        pytest.skip("Redis not reachable and CAREPOST_TEST_REDIS_URL not set")
    queue_env({"CAREPOST_QUEUE_URL": url})
    assert isinstance(huey.storage, RedisStorage)
    assert huey.pending_count() == 0


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_enqueue_many_writes_every_task_with_its_own_request_id_or_none(queue_env, store):
    """``huey.enqueue_many`` (the API's group accept: one write for a group's delivery tasks):
    each task is dequeued as enqueued alone, in order, with the request id it was given; one
    argument that is not an id rejects the whole call before anything is written."""
    from carepost.core.queue import TaskArgumentRejected, _incoming, huey

    if store == "redis":
        url = redis_test_url()
        if url is None:
            pytest.skip("Redis not reachable and CAREPOST_TEST_REDIS_URL not set")
        queue_env({"CAREPOST_QUEUE_URL": url})

    @huey.task(name="probe_task_for_enqueue_many")
    def probe(message_ids: list) -> None:
        pass

    try:
        ids = [new_id() for _ in range(3)]
        request_ids = [uuid.uuid4().hex, None, uuid.uuid4().hex]
        with pytest.raises(TaskArgumentRejected):
            huey.enqueue_many([(probe.s([ids[0]]), request_ids[0]), (probe.s(["jane@example.org"]), None)])
        assert huey.pending_count() == 0
        huey.enqueue_many([(probe.s([i]), r) for i, r in zip(ids, request_ids)])
        assert huey.pending_count() == 3
        got = []
        for _ in ids:
            task = huey.dequeue()
            got.append((task.args, getattr(_incoming, "request_id", None)))
        assert got == [(([i],), r) for i, r in zip(ids, request_ids)]
    finally:
        probe.unregister()


def test_unsupported_queue_url_is_refused(queue_env):
    from carepost.core.queue import huey

    queue_env({"CAREPOST_QUEUE_URL": "amqp://broker/"})
    with pytest.raises(ValueError, match="CAREPOST_QUEUE_URL"):
        huey.pending_count()


# --------------------------------------------------------------------------- maintenance task


def _arrange_credentials(session):
    """One expired and one live item of each kind the purge handles; returns (dead, live) ids."""
    from carepost.accounts.models import ApiCredential, OAuthToken, OneTimeLink, Organization, RequestNonce, User, WebSession
    from carepost.core import clock

    now = clock.now()
    org = Organization(slug="purge-" + new_id()[:8], name="Purge Clinic")
    user = User(email=f"{new_id()[:10]}@staff.test", display_name="Staff")
    session.add_all([org, user])
    session.flush()
    cred = ApiCredential(org_id=org.id, key_id="k" + new_id(), name="ci", secret_hash="x" * 64)
    session.add(cred)
    session.flush()
    dead, live = {}, {}

    def web_session(**kw):
        ws = WebSession(id=new_id() + new_id(), user_id=user.id, org_id=org.id, csrf_secret="c", **kw)
        session.add(ws)
        return ws.id

    dead["expired_session"] = web_session(expires_at=now - timedelta(seconds=1), last_seen_at=now)
    dead["revoked_session"] = web_session(expires_at=now + timedelta(hours=1), last_seen_at=now, revoked_at=now)
    dead["idle_session"] = web_session(expires_at=now + timedelta(hours=4), last_seen_at=now - timedelta(hours=2))
    live["session"] = web_session(expires_at=now + timedelta(hours=1), last_seen_at=now)

    for bucket, expires in ((dead, now - timedelta(seconds=1)), (live, now + timedelta(minutes=5))):
        n = RequestNonce(credential_id=cred.id, nonce=new_id(), expires_at=expires)
        session.add(n)
        session.flush()
        bucket["nonce"] = n.id

    def link(**kw):
        lk = OneTimeLink(purpose="enrollment", token_hash=new_id() + new_id(), **kw)
        session.add(lk)
        session.flush()
        return lk.id

    dead["expired_link"] = link(expires_at=now - timedelta(seconds=1))
    dead["used_link"] = link(expires_at=now + timedelta(days=3), used_at=now - timedelta(days=2))
    live["link"] = link(expires_at=now + timedelta(days=1))
    live["just_used_link"] = link(expires_at=now + timedelta(days=1), used_at=now)

    def token(**kw):
        t = OAuthToken(org_id=org.id, credential_id=cred.id, token_hash=new_id() + new_id(), **kw)
        session.add(t)
        session.flush()
        return t.id

    dead["expired_token"] = token(expires_at=now - timedelta(days=2))
    dead["revoked_token"] = token(expires_at=now + timedelta(minutes=10), revoked_at=now - timedelta(days=2))
    live["token"] = token(expires_at=now + timedelta(minutes=10))
    session.commit()
    return dead, live


def _existing(ids: dict) -> set[str]:
    from carepost.accounts.models import OAuthToken, OneTimeLink, RequestNonce, WebSession
    from carepost.core.database import read_only_session

    found = set()
    with read_only_session() as s:
        for model in (WebSession, RequestNonce, OneTimeLink, OAuthToken):
            for (rid,) in s.query(model.id).filter(model.id.in_(list(ids.values()))):
                found.add(rid)
    return {name for name, rid in ids.items() if rid in found}


def test_purge_removes_only_what_can_no_longer_be_used(session):
    from carepost.accounts.tasks import purge_expired
    from carepost.core.database import system_session

    dead, live = _arrange_credentials(session)
    with system_session() as s:
        counts = purge_expired(s)
        s.commit()
    assert counts == {"web_sessions": 3, "request_nonces": 1, "one_time_links": 2, "oauth_tokens": 2}
    assert _existing(dead) == set()
    assert _existing(live) == set(live)


def test_purge_is_a_periodic_task():
    from datetime import datetime

    from carepost.accounts.tasks import purge_expired_credentials

    task = purge_expired_credentials.task_class()
    assert task.validate_datetime(datetime(2026, 1, 1, 10, 15))
    assert not task.validate_datetime(datetime(2026, 1, 1, 10, 16))


# --------------------------------------------------------------------------- a real worker process


def _start_worker(storage, env: dict, log_path, preload: str | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **storage.env, **env, "CAREPOST_LOG_JSON": "true"}
    log = open(log_path, "w")
    if preload:  # a test module whose tasks the worker must know
        entry = [sys.executable, "-c", f"import {preload}; from carepost.cli import main; main()"]
    else:
        entry = [sys.executable, "-m", "carepost.cli"]
    return subprocess.Popen(
        entry + ["worker", "--threads", "2", "--no-periodic"],
        cwd=str(ROOT),
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _stop_worker(proc: subprocess.Popen, log_path) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("worker did not stop on SIGTERM: " + log_path.read_text()[-2000:])
    assert code == 0, log_path.read_text()[-2000:]
    return log_path.read_text()


def _run_purge_through_worker(storage, session, queue_env, tmp_path, extra_env: dict) -> None:
    from carepost.accounts.tasks import purge_expired_credentials

    env = queue_env(extra_env)
    dead, live = _arrange_credentials(session)
    log_path = tmp_path / "worker.log"
    proc = _start_worker(storage, env, log_path)
    try:
        purge_expired_credentials()  # enqueue from this process; the worker runs it
        deadline = time.monotonic() + 30
        while _existing(dead) and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            time.sleep(0.2)
        assert _existing(dead) == set(), log_path.read_text()[-2000:]
        assert _existing(live) == set(live)
    finally:
        output = _stop_worker(proc, log_path) if proc.poll() is None else log_path.read_text()
    assert "purged_expired_credentials" in output
    assert "Consumer exiting" in output or "Shutting down" in output or "All workers have stopped" in output


def test_worker_process_runs_tasks_from_the_sqlite_queue(storage, session, queue_env, tmp_path):
    _run_purge_through_worker(storage, session, queue_env, tmp_path, {})


def test_worker_process_runs_tasks_from_redis(storage, session, queue_env, tmp_path):
    url = redis_test_url()
    if url is None:
        pytest.skip("Redis not reachable and CAREPOST_TEST_REDIS_URL not set")
    _run_purge_through_worker(storage, session, queue_env, tmp_path, {"CAREPOST_QUEUE_URL": url})


@huey_task()
def slow_touch(marker_id: str) -> None:
    """A task that takes a while, for the graceful-stop test (the worker imports this module)."""
    (Path(os.environ["CAREPOST_TEST_MARKER_DIR"]) / f"{marker_id}.started").write_text("started")
    time.sleep(2)
    (Path(os.environ["CAREPOST_TEST_MARKER_DIR"]) / marker_id).write_text("done")


def test_worker_finishes_a_running_task_on_sigterm(storage, db, queue_env, tmp_path):
    """Graceful stop: SIGTERM while a task runs lets it complete before the process exits."""
    env = queue_env({"CAREPOST_TEST_MARKER_DIR": str(tmp_path)})
    log_path = tmp_path / "worker.log"
    proc = _start_worker(storage, env, log_path, preload="tests.test_worker")
    try:
        marker_id = new_id()
        slow_touch(marker_id)
        deadline = time.monotonic() + 30
        # Wait for the task itself to run: the worker's start-up banner also names slow_touch,
        # before the consumer installs its SIGTERM handler.
        while not (tmp_path / f"{marker_id}.started").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            time.sleep(0.05)
        assert not (tmp_path / marker_id).exists()  # still running
    finally:
        _stop_worker(proc, log_path)
    assert (tmp_path / marker_id).read_text() == "done"


def test_revocations_with_a_time_survive_the_json_store(queue_env):
    from datetime import datetime, timezone

    from carepost.accounts.tasks import purge_expired_credentials

    until = datetime(2030, 1, 1, tzinfo=timezone.utc)
    purge_expired_credentials.revoke(revoke_until=until)
    assert purge_expired_credentials.is_revoked()
    purge_expired_credentials.restore()
    assert not purge_expired_credentials.is_revoked()
