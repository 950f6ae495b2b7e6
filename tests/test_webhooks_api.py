"""The webhooks REST API and UI routes over TestClient: CRUD with the secret shown once, the
delivery log, replay, test events, permissions, PHI opt-in, validation errors naming the field,
audit events, and pages that render the log."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from carepost.accounts import credentials as creds
from tests.fixtures.accounts import csrf_from, login_client
from tests.test_webhooks import _receiver, allow_private, immediate, independent_verify, receiver  # noqa: F401


@pytest.fixture
def key(session):
    def make(org_id, scopes=("webhooks:manage",)):
        cred, secret = creds.create_credential(session, org_id, name="Webhooks test", scopes=list(scopes))
        session.commit()
        return {"Authorization": f"Bearer {cred.key_id}.{secret}"}

    return make


def _audit(session, action):
    from carepost.audit.models import AuditEvent

    session.rollback()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_crud_and_secret_shown_once(client, session, org, key, receiver, allow_private, immediate):
    h = key(org.id)
    types = client.get("/api/v1/webhook-event-types", headers=h).json()
    assert {"message.delivered", "message.bounced", "message.complained", "webhook.test"} <= {t["type"] for t in types}

    r = client.post("/api/v1/webhooks", json={"url": receiver.url(), "event_types": ["message.bounced"],
                                               "description": "Billing system"}, headers=h)
    assert r.status_code == 201, r.text
    created = r.json()
    secret = created["secret"]
    assert secret.startswith("whsec_") and created["secret_hint"].endswith(secret[-4:])
    endpoint_id = created["id"]
    listed = client.get("/api/v1/webhooks", headers=h).json()
    assert [e["id"] for e in listed] == [endpoint_id]
    assert "secret" not in listed[0] and secret not in client.get(f"/api/v1/webhooks/{endpoint_id}", headers=h).text

    r = client.patch(f"/api/v1/webhooks/{endpoint_id}", json={"event_types": ["*"], "description": "All of it"}, headers=h)
    assert r.status_code == 200 and r.json()["event_types"] == ["*"]

    r = client.post(f"/api/v1/webhooks/{endpoint_id}/test-event", headers=h)
    assert r.status_code == 202 and r.json()["event_type"] == "webhook.test"
    [request] = receiver.wait(1)
    assert independent_verify(secret, request.headers, request.body)["type"] == "webhook.test"

    rotated = client.post(f"/api/v1/webhooks/{endpoint_id}/rotate-secret", headers=h).json()["secret"]
    assert rotated != secret
    client.post(f"/api/v1/webhooks/{endpoint_id}/test-event", headers=h)
    second = receiver.wait(2)[1]
    independent_verify(rotated, second.headers, second.body)

    log = client.get(f"/api/v1/webhooks/{endpoint_id}/deliveries", headers=h).json()
    assert [d["status"] for d in log] == ["succeeded", "succeeded"]
    assert log[0]["log"][0]["status_code"] == 204 and log[0]["log"][0]["duration_ms"] is not None
    r = client.post(f"/api/v1/webhooks/{endpoint_id}/deliveries/{log[1]['id']}/replay", headers=h)
    assert r.status_code == 202 and r.json()["replay_of"] == log[1]["id"]
    assert len(receiver.wait(3)) == 3
    assert client.get(f"/api/v1/webhooks/{endpoint_id}/deliveries?status=failed", headers=h).json() == []

    assert client.delete(f"/api/v1/webhooks/{endpoint_id}", headers=h).status_code == 204
    assert client.get(f"/api/v1/webhooks/{endpoint_id}", headers=h).status_code == 404
    actions = ["webhook.create", "webhook.update", "webhook.test_event", "webhook.rotate_secret", "webhook.replay",
               "webhook.delete"]
    for action in actions:
        events = _audit(session, action)
        assert events and all(secret not in str(e.details) and rotated not in str(e.details) for e in events), action


def test_pause_and_resume(client, org, key, receiver, allow_private, immediate):
    h = key(org.id)
    endpoint_id = client.post("/api/v1/webhooks", json={"url": receiver.url(), "event_types": ["*"]}, headers=h).json()["id"]
    assert client.patch(f"/api/v1/webhooks/{endpoint_id}", json={"enabled": False}, headers=h).json()["enabled"] is False
    r = client.post(f"/api/v1/webhooks/{endpoint_id}/test-event", headers=h)
    assert r.status_code == 409 and r.json()["error"]["field"] == "enabled"
    assert client.patch(f"/api/v1/webhooks/{endpoint_id}", json={"enabled": True}, headers=h).json()["enabled"] is True
    assert client.post(f"/api/v1/webhooks/{endpoint_id}/test-event", headers=h).status_code == 202


@pytest.mark.parametrize("body, field", [
    ({"url": "http://127.0.0.1:9/x", "event_types": ["*"]}, "url"),
    ({"url": "http://169.254.169.254/latest", "event_types": ["*"]}, "url"),
    ({"url": "https://user:pw@example.org/x", "event_types": ["*"]}, "url"),
    ({"url": "https://example.org/x", "event_types": ["message.nope"]}, "event_types"),
    ({"url": "https://example.org/x", "event_types": []}, "event_types"),
    ({"url": "https://example.org/x", "event_types": ["*"], "extra": 1}, "extra"),
    ({"url": "https://example.org/x", "event_types": ["*"], "description": "a\nb"}, "description"),
    ({"url": "https://example.org/x", "event_types": ["*"], "include_phi": True}, "include_phi"),
])
def test_bad_input_names_the_field(client, org, key, body, field):
    r = client.post("/api/v1/webhooks", json=body, headers=key(org.id))
    assert r.status_code == 422, r.text
    text = r.text
    assert field in text
    assert "169.254.169.254" not in text or field == "url"


def test_include_phi_needs_phi_read_unmasked(client, org, key, allow_private):
    url = "https://localhost:9/hooks"
    r = client.post("/api/v1/webhooks", json={"url": url, "event_types": ["*"], "include_phi": True}, headers=key(org.id))
    assert r.status_code == 422 and r.json()["error"]["field"] == "include_phi"
    h = key(org.id, ("webhooks:manage", "phi:read_unmasked"))
    r = client.post("/api/v1/webhooks", json={"url": url, "event_types": ["*"], "include_phi": True}, headers=h)
    assert r.status_code == 201 and r.json()["include_phi"] is True
    # Without the permission, nobody can point a PHI endpoint elsewhere.
    r = client.patch(f"/api/v1/webhooks/{r.json()['id']}", json={"url": "https://localhost:10/other"}, headers=key(org.id))
    assert r.status_code == 422 and r.json()["error"]["field"] == "include_phi"


def test_permission_required(client, org, key):
    h = key(org.id, ("messages:read",))
    assert client.get("/api/v1/webhooks", headers=h).status_code == 403
    assert client.post("/api/v1/webhooks", json={"url": "https://example.org/", "event_types": ["*"]},
                       headers=h).status_code == 403


def test_other_organizations_endpoints_are_invisible(client, session, org, key, allow_private):
    from carepost.accounts.service import create_organization
    from carepost.tracking.service import create_endpoint

    other = create_organization(session, "Zeta Clinic")
    row, _ = create_endpoint(session, other.id, url="http://127.0.0.1:9/zeta", event_types=["*"])
    session.commit()
    h = key(org.id)
    assert client.get("/api/v1/webhooks", headers=h).json() == []
    for method, path in (("GET", f"/api/v1/webhooks/{row.id}"), ("PATCH", f"/api/v1/webhooks/{row.id}"),
                         ("DELETE", f"/api/v1/webhooks/{row.id}"), ("POST", f"/api/v1/webhooks/{row.id}/test-event"),
                         ("GET", f"/api/v1/webhooks/{row.id}/deliveries"),
                         ("POST", f"/api/v1/webhooks/{row.id}/rotate-secret")):
        r = client.request(method, path, headers=h, json={} if method == "PATCH" else None)
        assert r.status_code == 404, (method, path)


# --------------------------------------------------------------------------- UI routes


def test_ui_create_shows_secret_once_and_the_log(client, session, org, make_user, receiver, allow_private, immediate):
    user = make_user(org, role="developer")
    csrf = login_client(client, user)
    page = client.get("/app/webhooks")
    assert page.status_code == 200 and "Add an endpoint" in page.text
    bad = client.post("/app/webhooks", data={"csrf_token": csrf, "url": "ftp://files.example/x", "event_types": ["*"]})
    assert bad.status_code == 422 and 'id="url-error"' in bad.text
    r = client.post("/app/webhooks", data={"csrf_token": csrf, "url": receiver.url(), "description": "EHR",
                                           "event_types": ["message.bounced", "message.complained"]})
    assert r.status_code == 200 and 'data-testid="created-secret"' in r.text
    from carepost.tracking.models import WebhookEndpoint

    session.rollback()
    endpoint = session.scalars(select(WebhookEndpoint)).one()
    secret_text = r.text.split('data-testid="created-secret">')[1].split("<")[0]
    assert secret_text.startswith("whsec_")
    listing = client.get("/app/webhooks")
    assert secret_text not in listing.text and endpoint.secret_hint in listing.text

    detail = client.get(f"/app/webhooks/{endpoint.id}")
    r = client.post(f"/app/webhooks/{endpoint.id}/test-event", data={"csrf_token": csrf_from(detail.text)},
                    follow_redirects=False)
    assert r.status_code == 303
    [request] = receiver.wait(1)
    independent_verify(secret_text, request.headers, request.body)
    detail = client.get(f"/app/webhooks/{endpoint.id}")
    assert 'data-testid="delivery-log"' in detail.text and "succeeded" in detail.text
    delivery_id = detail.text.split('data-delivery-id="')[1].split('"')[0]
    r = client.post(f"/app/webhooks/{endpoint.id}/deliveries/{delivery_id}/replay", data={"csrf_token": csrf},
                    follow_redirects=False)
    assert r.status_code == 303 and len(receiver.wait(2)) == 2

    r = client.post(f"/app/webhooks/{endpoint.id}/enabled", data={"csrf_token": csrf, "enabled": "false"},
                    follow_redirects=False)
    assert r.status_code == 303
    assert 'data-testid="endpoint-status">disabled' in client.get(f"/app/webhooks/{endpoint.id}").text
    rotated = client.post(f"/app/webhooks/{endpoint.id}/rotate-secret", data={"csrf_token": csrf})
    assert 'data-testid="new-secret"' in rotated.text
    r = client.post(f"/app/webhooks/{endpoint.id}/delete", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and client.get(f"/app/webhooks/{endpoint.id}").status_code == 404


def test_ui_needs_the_permission(client, org, make_user):
    user = make_user(org, role="analyst")
    login_client(client, user)
    assert client.get("/app/webhooks").status_code == 403
