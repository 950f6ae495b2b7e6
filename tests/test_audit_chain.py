"""The audit hash chain: verification passes on a clean chain and names the first bad event of
every kind of tampering, done the way an attacker with database access would — raw SQL."""

from __future__ import annotations

import secrets
import shutil
import threading

import pytest
from sqlalchemy import select, text

from carepost.audit import checkpoints
from carepost.audit.models import SYSTEM_CHAIN, AuditChainHead, AuditEvent
from carepost.audit.service import record
from carepost.audit.verify import verify


@pytest.fixture(autouse=True)
def fresh_checkpoints(db):
    """Each test gets an empty database; its checkpoint files must start empty too."""
    shutil.rmtree(checkpoints.checkpoint_dir(), ignore_errors=True)
    yield


def append(session, org_id, n, action="contact.read"):
    for i in range(n):
        record(session, org_id=org_id, actor_type="user", actor_id="u1", action=action,
               target_type="contact", target_id=f"c{i}", ip="10.0.0.1", request_id=f"r{i}")
    session.commit()


def run_verify(org_id=None, given=None):
    from carepost.core.database import read_only_session

    with read_only_session() as s:
        return verify(s, org_id=org_id, given=given)


def sql(session, statement, **params):
    session.execute(text(statement), params)
    session.commit()


def event_row(session, chain, seq):
    session.rollback()
    event = session.scalar(select(AuditEvent).where(AuditEvent.chain == chain, AuditEvent.seq == seq))
    session.expunge(event)  # a detached snapshot: later raw SQL must not refresh it
    return event


def test_clean_chain_verifies(session, org):
    append(session, org.id, 5)
    record(session, org_id=None, actor_type="anonymous", actor_id=None, action="auth.login", outcome="failure")
    session.commit()
    report = run_verify()
    assert report.ok, report.to_dict()
    by_chain = {c.chain: c for c in report.chains}
    assert by_chain[org.id].events == 5 and by_chain[org.id].head_seq == 5
    assert by_chain[SYSTEM_CHAIN].events == 1
    assert all(cp["status"] == "ok" for cp in by_chain[org.id].checkpoints)
    assert not by_chain[org.id].warnings


def test_altered_field_is_named(session, org):
    append(session, org.id, 5)
    victim = event_row(session, org.id, 3)
    sql(session, "UPDATE audit_events SET outcome = 'success', actor_id = 'someone-else' WHERE id = :id", id=victim.id)
    report = run_verify(org.id)
    p = report.first_problem
    assert not report.ok
    assert (p.kind, p.chain, p.seq, p.event_id) == ("altered", org.id, 3, victim.id)
    assert "altered" in p.message and victim.id in p.message


def test_altered_details_and_time_are_detected(session, org):
    append(session, org.id, 4)
    victim = event_row(session, org.id, 2)
    sql(session, "UPDATE audit_events SET occurred_at = :t WHERE id = :id", t=victim.occurred_at.replace(year=2020), id=victim.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq, p.event_id) == ("altered", 2, victim.id)


def test_altered_stored_hash_is_detected(session, org):
    append(session, org.id, 4)
    victim = event_row(session, org.id, 2)
    sql(session, "UPDATE audit_events SET hash = :h WHERE id = :id", h=secrets.token_hex(32), id=victim.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq, p.event_id) == ("altered", 2, victim.id)


def test_deleted_middle_event_is_named(session, org):
    append(session, org.id, 5)
    after = event_row(session, org.id, 4)
    sql(session, "DELETE FROM audit_events WHERE chain = :c AND seq = 3", c=org.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq, p.event_id) == ("missing", 4, after.id)
    assert "seq 3 missing" in p.message


def test_deleted_first_event_is_named(session, org):
    append(session, org.id, 3)
    sql(session, "DELETE FROM audit_events WHERE chain = :c AND seq = 1", c=org.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq) == ("missing", 2)


def test_deleted_and_renumbered_is_named(session, org):
    """Delete seq 3 and shift the later events down so seq looks continuous."""
    append(session, org.id, 5)
    moved = event_row(session, org.id, 4)
    sql(session, "DELETE FROM audit_events WHERE chain = :c AND seq = 3", c=org.id)
    for seq in (4, 5):
        sql(session, "UPDATE audit_events SET seq = :n WHERE chain = :c AND seq = :s", n=seq - 1, c=org.id, s=seq)
    sql(session, "UPDATE audit_chain_heads SET seq = 4 WHERE chain = :c", c=org.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq, p.event_id) == ("reordered", 3, moved.id)
    assert "written as seq 4" in p.message


def test_truncated_newest_events_detected_by_head(session, org):
    append(session, org.id, 5)
    sql(session, "DELETE FROM audit_events WHERE chain = :c AND seq >= 4", c=org.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq) == ("truncated", 4)


def test_truncation_with_consistent_head_rewind_detected_by_checkpoint(session, org):
    append(session, org.id, 5)
    fifth = event_row(session, org.id, 5)
    third = event_row(session, org.id, 3)
    sql(session, "DELETE FROM audit_events WHERE chain = :c AND seq >= 4", c=org.id)
    sql(session, "UPDATE audit_chain_heads SET seq = 3, hash = :h WHERE chain = :c", h=third.hash, c=org.id)
    # Without the checkpoint outside the database, this truncation is invisible:
    shutil.copy(checkpoints.checkpoint_path(org.id), checkpoints.checkpoint_dir() / "saved.bak")
    checkpoints.checkpoint_path(org.id).unlink()
    blind = run_verify(org.id)
    assert blind.ok and blind.chains[0].warnings
    shutil.copy(checkpoints.checkpoint_dir() / "saved.bak", checkpoints.checkpoint_path(org.id))
    p = run_verify(org.id).first_problem
    assert (p.kind, p.chain, p.seq) == ("truncated", org.id, 4)
    assert "seq 4..5" in p.message and fifth.id in p.message


def test_truncation_then_new_appends_keeps_evidence(session, org):
    """After a truncation, new appends must not advance the checkpoint over the gap."""
    append(session, org.id, 5)
    original_fifth = event_row(session, org.id, 5)
    third = event_row(session, org.id, 3)
    sql(session, "DELETE FROM audit_events WHERE chain = :c AND seq >= 4", c=org.id)
    sql(session, "UPDATE audit_chain_heads SET seq = 3, hash = :h WHERE chain = :c", h=third.hash, c=org.id)
    append(session, org.id, 4)  # new seq 4..7, all validly chained
    assert checkpoints.read_local(org.id).seq == 5
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq) == ("checkpoint_mismatch", 5)
    assert original_fifth.id in p.message


def test_swapped_seq_is_named_as_reordering(session, org):
    append(session, org.id, 5)
    a, b = event_row(session, org.id, 3), event_row(session, org.id, 4)
    sql(session, "UPDATE audit_events SET seq = 1000 WHERE id = :id", id=a.id)
    sql(session, "UPDATE audit_events SET seq = 3 WHERE id = :id", id=b.id)
    sql(session, "UPDATE audit_events SET seq = 4 WHERE id = :id", id=a.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq, p.event_id) == ("reordered", 3, b.id)
    assert "written as seq 4" in p.message


def test_swapped_rows_are_named_as_reordering(session, org):
    """Swap every column but seq between two rows (the rows trade places)."""
    append(session, org.id, 5)
    a, b = event_row(session, org.id, 2), event_row(session, org.id, 3)
    cols = ["id", "occurred_at", "actor_type", "actor_id", "action", "target_type", "target_id", "outcome", "ip",
            "request_id", "prev_hash", "hash"]
    sets = ", ".join(f"{c} = :{c}" for c in cols)
    sql(session, "UPDATE audit_events SET id = :tmp WHERE id = :id", tmp="f" * 32, id=a.id)
    sql(session, f"UPDATE audit_events SET {sets} WHERE id = :old", old=b.id, **{c: getattr(a, c) for c in cols})
    sql(session, f"UPDATE audit_events SET {sets} WHERE id = :old", old="f" * 32, **{c: getattr(b, c) for c in cols})
    assert event_row(session, org.id, 2).id == b.id
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq, p.event_id) == ("reordered", 2, b.id)


def test_inserted_forged_event_in_the_middle_is_named(session, org):
    append(session, org.id, 5)
    second = event_row(session, org.id, 2)
    for seq in (5, 4, 3):
        sql(session, "UPDATE audit_events SET seq = :n WHERE chain = :c AND seq = :s", n=seq + 1, c=org.id, s=seq)
    forged_id = secrets.token_hex(16)
    sql(
        session,
        "INSERT INTO audit_events (id, chain, seq, org_id, occurred_at, actor_type, actor_id, action, outcome, details, prev_hash, hash) "
        "VALUES (:id, :c, 3, :c, :t, 'user', 'u1', 'contact.read', 'success', '{}', :prev, :h)",
        id=forged_id, c=org.id, t=second.occurred_at, prev=second.hash, h=secrets.token_hex(32),
    )
    sql(session, "UPDATE audit_chain_heads SET seq = 6 WHERE chain = :c", c=org.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq, p.event_id) == ("inserted", 3, forged_id)


def test_forged_event_appended_at_the_end_is_named(session, org):
    append(session, org.id, 3)
    third = event_row(session, org.id, 3)
    forged_id, forged_hash = secrets.token_hex(16), secrets.token_hex(32)
    sql(
        session,
        "INSERT INTO audit_events (id, chain, seq, org_id, occurred_at, actor_type, actor_id, action, outcome, details, prev_hash, hash) "
        "VALUES (:id, :c, 4, :c, :t, 'system', 'cli', 'user.delete', 'success', '{}', :prev, :h)",
        id=forged_id, c=org.id, t=third.occurred_at, prev=third.hash, h=forged_hash,
    )
    sql(session, "UPDATE audit_chain_heads SET seq = 4, hash = :h WHERE chain = :c", h=forged_hash, c=org.id)
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq, p.event_id) == ("altered", 4, forged_id)


def test_event_moved_from_another_chain_is_detected(session, org):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    append(session, org.id, 2)
    append(session, other.id, 3)
    moved = event_row(session, other.id, 3)
    sql(session, "UPDATE audit_events SET chain = :c, org_id = :c WHERE id = :id", c=org.id, id=moved.id)
    sql(session, "UPDATE audit_chain_heads SET seq = 3, hash = :h WHERE chain = :c", h=moved.hash, c=org.id)
    report = run_verify()
    problems = {c.chain: c.problem for c in report.chains if c.problem}
    assert problems[org.id].kind == "altered" and problems[org.id].seq == 3
    assert problems[other.id].kind == "truncated"


def test_concurrent_appends_never_fork(session, org):
    """Several threads, each with its own connection, append to one chain at once."""
    from carepost.core.database import system_session

    threads, per_thread, errors = 6, 8, []
    barrier = threading.Barrier(threads)

    def worker(n):
        try:
            barrier.wait()
            for i in range(per_thread):
                with system_session() as s:
                    record(s, org_id=org.id, actor_type="user", actor_id=f"u{n}", action="contact.read", target_id=str(i))
                    s.commit()
        except Exception as exc:  # reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    session.rollback()
    rows = session.execute(select(AuditEvent.seq, AuditEvent.prev_hash, AuditEvent.hash).where(AuditEvent.chain == org.id).order_by(AuditEvent.seq)).all()
    total = threads * per_thread
    assert [r.seq for r in rows] == list(range(1, total + 1))
    assert all(rows[i].prev_hash == rows[i - 1].hash for i in range(1, total))
    head = session.scalar(select(AuditChainHead).where(AuditChainHead.chain == org.id))
    assert (head.seq, head.hash) == (total, rows[-1].hash)
    assert checkpoints.read_local(org.id).seq == total  # the file only ever moved forward
    assert run_verify(org.id).ok


def test_verify_during_concurrent_appends_sees_a_consistent_snapshot(session, org):
    from carepost.core.database import system_session

    append(session, org.id, 3)
    stop = threading.Event()
    errors = []

    def writer():
        try:
            while not stop.is_set():
                with system_session() as s:
                    record(s, org_id=org.id, actor_type="user", actor_id="u", action="contact.read")
                    s.commit()
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        reports = [run_verify(org.id) for _ in range(6)]
    finally:
        stop.set()
        t.join()
    assert not errors
    assert all(r.ok for r in reports), [r.first_problem for r in reports if not r.ok]
    assert run_verify(org.id).ok


def test_details_never_hold_phi_values(session, org):
    append(session, org.id, 1)
    event = record(
        session, org_id=org.id, actor_type="user", actor_id="u1", action="contact.update",
        details={"email": "jane.doe@example.org", "note": "SSN 123-45-6789", "fields": ["birth_date"],
                 "reason": "called 555-123-4567 about jane.doe@example.org", "count": 2},
    )
    session.commit()
    session.rollback()
    stored = session.scalar(select(AuditEvent.details).where(AuditEvent.id == event.id))
    flat = str(stored)
    assert "jane.doe@example.org" not in flat and "123-45-6789" not in flat and "555-123-4567" not in flat
    assert stored["fields"] == ["birth_date"] and stored["count"] == 2
    assert stored["email"] == "[redacted]"
    assert run_verify(org.id).ok  # the hash covers the scrubbed details
