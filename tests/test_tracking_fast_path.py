"""The /t/ fast path (issue 13, speed of ``/t/``; ``tracking.engagement_pages``): opens and clicks
are answered by a plain ASGI layer in front of the app, with exactly the headers the app's own
middleware gives an answer it may not cache (request id aside), the same answers to bad tokens,
HEAD and query strings, and every other request handed to the app unchanged — in process and
through a real ``carepost serve``."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from carepost.tracking.engagement_pages import NOT_VALID, PIXEL
from tests.faults import stop
from tests.faults.test_server_kill import _serve
from tests.faults.test_tracking_journal_kill import CHROME, _events, _tracked_message
from tests.fixtures.ui import free_port

ANSWER_OWN = {b"content-type", b"content-length", b"location", b"allow", b"retry-after", b"x-robots-tag"}
SERVER_OWN = {b"date", b"server", b"x-request-id"}


def _added(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers a layer adds to every answer, in order: not the answer's own (its type, length,
    Location...), not the server's, not the request id."""
    return [(k.lower(), v) for k, v in raw if k.lower() not in ANSWER_OWN | SERVER_OWN]


@pytest.mark.parametrize("base_url", ["http://localhost:8000", "https://carepost.clinic.example"])
def test_fast_path_sends_exactly_the_headers_the_app_sends(db, base_url):
    from carepost.app import create_app
    from carepost.core.config import Settings

    with TestClient(create_app(Settings(base_url=base_url)), base_url="http://localhost:8000") as client:
        fast = client.get("/t/c/a/b")  # a token with a slash: refused by the fast path itself
        app = client.get("/healthz")  # through FastAPI and HeadersAndIds
    assert fast.status_code == 404 and fast.content == NOT_VALID
    assert "x-request-id" in app.headers and "x-request-id" not in fast.headers
    assert _added(fast.headers.raw) == _added(app.headers.raw)  # same names, values and order
    assert ("strict-transport-security" in fast.headers) == base_url.startswith("https://")
    assert fast.headers["x-robots-tag"] == "noindex, nofollow"


def test_opens_and_clicks_through_a_real_serve(storage, session, tmp_path):
    message_id, paths = _tracked_message(session, 6)
    opens = [(rid, p) for rid, p in paths if p.startswith("/t/o/")]
    clicks = [(rid, p) for rid, p in paths if p.startswith("/t/c/")]
    port = free_port()
    server = _serve(storage, port, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=f"http://localhost:{port}", timeout=10, headers={"User-Agent": CHROME}) as c:
            app = c.get("/healthz")
            pixel = c.get(opens[0][1])
            assert pixel.status_code == 200 and pixel.content == PIXEL
            assert pixel.headers["content-type"] == "image/gif" and pixel.headers["content-length"] == str(len(PIXEL))
            assert _added(pixel.headers.raw) == _added(app.headers.raw)

            queried = c.get(opens[1][1] + "?utm_source=mail&x=%2F")  # the path decides; the query is ignored
            assert queried.status_code == 200 and queried.content == PIXEL

            head = c.head(opens[2][1])
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == str(len(PIXEL))  # what GET would send

            rid, click = clicks[0]
            n = next(i for i, (r, _p) in enumerate(paths) if r == rid)
            moved = c.get(click, follow_redirects=False)
            assert moved.status_code == 302 and moved.content == b""
            assert moved.headers["location"] == f"https://journal.example/{n % 3}"  # the recorded URL only
            assert _added(moved.headers.raw) == _added(app.headers.raw)
            assert c.get(click + "?next=https://evil.example", follow_redirects=False).headers["location"] == \
                f"https://journal.example/{n % 3}"

            token = opens[0][1][len("/t/o/"):-len(".gif")]
            forged = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
            for path in (f"/t/o/{forged}.gif", f"/t/c/{token}", "/t/o/x.gif", "/t/c/" + "A" * 201):
                bad = c.get(path, follow_redirects=False)
                assert bad.status_code == 404 and bad.content == NOT_VALID, path
                assert token not in bad.text and forged not in bad.text
                assert _added(bad.headers.raw) == _added(app.headers.raw)

            refused = c.post(click, follow_redirects=False)
            assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"

            # Not an open or a click: handed to the app (FastAPI's answer carries the request id).
            for path in (opens[0][1][:-len(".gif")], "/t/u/forged", "/healthz?x=1"):
                other = c.get(path, follow_redirects=False)
                assert "x-request-id" in other.headers, path
                assert other.content != PIXEL
    finally:
        stop(server)
    # CAREPOST_ACCESS_LOG is off (the default): no line per request, not even a redacted one.
    assert '"GET /' not in (tmp_path / "server.log").read_text()
    answered = {opens[0][0], opens[1][0], opens[2][0], clicks[0][0]}
    deadline = time.monotonic() + 60
    while not answered <= set(found := _events(session, message_id)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert set(found) == answered  # every answered open and click, nothing for refused or forged ones
    assert found[clicks[0][0]] == 2 and found[opens[0][0]] == 1
