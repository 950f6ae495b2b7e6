"""The OpenAPI document as the API behaves (issue 9 item 28).

FastAPI documents the success answer and 422; CarePost's routes also answer 400, 401, 403, 404,
409, 413 and 429, in one error shape. Instead of repeating ``responses=`` on every route, the
document is completed here from what each route declares:

* its access declaration (``accounts.access``): a permissioned or authenticated route can answer
  401 (with ``WWW-Authenticate``), 403 and 429 (with ``Retry-After``), and names the security
  schemes; a public route does not;
* its path parameters: 404 (a missing id and an id of another organization look the same);
* its method and body: 400 and 409 for writes, 413 for bodies over the limit, 422 for any input;
* the media types it really answers with (CSV exports, NDJSON).

Routes may still add their own with :func:`error_responses` (the shared helper), which uses the
same schema. ``tests/test_openapi_fuzz.py`` runs schemathesis over the live document and fails on
any 5xx, undocumented status code, content type or schema mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "Stable machine-readable code, e.g. not_found, validation_error."},
                "message": {"type": "string", "description": "What went wrong, for people. Never repeats submitted values."},
                "field": {"type": ["string", "null"], "description": "The input at fault (dotted path), when there is one."},
                "errors": {"type": "array", "items": {"type": "object"}, "description": "Every input at fault (422)."},
            },
        }
    },
}
OAUTH_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
    "description": "RFC 6749 section 5.2 error response.",
}
DESCRIPTIONS = {
    400: "Bad request", 401: "Authentication required (see WWW-Authenticate)", 403: "Permission denied",
    404: "Not found (in the caller's organization)", 405: "Method not allowed (see Allow)",
    409: "Conflict with the current state", 410: "Gone", 413: "Request body too large",
    415: "Unsupported media type", 422: "Invalid input (the field is named)", 429: "Rate limited (see Retry-After)",
}
SECURITY_SCHEMES: dict[str, Any] = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "`Authorization: Bearer <key id>.<secret>` (an API key), or an OAuth 2.0 access token."},
    "basicAuth": {"type": "http", "scheme": "basic", "description": "HTTP Basic with the key id as user name and the secret as password."},
    "oauth2": {"type": "oauth2", "description": "OAuth 2.0 client credentials (RFC 6749 section 4.4); the client is an API key.",
               "flows": {"clientCredentials": {"tokenUrl": "/api/v1/oauth/token", "scopes": {}}}},
    "hmacSignature": {"type": "apiKey", "in": "header", "name": "Authorization",
                      "description": "`CarePost-HMAC-SHA256 Credential=<key id>, Timestamp=<unix seconds>, Nonce=<nonce>, "
                                     "Signature=<base64>`: a signed request, the secret never sent (docs/api.md)."},
}
SECURITY = [{"bearerAuth": []}, {"basicAuth": []}, {"oauth2": []}, {"hmacSignature": []}]

# Media types answered besides JSON, and success codes answered besides the declared one.
CSV = {"text/csv": {"schema": {"type": "string"}}}
EXTRA_CONTENT: dict[tuple[str, str], dict[int, dict]] = {
    ("get", "/api/v1/consent/reports"): {200: CSV},
    ("get", "/api/v1/suppressions/export"): {200: CSV},
    ("get", "/api/v1/imports/{import_id}/errors"): {200: CSV},
}
EXTRA_SUCCESS: dict[tuple[str, str], list[int]] = {
    ("post", "/api/v1/contacts"): [201],  # 201 created, 200 updated (same external id)
}


def error_responses(*codes: int, oauth: bool = False) -> dict[int, dict]:
    """``responses=`` for a route: each code with the shared error schema (the shared helper)."""
    out: dict[int, dict] = {}
    for code in codes:
        # The token endpoints answer RFC 6749 errors; input validation (422) is CarePost's shape.
        schema = OAUTH_ERROR_SCHEMA if oauth and code in (400, 401) else {"$ref": "#/components/schemas/Error"}
        entry: dict[str, Any] = {"description": DESCRIPTIONS.get(code, "Error"),
                                 "content": {"application/json": {"schema": schema}}}
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        if code == 429:
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
        out[code] = entry
    return out


def _codes_for(method: str, path: str, kind: str, operation: dict) -> list[int]:
    codes = {400, 413} if method in ("post", "put", "patch", "delete") else {400}
    if operation.get("parameters") or operation.get("requestBody"):
        codes.add(422)
    if method in ("post", "put", "patch", "delete"):
        codes.update({409, 422})
    if "{" in path:
        codes.add(404)
    if kind != "public" and (operation.get("parameters") or operation.get("requestBody")):
        codes.add(404)  # an id it refers to (in the query or body) is not in the caller's organization
    if kind != "public":
        codes.update({401, 403, 429})
    elif path.startswith("/api/v1/oauth/"):
        codes.update({401})
    return sorted(codes)


def complete_document(app: FastAPI, document: dict, access_kind: Callable[[APIRoute], str]) -> dict:
    """``access_kind(route)``: "public", "authenticated" or "permission" — the app passes
    accounts' reading of the route's access declaration (web imports no capability)."""
    from fastapi.routing import iter_route_contexts

    components = document.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    components["schemas"]["OAuthError"] = OAUTH_ERROR_SCHEMA
    components["securitySchemes"] = SECURITY_SCHEMES
    kinds: dict[tuple[str, str], str] = {}
    for context in iter_route_contexts(app.routes):
        route = context.route
        if isinstance(route, APIRoute):
            kind = access_kind(route)
            for method in context.methods or ():
                kinds[(method.lower(), context.path)] = kind
    for path, item in (document.get("paths") or {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or method not in ("get", "put", "post", "patch", "delete"):
                continue
            kind = kinds.get((method, path), "public")
            responses = operation.setdefault("responses", {})
            oauth = path.startswith("/api/v1/oauth/")
            for code, entry in error_responses(*_codes_for(method, path, kind, operation), oauth=oauth).items():
                existing = responses.get(str(code))
                # The Error shape replaces FastAPI's validation 422, not an answer a route documents
                # in a media type of its own (FHIR's OperationOutcome as application/fhir+json).
                own_media = existing is not None and set(existing.get("content") or {}) - {"application/json"}
                if existing is None or (code == 422 and not own_media):
                    responses[str(code)] = entry
            for code, content in EXTRA_CONTENT.get((method, path), {}).items():
                responses.setdefault(str(code), {"description": "OK"}).setdefault("content", {}).update(content)
            for code in EXTRA_SUCCESS.get((method, path), []):
                ok = responses.get("200") or {"description": "OK"}
                responses.setdefault(str(code), {**ok, "description": "Created"})
            if kind != "public":
                operation["security"] = SECURITY
    return document


def install_openapi(app: FastAPI, access_kind: Callable[[APIRoute], str],
                    listed: Callable[[list], list] | None = None) -> None:
    """Replace ``app.openapi`` with the completed document (built once). ``listed``: the app's
    routes in the order the document lists them (default: the order they are matched in)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            routes = listed(list(app.routes)) if listed is not None else app.routes
            document = get_openapi(title=app.title, version=app.version, routes=routes,
                                   description=app.description or None)
            app.openapi_schema = complete_document(app, document, access_kind)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --------------------------------------------------------------------------- strict numbers
#
# Pydantic's lax mode takes ``true`` for an integer (1) and a number. The document says integer,
# so a boolean is refused with 422 naming the field — checked against the operation's request
# body schema in the one input guard (web/inputs.py), not model by model.

def _resolve(schema: dict, document: dict) -> dict:
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 32:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = document.get("components", {}).get("schemas", {}).get(name, {})
        seen += 1
    return schema if isinstance(schema, dict) else {}


def _types(schema: dict, document: dict) -> set[str]:
    schema = _resolve(schema, document)
    out: set[str] = set()
    kind = schema.get("type")
    if isinstance(kind, list):
        out.update(kind)
    elif isinstance(kind, str):
        out.add(kind)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or []:
            out |= _types(sub, document)
    if not out and not any(k in schema for k in ("anyOf", "oneOf", "allOf")):
        out.add("any")
    return out


def _subschema(schema: dict, document: dict, key) -> dict | None:
    schema = _resolve(schema, document)
    candidates = [schema, *[_resolve(s, document) for k in ("anyOf", "oneOf", "allOf") for s in schema.get(k) or []]]
    for candidate in candidates:
        if isinstance(key, int) and "items" in candidate:
            return candidate["items"]
        if isinstance(key, str):
            props = candidate.get("properties") or {}
            if key in props:
                return props[key]
            extra = candidate.get("additionalProperties")
            if isinstance(extra, dict):
                return extra
    return None


def boolean_for_number(value, schema: dict, document: dict, path: list[str]) -> str | None:
    """The dotted field where ``value`` holds a boolean the schema declares a number, else None."""
    if isinstance(value, bool):
        types = _types(schema, document)
        if types & {"integer", "number"} and not types & {"boolean", "any"}:
            return ".".join(path) or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            sub = _subschema(schema, document, str(key))
            if sub is not None:
                found = boolean_for_number(item, sub, document, [*path, str(key)])
                if found:
                    return found
    elif isinstance(value, list):
        sub = _subschema(schema, document, 0)
        if sub is not None:
            for index, item in enumerate(value):
                found = boolean_for_number(item, sub, document, [*path, str(index)])
                if found:
                    return found
    return None


_ROUTE_TABLES: dict[int, tuple[FastAPI, list]] = {}
_ROUTE_SCHEMAS: dict[int, tuple[object, tuple[dict, dict] | None]] = {}


def _route_table(app: FastAPI) -> list:
    entry = _ROUTE_TABLES.get(id(app))
    if entry is None or entry[0] is not app:
        from fastapi.routing import APIRoute, iter_route_contexts
        from starlette.routing import compile_path

        table = []
        for context in iter_route_contexts(app.routes):
            template = getattr(context, "path", None)
            if template and isinstance(context.route, APIRoute):
                table.append((compile_path(template)[0], set(context.methods or ()), context.route))
        entry = _ROUTE_TABLES[id(app)] = (app, table)
    return entry[1]


def _route_body_schema(route) -> tuple[dict, dict] | None:
    """The JSON schema of a route's body, from its own body field (not the whole document: that
    costs seconds to build, and this runs on the first request of every app)."""
    cached = _ROUTE_SCHEMAS.get(id(route))
    if cached is None or cached[0] is not route:
        result = None
        field = getattr(route, "body_field", None)
        annotation = getattr(getattr(field, "field_info", None), "annotation", None)
        if annotation is not None:
            from pydantic import TypeAdapter

            try:
                schema = TypeAdapter(annotation).json_schema(ref_template="#/components/schemas/{model}")
            except Exception:  # noqa: BLE001 - no schema, no strictness check
                schema = None
            if schema:
                result = (schema, {"components": {"schemas": schema.pop("$defs", {})}})
        cached = _ROUTE_SCHEMAS[id(route)] = (route, result)
    return cached[1]


def request_body_schema(app: FastAPI, method: str, path: str) -> tuple[dict, dict] | None:
    """(JSON request body schema, its definitions) of the route ``method path`` reaches, if any."""
    for regex, methods, route in _route_table(app):
        if method in methods and regex.match(path):
            return _route_body_schema(route)
    return None


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods some route answers on ``path``, for the ``Allow`` header of a 405."""
    methods: set[str] = set()
    for regex, route_methods, _route in _route_table(app):
        if regex.match(path):
            methods |= route_methods
    if "GET" in methods:
        methods.add("HEAD")
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods, key=lambda m: order.index(m) if m in order else len(order))
