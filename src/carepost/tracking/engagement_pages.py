"""The open pixel and click redirects (public; the opaque token in the path is all there is).

* ``GET|HEAD /t/o/<token>.gif`` — a 1x1 transparent GIF, once the open is recorded.
* ``GET|HEAD /t/c/<token>`` — ``302`` to the URL recorded for that message and link position at
  send time (never a URL from the request: no open redirect); the invisible trap link answers a
  plain page.

A forged, altered, truncated or unknown token — or one of another organization, or of a message
that no longer exists — gets the same plain ``404`` page, which repeats nothing of the request
(no trace, no hint of why). Nothing about the request is kept but the class it was given and the
user agent's family (``tracking.engagement``).

The handlers are ``async`` and wait for the writer thread's group commit: no worker thread per
request, no session per request.
"""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from carepost.accounts.access import ACCESS_ATTR
from carepost.tracking.engagement import Hit, recorder

router = APIRouter(include_in_schema=False)

WHY = "engagement link: the opaque token in the path is the credential (no login, no PHI in the URL)"
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
PLAIN = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>"
         "<body><h1>{title}</h1><p>{text}</p></body></html>")
NOT_VALID = PLAIN.format(title="This link is not valid",
                         text="The link may be incomplete or changed. Open it again from the original email.")
NOTHING = PLAIN.format(title="Nothing here", text="This link leads nowhere.")
UNAVAILABLE = PLAIN.format(title="Try again", text="This link cannot be followed right now. Please try again shortly.")
HEADERS = {"X-Robots-Tag": "noindex, nofollow"}


async def _public() -> None:
    return None


setattr(_public, ACCESS_ATTR, ("public", (WHY,)))


async def _record(request: Request, kind: str, token: str):
    hit = Hit(kind=kind, token=token, user_agent=request.headers.get("user-agent"),
              ip=request.client.host if request.client else None, method=request.method)
    try:
        return await asyncio.wrap_future(recorder().submit(hit))
    except Exception:  # noqa: BLE001 - logged by the recorder; the client may try again
        return None


@router.api_route("/t/o/{token}.gif", methods=["GET", "HEAD"])
async def open_pixel(request: Request, token: str, _=Depends(_public)):
    outcome = await _record(request, "o", token)
    if outcome is None:
        return HTMLResponse(UNAVAILABLE, status_code=503, headers={**HEADERS, "Retry-After": "5"})
    if not outcome.valid:
        return HTMLResponse(NOT_VALID, status_code=404, headers=HEADERS)
    return Response(PIXEL, media_type="image/gif", headers=HEADERS)


@router.api_route("/t/c/{token}", methods=["GET", "HEAD"])
async def click(request: Request, token: str, _=Depends(_public)):
    outcome = await _record(request, "c", token)
    if outcome is None:
        return HTMLResponse(UNAVAILABLE, status_code=503, headers={**HEADERS, "Retry-After": "5"})
    if not outcome.valid:
        return HTMLResponse(NOT_VALID, status_code=404, headers=HEADERS)
    if outcome.trap:
        return HTMLResponse(NOTHING, status_code=200, headers=HEADERS)
    return RedirectResponse(outcome.url, status_code=302, headers=HEADERS)
