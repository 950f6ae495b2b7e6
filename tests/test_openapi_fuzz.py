"""Issue 9 item 28: the OpenAPI document describes the API as it behaves.

schemathesis runs over the LIVE document (``GET /api/v1/openapi.json`` of the assembled app,
in-process through its ASGI support), authenticated with a real API key holding every API scope,
on SQLCipher and PostgreSQL. Any 5xx, undocumented status code or content type, or a response
that violates its documented schema fails the test. Bounded: a few examples per operation
(``CAREPOST_FUZZ_EXAMPLES``, default 2), derandomized so a failure reproduces.
"""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from carepost.accounts import credentials as creds

EXAMPLES = int(os.environ.get("CAREPOST_FUZZ_EXAMPLES", "2"))


@pytest.fixture
def document(app):
    return TestClient(app).get("/api/v1/openapi.json").json()


def test_the_document_declares_every_security_scheme(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["basicAuth"]["scheme"] == "basic"
    assert schemes["oauth2"]["flows"]["clientCredentials"]["tokenUrl"] == "/api/v1/oauth/token"
    assert schemes["hmacSignature"]["in"] == "header" and "CarePost-HMAC-SHA256" in schemes["hmacSignature"]["description"]


def test_every_protected_operation_documents_its_errors(document):
    assert "Error" in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            if operation.get("security"):
                for code in ("401", "403", "429"):
                    assert code in responses, (method, path, code)
                assert "WWW-Authenticate" in responses["401"]["headers"]
            if "{" in path:
                assert "404" in responses, (method, path)
            if method in ("post", "put", "patch"):
                assert {"409", "413", "422"} <= set(responses), (method, path)


def test_csv_answers_are_documented_as_csv(document):
    assert "text/csv" in document["paths"]["/api/v1/suppressions/export"]["get"]["responses"]["200"]["content"]
    assert "text/csv" in document["paths"]["/api/v1/consent/reports"]["get"]["responses"]["200"]["content"]


def test_the_facts_routes_do_not_shadow_the_consent_evidence_route(app, session, org):
    cred, secret = creds.create_credential(session, org.id, name="Shadow", scopes=["phi:read_masked", "phi:write",
                                                                                     "consent:manage"])
    session.commit()
    client = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {cred.key_id}.{secret}"
    contact = "0" * 32
    response = client.patch(f"/api/v1/contacts/{contact}/consent/evidence", json={"display": "x"})
    # The evidence export is GET only: 405 naming it, not the facts route's "no such kind".
    assert response.status_code == 405, response.text
    assert response.headers["allow"] in ("GET", "GET, HEAD")
    assert client.patch(f"/api/v1/contacts/{contact}/conditions/{contact}", json={"display": "x"}).status_code == 404


@pytest.mark.slow
def test_schemathesis_over_the_live_document_finds_nothing(app, session, org):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks

    cred, secret = creds.create_credential(session, org.id, name="Fuzzer", scopes=sorted(__import__(
        "carepost.accounts.permissions", fromlist=["API_SCOPES"]).API_SCOPES), rate_limit_per_minute=100_000)
    session.commit()
    headers = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    selected = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                checks.response_schema_conformance]
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            case.call_and_validate(headers=headers, checks=selected)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every failure is reported below
            failures[operation.label] = str(exc)[:800]
    assert operations > 50
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in sorted(failures.items()))


def test_a_boolean_where_an_integer_is_declared_is_refused(app, session, org):
    """Strict types: pydantic's lax mode read ``true`` as 1; the document says integer."""
    cred, secret = creds.create_credential(session, org.id, name="Strict", scopes=["consent:manage", "phi:write",
                                                                                     "phi:read_masked"])
    session.commit()
    client = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {cred.key_id}.{secret}"
    response = client.post("/api/v1/eligibility", json={"contact_ids": ["0" * 32], "purpose": "treatment",
                                                        "prescription_lapsed_days": True})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "prescription_lapsed_days" and "not true or false" in error["message"]
    # A boolean where a boolean is declared, and a number where a number is, still pass the guard.
    assert client.post("/api/v1/contacts", json={"given_name": "Ann", "deceased": False}).status_code in (200, 201)
    assert client.post("/api/v1/eligibility", json={"contact_ids": ["0" * 32], "purpose": "treatment",
                                                    "prescription_lapsed_days": 30}).status_code != 422


def test_405_names_every_method_of_the_path(app, session, org):
    cred, secret = creds.create_credential(session, org.id, name="Allow", scopes=["webhooks:manage"])
    session.commit()
    client = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {cred.key_id}.{secret}"
    response = client.put("/api/v1/webhooks", json={})
    assert response.status_code == 405
    # GET (list) and POST (add) are separate routes on the same path: both are named.
    assert [m.strip() for m in response.headers["allow"].split(",")] == ["GET", "HEAD", "POST"]
