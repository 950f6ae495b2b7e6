"""Issue 9, API hardening: request ids, denied cross-tenant attempts, control characters,
401 challenges. Every test runs on SQLCipher and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from carepost.accounts import credentials as creds


@pytest.fixture
def api(app, session, org):
    """A TestClient authenticated with a real API key of ``org`` holding only contacts:import."""
    cred, secret = creds.create_credential(session, org.id, name="Narrow key", scopes=["contacts:import"],
                                           rate_limit_per_minute=100_000)
    session.commit()
    client = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {cred.key_id}.{secret}"
    return client


def _denied_events(org_id: str):
    from carepost.audit.models import AuditEvent
    from carepost.core.database import read_only_session

    with read_only_session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.chain == org_id,
                                                        AuditEvent.action == "access.denied")))


# --------------------------------------------------------------------------- item 22


@pytest.mark.parametrize("supplied", [
    "jane.doe@example.org",          # an e-mail address
    "Jane Quinlan-Doe",              # a name
    "555-867-5309",                  # a phone number
    "r" * 500,                       # overlong
    "0123456789abcdef0123456789abcdef\nX-Injected: 1",  # header smuggling
    "../../etc/passwd",
])
def test_a_client_request_id_that_is_not_a_trace_id_is_replaced(api, org, supplied):
    response = api.get("/api/v1/contacts", headers={"X-Request-Id": supplied})
    assert response.status_code == 403  # the key lacks phi:read_masked: an audited denial
    returned = response.headers["x-request-id"]
    assert returned != supplied and len(returned) == 32
    [event] = _denied_events(org.id)
    assert event.request_id == returned


@pytest.mark.parametrize("supplied", [
    "4bf92f3577b34da6a3ce929d0e0e4736",          # W3C trace id
    "3fa85f64-5717-4562-b3fc-2c963f66afa6",      # UUID
])
def test_a_well_formed_request_id_is_kept(api, org, supplied):
    response = api.get("/api/v1/contacts", headers={"X-Request-Id": supplied})
    assert response.status_code == 403
    assert response.headers["x-request-id"] == supplied
    [event] = _denied_events(org.id)
    assert event.request_id == supplied
