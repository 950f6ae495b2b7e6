"""The ASGI app: the routers the composition root (``carepost.assembly``) names, and the
cross-cutting middleware."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carepost import __version__
from carepost.accounts.access import declared_access
from carepost.core.config import Settings, get_settings
from carepost.core.errors import CarePostError, RateLimited
from carepost.core.ids import new_id
from carepost.core.logging import configure_logging, get_logger

log = get_logger("carepost.app")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


class BodyLimitMiddleware:
    """Refuses bodies over ``CAREPOST_MAX_UPLOAD_BYTES`` — by header, and by counting a stream."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit, send)
        seen = 0
        started = False
        exceeded = False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                # FastAPI turns the aborted body read into its own 400; whatever the app
                # answered, the caller gets 413.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _too_large(self.limit, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        # ``except*``: a route that streams the body itself (imports) reads it inside the task group
        # of a BaseHTTPMiddleware, which wraps the exception in an ExceptionGroup (was a 500).
        try:
            await self.app(scope, counting_receive, tracking_send)
        except* _BodyTooLarge:
            if not started:
                await _too_large(self.limit, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, send: Send) -> None:
    body = JSONResponse(
        {"error": {"code": "payload_too_large", "message": f"Request body exceeds the limit of {limit} bytes."}},
        status_code=413,
    )
    await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
    await send({"type": "http.response.body", "body": body.body})


def _wants_html(request: Request) -> bool:
    path = request.url.path
    return not path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


def _error_response(request: Request, status: int, body: dict, headers: dict | None = None) -> Response:
    if _wants_html(request):
        from carepost.web.rendering import render_error

        return render_error(request, status, body, headers)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


WWW_AUTHENTICATE = 'Bearer realm="CarePost API", Basic realm="CarePost API", charset="UTF-8"'


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CarePostError)
    async def _carepost_error(request: Request, exc: CarePostError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
        if exc.status_code == 404 and getattr(request.state, "principal", None) is not None:
            # A lookup outside the caller's organization looks like any other miss (same 404) but
            # leaves an audit trace (issue 9 item 25).
            from starlette.concurrency import run_in_threadpool

            from carepost.accounts.denials import record_not_found

            await run_in_threadpool(record_not_found, request, exc.field)
        if _wants_html(request) and (exc.status_code == 401 or exc.code == "mfa_required"):
            from fastapi.responses import RedirectResponse

            # A browser that is not signed in, or has not finished MFA, is sent to finish it.
            return RedirectResponse("/app/login" if exc.status_code == 401 else "/app/mfa", status_code=303)
        if _wants_html(request) and exc.code == "acknowledgement_required":
            # The training gate (issue 16 item 10): read and acknowledge the policies, then come back.
            from urllib.parse import quote

            from fastapi.responses import RedirectResponse

            return RedirectResponse("/app/compliance/acknowledge?next=" + quote(request.url.path, safe="/"),
                                    status_code=303)
        if exc.status_code == 401:
            # RFC 9110 15.5.2: a 401 names the schemes that would work (RFC 6750 Bearer, RFC 7617 Basic).
            headers = {**(headers or {}), "WWW-Authenticate": WWW_AUTHENTICATE}
        return _error_response(request, exc.status_code, exc.to_dict(), headers)

    from sqlalchemy.orm.exc import StaleDataError

    @app.exception_handler(StaleDataError)
    async def _stale(request: Request, exc: StaleDataError):
        # The row was deleted (or changed) by another request between reading and writing it.
        return _error_response(request, 404, {"code": "not_found", "message": "It was removed or changed meanwhile; "
                                              "reload and try again."})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # FastAPI's default handler echoes the submitted value ("input"), which may be PHI.
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "cookie")]
            errors.append({"field": ".".join(loc) or None, "reason": err.get("msg", "invalid"), "type": err.get("type")})
        first = errors[0] if errors else {"field": None, "reason": "invalid"}
        body = {
            "code": "validation_error",
            "message": f"{first['field'] or 'request'}: {first['reason']}",
            "field": first["field"],
            "errors": errors,
        }
        return _error_response(request, 422, body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 401: "authentication_required", 403: "permission_denied"}
        message = exc.detail if isinstance(exc.detail, str) else "error"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 401:
            headers.setdefault("WWW-Authenticate", WWW_AUTHENTICATE)
        if exc.status_code == 405:
            # Every method of every route on this path (Starlette names only the first route's).
            from carepost.web.openapi import allowed_methods

            allowed = allowed_methods(request.app, request.url.path)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return _error_response(request, exc.status_code, {"code": codes.get(exc.status_code, "http_error"), "message": message},
                               headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if storage_full(exc):
            # Issue 17 item 3: the disk under the database (or the data dir) is full. The
            # transaction was rolled back, so nothing was half-stored: say so, and when to retry.
            log.error("storage_full", error_type=type(exc).__name__, path_template=_route_template(request))
            return _error_response(request, 507, {"code": "storage_full", "message": "The server's storage is full; "
                                                  "nothing was stored. Try again later."}, {"Retry-After": "60"})
        log.error("unhandled_error", error_type=type(exc).__name__, path_template=_route_template(request))
        return _error_response(request, 500, {"code": "internal_error", "message": "Something went wrong. The error was logged."})


def storage_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or an OSError ENOSPC, possibly wrapped."""
    import errno

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "database or disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
        seen += 1
    return False


def _route_template(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


# A client's X-Request-Id is kept (and stored in audit events) only when it looks like a trace id:
# 16-64 hex digits, optionally grouped by hyphens (UUIDs, W3C trace ids, CarePost ids). Anything
# else — free text, an e-mail address, a name, a phone number — is replaced by a new id.
_REQUEST_ID = re.compile(r"^(?=.{16,64}$)[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*$")


def accepted_request_id(value: str | None) -> str:
    if value and _REQUEST_ID.match(value):
        return value
    return new_id()


# The headers every response carries (the /t/ fast path builds the same list in install_middleware).
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")
NO_STORE = ((b"cache-control", b"no-store"), (b"pragma", b"no-cache"))


class HeadersAndIds:
    """Pure ASGI middleware: the request id (``request.state.request_id``), the security headers
    and ``Cache-Control: no-store`` on every answer, and the request metrics.

    It was a Starlette ``BaseHTTPMiddleware`` (``@app.middleware("http")``), which runs the app in
    a task group of its own and streams every answer through a memory channel: about 1 ms of CPU
    per request (issue 11 item 6). Same behaviour: a client's trace-like ``X-Request-Id`` is kept,
    anything else replaced; a route's own ``Content-Security-Policy`` wins, every other header
    here replaces what the route set; ``/static/`` and ``/b/`` may be cached; an exception from
    the app passes through (Starlette's error middleware, outside, answers it)."""

    def __init__(self, app: ASGIApp, settings: Settings, observe=None):
        self.app = app
        self.observe = observe  # (method, route template, status, seconds) -> None
        fixed = list(SECURITY_HEADERS)
        if settings.base_url.startswith("https://"):
            fixed.append(HSTS)
        self.fixed = fixed
        self.fixed_no_store = fixed + list(NO_STORE)
        self.csp = (b"content-security-policy", CSP.encode())

    def answer_headers(self) -> list[tuple[bytes, bytes]]:
        """What this middleware adds to an answer that sets no CSP of its own and may not be
        cached, the request id aside: the /t/ fast path sends exactly these."""
        return [self.csp, *self.fixed_no_store]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent_id = None
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":
                sent_id = value.decode("latin-1")
                break
        request_id = accepted_request_id(sent_id)
        scope.setdefault("state", {})["request_id"] = request_id
        # On every log line of this request, and on the tasks it queues (carepost.core.queue): a
        # trace id only (the rule above), in this request's own context (one task per request).
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        # /b/: an organization's public logo and colours, no PHI. PHI may be on any other API
        # response or page: never cache (ASVS 8.2.1).
        cacheable = scope["path"].startswith(("/static/", "/b/"))
        ours = self.fixed if cacheable else self.fixed_no_store
        replaced = {name for name, _ in ours}
        replaced.add(b"x-request-id")
        status = [None]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = []
                has_csp = False
                for name, value in message.get("headers") or ():
                    lower = name.lower()
                    if lower in replaced:
                        continue
                    if lower == b"content-security-policy":
                        has_csp = True
                    headers.append((name, value))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                if not has_csp:
                    headers.append(self.csp)
                headers.extend(ours)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
        if self.observe is not None and status[0] is not None:
            self.observe(scope["method"], _route_template_of(scope), status[0], time.perf_counter() - started)


def _route_template_of(scope: Scope) -> str:
    return getattr(scope.get("route"), "path", "unmatched")


def install_middleware(app: FastAPI, settings: Settings) -> None:
    from carepost.web.inputs import ControlCharacterGuard
    from carepost.web.metrics import observe_request

    async def _refuse_control_characters(request: Request, field: str, reason: str) -> Response:
        # One place for every text input (path, query, JSON, form fields): issue 9 items 26 and 28.
        kind = "control_characters" if reason.startswith("control") else "strict_type"
        body = {"code": "validation_error", "message": f"{field}: {reason}", "field": field,
                "errors": [{"field": field, "reason": reason, "type": kind}]}
        return _error_response(request, 422, body)

    # Innermost: the refusal still gets the request id and security headers below.
    app.add_middleware(ControlCharacterGuard, refuse=_refuse_control_characters, router_app=app)

    app.add_middleware(HeadersAndIds, settings=settings, observe=observe_request)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    # In front of the whole app: the open pixel and click redirects (/t/o/, /t/c/) are answered
    # before FastAPI itself (its telemetry, Starlette's error middleware, the body limit), the
    # middleware above and routing, with the same security headers (issue 13;
    # carepost.tracking.engagement_pages): CarePostApp.__call__ enters through ``app.front``.
    from carepost.tracking.engagement_pages import EngagementFastPath

    # The same headers, in the same order, as HeadersAndIds gives an answer it may not cache (one
    # list for both: tests/test_tracking_fast_path.py compares the two answers).
    app.front = EngagementFastPath(functools.partial(FastAPI.__call__, app),
                                   headers=HeadersAndIds(app, settings).answer_headers(),
                                   observe=observe_request)


def enforce_declared_access(app: FastAPI) -> list[str]:
    """Deny by default: every API route must declare a permission or that it is public."""
    from fastapi.routing import iter_route_contexts

    undeclared = []
    # FastAPI >= 0.16x keeps included routers as wrappers in ``app.routes``; iterate the routes
    # they contain, or this check would see nothing.
    for context in iter_route_contexts(app.routes):
        route = context.route
        if isinstance(route, APIRoute) and declared_access(route) is None:
            undeclared.append(f"{sorted(context.methods or ())} {context.path}")
    if undeclared:
        raise RuntimeError("routes without an access declaration: " + "; ".join(undeclared))
    return undeclared


def _path_shapes(router) -> list[tuple[str, bool]]:
    """Each route's path up to its first parameter, and whether that is the whole path: a request
    path can match the route only if it starts with this text (or, without parameters, is it). A
    route without a path could match anything (the empty prefix)."""
    out = []
    for route in router.routes:
        path = getattr(route, "path", None)
        out.append((path.split("{", 1)[0], "{" not in path) if isinstance(path, str) else ("", False))
    return out


def _may_share_a_path(a: tuple[str, bool], b: tuple[str, bool]) -> bool:
    (pa, exact_a), (pb, exact_b) = a, b
    if exact_a and exact_b:
        return pa == pb
    if exact_a:
        return pa.startswith(pb)
    if exact_b:
        return pb.startswith(pa)
    return pa.startswith(pb) or pb.startswith(pa)


# The routers of the high-rate API, matched first and in this order (see matching_order): an EHR's
# transactional sends (issue 17), then the audited contact read (issue 11 item 6).
HOT_ROUTERS = ("carepost.delivery.api", "carepost.patients.api")


def matching_order(routers: list, first: tuple = ()) -> list:
    """The routers in the order the app includes them: the web UI's routers (every path under
    ``/app``) after the others, so an API request (or ``/healthz``, ``/p/``, ``/f/``) is matched
    after tens of routes rather than a hundred (FastAPI tries an app's routes one by one, a few
    µs each; issue 11 item 6). A UI page, which renders a template, is matched after more.
    Routers in ``first`` (the high-rate API), in that order, go ahead of all others they may go
    ahead of: ``POST /api/v1/messages`` is matched after no other router's routes (it was after
    about a hundred, each tried twice per request by FastAPI 0.165; issue 17).

    No request is answered by another route than in the composition root's order: a router moves
    ahead of an earlier one only when no path can match a route of both (see
    :func:`_may_share_a_path`), so among routes that could both match a path the composition
    root's order stands (for a full match, and for a method mismatch's 405)."""
    shapes = [sorted(set(_path_shapes(r))) for r in routers]

    def overlap(a: list, b: list) -> bool:
        return any(_may_share_a_path(x, y) for x in a for y in b)

    conflicts = {i: {j for j in range(i) if overlap(shapes[i], shapes[j])} for i in range(len(routers))}
    ui = [bool(s) and all(p == "/app" or p.startswith("/app/") for p, _ in s) for s in shapes]
    remaining = list(range(len(routers)))
    order = []
    while remaining:
        left = set(remaining)
        ready = [i for i in remaining if not (conflicts[i] & left)]  # never empty: the first one is ready
        pick = next((i for hot in first for i in ready if routers[i] is hot),
                    next((i for i in ready if not ui[i]), ready[0]))
        order.append(pick)
        remaining.remove(pick)
    return [routers[i] for i in order]


class CarePostApp(FastAPI):
    """The ASGI app ``serve`` runs: a FastAPI app whose calls enter through ``front`` when it is
    set (the /t/ fast path, which hands every other request to FastAPI unchanged)."""

    front = None

    async def __call__(self, scope, receive, send) -> None:
        front = self.front
        if front is not None:
            await front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


_frozen = [False]


def _freeze_start_up_objects() -> None:
    """Once per process, when the app starts (models, routes, templates loaded): move what exists
    now out of the garbage collector's generations, so its collections do not walk it again and
    again under load (issue 13, /t/ throughput). Later garbage is collected as usual."""
    if _frozen[0]:
        return
    import gc

    _frozen[0] = True
    gc.collect()
    gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    import importlib

    from carepost.assembly import assemble

    assembly = assemble()  # models, pipeline steps, tasks, events: before the first request
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json, access_log=settings.access_log)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        from carepost.tracking.engagement import recorder

        # The /t/ journal of this process, and its ingester: what a killed process journaled is
        # moved into the database now, not at the next open (issue 13; tracking.engagement_journal).
        try:
            await asyncio.to_thread(recorder().start)
        except Exception as exc:  # noqa: BLE001 - e.g. the database not up yet: opened at the first /t/ request
            log.warning("engagement_journal_not_opened", error_type=type(exc).__name__)
        _freeze_start_up_objects()
        yield
        from carepost.core.database import dispose_engine

        await asyncio.to_thread(recorder().stop)
        dispose_engine()

    app = CarePostApp(
        title="CarePost API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_middleware(app, settings)
    from fastapi.staticfiles import StaticFiles

    from carepost.web.rendering import STATIC_DIR

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    routers = [importlib.import_module(name).router for name in assembly.routers]
    hot = tuple(routers[assembly.routers.index(name)] for name in HOT_ROUTERS if name in assembly.routers)
    for router in matching_order(routers, first=hot):
        app.include_router(router)
    enforce_declared_access(app)
    from carepost.web.openapi import install_openapi

    # The document lists the routes as before the hot routers went first (its tags and paths in
    # the order readers know), whatever order they are matched in.
    place = {id(r): i for i, r in enumerate(matching_order(routers))}

    def listed(routes: list) -> list:
        return sorted(routes, key=lambda route: place.get(id(getattr(route, "original_router", None)), -1))

    # the document as the API behaves (issue 9 item 28)
    install_openapi(app, lambda route: (declared_access(route) or ("public",))[0], listed)
    return app
