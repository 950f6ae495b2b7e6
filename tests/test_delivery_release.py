"""The hand-over between the delivery loop's senders and the recorder (pipeline step 9/11).

A sender waits for the commit of its "being sent" mark before its SMTP transaction, and for the
commit of its outcome before it frees its place among the concurrent sends. The recorder frees a
committed group's senders with one hand-over to the loop (``pipeline._release_all``); a sender
the recorder never answers gives up after ``MARK_TIMEOUT``: not sent when it was waiting for its
mark. No database here: the recorder is this test, the SMTP client a stand-in that counts sends.
"""

from __future__ import annotations

import asyncio
import queue
import time
from types import SimpleNamespace

from carepost.delivery import pipeline
from carepost.delivery.smtp import Envelope, RecipientResult


class _CountingClient:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def deliver(self, envelope: Envelope) -> list[RecipientResult]:
        self.sent.extend(envelope.recipients)
        return [RecipientResult(r, "delivered", "accepted: 250", 250) for r in envelope.recipients]


def _take(inbox: queue.SimpleQueue, count: int) -> list:
    items, deadline = [], time.monotonic() + 10
    while len(items) < count:
        items.append(inbox.get(timeout=max(0.01, deadline - time.monotonic())))
    return items


def test_the_recorder_frees_a_group_at_once_and_a_sender_it_never_answers_gives_up(monkeypatch):
    client = _CountingClient()

    async def client_for(self, settings):
        return client, asyncio.Semaphore(4)

    monkeypatch.setattr(pipeline.DeliveryLoop, "_client_for", client_for)
    monkeypatch.setattr(pipeline, "MARK_TIMEOUT", 0.5)
    loop = pipeline.DeliveryLoop()
    envelopes = [Envelope(sender="b@clinic.test", recipients=[f"p{i}@sink.test"], message=b"x", require_verified_tls=True)
                 for i in range(3)]
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        sending = loop.submit(envelopes, SimpleNamespace(delivery_lease_seconds=120), inbox)
        starts = sorted(_take(inbox, 3), key=lambda item: item[1])
        assert [(kind, i) for kind, i, *_ in starts] == [("start", 0), ("start", 1), ("start", 2)]
        assert client.sent == []  # nobody sends before its mark is committed
        # One group: copy 0 and 2 marked, copy 1's lease lost (another run sends it).
        pipeline._release_all([(starts[0][3], True), (starts[1][3], False), (starts[2][3], True)])
        done = sorted(_take(inbox, 3), key=lambda item: item[1])
        assert [(kind, i) for kind, i, *_ in done] == [("done", 0), ("done", 1), ("done", 2)]
        assert done[1][2].status == "deferred"  # copy 1 was not sent: its outcome says so
        assert sorted(client.sent) == ["p0@sink.test", "p2@sink.test"]
        # Copy 0's and 1's outcomes committed; copy 2's never is: it frees its place after MARK_TIMEOUT.
        pipeline._release_all([(done[0][3], True), (done[1][3], True)])
        results = sending.result(10)
    finally:
        loop.close()
    assert [r.status for r in results] == ["delivered", "deferred", "delivered"]
    assert results[1].reason == "internal: attempt not recorded" and not results[1].possible_duplicate


def test_a_sender_whose_mark_is_never_committed_is_not_sent(monkeypatch):
    client = _CountingClient()

    async def client_for(self, settings):
        return client, asyncio.Semaphore(4)

    monkeypatch.setattr(pipeline.DeliveryLoop, "_client_for", client_for)
    monkeypatch.setattr(pipeline, "MARK_TIMEOUT", 0.3)
    loop = pipeline.DeliveryLoop()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        sending = loop.submit([Envelope(sender="b@clinic.test", recipients=["p@sink.test"], message=b"x")],
                              SimpleNamespace(delivery_lease_seconds=120), inbox)
        [(kind, _, _, release)] = _take(inbox, 1)
        assert kind == "start"
        [result] = sending.result(10)  # the recorder never answers
        release(True)  # too late: the sender has given up; nothing breaks
    finally:
        loop.close()
    assert result.status == "deferred" and client.sent == []
