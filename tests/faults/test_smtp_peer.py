"""An SMTP peer that misbehaves (issue 17 item 3): a real ``carepost worker`` sends to a real SMTP
server (verified TLS) that, on its first attempt for a recipient, answers the final "." with 421,
resets the connection after taking the message, or stalls past the client's timeout. The
deferred recipients come due again (their retry time moved to now, as five minutes passing
would), the periodic sweep queues them, and the peer behaves.

What must hold, counted by Message-ID at the peer: the 421 message arrives once and is not
suspected; the reset and stalled ones may arrive twice (the peer kept the first copy) and are
flagged ``possible_duplicate`` with the reason; everything ends delivered, nothing stuck.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select, update

from carepost.delivery.models import Message, MessageRecipient
from tests.faults import count_message_ids, start_worker, stop

pytestmark = pytest.mark.slow

SMTP_TIMEOUT = 3
FAULTS = {"p421@valid.test": "421", "preset@valid.test": "reset", "pstall@valid.test": "stall"}


def test_421_reset_after_data_and_stall(storage, delivery_env, sender, delivery_queue, client, session, tmp_path,
                                        monkeypatch):
    mx = delivery_env.mx["valid"]
    recorder = mx.recorder
    original = recorder.handle_DATA
    misbehaved: set[str] = set()

    async def flaky_data(server, smtp_session, envelope):
        rcpt = envelope.rcpt_tos[0]
        fault = FAULTS.get(rcpt) if rcpt not in misbehaved else None
        if fault is None:
            return await original(server, smtp_session, envelope)
        misbehaved.add(rcpt)
        if fault == "421":
            return "421 4.3.2 Service shutting down, try again later"
        await original(server, smtp_session, envelope)  # the peer kept this copy
        if fault == "reset":
            server.transport.abort()
            return "250 2.0.0 never read"
        await asyncio.sleep(SMTP_TIMEOUT + 3)  # past the client's timeout
        return "250 2.0.0 too late"

    monkeypatch.setattr(recorder, "handle_DATA", flaky_data)
    key = sender.key()
    ids = []
    for rcpt in [*FAULTS, "pfine@valid.test"]:
        r = client.post("/api/v1/messages", headers=key, json={
            "from": "Bar Clinic <care@bar.example>", "to": [rcpt], "subject": "From your care team",
            "text": "Your results are ready in the portal."})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])

    log_path = tmp_path / "worker.log"
    worker = start_worker(storage, log_path, periodic=False, smtp_timeout=SMTP_TIMEOUT)

    def wait_for(done, what: str, timeout: float = 150):
        deadline = time.monotonic() + timeout
        while True:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            session.rollback()
            rows = session.scalars(select(MessageRecipient).where(MessageRecipient.message_id.in_(ids))).all()
            if done(rows):
                return rows
            assert time.monotonic() < deadline, f"{what}: {[(r.status, r.reason) for r in rows]}"
            time.sleep(0.3)

    try:
        from carepost.core.crypto import get_keyring

        ring = get_keyring()

        def address(r):
            return ring.decrypt_text(session, r.org_id, MessageRecipient.__tablename__, "address", r.id, r.address_enc)

        rows = wait_for(lambda rows: sum(r.status == "deferred" for r in rows) == 3
                        and sum(r.status == "delivered" for r in rows) == 1, "first attempts")
        by_address = {address(r): r for r in rows}
        first = by_address["p421@valid.test"]
        assert not first.possible_duplicate and "421" in (first.reason or ""), first.reason
        for rcpt in ("preset@valid.test", "pstall@valid.test"):
            r = by_address[rcpt]
            assert r.possible_duplicate and r.reason, (rcpt, r.reason)  # flagged, with the reason
            assert r.sending_since is None

        # Five minutes pass for the deferred ones; the periodic sweep queues them again.
        from carepost.core.database import system_session
        from carepost.delivery.tasks import deliver_due

        with system_session() as s:
            s.execute(update(MessageRecipient).where(MessageRecipient.message_id.in_(ids),
                                                     MessageRecipient.status == "deferred")
                      .values(next_attempt_at=MessageRecipient.first_attempt_at))
            s.commit()
        deliver_due.call_local()
        rows = wait_for(lambda rows: all(r.status == "delivered" for r in rows), "after the retry")
    finally:
        stop(worker)

    session.rollback()
    headers = dict(session.execute(select(Message.id, Message.message_id_header).where(Message.id.in_(ids))).all())
    arrived = count_message_ids(m.data for m in recorder.messages)
    assert set(arrived) == set(headers.values())
    for r in rows:
        rcpt = address(r)
        n = arrived[headers[r.message_id]]
        if rcpt in ("preset@valid.test", "pstall@valid.test"):
            assert n == 2 and r.possible_duplicate, (rcpt, n)  # sent twice, and said so
            assert "possible duplicate: an earlier attempt ended in doubt" in r.reason, r.reason  # and why
        else:
            assert n == 1 and not r.possible_duplicate, (rcpt, n)
        assert r.status == "delivered" and r.sending_since is None
