"""Cross-cutting behavior of the assembled app: headers, caching, body limits, validation errors
that never echo input, deny by default, error bodies, metrics and readiness."""

from __future__ import annotations

import json

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from carepost.accounts.access import public, require
from carepost.app import CSP, create_app, enforce_declared_access
from carepost.core.config import Settings

SSN = "123-45-6789"
EMAIL = "jane.doe@example.org"


class ContactIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    given_name: str
    birth_year: int


def probe_router() -> APIRouter:
    """Routes that exercise the app's real middleware and error handlers on a body model that
    forbids unknown fields (as every CarePost schema does)."""
    router = APIRouter()

    @router.post("/api/v1/_probe/contacts", dependencies=[Depends(public("test probe"))])
    def create_contact(body: ContactIn) -> dict:
        return {"ok": True}

    @router.get("/api/v1/_probe/contacts/{contact_id}", dependencies=[Depends(public("test probe"))])
    def read_contact(contact_id: str) -> dict:
        return {"id": contact_id}

    return router


@pytest.fixture
def probe_client(db):
    app = create_app(Settings(max_upload_bytes=1024))
    app.include_router(probe_router())
    with TestClient(app, base_url="http://localhost:8000") as c:
        yield c


# --------------------------------------------------------------------------- headers


SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}


@pytest.mark.parametrize(
    ("path", "accept"),
    [
        ("/app/login", "text/html"),  # a page
        ("/healthz", "application/json"),  # the API
        ("/api/v1/me", "application/json"),  # an API error (401)
        ("/nowhere", "text/html"),  # an HTML error page
        ("/api/docs", "text/html"),
    ],
)
def test_security_headers_and_no_store_everywhere(client, path, accept):
    response = client.get(path, headers={"accept": accept}, follow_redirects=False)
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name
    csp = response.headers["content-security-policy"]
    assert csp == CSP
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"]
    assert "server" not in response.headers or "uvicorn" not in response.headers["server"].lower()


def test_static_assets_may_be_cached_but_carry_security_headers(client):
    response = client.get("/static/app.css")
    assert response.status_code == 200
    assert response.headers.get("cache-control") != "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_hsts_only_when_served_over_https(db):
    plain = TestClient(create_app(Settings(base_url="http://localhost:8000")))
    assert "strict-transport-security" not in plain.get("/healthz").headers
    tls = TestClient(create_app(Settings(base_url="https://carepost.clinic.example")))
    assert tls.get("/healthz").headers["strict-transport-security"].startswith("max-age=31536000")


def test_request_id_is_bounded(client):
    # Not a trace id (hex, 16-64 characters): replaced by a new id (issue 9 item 22).
    response = client.get("/healthz", headers={"x-request-id": "r" * 500})
    assert len(response.headers["x-request-id"]) == 32 and response.headers["x-request-id"] != "r" * 32


# --------------------------------------------------------------------------- request bodies


def test_body_over_the_limit_by_content_length_is_413(probe_client):
    response = probe_client.post("/api/v1/_probe/contacts", content=b"x" * 2048, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_body_over_the_limit_streamed_without_content_length_is_413(probe_client):
    def chunks():
        yield b'{"given_name": "'
        for _ in range(40):
            yield b"A" * 100
        yield b'", "birth_year": 1980}'

    response = probe_client.post("/api/v1/_probe/contacts", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "AAAA" not in response.text


def test_body_within_the_limit_is_accepted(probe_client):
    response = probe_client.post("/api/v1/_probe/contacts", json={"given_name": "Jane", "birth_year": 1980})
    assert response.status_code == 200


def test_oversized_body_on_a_real_route_is_413(db):
    client = TestClient(create_app(Settings(max_upload_bytes=512)))
    response = client.post("/api/v1/oauth/token", content=b"grant_type=client_credentials&x=" + b"y" * 1024,
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413


def test_malformed_json_is_422_and_does_not_echo_the_body(probe_client):
    body = '{"given_name": "' + EMAIL + '", "birth_year": ' + SSN
    response = probe_client.post("/api/v1/_probe/contacts", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert EMAIL not in response.text and SSN not in response.text and "jane" not in response.text.lower()


def test_unknown_field_is_422_naming_the_field_without_its_value(probe_client):
    response = probe_client.post(
        "/api/v1/_probe/contacts", json={"given_name": "Jane", "birth_year": 1980, "ssn": SSN}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "ssn"
    assert "ssn" in error["message"]
    assert SSN not in response.text


def test_wrong_type_names_the_field_and_reason_without_the_value(probe_client):
    response = probe_client.post("/api/v1/_probe/contacts", json={"given_name": "Jane Doe", "birth_year": EMAIL})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "birth_year"
    assert error["errors"][0]["reason"]
    assert EMAIL not in response.text and "Jane Doe" not in response.text


def test_missing_field_is_named(probe_client):
    response = probe_client.post("/api/v1/_probe/contacts", json={"birth_year": 1980})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "given_name"


# --------------------------------------------------------------------------- deny by default


def test_a_route_without_an_access_declaration_is_refused():
    app = FastAPI()

    @app.get("/api/v1/forgotten")
    def forgotten() -> dict:
        return {}

    with pytest.raises(RuntimeError, match="/api/v1/forgotten"):
        enforce_declared_access(app)


def test_an_undeclared_route_in_an_included_router_is_refused_too():
    app = FastAPI()
    router = APIRouter(prefix="/api/v1")

    @router.get("/declared", dependencies=[Depends(require("users:read"))])
    def declared() -> dict:
        return {}

    @router.post("/undeclared")
    def undeclared() -> dict:
        return {}

    app.include_router(router)
    with pytest.raises(RuntimeError) as exc:
        enforce_declared_access(app)
    assert "/api/v1/undeclared" in str(exc.value) and "/api/v1/declared" not in str(exc.value)


def api_routes(app) -> list[tuple[str, set[str], APIRoute]]:
    """(full path, methods, route) of every endpoint, through included routers."""
    from fastapi.routing import iter_route_contexts

    return [
        (ctx.path, set(ctx.methods or ()), ctx.route)
        for ctx in iter_route_contexts(app.routes)
        if isinstance(ctx.route, APIRoute)
    ]


def test_every_route_of_the_app_declares_its_access(db):
    from carepost.accounts.access import declared_access

    routes = api_routes(create_app())
    assert len(routes) > 10
    for path, _methods, route in routes:
        kind = declared_access(route)
        assert kind is not None, path
        assert kind[0] in ("permission", "authenticated", "public"), path
        if kind[0] == "public":
            assert kind[1] and kind[1][0].strip(), f"{path}: a public route says why"


def test_protected_api_routes_refuse_anonymous_callers(client):
    import re

    from carepost.accounts.access import declared_access

    checked = 0
    for template, methods, route in api_routes(client.app):
        if not template.startswith("/api/v1") or declared_access(route)[0] == "public":
            continue
        path = re.sub(r"\{[^}:]+:fact_kind\}", "conditions", template)  # a converter takes only its values
        path = re.sub(r"\{[^}]+\}", "0" * 32, path)
        method = sorted(methods - {"HEAD"})[0]
        response = client.request(method, path, headers={"accept": "application/json"})
        assert response.status_code == 401, f"{method} {template} -> {response.status_code}"
        checked += 1
    assert checked > 0


# --------------------------------------------------------------------------- errors


def test_404_body_is_json_for_the_api_and_does_not_echo_the_path(client):
    response = client.get(f"/api/v1/patients/{EMAIL}")
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert EMAIL not in response.text


def test_404_page_for_browsers(client):
    response = client.get("/app/nothing-here", headers={"accept": "text/html"})
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "nothing-here" not in response.text


def test_405_body(client):
    response = client.delete("/healthz")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "allow" in {k.lower() for k in response.headers}


def test_unexpected_errors_are_500_without_details(db):
    app = create_app()
    router = APIRouter()

    @router.get("/api/v1/_probe/boom", dependencies=[Depends(public("test probe"))])
    def boom() -> dict:
        raise ValueError(f"lookup failed for {EMAIL}")

    app.include_router(router)
    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/api/v1/_probe/boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert EMAIL not in response.text and "ValueError" not in response.text


# --------------------------------------------------------------------------- health, readiness, metrics


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_readyz_checks_the_database(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "queue": "ok"}}


def test_readyz_is_503_when_the_database_is_unreachable(client, monkeypatch):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from carepost.dashboard import api as web_api

    unreachable = sessionmaker(create_engine("postgresql+psycopg://carepost@127.0.0.1:1/none", connect_args={"connect_timeout": 2}))
    monkeypatch.setattr(web_api, "session_factory", lambda: unreachable)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith("error: ")
    assert "127.0.0.1" not in response.text  # the error type only, no connection details


def test_metrics_label_requests_by_route_template_not_raw_path(probe_client):
    contact_id = "f" * 32
    assert probe_client.get(f"/api/v1/_probe/contacts/{contact_id}").status_code == 200
    probe_client.get(f"/api/v1/no-such/{EMAIL}")
    text = probe_client.get("/metrics").text
    assert "carepost_http_requests_total" in text
    assert 'route="/api/v1/_probe/contacts/{contact_id}"' in text
    assert 'route="unmatched"' in text
    assert contact_id not in text and EMAIL not in text and "jane" not in text


def test_metrics_expose_counters_and_latency(client):
    client.get("/healthz")
    text = client.get("/metrics").text
    assert 'carepost_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert "carepost_http_request_seconds_bucket" in text
    json.dumps(text)  # plain text exposition
