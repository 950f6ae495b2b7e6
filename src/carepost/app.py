"""The ASGI app: the routers the composition root (``carepost.assembly``) names, and the
cross-cutting middleware."""

from __future__ import annotations

import functools
import re
import time
from contextlib import asynccontextmanager

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
        log.error("unhandled_error", error_type=type(exc).__name__, path_template=_route_template(request))
        return _error_response(request, 500, {"code": "internal_error", "message": "Something went wrong. The error was logged."})


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

    @app.middleware("http")
    async def _headers_and_ids(request: Request, call_next):
        request.state.request_id = accepted_request_id(request.headers.get("x-request-id"))
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.state.request_id
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if settings.base_url.startswith("https://"):
            response.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
        path = request.url.path
        if not path.startswith(("/static/", "/b/")):  # /b/: an organization's public logo and colours, no PHI
            # PHI may be on any API response or page: never cache (ASVS 8.2.1).
            response.headers["Cache-Control"] = "no-store"
            response.headers["Pragma"] = "no-cache"
        observe_request(request.method, _route_template(request), response.status_code, time.perf_counter() - started)
        return response

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    # In front of the whole app: the open pixel and click redirects (/t/o/, /t/c/) are answered
    # before FastAPI itself (its telemetry, Starlette's error middleware, the body limit), the
    # middleware above and routing, with the same security headers (issue 13;
    # carepost.tracking.engagement_pages): CarePostApp.__call__ enters through ``app.front``.
    from carepost.tracking.engagement_pages import EngagementFastPath

    fast_headers = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
                    (b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
    if settings.base_url.startswith("https://"):
        fast_headers.append((b"strict-transport-security", b"max-age=31536000; includeSubDomains"))
    app.front = EngagementFastPath(functools.partial(FastAPI.__call__, app), headers=fast_headers,
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
    configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        _freeze_start_up_objects()
        yield
        from carepost.core.database import dispose_engine

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
    for module_name in assembly.routers:
        module = importlib.import_module(module_name)
        app.include_router(module.router)
    enforce_declared_access(app)
    from carepost.web.openapi import install_openapi

    # the document as the API behaves (issue 9 item 28)
    install_openapi(app, lambda route: (declared_access(route) or ("public",))[0])
    return app
