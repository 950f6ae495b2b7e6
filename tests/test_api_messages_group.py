"""Single-message API requests accepted together in one transaction (delivery/accept_group.py,
issue 17): each request keeps its own answer, its own error and its own audit event; the same
Idempotency-Key in one group answers one message; a group whose transaction fails is accepted
again request by request."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import func, select

from carepost.audit.models import AuditEvent
from carepost.core.errors import Conflict, ValidationFailed
from carepost.delivery.models import Message, MessageRecipient
from tests.fixtures.statements import captured_statements

PHI = "Your HbA1c is 7.9 %; please call about your insulin dose."


def body(**over) -> dict:
    data = {"from": "Bar Clinic <care@bar.example>", "to": ["Pat Doe <pat@valid.test>"],
            "subject": "A message from your care team", "text": PHI, "html": f"<p>{PHI}</p>"}
    data.update(over)
    return data


def created_events(session, org_id) -> list[AuditEvent]:
    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.org_id == org_id,
                                                        AuditEvent.action == "message.create")))


def count(session, model) -> int:
    session.rollback()
    return session.scalar(select(func.count()).select_from(model))


def pending(principal, data: dict, key: str | None = None):
    from carepost.delivery import accept_group
    from carepost.delivery.schemas import MessageIn

    return accept_group.Pending(principal, MessageIn.model_validate(data), key,
                                {"ip": "127.0.0.1", "user_agent": "test", "request_id": None})


@pytest.fixture
def principal(sender, delivery_queue):
    from carepost.accounts.access import Principal

    return Principal(kind="api_credential", org_id=sender.org_id, actor_id="cred_group_test",
                     permissions=frozenset({"messages:send"}))


def test_one_group_answers_each_request_its_own(principal, sender, session, delivery_queue):
    from carepost.core.queue import huey
    from carepost.delivery import accept_group

    first = pending(principal, body(), "order-1")
    replay = pending(principal, body(), "order-1")  # the same request again, in the same group
    conflict = pending(principal, body(subject="Another message"), "order-1")
    bad = pending(principal, body(**{"from": "care@unknown.example"}))
    other = pending(principal, body(to=["lee@valid.test", "ops@valid.test"]))
    accept_group.accept_group([first, replay, conflict, bad, other])

    assert first.created and other.created and first.message_id != other.message_id
    assert replay.message_id == first.message_id and not replay.created and replay.error is None
    assert isinstance(conflict.error, Conflict) and conflict.error.code == "idempotency_conflict"
    assert isinstance(bad.error, ValidationFailed) and bad.error.field == "from"
    assert not any(p.alone for p in (first, replay, conflict, bad, other))
    assert count(session, Message) == 2 and count(session, MessageRecipient) == 3
    events = created_events(session, sender.org_id)
    assert sorted(e.target_id for e in events) == sorted([first.message_id, other.message_id])
    by_target = {e.target_id: e for e in events}
    assert by_target[other.message_id].details["recipients_count"] == 2
    assert by_target[first.message_id].ip == "127.0.0.1" and by_target[first.message_id].actor_id == "cred_group_test"
    assert "valid.test" not in json.dumps([e.details for e in events])
    # Delivery is queued for the stored messages and the replay, by id only.
    queued = [task.args[0] for task in iter(huey.dequeue, None)]
    assert sorted(i for ids in queued for i in ids) == sorted([first.message_id, first.message_id, other.message_id])

    # Later, in another group: the key still answers its message, or 409.
    again = pending(principal, body(), "order-1")
    changed = pending(principal, body(text="changed"), "order-1")
    accept_group.accept_group([again, changed])
    assert again.message_id == first.message_id and not again.created
    assert isinstance(changed.error, Conflict)
    assert count(session, Message) == 2


def test_a_group_that_fails_to_store_keeps_nothing_and_is_accepted_again_alone(principal, sender, session, monkeypatch):
    from carepost.delivery import accept_group, messages

    real = messages.store_messages
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        real(*args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(messages, "store_messages", failing)
    good, bad = pending(principal, body(), "k-1"), pending(principal, body(to=["not an address"]))
    accept_group.accept_group([good, bad])
    assert calls and good.alone and good.message_id is None and good.error is None
    assert not bad.alone and isinstance(bad.error, ValidationFailed) and bad.error.field == "to.0"
    assert count(session, Message) == 0 and count(session, MessageRecipient) == 0
    assert created_events(session, sender.org_id) == []


def test_the_api_accepts_a_request_alone_when_its_group_fails(client, sender, session, delivery_queue, monkeypatch):
    from carepost.delivery import accept_group

    def broken(org_id, items):
        raise RuntimeError("database went away")

    monkeypatch.setattr(accept_group, "_accept_org", broken)
    key = sender.key()
    r = client.post("/api/v1/messages", json=body(), headers={**key, "Idempotency-Key": "alone-1"})
    assert r.status_code == 202, r.text
    again = client.post("/api/v1/messages", json=body(), headers={**key, "Idempotency-Key": "alone-1"})
    assert again.status_code == 202 and again.json()["id"] == r.json()["id"]
    assert count(session, Message) == 1
    assert [e.target_id for e in created_events(session, sender.org_id)] == [r.json()["id"]]


def test_concurrent_requests_each_get_their_own_message(client, sender, session, delivery_queue):
    key = sender.key()
    answers: dict[int, object] = {}

    def send(i: int) -> None:
        headers = {**key, "Idempotency-Key": "same-key" if i % 4 == 0 else f"key-{i}"}
        answers[i] = client.post("/api/v1/messages", json=body(to=[f"patient-{i % 4 and i}@valid.test"]), headers=headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 202 for r in answers.values()), [r.text for r in answers.values() if r.status_code != 202]
    same = {answers[i].json()["id"] for i in range(0, 24, 4)}
    others = [answers[i].json()["id"] for i in range(24) if i % 4]
    assert len(same) == 1 and len(set(others)) == 18 and not same & set(others)
    assert count(session, Message) == 19 and count(session, MessageRecipient) == 19
    assert sorted(e.target_id for e in created_events(session, sender.org_id)) == sorted(same | set(others))


def test_each_request_in_a_group_queues_its_delivery_under_its_own_request_id(principal, sender, delivery_queue):
    """The accepting thread has none of the requests' context: each request's delivery task must
    still carry the id of the request that queued it (core.queue), so a worker's log lines for
    the task name that request (tests/test_topology.py checks it through nginx and real workers)."""
    import asyncio

    import structlog

    from carepost.core.queue import huey
    from carepost.delivery import accept_group

    async def one(i: int, request_id: str):
        structlog.contextvars.bind_contextvars(request_id=request_id)  # as the middleware does, per task
        return await accept_group.submit(principal, pending(principal, body(to=[f"p{i}@valid.test"])).body, None,
                                         {"ip": "127.0.0.1", "user_agent": "test", "request_id": request_id})

    async def many():
        return await asyncio.gather(*(one(i, f"{i:032x}") for i in range(1, 9)))

    answered = asyncio.run(many())
    assert all(a.message_id and a.error is None and not a.alone for a in answered)
    tasks = [json.loads(bytes(item)) for item in huey.storage.enqueued_items()]
    by_request = {t["request_id"]: t["args"][0] for t in tasks if "deliver_messages" in t["name"]}
    assert by_request == {f"{i:032x}": [a.message_id] for i, a in zip(range(1, 9), answered)}


@pytest.mark.parametrize("statistics", ["none", "stale"])
def test_a_group_reads_its_rows_by_primary_key_not_through_the_organization(principal, sender, session, delivery_queue,
                                                                          statistics):
    """The eligibility check of a group reads its messages, recipients and contacts by id. On
    SQLite ``org_id = ? AND id IN (...)`` with a list of more than a few ids went through the
    org_id index when the planner had no statistics (a database the worker never analyzed): every
    row of the organization per group, a cost growing with the stored messages (issue 17). No
    statement of a group's transaction may search those tables by org_id alone — nor with stale
    statistics (an ANALYZE of the first 40 messages: the worker's delivery threads then probed
    each id through (org_id, campaign_id), 20 s for 500 ids at 20,000 messages, under the write
    lock, and the other threads failed "database is locked")."""
    import re

    from sqlalchemy import text

    from carepost.consent import eligibility
    from carepost.core.config import get_settings
    from carepost.core.database import get_engine, org_session
    from carepost.delivery import accept_group
    from tests.test_consent_delivery import _contact

    contact_id, _ = _contact(sender.org_id, "pat0@valid.test", sign=False)
    if statistics == "stale":
        if not get_settings().is_sqlite:
            pytest.skip("SQLite's statistics (PostgreSQL's autovacuum keeps its own)")
        # Statistics taken when the database held 40 messages, all of another organization (SQLite's
        # samples then know nothing of this one's org_id): made here by accepting 40 and moving them.
        from carepost.accounts.service import create_organization

        other = create_organization(session, "Another Clinic")
        session.commit()
        accept_group.accept_group([pending(principal, body(to=[f"early{i}@valid.test"])) for i in range(40)])
        with get_engine().begin() as conn:
            conn.execute(text("UPDATE messages SET org_id = :other"), {"other": other.id})
            conn.execute(text("ANALYZE"))
    with captured_statements() as statements:
        items = [pending(principal, body(to=[f"pat{i}@valid.test"]), f"plan-{i}") for i in range(12)]
        accept_group.accept_group(items)
        # What the delivery pipeline reads by id at claim (consent's List-Unsubscribe, topics).
        ids = [item.message_id for item in items]
        with org_session(sender.org_id) as s:
            eligibility.message_topics(s, sender.org_id, ids)
            eligibility._by_ids(s, Message, (Message.id,), sender.org_id, ids)
            s.rollback()
    assert all(item.created and item.error is None for item in items)
    session.rollback()
    linked = session.scalars(select(MessageRecipient.contact_id).where(
        MessageRecipient.message_id == items[0].message_id)).all()
    assert linked == [contact_id]
    reads = [(sql, params) for sql, params in statements
             if sql.lstrip().upper().startswith(("SELECT", "WITH"))
             and re.search(r"\b(messages|message_recipients|contacts)\b", sql)]
    assert any("message_recipients" in sql for sql, _ in reads) and any("contacts" in sql for sql, _ in reads)
    if not get_settings().is_sqlite:
        return  # PostgreSQL plans with the statistics autovacuum keeps
    by_org_only = re.compile(r"SEARCH (messages|message_recipients|contacts) USING (COVERING )?INDEX \S+ \(org_id=\?\)")
    with get_engine().connect() as conn:
        for sql, params in reads:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            assert not any(by_org_only.search(line) for line in plan), (sql, plan)
