"""Analytics increments appended, then folded set-wise into the rollups (issue 13 speed): every
increment counted exactly once — in chunks, by two aggregators at once beside writers, after an
aggregator killed with SIGKILL mid-chunk — and readers see what was committed before they read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from carepost.core.database import org_session, read_only_session, system_session
from carepost.tracking import rollups
from carepost.tracking.rollups import AnalyticsRollup

AT = datetime(2026, 12, 3, 14, 25, tzinfo=UTC)
DOMAINS = ("gmail.com", "yahoo.com", "clinic.example")


def _raw_totals(org_id: str) -> dict:
    """(grain, metric) -> sum of n in the rollups, read on a connection (no fold first)."""
    with system_session() as s:
        rows = s.connection().exec_driver_sql(
            "SELECT grain, metric, sum(n) FROM analytics_rollups WHERE org_id = "
            + ("%s" if s.get_bind().dialect.name == "postgresql" else "?") + " GROUP BY grain, metric",
            (org_id,)).all()
        return {(g, m): int(n) for g, m, n in rows}


def _pending() -> int:
    with system_session() as s:
        return int(s.connection().exec_driver_sql("SELECT count(*) FROM analytics_increments").scalar())


def _append(org_id: str, transactions: int, per_transaction: int, start: int = 0) -> int:
    """Count ``opened`` ``transactions`` × ``per_transaction`` times over three domains, two hours,
    a campaign and a transactional message (message grain). Returns how many were counted."""
    counted = 0
    for t in range(start, start + transactions):
        with org_session(org_id) as s:
            for i in range(per_transaction):
                api = (t + i) % 4 == 0
                rollups.add(s, org_id=org_id, at=AT + timedelta(hours=(t + i) % 2), metric="opened",
                            source="api" if api else "campaign", campaign_id=None if api else "c1",
                            receiving_domain=DOMAINS[(t + i) % 3], message_id=f"m{t % 5}" if api else None)
                counted += 1
            s.commit()
    return counted


def _check_exact(org_id: str, counted: int, messages: int) -> None:
    totals = _raw_totals(org_id)
    assert totals[("h", "opened")] == counted
    assert totals[("d", "opened")] == counted
    assert totals.get(("m", "opened"), 0) == messages
    with read_only_session(org_id) as s:  # one row per key (the upsert met the rows folded earlier)
        keys = s.execute(select(AnalyticsRollup.grain, AnalyticsRollup.period, AnalyticsRollup.receiving_domain,
                                AnalyticsRollup.campaign_id, AnalyticsRollup.message_id, func.count())
                         .group_by(AnalyticsRollup.grain, AnalyticsRollup.period, AnalyticsRollup.receiving_domain,
                                   AnalyticsRollup.campaign_id, AnalyticsRollup.message_id)).all()
        assert keys and all(row[-1] == 1 for row in keys)


def _api_count(transactions: int, per_transaction: int, start: int = 0) -> int:
    return sum(1 for t in range(start, start + transactions) for i in range(per_transaction) if (t + i) % 4 == 0)


def test_fold_in_chunks_counts_each_increment_once(org):
    other = None
    with system_session() as s:
        from carepost.accounts.service import create_organization

        other = create_organization(s, "Other Clinic").id
        s.commit()
    counted = _append(org.id, 10, 13)
    _append(other, 2, 5)
    # Appended only: the event's transaction wrote no rollup row (hour and message keys appended).
    assert _raw_totals(org.id) == {}
    assert _pending() > 0
    with system_session() as s:
        chunks = rollups.fold(s, org.id, chunk=7)
    assert chunks > 1
    _check_exact(org.id, counted, _api_count(10, 13))
    assert _raw_totals(other) == {}  # the other organization's increments wait for their own fold
    # Folding again adds nothing (no rescan: the folded rows are gone).
    with system_session() as s:
        assert rollups.fold(s, org.id, chunk=7) == 0
    _check_exact(org.id, counted, _api_count(10, 13))
    # More events on the same keys fold onto the same rows; fold_all folds every organization.
    counted += _append(org.id, 4, 13, start=10)
    assert rollups.fold_all(system_session, chunk=5) > 0
    assert _pending() == 0
    _check_exact(org.id, counted, _api_count(14, 13))
    assert _raw_totals(other)[("d", "opened")] == 10


def test_a_reader_sees_what_was_committed_before_it_read(org):
    counted = _append(org.id, 3, 4)
    with read_only_session(org.id) as s:  # SQLite: a DEFERRED reader folds in a savepoint
        total = s.scalar(select(func.sum(AnalyticsRollup.n)).where(AnalyticsRollup.grain == "d"))
    assert total == counted
    with org_session(org.id) as s:
        rows = s.scalars(select(AnalyticsRollup).where(AnalyticsRollup.grain == "h")).all()
        assert sum(r.n for r in rows) == counted
        s.commit()  # this reader's fold is kept
    assert _pending() == 0
    _check_exact(org.id, counted, _api_count(3, 4))


def test_two_aggregators_beside_writers_count_exactly(org):
    errors: list[BaseException] = []
    counted: list[int] = []
    stop = threading.Event()

    def writer(start):
        try:
            counted.append(_append(org.id, 30, 9, start=start))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def aggregator():
        try:
            while not stop.is_set():
                rollups.fold_all(system_session, chunk=11)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(start,)) for start in (0, 1000)]
    aggregators = [threading.Thread(target=aggregator) for _ in range(2)]
    for t in writers + aggregators:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in aggregators:
        t.join()
    assert not errors, errors
    rollups.fold_all(system_session)
    assert _pending() == 0
    _check_exact(org.id, sum(counted), _api_count(30, 9) + _api_count(30, 9, start=1000))


_KILLED_FOLD = """
import sys, time
from carepost.models import load_all_models
load_all_models()
from carepost.core.database import system_session
from carepost.tracking import rollups
with system_session() as s:
    rollups.lock_fold(s, sys.argv[1])
    folded = rollups.fold_chunk(s, sys.argv[1], chunk=int(sys.argv[2]))
    print("folded", folded, flush=True)
    time.sleep(120)  # killed here, its transaction open
"""


def test_an_aggregator_killed_mid_chunk_loses_and_repeats_nothing(org, storage):
    counted = _append(org.id, 8, 10)
    before = _pending()
    env = {**os.environ, **storage.env}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_FOLD, org.id, "1000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("folded "), line + proc.stdout.read()
        assert int(line.split()[1]) > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # Neither half of the killed chunk happened: the increments are still there, no rollup row.
    deadline = time.monotonic() + 30
    while True:  # PostgreSQL notices the closed connection and rolls back at once; wait if not
        try:
            assert _pending() == before
            assert _raw_totals(org.id) == {}
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # The next aggregator folds them exactly once.
    assert rollups.fold_all(system_session, chunk=9) > 0
    assert _pending() == 0
    _check_exact(org.id, counted, _api_count(8, 10))



def test_the_worker_folds_every_minute_and_the_cli_on_demand(org):
    from typer.testing import CliRunner

    from carepost.cli import app as cli_app
    from carepost.tracking.tasks import fold_rollups

    task = fold_rollups.task_class()
    assert task.validate_datetime(datetime(2026, 1, 1, 10, 15)) and task.validate_datetime(datetime(2026, 1, 1, 10, 16))
    counted = _append(org.id, 2, 3)
    fold_rollups.call_local()
    assert _pending() == 0
    _check_exact(org.id, counted, _api_count(2, 3))
    counted += _append(org.id, 2, 3, start=2)
    result = CliRunner().invoke(cli_app, ["analytics", "fold"])
    assert result.exit_code == 0, result.output
    assert "folded into the rollups" in result.output
    assert _pending() == 0
    _check_exact(org.id, counted, _api_count(4, 3))


def _pg_or_skip(storage) -> None:
    with system_session() as s:
        if s.get_bind().dialect.name != "postgresql":
            pytest.skip("SQLite: an append is a call into the library per row and a fold chunk is bounded by "
                        "max(id) under the write lock; the PostgreSQL statements are what this checks")


def test_an_events_transaction_appends_its_increments_in_one_statement(org, storage, tmp_path):
    """PostgreSQL: the buffer of a transaction goes to ``analytics_increments`` as one COPY (one
    execution inside a pipeline, where COPY cannot run) — not one INSERT per row (executemany: a
    Bind and an Execute for each of the 63 keys)."""
    _pg_or_skip(storage)
    from psycopg.pq import Trace

    def commit_traced(pipeline: bool) -> list[str]:
        trace = tmp_path / f"libpq-{pipeline}.trace"
        with org_session(org.id) as s:
            s.connection().exec_driver_sql("SELECT 1")  # the transaction has begun before the trace
            for i in range(60):
                rollups.add(s, org_id=org.id, at=AT, metric="opened", source="api",
                            receiving_domain=DOMAINS[i % 3], message_id=f"m{i}")
            assert rollups.pending(s) == 60 + 3  # 60 message keys, 3 hour keys
            driver = s.connection().connection.driver_connection
            with open(trace, "w") as out:
                driver.pgconn.trace(out.fileno())
                driver.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
                try:
                    if pipeline:  # as the /t/ writer flushes: in its pipeline, before the commit
                        with driver.pipeline():
                            assert rollups.flush_pending(s) == 63
                    s.commit()
                finally:
                    driver.pgconn.untrace()
        return [line.split("\t")[2] for line in trace.read_text().splitlines() if line.startswith("F\t")]

    sent = commit_traced(pipeline=False)
    assert "CopyData" in sent and sent.count("Bind") == 0, sent
    assert _pending() == 63
    sent = commit_traced(pipeline=True)
    assert sent.count("Bind") == 1 and sent.count("Execute") == 1, sent
    assert _pending() == 126
    rollups.fold_all(system_session)
    _check_exact(org.id, 120, 120)


def test_a_fold_chunk_reads_only_its_range_of_the_backlog(org, storage):
    """PostgreSQL: a chunk deletes a range of ids from the organization's oldest pending one —
    never a scan of the whole backlog (picking ``ORDER BY id LIMIT n`` was planned, with the
    statistics of a table that had grown since its last analyze, as a scan and sort of every
    pending row for every chunk). The rollup rows it makes have time-ordered ids (as
    ``carepost.core.ids.new_id``), written in key order."""
    _pg_or_skip(storage)
    import json

    counted = _append(org.id, 4, 25)
    with system_session() as s:  # a backlog as 20,000 appends of a busy minute leave it (one row each)
        s.connection().exec_driver_sql(
            "INSERT INTO analytics_increments (org_id, grain, period, metric, source, campaign_id, journey_step_id, "
            "template_id, segment_id, receiving_domain, topic_id, purpose, sending_domain_id, message_id, n) "
            "SELECT %s, 'h', %s, 'opened', 'campaign', 'c1', '', '', '', 'gmail.com', '', '', '', '', 1 "
            "FROM generate_series(1, 20000)", (org.id, AT))
        s.commit()
    counted += 20_000
    backlog = _pending()
    with system_session() as s:
        rollups.lock_fold(s, org.id)
        cursor = s.connection().connection.driver_connection.cursor()
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + rollups._FOLD_PG, {"org": org.id, "chunk": 500})
        plan = cursor.fetchone()[0]
        s.rollback()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    read = []

    def walk(node):
        if node.get("Relation Name") == "analytics_increments" and "Scan" in node["Node Type"]:
            read.append((node["Node Type"], node["Actual Rows"] * node.get("Actual Loops", 1)))
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan[0]["Plan"])
    assert read and max(n for _, n in read) <= 500, (read, backlog)
    assert _pending() == backlog  # the EXPLAIN's chunk was rolled back
    started_ms = int(time.time() * 1000)
    assert rollups.fold_all(system_session, chunk=5000) > 0
    _check_exact(org.id, counted, _api_count(4, 25))
    with system_session() as s:
        ids = [row[0] for row in s.connection().exec_driver_sql(
            "SELECT id FROM analytics_rollups WHERE org_id = %s", (org.id,))]
    assert ids and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(abs(int(i[:12], 16) - started_ms) < 600_000 for i in ids), ids[:3]
