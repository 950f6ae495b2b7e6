"""PostgreSQL restarted mid-send (issue 17 item 3).

A real ``carepost worker`` delivers messages stored in a PostgreSQL of this test's own (initdb +
pg_ctl on a free port: the suite's shared server is never restarted); the queue is the SQLite
queue in the data dir. While the SMTP server holds one message's final "." — others in flight
behind it — PostgreSQL is stopped as a crash would stop it (``pg_ctl -m immediate``: every
connection cut, recovery at start), stays down two seconds and starts again.

What must hold, counted by Message-ID at the SMTP server: every message arrives exactly once, or
twice with its recipient flagged ``possible_duplicate`` and the reason (its outcome could not be
recorded before the database went away); nothing is stuck. How it recovers: the run whose
database went away stops (copies not yet started are not sent); its recipients are leased
(``CAREPOST_DELIVERY_LEASE_SECONDS``) and the task the claim scheduled for the lease's end
delivers them again on the restarted database (connections checked before use); the failed task
is also retried by the queue.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from tests.faults import (
    all_delivered,
    assert_each_sent_once_or_flagged,
    start_worker,
    stop,
    wait_for_recipients,
)
from tests.faults.services import PrivatePostgres

pytestmark = pytest.mark.slow

COUNT = 30
CONCURRENCY = 4
LEASE_SECONDS = 8
STOP_AT = 8  # the arrival whose final "." is held while PostgreSQL goes down


@pytest.fixture(scope="module")
def private_postgres():
    pg = PrivatePostgres()
    yield pg
    pg.close()


@pytest.fixture(scope="module")
def storage(private_postgres, tmp_path_factory):
    """The suite's ``storage`` (tests/conftest.py), on the private PostgreSQL: every fixture built
    on it (``db``, ``session``, ``client``, ``sender``) uses that server."""
    from tests.conftest import _ENV_KEYS, Storage, apply_env

    url = private_postgres.create_database(f"carepost_fault_{uuid.uuid4().hex[:8]}")
    data_dir = tmp_path_factory.mktemp("data-private-postgresql")
    env = {"CAREPOST_DATA_DIR": str(data_dir), "CAREPOST_LOG_JSON": "true", "CAREPOST_DATABASE_URL": url}
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    apply_env(env)
    from carepost.assembly import assemble
    from carepost.core.bootstrap import initialize_storage

    assemble()
    initialize_storage()
    yield Storage("postgresql", data_dir, env)
    apply_env({k: v for k, v in saved.items() if v is not None})


def test_postgresql_restarted_mid_send(private_postgres, storage, delivery_env, sender, delivery_queue, client,
                                       session, tmp_path, monkeypatch):
    mx = delivery_env.mx["valid"]
    original = mx.recorder.handle_DATA
    arrivals = []
    restarted = asyncio.Event()

    async def data(server, smtp_session, envelope):
        arrivals.append(envelope.rcpt_tos[0])
        if len(arrivals) == STOP_AT:
            # This message's final "." is here, its answer not yet given; others are in flight.
            await asyncio.to_thread(private_postgres.stop, "immediate")
            restarted.set()
        await asyncio.sleep(0.05)  # a real server's latency
        return await original(server, smtp_session, envelope)

    monkeypatch.setattr(mx.recorder, "handle_DATA", data)
    key = sender.key()
    batch = [{"from": "Bar Clinic <care@bar.example>", "to": [f"patient{i}@valid.test"],
              "subject": "From your care team", "text": f"Dear patient {i}: your results are in the portal."}
             for i in range(COUNT)]
    r = client.post("/api/v1/messages/batch", json={"messages": batch}, headers=key)
    assert r.status_code == 202, r.text
    ids = r.json()["ids"]

    log_path = tmp_path / "worker.log"
    started = time.monotonic()
    worker = start_worker(storage, log_path, periodic=True, delivery_lease_seconds=LEASE_SECONDS,
                          delivery_concurrency=CONCURRENCY, delivery_batch_size=50)
    try:
        deadline = time.monotonic() + 120  # a worker's start-up on a loaded machine
        while not restarted.is_set():
            assert worker.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"only {len(arrivals)} arrived"
            time.sleep(0.01)
        down_at = time.monotonic()
        time.sleep(2)
        private_postgres.start()
        assert len(arrivals) < COUNT, "everything was sent before the database went down"

        wait_for_recipients(session, ids, all_delivered, "not all delivered after the restart",
                            timeout=LEASE_SECONDS + 90, worker=worker, log_path=log_path)
        recovered_in = time.monotonic() - down_at
    finally:
        stop(worker)

    verdict = assert_each_sent_once_or_flagged(session, [m.data for m in mx.recorder.messages], ids)
    assert verdict["flagged"] <= CONCURRENCY, verdict  # only what was in flight is suspected
    log = log_path.read_text()
    assert "OperationalError" in log or "connection" in log.lower(), "the worker never saw the database go away"
    print(f"PostgreSQL down at arrival {STOP_AT}/{COUNT}: {verdict}; all delivered {recovered_in:.1f} s after the "
          f"stop, {time.monotonic() - started:.1f} s in all")
