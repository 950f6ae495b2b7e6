"""Checkpoints of the chain head outside the database: written after commit only, atomically,
0600, authenticated, only ever moving forward."""

from __future__ import annotations

import json
import shutil
import stat
import threading

import pytest
from sqlalchemy import select

from carepost.audit import checkpoints
from carepost.audit.models import AuditChainHead
from carepost.audit.service import chain_key, record
from carepost.audit.verify import verify


@pytest.fixture(autouse=True)
def fresh_checkpoints(db):
    shutil.rmtree(checkpoints.checkpoint_dir(), ignore_errors=True)
    yield


def append(session, org_id, action="contact.read"):
    return record(session, org_id=org_id, actor_type="user", actor_id="u1", action=action, target_type="contact", target_id="c1")


def run_verify(org_id=None, given=None):
    from carepost.core.database import read_only_session

    with read_only_session() as s:
        return verify(s, org_id=org_id, given=given)


def test_commit_writes_head_checkpoint(session, org):
    append(session, org.id)
    last = append(session, org.id)
    assert checkpoints.read_local(org.id) is None  # nothing before commit
    session.commit()
    cp = checkpoints.read_local(org.id)
    assert (cp.chain, cp.seq, cp.hash, cp.event_id) == (org.id, 2, last.hash, last.id)
    path = checkpoints.checkpoint_path(org.id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.parent == checkpoints.checkpoint_dir()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert checkpoints.mac_ok(chain_key(session, org.id), cp)
    assert not list(path.parent.glob("*.tmp"))


def test_rollback_writes_no_checkpoint(session, org):
    append(session, org.id)
    session.commit()
    before = checkpoints.checkpoint_path(org.id).read_text()
    append(session, org.id)
    session.rollback()
    assert checkpoints.checkpoint_path(org.id).read_text() == before
    session.rollback()
    assert session.scalar(select(AuditChainHead.seq).where(AuditChainHead.chain == org.id)) == 1


def test_rolled_back_savepoint_is_not_checkpointed(session, org):
    first = append(session, org.id)
    nested = session.begin_nested()
    append(session, org.id)
    nested.rollback()
    session.commit()
    cp = checkpoints.read_local(org.id)
    assert (cp.seq, cp.hash) == (1, first.hash)
    assert run_verify(org.id).ok


def test_committed_savepoint_is_checkpointed_with_the_outer_commit(session, org):
    append(session, org.id)
    with session.begin_nested():
        inner = append(session, org.id)
    assert checkpoints.read_local(org.id) is None  # the savepoint is not the commit
    session.commit()
    assert checkpoints.read_local(org.id).hash == inner.hash


def test_checkpoint_never_moves_backwards(session, org):
    for _ in range(3):
        append(session, org.id)
    session.commit()
    key = chain_key(session, org.id)
    older = checkpoints.sign(key, chain=org.id, seq=2, hash="0" * 64, event_id=None, occurred_at=None)
    assert checkpoints.write_forward(older) is False
    assert checkpoints.read_local(org.id).seq == 3
    # Many writers racing with mixed seqs leave the highest.
    cps = [checkpoints.sign(key, chain=org.id, seq=s, hash="ab" * 32, event_id=None, occurred_at=None) for s in range(4, 40)]
    threads = [threading.Thread(target=checkpoints.write_forward, args=(cp,)) for cp in reversed(cps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert checkpoints.read_local(org.id).seq == 39


def test_concurrent_commits_share_one_checkpoint_write_and_each_is_covered_when_it_returns(session, org, monkeypatch):
    """Group commit: callers that arrive while a write is under way are covered by one later
    write; none returns before the file holds its seq or a newer one."""
    key = chain_key(session, org.id)
    writes, original = [], checkpoints.write_forward
    gate = threading.Event()

    def slow_write(cp, settings=None):  # the real write, made slow like an fsync on a busy disk
        writes.append(cp.seq)
        gate.wait(5)
        return original(cp, settings)

    monkeypatch.setattr(checkpoints, "write_forward", slow_write)
    covered, errors = [], []

    def commit(seq):
        cp = checkpoints.sign(key, chain=org.id, seq=seq, hash="ab" * 32, event_id=None, occurred_at=None)
        checkpoints.write_committed(cp)
        on_file = checkpoints.read_local(org.id).seq
        (covered if on_file >= seq else errors).append((seq, on_file))

    first = threading.Thread(target=commit, args=(1,))
    first.start()
    while not writes:  # the first write is under way
        threading.Event().wait(0.01)
    others = [threading.Thread(target=commit, args=(seq,)) for seq in range(2, 22)]
    for t in others:
        t.start()
    threading.Event().wait(0.2)  # all twenty are waiting behind the first write
    gate.set()
    for t in [first, *others]:
        t.join(10)
    assert errors == [] and len(covered) == 21
    assert writes == [1, 21]  # one write for the first, one for the twenty that queued behind it
    assert checkpoints.read_local(org.id).seq == 21


def test_forged_checkpoint_is_reported(session, org):
    for _ in range(3):
        append(session, org.id)
    session.commit()
    path = checkpoints.checkpoint_path(org.id)
    data = json.loads(path.read_text())
    data["seq"] = 2  # an attacker "rewinds" the file to match a truncated log
    path.write_text(json.dumps(data))
    p = run_verify(org.id).first_problem
    assert (p.kind, p.chain) == ("checkpoint_invalid", org.id)


def test_checkpoint_of_another_chain_does_not_authenticate(session, org):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    append(session, org.id)
    append(session, other.id)
    session.commit()
    data = json.loads(checkpoints.checkpoint_path(other.id).read_text())
    data["chain"] = org.id
    checkpoints.checkpoint_path(org.id).write_text(json.dumps(data))
    assert run_verify(org.id).first_problem.kind == "checkpoint_invalid"


def test_unreadable_checkpoint_is_kept_as_evidence(session, org):
    append(session, org.id)
    session.commit()
    path = checkpoints.checkpoint_path(org.id)
    path.write_text("not json")
    append(session, org.id)
    session.commit()
    assert path.read_text() == "not json"
    assert run_verify(org.id).first_problem.kind == "checkpoint_invalid"


def test_verify_accepts_a_checkpoint_from_another_machine(session, org, tmp_path):
    """Each machine keeps its own file; ``--checkpoint`` checks the database against any of them."""
    for _ in range(4):
        append(session, org.id)
    session.commit()
    elsewhere = tmp_path / "machine-b.json"
    shutil.copy(checkpoints.checkpoint_path(org.id), elsewhere)
    checkpoints.checkpoint_path(org.id).unlink()
    given = checkpoints.load_file(elsewhere)
    assert run_verify(org.id, given).ok
    from carepost.core.database import read_only_session

    with read_only_session() as s:
        from sqlalchemy import text

        s.execute(text("DELETE FROM audit_events WHERE chain = :c AND seq = 4"), {"c": org.id})
        s.execute(text("UPDATE audit_chain_heads SET seq = 3, hash = (SELECT hash FROM audit_events WHERE chain = :c AND seq = 3) WHERE chain = :c"), {"c": org.id})
        s.commit()
    assert run_verify(org.id).ok  # no local file: this machine cannot tell
    p = run_verify(org.id, given).first_problem
    assert (p.kind, p.seq) == ("truncated", 4) and str(elsewhere) in p.message


def test_whole_chain_deleted_is_detected(session, org):
    for _ in range(2):
        append(session, org.id)
    session.commit()
    from sqlalchemy import text

    session.execute(text("DELETE FROM audit_events WHERE chain = :c"), {"c": org.id})
    session.execute(text("DELETE FROM audit_chain_heads WHERE chain = :c"), {"c": org.id})
    session.commit()
    p = run_verify(org.id).first_problem
    assert (p.kind, p.seq) == ("truncated", 1)


@pytest.fixture
def logs():
    import io

    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    buf = io.StringIO()
    configure_logging("INFO", True, stream=buf)
    yield buf
    configure_logging(get_settings().log_level, get_settings().log_json)


def test_checkpoint_write_failure_never_fails_the_commit(session, org, logs):
    directory = checkpoints.checkpoint_dir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.write_text("a file where the directory should be")
    try:
        append(session, org.id)
        session.commit()  # committed despite the unusable checkpoint directory
    finally:
        directory.unlink()
    session.rollback()
    assert session.scalar(select(AuditChainHead.seq).where(AuditChainHead.chain == org.id)) == 1
    assert "audit_checkpoint_unreadable" in logs.getvalue()
    # The write itself fails (its lock file cannot be opened): still committed, and logged.
    directory.mkdir(mode=0o700)
    (directory / f".{org.id}.lock").mkdir()
    append(session, org.id)
    session.commit()
    session.rollback()
    assert session.scalar(select(AuditChainHead.seq).where(AuditChainHead.chain == org.id)) == 2
    assert "audit_checkpoint_write_failed" in logs.getvalue()
    (directory / f".{org.id}.lock").rmdir()
    report = run_verify(org.id)
    assert report.ok and report.chains[0].warnings  # nothing checkpointed: verify says so


def test_checkpoint_json_that_is_not_an_object_is_refused(tmp_path):
    f = tmp_path / "cp.json"
    f.write_text("[1, 2]")
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.load_file(f)
