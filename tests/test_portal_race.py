"""Issue 9 item 21: wrong portal answers and codes racing on the database each count.

Real concurrent attempts: one thread per attempt, each with its own session and connection, all
holding the message loaded before any of them checks (a barrier), as concurrent page requests do.
On PostgreSQL, without the row lock, they all read ``failed_attempts = 0`` and write 1: the
lockout never comes. Run it on PostgreSQL with CAREPOST_TEST_DATABASE_URL (on SQLite the writer
lock serializes the transactions and it passes either way)."""

from __future__ import annotations

import threading

from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.core.config import get_settings
from carepost.core.database import read_only_session, session_factory
from carepost.portal import service
from carepost.portal.models import PortalMessage
from tests.fixtures.portal import arrange


def _race(org_id: str, pm_id: str, attempts: int, check, backend: str) -> list:
    # On SQLite a write transaction holds the database from BEGIN: the attempts run in their own
    # threads but cannot all hold the message at once, so there is no barrier there.
    barrier = threading.Barrier(attempts, timeout=60) if backend == "postgresql" else None
    results: list = [None] * attempts
    errors: list = []

    def attempt(i: int) -> None:
        try:
            with session_factory()() as s:
                s.info["org_id"] = org_id
                pm = s.get(PortalMessage, pm_id)
                if barrier is not None:
                    assert pm.failed_attempts == 0
                    barrier.wait()  # every attempt has read the counter before any checks
                results[i] = check(s, pm)
                s.commit()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def _failures(org_id: str, pm_id: str) -> int:
    with read_only_session(org_id) as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == "portal.auth",
                                                   AuditEvent.target_id == pm_id,
                                                   AuditEvent.outcome == "failure")).all()
        return len(rows)


def test_concurrent_wrong_answers_each_count_and_lock_the_message(storage, session, org):
    a = arrange(session, org.id, auth="question", question="Name of your first pet?", answer="Blue Heron")
    limit = get_settings().portal_max_attempts
    extra = 2
    results = _race(org.id, a.portal_message_id, limit + extra,
                    lambda s, pm: service.verify_answer(s, pm, "wrong heron"), storage.backend)
    assert not any(r.ok for r in results)
    # Exactly `limit` wrong answers counted (each saw the one before), the last locked the
    # message, and the ones that came after found it locked.
    assert sorted(r.attempts_left for r in results if r.attempts_left is not None) == [0] + list(range(1, limit))
    assert sum("cannot be opened now" in r.reason for r in results) == extra
    assert _failures(org.id, a.portal_message_id) == limit
    with read_only_session(org.id) as s:
        pm = s.get(PortalMessage, a.portal_message_id)
        assert pm.lockouts == 1 and pm.failed_attempts == 0 and service.state(pm) == "locked"


def test_concurrent_wrong_codes_each_count_and_the_right_code_works_once(storage, session, org):
    a = arrange(session, org.id)
    with session_factory()() as s:
        s.info["org_id"] = org.id
        pm = s.get(PortalMessage, a.portal_message_id)
        code = service.issue_code(s, pm)
        s.commit()
    wrong = f"{(int(code) + 1) % 10 ** 8:08d}"
    limit = get_settings().portal_max_attempts
    results = _race(org.id, a.portal_message_id, limit - 1, lambda s, pm: service.verify_code(s, pm, wrong), storage.backend)
    assert sorted(r.attempts_left for r in results) == list(range(1, limit))
    assert _failures(org.id, a.portal_message_id) == limit - 1
    # Two racing uses of the right code: one opens the message, the other finds the code spent.
    opened = _race_right_code(org.id, a.portal_message_id, code, storage.backend)
    assert sorted(r.ok for r in opened) == [False, True]


def _race_right_code(org_id: str, pm_id: str, code: str, backend: str) -> list:
    barrier = threading.Barrier(2, timeout=60) if backend == "postgresql" else None
    results: list = []
    errors: list = []

    def attempt() -> None:
        try:
            with session_factory()() as s:
                s.info["org_id"] = org_id
                pm = s.get(PortalMessage, pm_id)
                if barrier is not None:
                    barrier.wait()
                results.append(service.verify_code(s, pm, code))
                s.commit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results
