"""The open pixel and click redirects (public; the opaque token in the path is all there is).

* ``GET|HEAD /t/o/<token>.gif`` — a 1x1 transparent GIF, once the open is recorded.
* ``GET|HEAD /t/c/<token>`` — ``302`` to the URL recorded for that message and link position at
  send time (never a URL from the request: no open redirect); the invisible trap link answers a
  plain page.

A forged, altered, truncated or unknown token — or one of another organization, or of a message
that no longer exists — gets the same plain ``404`` page, which repeats nothing of the request
(no trace, no hint of why). Nothing about the request is kept but the class it was given and the
user agent's family (``tracking.engagement``).

**A fast path in front of the app.** These two paths are the busiest of an installation (every
image load and click of every tracked message) and carry nothing but a token, so they are served
by :class:`EngagementFastPath`, a plain ASGI layer the composition root (``carepost.app``) wraps
around the app's built middleware stack, instead of going through Starlette's error middleware,
FastAPI's telemetry and body limit, routing, the request-id/header middleware and a database
session per request: the handler awaits the writer thread's group commit (``tracking.engagement``)
and answers with the same security headers every CarePost response carries (passed in by the
app). They are public by design (the token is the credential), declared here as the consent
links are in their routes. Any other path, and any other method on these paths (405), passes
through to the app unchanged.
"""

from __future__ import annotations

import base64
import time
from urllib.parse import quote

from carepost.tracking.engagement import Hit, recorder

WHY = "engagement link: the opaque token in the path is the credential (no login, no PHI in the URL)"
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
PLAIN = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>"
         "<body><h1>{title}</h1><p>{text}</p></body></html>")
NOT_VALID = PLAIN.format(title="This link is not valid",
                         text="The link may be incomplete or changed. Open it again from the original email.").encode()
NOTHING = PLAIN.format(title="Nothing here", text="This link leads nowhere.").encode()
UNAVAILABLE = PLAIN.format(title="Try again",
                           text="This link cannot be followed right now. Please try again shortly.").encode()
OPEN_PREFIX, CLICK_PREFIX = "/t/o/", "/t/c/"
MAX_TOKEN = 200
LOCATION_SAFE = ":/?#[]@!$&'()*+,;=%~"  # a recorded URL as it was; only what a header cannot carry is escaped


class EngagementFastPath:
    """ASGI: ``/t/o/<token>.gif`` and ``/t/c/<token>`` answered here; everything else to ``app``."""

    def __init__(self, app, headers: list[tuple[bytes, bytes]] | None = None, observe=None):
        self.app = app
        self.headers = list(headers or []) + [(b"x-robots-tag", b"noindex, nofollow")]
        self.observe = observe  # (method, route template, status, seconds) -> None: request metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith(OPEN_PREFIX) and path.endswith(".gif"):
                return await self._serve(scope, send, "o", path[len(OPEN_PREFIX):-4], "/t/o/{token}.gif")
            if path.startswith(CLICK_PREFIX):
                return await self._serve(scope, send, "c", path[len(CLICK_PREFIX):], "/t/c/{token}")
        return await self.app(scope, receive, send)

    async def _serve(self, scope, send, kind: str, token: str, template: str):
        started = time.perf_counter()
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            status, body, extra = 405, b"", [(b"allow", b"GET, HEAD")]
        elif not token or len(token) > MAX_TOKEN or "/" in token:
            status, body, extra = 404, NOT_VALID, []
        else:
            user_agent = None
            for name, value in scope.get("headers") or ():
                if name == b"user-agent":
                    user_agent = value.decode("latin-1")[:512]
                    break
            client = scope.get("client")
            hit = Hit(kind=kind, token=token, user_agent=user_agent, ip=client[0] if client else None, method=method)
            try:
                outcome = await recorder().submit_async(hit)
            except Exception:  # noqa: BLE001 - logged by the recorder; the client may try again
                outcome = None
            if outcome is None:
                status, body, extra = 503, UNAVAILABLE, [(b"retry-after", b"5")]
            elif not outcome.valid:
                status, body, extra = 404, NOT_VALID, []
            elif outcome.trap:
                status, body, extra = 200, NOTHING, []
            elif kind == "c":
                status, body, extra = 302, b"", [(b"location", quote(outcome.url, safe=LOCATION_SAFE).encode("ascii"))]
            else:
                status, body, extra = 200, PIXEL, []
        ctype = b"image/gif" if body is PIXEL else b"text/html; charset=utf-8"
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra, *self.headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        if self.observe is not None:
            self.observe(method, template, status, time.perf_counter() - started)
