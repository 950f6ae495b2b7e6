"""MFA enrollment (TOTP, QR, recovery codes) and WebAuthn with a real software authenticator."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from carepost.accounts import mfa
from carepost.accounts.models import User, WebAuthnCredential
from carepost.audit.models import AuditEvent
from carepost.core.database import session_factory
from tests.fixtures.accounts import csrf_from, login_client

ORIGIN = "http://localhost:8000"
RP_ID = "localhost"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SoftwareAuthenticator:
    """A FIDO2 authenticator in software: an EC P-256 key, "none" attestation, ES256 assertions,
    built byte by byte as the WebAuthn Level 2 spec describes (sections 6.1, 6.5, 5.2)."""

    def __init__(self, origin: str = ORIGIN, rp_id: str = RP_ID):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = b"\x01" + hashlib.sha256(str(id(self)).encode()).digest()
        self.sign_count = 0
        self.origin = origin
        self.rp_id = rp_id

    def _cose_public_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")})

    def _client_data(self, kind: str, challenge: str) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge, "origin": self.origin, "crossOrigin": False}).encode()

    def create(self, options: dict) -> dict:
        client_data = self._client_data("webauthn.create", options["challenge"])
        auth_data = (
            hashlib.sha256(self.rp_id.encode()).digest()
            + bytes([0x41])  # user present + attested credential data
            + struct.pack(">I", self.sign_count)
            + b"\x00" * 16  # AAGUID
            + struct.pack(">H", len(self.credential_id)) + self.credential_id
            + self._cose_public_key()
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {
            "id": b64url(self.credential_id), "rawId": b64url(self.credential_id), "type": "public-key",
            "response": {"clientDataJSON": b64url(client_data), "attestationObject": b64url(attestation), "transports": ["usb"]},
        }

    def get(self, options: dict, *, tamper: bool = False) -> dict:
        self.sign_count += 1
        client_data = self._client_data("webauthn.get", options["challenge"])
        auth_data = hashlib.sha256(self.rp_id.encode()).digest() + bytes([0x01]) + struct.pack(">I", self.sign_count)
        signature = self.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
        if tamper:
            auth_data = auth_data[:-1] + bytes([auth_data[-1] ^ 0xFF])
        return {
            "id": b64url(self.credential_id), "rawId": b64url(self.credential_id), "type": "public-key",
            "response": {"clientDataJSON": b64url(client_data), "authenticatorData": b64url(auth_data),
                         "signature": b64url(signature), "userHandle": None},
        }


def password_step(client, user):
    page = client.get("/app/login")
    r = client.post("/app/login", data={"email": user.email, "password": user.password, "csrf_token": csrf_from(page.text)},
                    follow_redirects=False)
    assert r.status_code == 303
    return r


def pre_mfa_csrf(client) -> str:
    return csrf_from(client.get("/app/mfa").text)


def register_key(client, csrf, authenticator, name="YubiKey 5"):
    options = client.post("/app/account/webauthn/options", headers={"x-csrf-token": csrf})
    assert options.status_code == 200, options.text
    opts = options.json()
    assert opts["rp"]["id"] == RP_ID and opts["attestation"] == "none"
    return client.post("/app/account/webauthn", json={"credential": authenticator.create(opts), "name": name},
                       headers={"x-csrf-token": csrf})


def test_enrollment_shows_qr_and_secret_then_recovery_codes(client, org, make_user, session):
    user = make_user(org, mfa=False)
    r = password_step(client, user)
    assert r.headers["location"] == "/app/mfa/enroll"
    assert client.get("/app/mfa", follow_redirects=False).headers["location"] == "/app/mfa/enroll"
    page = client.get("/app/mfa/enroll")
    assert page.status_code == 200
    secret = re.search(r'data-secret="([A-Z2-7]+)"', page.text).group(1)
    assert "otpauth://totp/CarePost:" in page.text and 'src="data:image/svg+xml' in page.text
    # Reloading keeps the same pending secret (the app already scanned it).
    assert secret in client.get("/app/mfa/enroll").text
    # The seed is stored encrypted, never in clear.
    session.rollback()
    row = session.get(User, user.id)
    assert row.totp_secret and secret.encode() not in row.totp_secret and row.totp_confirmed_at is None
    csrf = csrf_from(page.text)
    bad = client.post("/app/mfa/enroll", data={"code": "000000", "csrf_token": csrf}, follow_redirects=False)
    assert bad.status_code == 422 and "not valid" in bad.text
    code = mfa.totp_code(secret, mfa.current_step())
    done = client.post("/app/mfa/enroll", data={"code": code, "csrf_token": csrf}, follow_redirects=False)
    assert done.status_code == 200
    codes = re.findall(r"<code>([a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4})</code>", done.text)
    assert len(codes) == 10
    assert client.get("/app").status_code == 200
    session.rollback()
    session.expire_all()
    assert session.get(User, user.id).totp_confirmed_at is not None
    actions = [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id))]
    assert "auth.mfa_enroll" in actions
    # Recovery codes are stored hashed.
    stored = [r.code_hash for r in session.scalars(select(mfa.RecoveryCode).where(mfa.RecoveryCode.user_id == user.id))]
    assert len(stored) == 10 and not any(c in stored for c in codes)


def test_confirmed_totp_cannot_be_replaced_before_mfa(client, org, make_user, session):
    user = make_user(org)
    password_step(client, user)
    r = client.get("/app/mfa/enroll", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/app/mfa"
    r = client.post("/app/mfa/enroll", data={"code": "123456", "csrf_token": pre_mfa_csrf(client)}, follow_redirects=False)
    assert r.status_code == 303
    session.rollback()
    assert mfa.totp_secret_of(session, session.get(User, user.id)) == user.totp_secret


def test_webauthn_register_and_authenticate_with_software_authenticator(client, org, make_user, session):
    user = make_user(org)
    csrf = login_client(client, user)
    authenticator = SoftwareAuthenticator()
    r = register_key(client, csrf, authenticator)
    assert r.status_code == 201, r.text
    session.rollback()
    stored = session.scalar(select(WebAuthnCredential).where(WebAuthnCredential.user_id == user.id))
    assert stored.credential_id == authenticator.credential_id and stored.name == "YubiKey 5"
    assert "YubiKey 5" in client.get("/app/account/security").text

    other = type(client)(client.app, base_url=ORIGIN)
    password_step(other, user)
    challenge_page = other.get("/app/mfa")
    assert "Use security key" in challenge_page.text
    pre_csrf = csrf_from(challenge_page.text)
    options = other.post("/app/mfa/webauthn/options", headers={"x-csrf-token": pre_csrf}).json()
    assert [c["id"] for c in options["allowCredentials"]] == [b64url(authenticator.credential_id)]
    assertion = authenticator.get(options)
    r = other.post("/app/mfa/webauthn", json={"credential": assertion}, headers={"x-csrf-token": pre_csrf})
    assert r.status_code == 200 and r.json()["redirect"] == "/app"
    assert other.get("/app").status_code == 200
    session.rollback()
    session.expire_all()
    assert session.get(WebAuthnCredential, stored.id).sign_count == 1
    mfa_events = list(session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.action == "auth.mfa")
                                      .order_by(AuditEvent.seq)))
    assert mfa_events[-1].details == {"method": "webauthn"} and mfa_events[-1].outcome == "success"
    register_events = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "auth.webauthn_register")))
    assert register_events and register_events[-1].actor_id == user.id


def test_webauthn_refuses_replay_tampering_and_foreign_origin(client, org, make_user, session):
    user = make_user(org)
    csrf = login_client(client, user)
    authenticator = SoftwareAuthenticator()
    assert register_key(client, csrf, authenticator).status_code == 201

    other = type(client)(client.app, base_url=ORIGIN)
    password_step(other, user)
    pre_csrf = pre_mfa_csrf(other)
    options = other.post("/app/mfa/webauthn/options", headers={"x-csrf-token": pre_csrf}).json()
    r = other.post("/app/mfa/webauthn", json={"credential": authenticator.get(options, tamper=True)}, headers={"x-csrf-token": pre_csrf})
    assert r.status_code == 401
    # The challenge was consumed by the failed attempt: a valid assertion for it is now refused too.
    r = other.post("/app/mfa/webauthn", json={"credential": authenticator.get(options)}, headers={"x-csrf-token": pre_csrf})
    assert r.status_code == 422 and r.json()["error"]["field"] == "credential"
    # A phishing site's origin does not verify.
    phished = SoftwareAuthenticator(origin="http://localhost.evil.test:8000")
    phished.key, phished.credential_id = authenticator.key, authenticator.credential_id
    options = other.post("/app/mfa/webauthn/options", headers={"x-csrf-token": pre_csrf}).json()
    r = other.post("/app/mfa/webauthn", json={"credential": phished.get(options)}, headers={"x-csrf-token": pre_csrf})
    assert r.status_code == 401
    assert other.get("/api/v1/users").status_code == 403  # still not MFA-verified
    failures = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "auth.mfa", AuditEvent.outcome == "failure")))
    assert len(failures) == 2


def test_webauthn_registration_rejects_wrong_origin_and_duplicates(client, org, make_user):
    user = make_user(org)
    csrf = login_client(client, user)
    r = register_key(client, csrf, SoftwareAuthenticator(origin="https://attacker.example"))
    assert r.status_code == 422 and r.json()["error"]["field"] == "credential"
    authenticator = SoftwareAuthenticator()
    assert register_key(client, csrf, authenticator).status_code == 201
    assert register_key(client, csrf, authenticator).status_code == 422
    # Registration needs a fully signed-in session and the CSRF header.
    assert client.post("/app/account/webauthn/options").status_code == 403


def test_security_page_lists_sessions_and_revokes_another(client, org, make_user, session):
    user = make_user(org)
    csrf = login_client(client, user)
    other = type(client)(client.app, base_url=ORIGIN)
    login_client(other, user)
    page = client.get("/app/account/security")
    refs = re.findall(r"/app/account/sessions/([0-9a-f]{16})/revoke", page.text)
    assert len(refs) == 2 and "this session" in page.text
    from carepost.accounts.sessions import COOKIE_NAME, hash_session_token

    other_ref = hash_session_token(other.cookies.get(COOKIE_NAME))[:16]
    r = client.post(f"/app/account/sessions/{other_ref}/revoke", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert other.get("/api/v1/users").status_code == 401
    assert client.get("/api/v1/users").status_code == 200
    assert client.post("/app/account/sessions/0000000000000000/revoke", data={"csrf_token": csrf}).status_code == 404


def test_regenerating_recovery_codes_voids_old_ones(client, org, make_user):
    user = make_user(org)
    with session_factory()() as s:
        s.info["scope"] = "system"
        old = mfa.new_recovery_codes(s, s.get(User, user.id))
        s.commit()
    csrf = login_client(client, user)
    page = client.post("/app/account/recovery-codes", data={"csrf_token": csrf})
    new = re.findall(r"<code>([a-z2-7-]{19})</code>", page.text)
    assert len(new) == 10 and not set(new) & set(old)
    with session_factory()() as s:
        row = s.get(User, user.id)
        assert not mfa.use_recovery_code(s, row, old[0])
        assert mfa.use_recovery_code(s, row, new[0])
        s.rollback()


def test_the_same_totp_code_cannot_pass_twice_in_racing_sign_ins(db, org, make_user):
    """Issue 9 item 21: two sign-ins with the same code at the same moment. The first holds the
    person's row locked until it commits; the second then sees the step already used. (On
    PostgreSQL without the lock the second read the old step and passed too.)"""
    import threading
    import time as _time

    from carepost.accounts import mfa as _mfa
    from carepost.accounts.models import User as _User
    from carepost.core.database import system_session

    person = make_user(org)
    code = _mfa.totp_code(person.totp_secret, _mfa.current_step())
    first_verified, results = threading.Event(), {}

    def first():
        with system_session() as s:
            results["first"] = _mfa.verify_totp(s, s.get(_User, person.id), code)
            first_verified.set()
            _time.sleep(1.0)  # still in its transaction
            s.commit()

    def second():
        first_verified.wait(10)
        with system_session() as s:
            results["second"] = _mfa.verify_totp(s, s.get(_User, person.id), code)
            s.commit()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"first": True, "second": False}
