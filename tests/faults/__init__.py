"""The fault suite (issue 17 item 3): real processes and peers broken on purpose.

Each test counts, by Message-ID at a real SMTP server, that every planned message was sent
exactly once or, where a send may have reached the server before the failure, that it is flagged
``possible_duplicate`` with the reason; and that nothing is left stuck.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterable


def message_id_of(data: bytes) -> str | None:
    """The Message-ID header of a raw message (the first, unfolded), or None."""
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    lines = head.split(b"\n")
    for i, line in enumerate(lines):
        if line[:11].lower() == b"message-id:":
            value = line[11:]
            for cont in lines[i + 1:]:
                if cont[:1] not in (b" ", b"\t"):
                    break
                value += cont
            return value.strip().decode("ascii", "replace")
    return None


def count_message_ids(messages: Iterable[bytes]) -> Counter:
    """How many times each Message-ID arrived."""
    return Counter(message_id_of(data) for data in messages)


# --------------------------------------------------------------------------- shared by the fault tests


def start_worker(storage, log_path, *, periodic: bool = True, **settings) -> subprocess.Popen:
    """A real ``carepost worker`` (one task thread) on ``storage``, with ``CAREPOST_*`` settings
    given as keyword arguments (``delivery_lease_seconds=10``), its output in ``log_path``."""
    import os
    import sys

    env = {**os.environ, **storage.env, "CAREPOST_LOG_JSON": "true",
           **{f"CAREPOST_{k.upper()}": str(v) for k, v in settings.items()}}
    args = [sys.executable, "-m", "carepost.cli", "worker", "--threads", "1"] + ([] if periodic else ["--no-periodic"])
    with open(log_path, "w") as log:
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(proc) -> None:
    """SIGTERM (running tasks finish), SIGKILL after 30 s."""
    import signal

    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def recipient_rows(session, message_ids) -> list:
    from sqlalchemy import select

    from carepost.delivery.models import MessageRecipient

    session.rollback()
    return session.scalars(select(MessageRecipient).where(MessageRecipient.message_id.in_(list(message_ids)))).all()


def wait_for_recipients(session, message_ids, done, what: str, *, timeout: float, worker=None, log_path=None,
                        every: float = 0.3) -> list:
    """Poll the recipients of ``message_ids`` until ``done(rows)``; fail after ``timeout`` seconds
    (showing each status and reason), or at once when ``worker`` exited (showing its log)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if worker is not None:
            assert worker.poll() is None, f"the worker exited: {log_path.read_text()[-3000:] if log_path else ''}"
        rows = recipient_rows(session, message_ids)
        if done(rows):
            return rows
        assert time.monotonic() < deadline, f"{what}: {Counter((r.status, r.reason) for r in rows).most_common(8)}"
        time.sleep(every)


def all_delivered(rows) -> bool:
    return bool(rows) and all(r.status == "delivered" for r in rows)


def assert_each_sent_once_or_flagged(session, received: Iterable[bytes], message_ids) -> dict:
    """The fault suite's verdict, by Message-ID counted at the SMTP server: every planned message
    arrived, each exactly once or twice with its recipient flagged ``possible_duplicate`` and the
    reason saying why; nothing else arrived; nothing is stuck (every recipient delivered, no lease
    or being-sent mark left). Returns counts for the test's report."""
    from sqlalchemy import select

    from carepost.delivery.models import Message

    session.rollback()
    ids = list(message_ids)
    headers = dict(session.execute(select(Message.id, Message.message_id_header).where(Message.id.in_(ids))).all())
    assert len(headers) == len(ids), "a planned message is missing from the database"
    arrived = count_message_ids(received)
    missing = set(headers.values()) - set(arrived)
    assert not missing, f"{len(missing)} planned Message-IDs never arrived: {sorted(missing)[:5]}"
    strangers = set(arrived) - set(headers.values())
    assert not strangers, f"Message-IDs nobody planned arrived: {sorted(map(str, strangers))[:5]}"
    rows = recipient_rows(session, ids)
    assert len(rows) == len(ids)
    stuck = [(r.status, r.reason) for r in rows if r.status != "delivered" or r.lease_owner or r.sending_since]
    assert not stuck, f"not delivered, or a lease or mark left: {stuck[:10]}"
    twice = 0
    for r in rows:
        n = arrived[headers[r.message_id]]
        assert n in (1, 2), f"{headers[r.message_id]} arrived {n} times"
        if n == 2:
            twice += 1
            assert r.possible_duplicate, f"{headers[r.message_id]} arrived twice without possible_duplicate"
            assert r.reason and "duplicate" in r.reason, f"flagged without the reason: {r.reason!r}"
    flagged = sum(bool(r.possible_duplicate) for r in rows)
    return {"messages": len(ids), "twice": twice, "flagged": flagged}
