"""kill -9 of a server answering opens and clicks (issue 13, the /t/ journal): a real ``carepost
serve`` answers concurrent ``/t/o/`` and ``/t/c/`` requests, each for a different recipient, and
is killed with SIGKILL while they come — with events answered and journaled but not yet in the
database. Started again on the same data dir, it moves what the journal holds into the database
without any new request: every answered open and click is there **exactly once** (a request
killed unanswered may or may not be, never twice), and the counters agree with the events.
A second kill right after the restart (ingestion perhaps half done) changes nothing of that.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from tests.faults import stop
from tests.faults.test_server_kill import _serve
from tests.fixtures.ui import free_port

pytestmark = pytest.mark.slow

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
          "Safari/537.36")


def _tracked_message(session, recipients: int) -> tuple[str, list[tuple[str, str]]]:
    """An organization's tracked message with three recorded links; (recipient id, path) per
    request: an open or a click token of its own recipient each."""
    from carepost.accounts.service import create_organization
    from carepost.core import clock
    from carepost.core.crypto import get_keyring
    from carepost.core.ids import new_id
    from carepost.delivery.models import Message
    from carepost.tracking import engagement_tokens
    from carepost.tracking.models import MessageLink

    org = create_organization(session, "Journal Clinic")
    session.commit()
    ring = get_keyring()
    m = Message(id=new_id(), org_id=org.id, source="api", from_address="care@journal.example", subject_enc=b"",
                security="tls_required", purpose="treatment", tags=[], contains_phi=False, track_opens=True,
                track_clicks=True, created_at=clock.now())
    m.subject_enc = ring.encrypt(session, org.id, Message.__tablename__, "subject", m.id, "Hello")
    session.add(m)
    session.flush()
    for i in range(3):
        link = MessageLink(id=new_id(), org_id=org.id, message_id=m.id, link_index=i, part="html", url_enc=b"")
        link.url_enc = ring.encrypt(session, org.id, MessageLink.__tablename__, "url", link.id,
                                    f"https://journal.example/{i}")
        session.add(link)
    composed = clock.now().replace(year=clock.now().year - 1)
    paths = []
    for n in range(recipients):
        rid = new_id()
        if n % 2:
            paths.append((rid, f"/t/c/{engagement_tokens.make(session, 'c', org.id, m.id, rid, n % 3, composed)}"))
        else:
            paths.append((rid, f"/t/o/{engagement_tokens.make(session, 'o', org.id, m.id, rid, None, composed)}.gif"))
    session.commit()
    return m.id, paths


def _traffic(base: str, paths: list[tuple[str, str]]):
    """Eight clients requesting ``paths`` (not yet started): (answered recipient ids, their lock,
    the event that stops the clients, the threads). A client stops when the server is gone."""
    answered: set[str] = set()
    lock = threading.Lock()
    stopping = threading.Event()

    def client(share: list) -> None:
        with httpx.Client(base_url=base, timeout=10, headers={"User-Agent": CHROME}) as c:
            for rid, path in share:
                if stopping.is_set():
                    return
                try:
                    r = c.get(path, follow_redirects=False)
                except httpx.HTTPError:
                    return  # the server is gone
                assert r.status_code in (200, 302), (r.status_code, r.text[:200])
                with lock:
                    answered.add(rid)

    return answered, lock, stopping, [threading.Thread(target=client, args=(paths[i::8],)) for i in range(8)]


def _events(session, message_id: str) -> dict[str, int]:
    from carepost.tracking.models import EngagementEvent as E

    session.rollback()
    return dict(session.execute(select(E.recipient_id, func.count()).where(E.message_id == message_id)
                                .group_by(E.recipient_id)).all())


def test_kill_9_while_opens_and_clicks_are_answered_loses_and_doubles_nothing(storage, session, tmp_path):
    from carepost.tracking.models import EngagementCount

    message_id, paths = _tracked_message(session, 3000)
    port = free_port()
    base = f"http://localhost:{port}"
    log = tmp_path / "server.log"
    server = _serve(storage, port, log)
    answered, _lock, stopping, threads = _traffic(base, paths)
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(answered) < 600 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # mid-traffic: answered, journaled, not all ingested
        server.wait(10)
        stopping.set()
        for t in threads:
            t.join(30)
        in_database = _events(session, message_id)
        print(f"answered {len(answered)}, in the database at the kill {sum(in_database.values())}")
        assert len(answered) >= 600
        journaled = list((storage.data_dir / "engagement-journal").glob("*/*.journal"))
        assert journaled and any(p.stat().st_size for p in journaled)  # the kill left a journal behind

        # Started again: what the journal holds reaches the database, no request needed. A second
        # kill right after the start, then a third start.
        server = _serve(storage, port, log)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        server = _serve(storage, port, log)
        deadline = time.monotonic() + 120
        while True:
            found = _events(session, message_id)
            if answered <= set(found) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        missing = answered - set(found)
        assert not missing, f"{len(missing)} answered opens/clicks never reached the database"
        assert set(found) <= {rid for rid, _p in paths}
        doubled = {rid: n for rid, n in found.items() if n != 1}
        assert not doubled, f"{len(doubled)} recipients with their event more than once"
        session.rollback()
        counted = session.scalar(select(func.sum(EngagementCount.count))
                                 .where(EngagementCount.message_id == message_id))
        assert counted == sum(found.values())
    finally:
        stopping.set()
        stop(server)
        for t in threads:
            t.join(30)
