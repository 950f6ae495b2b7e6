"""API credentials: Bearer API keys, HTTP Basic, storage, audit, logs, scopes, sandbox."""

from __future__ import annotations

import base64
import io
import json
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from carepost.accounts import credentials as creds
from carepost.accounts.models import ApiCredential
from carepost.audit.models import AuditEvent
from carepost.core import clock


@pytest.fixture
def make_credential(session, org):
    """Create a credential in ``org`` (or another organization) and commit it; returns (cred, secret)."""

    def make(scopes=("messages:read",), org_id=None, **kw):
        cred, secret = creds.create_credential(session, org_id or org.id, name=kw.pop("name", "Test key"), scopes=list(scopes), **kw)
        session.commit()
        return cred, secret

    return make


def bearer(cred, secret):
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def basic(key_id, secret):
    return {"Authorization": "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()}


def fresh(session):
    """Forget what this test session has seen (a rollback outside a transaction expires nothing)."""
    session.rollback()
    session.expire_all()
    return session


def audit_events(session, action):
    fresh(session)
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.occurred_at)))


# --------------------------------------------------------------------------- formats and storage


def test_generated_key_id_and_secret_formats():
    key_id, secret = creds.generate_key_id(), creds.generate_secret()
    assert key_id.startswith("cpk_") and len(key_id) == 28
    assert secret.startswith("cp_sk_") and len(secret) == 49
    assert creds.generate_secret() != secret
    # The hash is bound to the key id.
    assert creds.hash_secret(key_id, secret) != creds.hash_secret(creds.generate_key_id(), secret)


def test_secret_never_stored_in_clear(db, session, org, make_credential):
    cred, secret = make_credential()
    token_part = secret[len("cp_sk_"):]
    rows = session.execute(text("SELECT * FROM api_credentials")).mappings().all()
    assert len(rows) == 1
    for value in rows[0].values():
        raw = value if isinstance(value, bytes) else str(value).encode()
        assert token_part.encode() not in raw
        assert creds.derive_signing_key(secret) not in raw  # signing key stored encrypted
    assert rows[0]["secret_hash"].startswith("hs256$")
    # The encrypted signing key decrypts to the derived key, and only for this row.
    from carepost.core.crypto import DecryptionFailed, get_keyring

    key = get_keyring().decrypt(session, org.id, "api_credentials", "signing_key", cred.id, cred.signing_key)
    assert key == creds.derive_signing_key(secret)
    with pytest.raises(DecryptionFailed):
        get_keyring().decrypt(session, org.id, "api_credentials", "signing_key", "0" * 32, cred.signing_key)


def test_bad_input_names_the_field(db, session, org):
    from carepost.core.errors import PermissionDenied, ValidationFailed

    with pytest.raises(ValidationFailed) as e:
        creds.create_credential(session, org.id, name=" ", scopes=[])
    assert e.value.field == "name"
    with pytest.raises(ValidationFailed) as e:
        creds.create_credential(session, org.id, name="k", scopes=["nope:nope"])
    assert e.value.field == "scopes"
    with pytest.raises(ValidationFailed) as e:
        creds.create_credential(session, org.id, name="k", scopes=[], expires_in_days=0)
    assert e.value.field == "expires_in_days"
    with pytest.raises(PermissionDenied) as e:
        creds.create_credential(session, org.id, name="k", scopes=["phi:write"], creator_permissions=frozenset({"messages:read"}))
    assert e.value.field == "scopes"
    session.rollback()
    assert session.scalars(select(ApiCredential)).all() == []


# --------------------------------------------------------------------------- Bearer and Basic


def test_bearer_api_key_authenticates(client, session, org, make_credential):
    cred, secret = make_credential(scopes=["messages:read", "phi:read_masked"])
    r = client.get("/api/v1/me", headers=bearer(cred, secret))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "api_credential"
    assert body["org_id"] == org.id and body["org_slug"] == "bar-clinic"
    assert body["credential_id"] == cred.id and body["key_id"] == cred.key_id
    assert body["auth_method"] == "api_key"
    assert body["scopes"] == ["messages:read", "phi:read_masked"]
    assert body["sandbox"] is False
    assert body["rate_limit_per_minute"] == 600
    assert fresh(session).get(ApiCredential, cred.id).last_used_at is not None


def test_basic_auth_authenticates(client, org, make_credential):
    cred, secret = make_credential()
    r = client.get("/api/v1/me", headers=basic(cred.key_id, secret))
    assert r.status_code == 200, r.text
    assert r.json()["auth_method"] == "basic"


def test_sandbox_flag_and_rate_override_are_carried(client, make_credential):
    cred, secret = make_credential(sandbox=True, rate_limit_per_minute=42)
    body = client.get("/api/v1/me", headers=bearer(cred, secret)).json()
    assert body["sandbox"] is True
    assert body["rate_limit_per_minute"] == 42


def _assert_generic_401(r):
    assert r.status_code == 401
    assert r.json() == {"error": {"code": "authentication_required", "message": "Sign in or send API credentials."}} or (
        r.json()["error"]["code"] == "authentication_required"
    )
    text_ = r.text.lower()
    for word in ("expired", "revoked", "secret", "unknown", "signature", "nonce"):
        assert word not in text_


@pytest.mark.parametrize(
    "case",
    ["wrong_secret", "unknown_key", "expired", "revoked", "malformed_bearer", "malformed_basic", "unsupported_scheme", "basic_wrong"],
)
def test_auth_failures_are_generic_401_and_audited(client, session, org, make_credential, case):
    cred, secret = make_credential(expires_in_days=1 if case == "expired" else None)
    headers = {
        "wrong_secret": bearer(cred, creds.generate_secret()),
        "unknown_key": {"Authorization": f"Bearer {creds.generate_key_id()}.{secret}"},
        "expired": bearer(cred, secret),
        "revoked": bearer(cred, secret),
        "malformed_bearer": {"Authorization": "Bearer garbage"},
        "malformed_basic": {"Authorization": "Basic !!!notbase64"},
        "unsupported_scheme": {"Authorization": "Digest username=x"},
        "basic_wrong": basic(cred.key_id, creds.generate_secret()),
    }[case]
    if case == "expired":
        clock.advance(timedelta(days=1, seconds=1))
    if case == "revoked":
        creds.revoke_credential(session, session.get(ApiCredential, cred.id))
        session.commit()
    r = client.get("/api/v1/me", headers=headers)
    _assert_generic_401(r)
    events = audit_events(session, "api_credential.auth_failed")
    assert len(events) == 1
    event = events[0]
    assert event.outcome == "failure"
    expected_reason = {
        "wrong_secret": "wrong_secret", "unknown_key": "unknown_key", "expired": "expired", "revoked": "revoked",
        "malformed_bearer": "malformed", "malformed_basic": "malformed", "unsupported_scheme": "unsupported_scheme",
        "basic_wrong": "wrong_secret",
    }[case]
    assert event.details["reason"] == expected_reason
    if case in ("wrong_secret", "expired", "revoked", "basic_wrong"):
        assert event.org_id == org.id and event.actor_id == cred.id and event.actor_type == "api_credential"
    else:
        assert event.org_id is None and event.chain == "system"
    assert secret not in json.dumps(event.details)


def test_wrong_scope_is_403_and_audited(client, session, make_credential):
    cred, secret = make_credential(scopes=["messages:read"])
    # Managing credentials needs apikeys:manage, which no API credential can hold.
    r = client.get("/api/v1/api-credentials", headers=bearer(cred, secret))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "permission_denied"
    denied = audit_events(session, "access.denied")
    assert denied and denied[-1].actor_id == cred.id and denied[-1].outcome == "denied"


def test_secret_never_logged(client, make_credential):
    from carepost.core.logging import configure_logging

    buf = io.StringIO()
    configure_logging("DEBUG", True, stream=buf)
    cred, secret = make_credential()
    assert client.get("/api/v1/me", headers=bearer(cred, secret)).status_code == 200
    assert client.get("/api/v1/me", headers=bearer(cred, secret + "x")).status_code == 401
    assert client.get("/api/v1/me", headers=basic(cred.key_id, secret[:-1] + ("B" if secret.endswith("A") else "A"))).status_code == 401
    out = buf.getvalue()
    assert "api_auth_failed" in out  # the failure was logged ...
    assert secret not in out and secret[6:] not in out and secret[:-1] not in out  # ... without the secret
    configure_logging("INFO", True)
