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
                                                        AuditEvent.action == "access.denied")
                                                   .order_by(AuditEvent.seq)))


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


# --------------------------------------------------------------------------- item 26


@pytest.fixture
def full_api(app, session, org):
    """A TestClient with a real API key of ``org`` holding every API scope."""
    from carepost.accounts.permissions import API_SCOPES

    cred, secret = creds.create_credential(session, org.id, name="Full key", scopes=sorted(API_SCOPES),
                                           rate_limit_per_minute=100_000)
    session.commit()
    client = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {cred.key_id}.{secret}"
    return client


NUL = "\x00"
# (method, path, json body or None, the field the 422 must name) — the inputs of the fuzzing report.
CONTROL_CASES = [
    ("POST", "/api/v1/contacts", {"given_name": "Ann", "city": f"Spring{NUL}field"}, "city"),
    ("POST", "/api/v1/contacts", {"given_name": "Ann", "state": f"M{NUL}A"}, "state"),
    ("POST", "/api/v1/contacts", {"given_name": "Ann", "gender_identity": f"x{NUL}"}, "gender_identity"),
    ("POST", "/api/v1/contacts", {"given_name": "Ann", "city": "Bell\x07ville"}, "city"),
    ("POST", "/api/v1/contacts", {"given_name": "Ann", "city": "Lone\ud800surrogate"}, "city"),
    ("GET", "/api/v1/contacts?city=a%00b", None, "city"),
    ("GET", "/api/v1/contacts?state=%00", None, "state"),
    ("POST", "/api/v1/templates", {"name": f"Rem{NUL}inder", "subject": "Hello", "text": "Hi"}, "name"),
    ("POST", "/api/v1/templates", {"name": "Reminder", "subject": "Hello", "text": f"Hi{NUL}"}, "text"),
    ("POST", "/api/v1/forms", {"name": f"Intake{NUL}"}, "name"),
    ("POST", "/api/v1/contact-attributes", {"key": "pet", "label": f"Pet{NUL}", "type": "text"}, "label"),
    ("POST", "/api/v1/imports/mappings", {"name": f"Map{NUL}", "columns": {"Email": "email"}}, "name"),
    ("POST", "/api/v1/eligibility", {"contact_ids": [f"abc{NUL}"], "purpose": "treatment"}, "contact_ids.0"),
    ("GET", "/api/v1/webhooks/a%00b", None, "endpoint_id"),
    ("GET", "/api/v1/templates/a%01b", None, "template_id"),
]


@pytest.mark.parametrize("method,path,body,field", CONTROL_CASES)
def test_control_characters_are_refused_with_422_naming_the_field(full_api, session, org, method, path, body, field):
    from carepost.patients.models import Contact

    if body is None:
        response = full_api.request(method, path)
    else:
        # Serialized by hand: a lone surrogate cannot be encoded by httpx's json=.
        import json

        response = full_api.request(method, path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 422, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["field"] == field
    assert "control characters" in error["message"]
    assert NUL not in response.text and "\\u0000" not in response.text
    assert session.scalars(select(Contact).where(Contact.org_id == org.id)).first() is None


def test_tab_and_line_breaks_stay_allowed_in_text(full_api):
    # the one guard lets tab and line breaks through in multi-line text (a one-line field such as a
    # template's name refuses them by its own schema)
    response = full_api.post("/api/v1/templates", json={"name": "Multi line", "subject": "Hello",
                                                          "text": "Line one\r\nLine two\n\tindented"})
    assert response.status_code == 201, response.text


def test_form_fields_of_pages_are_guarded_too(client):
    page = client.get("/app/login")
    from tests.fixtures.accounts import csrf_from

    response = client.post("/app/login", data={"email": f"a{NUL}@example.org", "password": "x",
                                               "csrf_token": csrf_from(page.text)},
                           headers={"accept": "application/json"}, follow_redirects=False)
    assert response.status_code == 422 and response.json()["error"]["field"] == "email"


def test_multipart_text_fields_are_guarded(client):
    response = client.post("/app/recipient-keys", data={"address": f"ann{NUL}@example.org", "kind": "pgp"},
                           files={"key_file": ("key.asc", b"-----BEGIN PGP PUBLIC KEY BLOCK-----\x00", "text/plain")})
    assert response.status_code == 422 and response.json()["error"]["field"] == "address"
    # A file's bytes are its importer's to judge: NUL inside the file alone is not refused here.
    response = client.post("/app/recipient-keys", data={"address": "ann@example.org", "kind": "pgp"},
                           files={"key_file": ("key.asc", b"binary\x00key", "application/octet-stream")})
    assert response.status_code != 422


# --------------------------------------------------------------------------- item 25


def _key_client(app, session, org_id: str, name: str) -> TestClient:
    from carepost.accounts.permissions import API_SCOPES

    cred, secret = creds.create_credential(session, org_id, name=name, scopes=sorted(API_SCOPES),
                                           rate_limit_per_minute=100_000)
    session.commit()
    client = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {cred.key_id}.{secret}"
    return client


def test_probing_another_organizations_ids_is_audited_with_the_same_404(app, session, org, make_user):
    from carepost.accounts.service import create_organization
    from carepost.audit.models import AuditEvent
    from carepost.core.ids import new_id
    from tests.fixtures.accounts import login_client

    other = create_organization(session, "Zeta Probe Clinic")
    session.commit()
    a = _key_client(app, session, org.id, "Alpha")
    b = _key_client(app, session, other.id, "Zeta")
    created = b.post("/api/v1/contacts", json={"given_name": "Zed", "family_name": "Zeta", "city": "Zetaville"})
    assert created.status_code in (200, 201), created.text
    b_contact = created.json()["id"]
    b_template = b.post("/api/v1/templates", json={"name": "Zeta", "subject": "Hello", "text": "Hi"}).json()["id"]
    nowhere = new_id()

    probes = [
        ("GET", f"/api/v1/contacts/{b_contact}", "contact"),
        ("PATCH", f"/api/v1/contacts/{b_contact}", "contact"),
        ("DELETE", f"/api/v1/contacts/{b_contact}", "contact"),
        ("GET", f"/api/v1/templates/{b_template}", "template"),
    ]
    for method, path, kind in probes:
        kwargs = {"json": {"city": "Alphaville"}} if method == "PATCH" else {}
        probe = a.request(method, path, **kwargs)
        miss = a.request(method, path.rsplit("/", 1)[0] + "/" + nowhere, **kwargs)
        assert probe.status_code == miss.status_code == 404, (path, probe.text)
        assert probe.json() == miss.json()  # nothing tells the caller the id exists
    # A signed-in owner of A through the web UI.
    owner = make_user(org, role="owner")
    web = TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False)
    login_client(web, owner)
    assert web.get(f"/api/v1/contacts/{b_contact}").status_code == 404

    from carepost.core.database import read_only_session

    with read_only_session() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.action == "access.denied")
                                .order_by(AuditEvent.seq)))
        b_events = list(s.scalars(select(AuditEvent).where(AuditEvent.chain == other.id,
                                                           AuditEvent.action == "access.denied")))
    probed = [e for e in events if e.target_id in (b_contact, b_template)]
    assert len(probed) == len(probes) + 1
    for event, (method, _path, kind) in zip(probed, probes, strict=False):
        assert event.outcome == "denied" and event.details["reason"] == "not_found_in_org"
        assert event.target_type == kind and event.details["method"] == method
        assert event.request_id
    assert probed[-1].actor_type == "user" and probed[-1].actor_id == owner.id
    assert sum(1 for e in events if e.target_id == nowhere) == len(probes)  # misses are recorded alike
    assert b_events == []  # B's chain learns nothing of A's probes; A's compliance view sees them


def test_a_free_text_path_value_is_stored_hashed(app, session, org):
    from carepost.audit.models import AuditEvent
    from carepost.core.database import read_only_session

    a = _key_client(app, session, org.id, "Alpha")
    response = a.get("/api/v1/contacts/jane.doe@example.org")
    assert response.status_code == 404
    with read_only_session() as s:
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.action == "access.denied"))
    assert event.target_id.startswith("sha256:") and "jane" not in str(event.details)
