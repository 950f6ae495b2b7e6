"""The delivery pipeline's reads by id (claim's lease and leased rows, load's messages,
recipients and attachments) go through their indexes whatever SQLite's statistics: none, stale
ones like those bench/campaign_send.py's workers ran under (taken when a few messages had
hundreds of recipients each: ``message_id`` estimated at 944 rows a value, ``messages`` at 40
rows), and those of a grown database. Written ``message_id IN (...)``, SQLite scanned ``message_recipients``
and ``messages`` under the stale ones (docs/performance.md, "Campaign end to end: the pipeline's
reads by id"). On PostgreSQL the same steps claim and load the same rows."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text

from tests.fixtures.statements import captured_statements

PHI = "Your HbA1c is 7.9 %; please call about your insulin dose."
# sqlite_stat1 rows of bench/campaign_send.py's database (16,000 contacts): "stale" as its
# population's ANALYZE left them before any campaign (40 messages, 37,749 recipients of them),
# "grown" as delivery.refresh_statistics took them after a campaign and a transactional phase.
STATISTICS = {
    "stale": {
        "sqlite_autoindex_messages_1": ("messages", "40 1"),
        "ix_messages_org_id": ("messages", "40 40"),
        "ix_messages_org_campaign": ("messages", "40 40 40"),
        "ix_messages_org_created": ("messages", "40 40 1 1 1"),
        "sqlite_autoindex_message_recipients_1": ("message_recipients", "37749 1"),
        "ix_message_recipients_message_id": ("message_recipients", "37749 944 158 1 1"),
        "ix_message_recipients_org_id": ("message_recipients", "37749 37749"),
        "ix_message_recipients_org_contact": ("message_recipients", "37749 37749 4 3 1"),
        "ix_message_recipients_org_address": ("message_recipients", "37749 37749 4"),
        "ix_message_recipients_due": ("message_recipients", "37749 6292 6292"),
    },
    "grown": {
        "sqlite_autoindex_messages_1": ("messages", "39304 1"),
        "ix_messages_org_id": ("messages", "39304 13102"),
        "ix_messages_org_campaign": ("messages", "39304 13102 7861"),
        "ix_messages_org_created": ("messages", "39304 13102 246 246 1"),
        "sqlite_autoindex_message_recipients_1": ("message_recipients", "77013 1"),
        "ix_message_recipients_message_id": ("message_recipients", "77013 2 2 1 1"),
        "ix_message_recipients_org_id": ("message_recipients", "77013 25671"),
        "ix_message_recipients_org_contact": ("message_recipients", "77013 25671 7 5 1"),
        "ix_message_recipients_org_address": ("message_recipients", "77013 25671 2"),
        "ix_message_recipients_due": ("message_recipients", "77013 11002 11002"),
    },
}
TABLES = ("messages", "message_recipients", "message_attachments")


@pytest.fixture
def principal(sender, delivery_queue):
    from carepost.accounts.access import Principal

    return Principal(kind="api_credential", org_id=sender.org_id, actor_id="cred_reads_test",
                     permissions=frozenset({"messages:send"}))


def accept(principal, n: int) -> list[str]:
    from carepost.delivery import accept_group
    from carepost.delivery.schemas import MessageIn

    items = [accept_group.Pending(principal, MessageIn.model_validate({
        "from": "Bar Clinic <care@bar.example>", "to": [f"Pat {i} <pat{i}@valid.test>"],
        "cc": [f"care{i}@valid.test"], "subject": "A message from your care team", "text": PHI,
        "html": f"<p>{PHI}</p>"}), None, {"ip": "127.0.0.1", "user_agent": "test", "request_id": None})
        for i in range(n)]
    accept_group.accept_group(items)
    assert all(item.created and item.error is None for item in items)
    return [item.message_id for item in items]


def set_statistics(conn, statistics: str) -> None:
    """In ``conn`` only (the caller rolls back): the statistics the planner reads."""
    conn.execute(text("ANALYZE"))  # makes sqlite_stat1 exist
    conn.execute(text("DELETE FROM sqlite_stat1 WHERE tbl IN ('messages', 'message_recipients', 'message_attachments')"))
    for idx, (tbl, stat) in STATISTICS.get(statistics, {}).items():
        conn.execute(text("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (:t, :i, :s)"), {"t": tbl, "i": idx, "s": stat})
    conn.execute(text("ANALYZE sqlite_schema"))  # the planner reads the statistics again


@pytest.mark.parametrize("statistics", ["none", "stale", "grown"])
def test_claim_and_load_read_by_id_whatever_the_statistics(principal, sender, session, delivery_queue, statistics):
    from carepost.core.config import get_settings
    from carepost.core.database import get_engine, system_session
    from carepost.core.ids import new_id
    from carepost.delivery import pipeline

    ids = accept(principal, 12)
    with captured_statements() as statements, system_session() as s:
        run = pipeline.Run(s, owner=new_id(), settings=get_settings())
        pipeline.hold_index_versions(s, ids)
        pipeline.claim(run, ids)
        pipeline.load(run)
        copies = {(c.recipient.message_id, c.recipient.kind): (c.content.message.id, c.content.text, c.content.to,
                                                                 c.content.cc) for c in run.copies}
        s.rollback()
    # Each message's To and Cc recipient leased and loaded with its message's content and headers.
    assert run.claimed == 24 and sorted(copies) == sorted((m, k) for m in ids for k in ("to", "cc"))
    for i, message_id in enumerate(ids):
        assert copies[(message_id, "to")] == copies[(message_id, "cc")] == (
            message_id, PHI, [f'"Pat {i}" <pat{i}@valid.test>'], [f"care{i}@valid.test"])
    if not get_settings().is_sqlite:
        return  # PostgreSQL plans with the statistics autovacuum keeps

    touching = re.compile(r"\b(" + "|".join(TABLES) + r")\b")
    reads = [(sql, params) for sql, params in statements
             if sql.lstrip().upper().startswith(("SELECT", "UPDATE")) and touching.search(sql)]
    assert any(sql.lstrip().startswith("UPDATE message_recipients") for sql, _ in reads)
    scan = re.compile(r"^SCAN (" + "|".join(TABLES) + r")\b|USING INDEX ix_message_recipients_due|MULTI-INDEX OR")
    with get_engine().connect() as conn:
        set_statistics(conn, statistics)
        if statistics == "stale":
            # These statistics are the ones that made SQLite scan: a batch's read (200 ids) written
            # IN (...) does.
            batch = tuple(f"{i:032x}" for i in range(200))
            old = [row[-1] for row in conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN SELECT id FROM message_recipients WHERE message_id IN ({', '.join('?' * 200)})",
                batch)]
            assert any(line.startswith("SCAN message_recipients") for line in old), old
        for sql, params in reads:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            assert not any(scan.search(line) for line in plan), (sql, plan)
            assert any(re.search(r"SEARCH (" + "|".join(TABLES) + r") USING (COVERING )?INDEX \S+ \((id|message_id)=\?", line)
                       for line in plan), (sql, plan)
        conn.rollback()
