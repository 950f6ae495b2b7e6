"""kill -9 of a server mid-request (issue 17 item 3): a real ``carepost serve`` process is killed
with SIGKILL while it handles ``POST /api/v1/messages``, started again, and the client retries
with the same ``Idempotency-Key``: exactly one message exists per key, and a real ``carepost
worker`` delivers each exactly once, counted by Message-ID at the SMTP server.

Two moments are hit: right after the request was sent (before the server could commit), and the
instant the message row is visible in the database (committed, the answer not yet read by the
client, the delivery task perhaps not yet queued — the retry queues it again: tasks are
idempotent).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from carepost.delivery.messages import idempotency_hash
from carepost.delivery.models import Message, MessageRecipient
from tests.faults import count_message_ids, start_worker, stop
from tests.fixtures.ui import free_port

pytestmark = pytest.mark.slow


def _serve(storage, port: int, log_path) -> subprocess.Popen:
    env = {**os.environ, **storage.env, "CAREPOST_PORT": str(port), "CAREPOST_BASE_URL": f"http://localhost:{port}",
           "CAREPOST_LOG_JSON": "true"}
    log = open(log_path, "a")
    proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    # a loaded machine may need longer (the live_server fixture's TEST_SERVER_START_SECONDS)
    deadline = time.monotonic() + max(300.0, float(os.environ.get("TEST_SERVER_START_SECONDS", "120")))
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log_path).read()[-3000:]
        try:
            if httpx.get(f"http://localhost:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start: " + open(log_path).read()[-3000:])


def test_kill_9_of_the_server_mid_request_then_retry_gives_one_message(
        storage, delivery_env, sender, delivery_queue, session, tmp_path):
    mx = delivery_env.mx["valid"]
    key = sender.key()
    port = free_port()
    base = f"http://localhost:{port}"
    server_log = tmp_path / "server.log"
    server = _serve(storage, port, server_log)
    worker = None
    cases = {"before-commit": 0, "after-commit": 1}
    ids: dict[str, str] = {}
    try:
        for case, n in cases.items():
            idem = f"fault-{case}-{os.getpid()}"
            body = {"from": "Bar Clinic <care@bar.example>", "to": [f"patient{n}@valid.test"],
                    "subject": "From your care team", "text": f"Dear patient {n}: your results are ready."}
            headers = {**key, "Idempotency-Key": idem}
            answer: list = []

            def post(body=body, headers=headers, answer=answer):
                try:
                    answer.append(httpx.post(f"{base}/api/v1/messages", json=body, headers=headers, timeout=60))
                except httpx.HTTPError as exc:
                    answer.append(exc)

            thread = threading.Thread(target=post)
            thread.start()
            if case == "after-commit":
                # Kill the instant the committed row is visible (the client is still waiting).
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    session.rollback()
                    if session.scalar(select(func.count()).select_from(Message)
                                      .where(Message.idempotency_key == idempotency_hash(idem))):
                        break
                    time.sleep(0.002)
            else:
                time.sleep(0.02)  # the request is on the wire, not yet handled
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            thread.join(60)
            first = answer[0] if answer else None
            print(f"{case}: the first attempt got {getattr(first, 'status_code', type(first).__name__)}")

            server = _serve(storage, port, server_log)  # restarted
            retry = httpx.post(f"{base}/api/v1/messages", json=body, headers=headers, timeout=60)
            assert retry.status_code == 202, retry.text
            ids[case] = retry.json()["id"]
            if isinstance(first, httpx.Response) and first.status_code == 202:
                assert first.json()["id"] == ids[case]
            again = httpx.post(f"{base}/api/v1/messages", json=body, headers=headers, timeout=60)
            assert again.json()["id"] == ids[case]  # a third try answers the same message

        session.rollback()
        for case, n in cases.items():
            rows = session.scalars(select(Message).join(MessageRecipient, MessageRecipient.message_id == Message.id)
                                   .where(Message.org_id == sender.org_id,
                                          Message.idempotency_key == idempotency_hash(f"fault-{case}-{os.getpid()}"))).all()
            assert [r.id for r in rows] == [ids[case]], f"{case}: {len(rows)} messages for one Idempotency-Key"

        worker = start_worker(storage, tmp_path / "worker.log", periodic=False)
        deadline = time.monotonic() + 120
        while True:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            session.rollback()
            statuses = session.scalars(select(MessageRecipient.status)
                                       .where(MessageRecipient.message_id.in_(ids.values()))).all()
            if statuses and all(s == "delivered" for s in statuses):
                break
            assert time.monotonic() < deadline, f"stuck: {statuses}"
            time.sleep(0.3)
    finally:
        stop(worker)
        stop(server)

    headers_by_id = dict(session.execute(select(Message.id, Message.message_id_header)
                                         .where(Message.id.in_(ids.values()))).all())
    arrived = count_message_ids(m.data for m in mx.recorder.messages)
    for case, message_id in ids.items():
        assert arrived[headers_by_id[message_id]] == 1, f"{case}: arrived {arrived[headers_by_id[message_id]]} times"
    assert sum(arrived.values()) == len(ids)
