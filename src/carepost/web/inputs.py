"""One guard for every text input: control characters are refused with 422 naming the field.

PostgreSQL cannot store NUL in text (psycopg raises, the route answered 500) and SQLite stored it;
other C0/C1 controls, DEL and lone UTF-16 surrogates corrupt exports, headers and terminals. The
guard runs as ASGI middleware before routing, so no route can forget it:

* path parameters and query names and values: no control character at all;
* JSON bodies (every string value and key, at any depth) and URL-encoded form fields: tab, line
  feed and carriage return are allowed (multi-line text is legitimate), nothing else;
* multipart bodies: the ordinary (non-file) fields, the same way; uploaded files are parsed and
  checked by their importers, which report errors per row.

Single-line values with CR/LF (a Subject, a header) are refused by the capability that knows the
value is single-line (``delivery/mime.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# C0 controls, DEL, C1 controls, lone surrogates (JSON "\ud800" decodes to one; it cannot be encoded).
_ANY_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_TEXT_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def has_control_characters(value: str, *, multiline: bool = True) -> bool:
    return bool((_TEXT_CONTROL if multiline else _ANY_CONTROL).search(value))


def _json_field(value, path: list[str]) -> str | None:
    """The dotted location of the first string (or key) with a control character, else None."""
    if isinstance(value, str):
        return ".".join(path) or "body" if _TEXT_CONTROL.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _ANY_CONTROL.search(str(key)):
                return ".".join(path) or "body"
            found = _json_field(item, [*path, str(key)])
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _json_field(item, [*path, str(index)])
            if found:
                return found
    return None


def _pairs_field(pairs: list[tuple[str, str]], *, multiline: bool) -> str | None:
    for name, value in pairs:
        if _ANY_CONTROL.search(name):
            return "query" if not multiline else "body"
        if has_control_characters(value, multiline=multiline):
            return name
    return None


def _path_field(app: ASGIApp, scope: Scope) -> str:
    """Name the path parameter carrying the control character, when a route template matches."""
    from fastapi.routing import iter_route_contexts
    from starlette.routing import compile_path

    path = scope.get("path", "")
    try:
        contexts = list(iter_route_contexts(getattr(app, "routes", [])))
    except Exception:  # noqa: BLE001 - naming the field is best effort; the refusal is not
        return "path"
    for context in contexts:
        template = getattr(context, "path", None)
        if not template or "{" not in template:
            continue
        regex, _format, _convertors = compile_path(template)
        match = regex.match(path)
        if match:
            for name, value in match.groupdict().items():
                if _ANY_CONTROL.search(value):
                    return name
    return "path"


def _multipart_field(body: bytes, content_type: str) -> str | None:
    """The first ordinary (non-file) multipart field with a control character."""
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # pragma: no cover - python-multipart is a dependency
        return None
    _ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        return None
    parts: list[dict] = []
    current: dict = {}
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin():
        current.clear()
        current.update(headers={}, data=bytearray())

    def on_header_field(data, start, end):
        header_field.extend(data[start:end])

    def on_header_value(data, start, end):
        header_value.extend(data[start:end])

    def on_header_end():
        current["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data, start, end):
        if len(current["data"]) < 1_000_000:
            current["data"].extend(data[start:end])

    def on_part_end():
        parts.append(dict(current))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except Exception:  # noqa: BLE001 - a malformed body is the route's to refuse
        return None
    for part in parts:
        disposition = part["headers"].get(b"content-disposition", b"")
        _d, options = parse_options_header(disposition)
        if b"filename" in options:
            continue
        name = options.get(b"name", b"").decode("utf-8", "replace")
        try:
            value = bytes(part["data"]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if has_control_characters(value) or _ANY_CONTROL.search(name):
            return name or "body"
    return None


Refuse = Callable[[Request, str, str], Awaitable[Response]]


class ControlCharacterGuard:
    """ASGI middleware: answers 422 (via ``refuse(request, field, reason)``) before the app sees the input.
    Also refuses ``true``/``false`` where the operation's request schema declares a number (strict types)."""

    # Form bodies of pages that check control characters themselves and answer the page again with
    # the error beside the field (hosted forms): the guard leaves their bodies to them.
    SELF_CHECKED_FORMS = re.compile(r"^/f/[^/]+$")

    def __init__(self, app: ASGIApp, refuse: Refuse, router_app: ASGIApp | None = None):
        self.app = app
        self.refuse = refuse
        self.router_app = router_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        field = None
        if _ANY_CONTROL.search(scope.get("path", "")):
            field = _path_field(self.router_app, scope) if self.router_app is not None else "path"
        if field is None and scope.get("query_string"):
            try:
                query = scope["query_string"].decode("utf-8")
            except UnicodeDecodeError:
                field = "query"
            else:
                field = _pairs_field(parse_qsl(query, keep_blank_values=True), multiline=False)
        if field is not None:
            return await self._refuse(scope, field, send)

        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        kind = (
            "json" if "json" in content_type.split(";")[0]
            else "form" if content_type.startswith("application/x-www-form-urlencoded")
            else "multipart" if content_type.startswith("multipart/form-data")
            else None
        )
        if kind is None or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        if kind in ("form", "multipart") and self.SELF_CHECKED_FORMS.match(scope.get("path", "")):
            return await self.app(scope, receive, send)

        messages: list[Message] = []
        body = bytearray()
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body.extend(message.get("body", b""))
            if not message.get("more_body"):
                break
        field = self._body_field(kind, bytes(body), content_type)
        if field is not None:
            return await self._refuse(scope, field, send)
        if kind == "json" and self.router_app is not None:
            field = self._boolean_for_number(scope, bytes(body))
            if field is not None:
                return await self._refuse(scope, field, send, reason="must be a number, not true or false")

        replay = iter(messages)

        async def replay_receive() -> Message:
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        await self.app(scope, replay_receive, send)

    @staticmethod
    def _body_field(kind: str, body: bytes, content_type: str) -> str | None:
        if not body:
            return None
        if kind == "json":
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return None  # the route's own parser answers 422 for malformed JSON
            return _json_field(document, [])
        if kind == "form":
            try:
                pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                return None
            return _pairs_field(pairs, multiline=True)
        return _multipart_field(body, content_type)

    def _boolean_for_number(self, scope: Scope, body: bytes) -> str | None:
        """Strict types: ``true`` where the operation's schema declares an integer or number."""
        from carepost.web.openapi import boolean_for_number, request_body_schema

        try:
            document = json.loads(body)
            found = request_body_schema(self.router_app, scope.get("method", ""), scope.get("path", ""))
        except Exception:  # noqa: BLE001 - the route's own validation answers
            return None
        if found is None:
            return None
        schema, openapi = found
        return boolean_for_number(document, schema, openapi, [])

    async def _refuse(self, scope: Scope, field: str, send: Send, reason: str = "control characters are not allowed") -> None:
        async def no_body() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        response = await self.refuse(Request(scope, no_body), field, reason)
        await response(scope, no_body, send)
