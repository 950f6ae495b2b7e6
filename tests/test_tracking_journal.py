"""The /t/ journal (issue 13; ``tracking.engagement_journal``): frames encrypted and bound to their
place, a frame cut short by a crash cut off at the next open, segments rotated and deleted once
ingested, one slot per process (flock), a dead process's slot drained by another, and ingestion
that moves its mark in the same transaction (read again, nothing doubled)."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import func, select

from carepost.tracking import engagement_journal as ej

KEY = bytes(range(32))


def keys(version):
    return 1, KEY


def record(n: int) -> list:
    return [f"{n:032x}", "o", "a" * 32, "b" * 32, "c" * 32, None, 0, "human", "mail_client", "Chrome", n]


def test_frames_are_encrypted_and_a_torn_tail_is_cut_off(tmp_path):
    journal = ej.claim(tmp_path, keys)
    journal.append([record(1), record(2)])
    end = journal.append([record(3)])
    raw = b"".join(p.read_bytes() for p in (tmp_path / "0").glob("*.journal"))
    assert b"mail_client" not in raw and b"Chrome" not in raw  # encrypted at rest
    records, after = journal.read(journal.first(), 100)
    assert [r[-1] for r in records] == [1, 2, 3] and after == end
    journal.close()

    segment = next((tmp_path / "0").glob("*.journal"))
    with open(segment, "ab") as f:
        f.write(b"\x00\x00\x01\x00\x01" + os.urandom(40))  # a frame cut short by a crash
    again = ej.claim(tmp_path, keys)
    assert again.durable == end and segment.stat().st_size == end.offset
    again.append([record(4)])
    assert [r[-1] for r in again.read(again.first(), 100)[0]] == [1, 2, 3, 4]
    again.close()

    # A flipped bit in a frame with more after it, or another key: damage, not a crash — the slot
    # is not opened and nothing is cut off.
    size = segment.stat().st_size
    data = bytearray(segment.read_bytes())
    data[30] ^= 1
    segment.write_bytes(bytes(data))
    with pytest.raises(ej.JournalDamaged):
        ej.claim(tmp_path, keys)
    assert segment.stat().st_size == size
    data[30] ^= 1
    segment.write_bytes(bytes(data))
    with pytest.raises(ej.JournalDamaged):
        ej.claim(tmp_path, lambda v: (1, bytes(32)))
    assert segment.stat().st_size == size


def test_one_slot_per_process_rotation_and_retire(tmp_path, monkeypatch):
    first = ej.claim(tmp_path, keys)
    second = ej.claim(tmp_path, keys)  # the first slot is held: another one
    assert first.directory != second.directory and first.id != second.id
    monkeypatch.setattr(ej, "SEGMENT_BYTES", 200)
    for n in range(5):
        first.append([record(n)])
    assert len(list(first.directory.glob("*.journal"))) >= 3  # rotated
    records, end = first.read(first.first(), 100)
    assert [r[-1] for r in records] == list(range(5)) and end == first.durable
    first.forget_before(end)
    assert [p.name for p in first.directory.glob("*.journal")] == [f"{end.segment:012d}.journal"]
    assert ej.orphans(tmp_path, keys, set()) == []  # both held
    second.append([record(9)])
    second.close()  # "dies" with a record in its journal
    [orphan] = ej.orphans(tmp_path, keys, {str(first.directory)})
    assert orphan.id == second.id and [r[-1] for r in orphan.read(orphan.first(), 10)[0]] == [9]
    orphan.retire()
    orphan.close()
    assert ej.orphans(tmp_path, keys, {str(first.directory)}) == []  # drained: nothing to take
    first.close()


def test_ingestion_moves_the_mark_with_the_events_and_never_doubles(db, session, tmp_path, monkeypatch):
    from carepost.tracking.engagement import Hit, recorder
    from carepost.tracking.models import EngagementEvent, EngagementJournalMark
    from tests.faults.test_tracking_journal_kill import _tracked_message

    message_id, paths = _tracked_message(session, 20)
    rec = recorder()
    rec.reset()
    try:
        rec.start()
        journal = rec._journal
        journal.stopping = True  # the ingester steps aside: this test ingests by hand
        journal.wake.set()
        rec._ingester.join(10)
        hits = [Hit(kind=p[3], token=p[5:].removesuffix(".gif"), user_agent="Mozilla/5.0 (X11) Firefox/120.0",
                    ip="198.51.100.1", method="GET") for _r, p in paths]
        outcomes = rec.journal(hits)
        assert all(o.valid for o in outcomes)
        session.rollback()
        assert not session.scalar(select(func.count()).select_from(EngagementEvent))  # journaled only

        # A transaction that fails after the events were written: the mark does not move either.
        real_ingest = rec.ingest

        def failing(s, records):
            real_ingest(s, records)
            raise RuntimeError("crash before the commit")

        monkeypatch.setattr(rec, "ingest", failing)
        with pytest.raises(RuntimeError):
            rec.ingest_from(journal)
        monkeypatch.setattr(rec, "ingest", real_ingest)
        session.rollback()
        assert not session.scalar(select(func.count()).select_from(EngagementEvent))
        assert session.get(EngagementJournalMark, journal.id) is None

        assert rec.ingest_from(journal) == 20
        assert rec.ingest_from(journal) == 0  # read again from the mark: nothing left, nothing doubled
        session.rollback()
        assert session.scalar(select(func.count()).select_from(EngagementEvent)
                              .where(EngagementEvent.message_id == message_id)) == 20
        mark = session.get(EngagementJournalMark, journal.id)
        assert (mark.segment, mark.position) == (journal.durable.segment, journal.durable.offset)
    finally:
        rec.reset()
