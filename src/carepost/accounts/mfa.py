"""Second factors: TOTP (RFC 6238), one-time recovery codes and WebAuthn security keys.

MFA is mandatory for every person (HIPAA NPRM 2025, 164.312(d)): after the password a session
is sent to TOTP enrollment (first time) or to the challenge, and ``access.require`` refuses
every permissioned route until the session is MFA-verified.

* TOTP: 30-second step, 6 digits, one step of drift either way; a code is accepted once — the
  step of the last accepted code is stored and any code of that step or an earlier one is
  refused (RFC 6238 section 5.2). The seed is encrypted under the system data key, bound to the
  user row. Time comes from ``clock.now()`` so tests can move it.
* Recovery codes: ten random codes shown once, stored as SHA-256 (they carry 80 bits of
  entropy, so a fast hash is enough), each usable once.
* WebAuthn (phishing resistant): registered on the security page, usable instead of TOTP at the
  challenge. The RP id is the host of ``CAREPOST_BASE_URL`` and the expected origin is the base URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from datetime import datetime
from urllib.parse import urlsplit

import pyotp
from sqlalchemy import ForeignKey, String, inspect, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from carepost.accounts.models import User, WebAuthnCredential, WebSession
from carepost.core import clock
from carepost.core.bootstrap import SYSTEM_KEY_OWNER  # TOTP seeds belong to no organization
from carepost.core.config import get_settings
from carepost.core.crypto import get_keyring
from carepost.core.database import Base
from carepost.core.errors import ValidationFailed
from carepost.core.ids import new_id

TOTP_STEP = 30
TOTP_DIGITS = 6
TOTP_DRIFT_STEPS = 1
RECOVERY_CODE_COUNT = 10
ISSUER = "CarePost"


class RecoveryCode(Base):
    """A one-time recovery code of a person (stored hashed)."""

    __tablename__ = "recovery_codes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(32), ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    used_at: Mapped[datetime | None]


# --------------------------------------------------------------------------- TOTP


def new_totp_secret() -> str:
    return pyotp.random_base32(32)  # 160 bits, as RFC 4226 recommends


def store_totp_secret(session: Session, user: User, secret: str) -> None:
    """Set a new, unconfirmed TOTP seed (enrollment); the old factor stops working."""
    user.totp_secret = get_keyring().encrypt(session, SYSTEM_KEY_OWNER, "users", "totp_secret", user.id, secret)
    user.totp_confirmed_at = None
    user.totp_last_step = None


def totp_secret_of(session: Session, user: User) -> str | None:
    return get_keyring().decrypt_text(session, SYSTEM_KEY_OWNER, "users", "totp_secret", user.id, user.totp_secret)


def provisioning_uri(secret: str, email: str) -> str:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP).provisioning_uri(name=email, issuer_name=ISSUER)


def qr_data_uri(text: str) -> str:
    """A QR code as an SVG ``data:`` URI, drawn on the server (CSP allows ``img-src data:``)."""
    import segno

    return segno.make(text, error="m").svg_data_uri(scale=5, border=2, dark="#101828", light="#ffffff")


def current_step(at: datetime | None = None) -> int:
    return int((at or clock.now()).timestamp()) // TOTP_STEP


def totp_code(secret: str, step: int) -> str:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP).generate_otp(step)


def _clean_code(code: str) -> str:
    return "".join(ch for ch in (code or "") if not ch.isspace() and ch != "-")


def verify_totp(session: Session, user: User, code: str) -> bool:
    """True once per code: the matched step must be later than the last accepted one."""
    code = _clean_code(code)
    if len(code) != TOTP_DIGITS or not code.isdigit() or user.totp_secret is None:
        return False
    secret = totp_secret_of(session, user)
    now_step = current_step()
    # Issue 9 item 21: lock the person's row (SELECT ... FOR UPDATE on PostgreSQL; SQLite's
    # writer lock serializes anyway) and re-read the last accepted step, so two sign-ins racing
    # with the same code cannot both pass.
    if inspect(user).persistent:
        session.flush()  # a step accepted earlier in this transaction must survive the re-read
        session.refresh(user, attribute_names=["totp_last_step"], with_for_update=True)
    last = user.totp_last_step if user.totp_last_step is not None else -1
    for step in range(now_step - TOTP_DRIFT_STEPS, now_step + TOTP_DRIFT_STEPS + 1):
        if step <= last:
            continue
        if hmac.compare_digest(totp_code(secret, step), code):
            user.totp_last_step = step
            return True
    return False


def confirm_totp(session: Session, user: User, code: str) -> bool:
    """Enrollment: the first valid code proves the authenticator app holds the seed."""
    if not verify_totp(session, user, code):
        return False
    user.totp_confirmed_at = clock.now()
    return True


# --------------------------------------------------------------------------- recovery codes


def _hash_code(code: str) -> str:
    return hashlib.sha256(_clean_code(code).lower().encode()).hexdigest()


def new_recovery_codes(session: Session, user: User) -> list[str]:
    """Replace any earlier codes with ten new ones; returns the plain codes (shown once)."""
    for old in session.scalars(select(RecoveryCode).where(RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None))):
        old.used_at = clock.now()
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = base64.b32encode(secrets.token_bytes(10)).decode().lower()  # 80 bits
        code = f"{raw[:4]}-{raw[4:8]}-{raw[8:12]}-{raw[12:16]}"
        codes.append(code)
        session.add(RecoveryCode(user_id=user.id, code_hash=_hash_code(code)))
    session.flush()
    return codes


def use_recovery_code(session: Session, user: User, code: str) -> bool:
    cleaned = _clean_code(code)
    if len(cleaned) != 16:
        return False
    row = session.scalar(
        select(RecoveryCode).where(
            RecoveryCode.user_id == user.id, RecoveryCode.code_hash == _hash_code(cleaned), RecoveryCode.used_at.is_(None)
        )
    )
    if row is None:
        return False
    row.used_at = clock.now()
    return True


def recovery_codes_left(session: Session, user_id: str) -> int:
    return len(list(session.scalars(select(RecoveryCode.id).where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None)))))


# --------------------------------------------------------------------------- WebAuthn


def rp_id() -> str:
    """The relying-party id: the host of the base URL (WebAuthn refuses IP addresses)."""
    return urlsplit(get_settings().base_url).hostname or "localhost"


def expected_origin() -> str:
    parts = urlsplit(get_settings().base_url)
    return f"{parts.scheme}://{parts.netloc}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def webauthn_credentials(session: Session, user_id: str) -> list[WebAuthnCredential]:
    return list(session.scalars(select(WebAuthnCredential).where(WebAuthnCredential.user_id == user_id).order_by(WebAuthnCredential.created_at)))


def _remember_challenge(ws: WebSession, purpose: str, challenge: bytes) -> None:
    state = dict(ws.state or {})
    state[f"webauthn_{purpose}"] = {"challenge": _b64url(challenge), "at": clock.now().timestamp()}
    ws.state = state  # reassign: JSON columns don't track in-place changes


def _take_challenge(ws: WebSession, purpose: str) -> bytes:
    """The pending challenge of ``purpose``, removed so it can be answered only once."""
    state = dict(ws.state or {})
    entry = state.pop(f"webauthn_{purpose}", None)
    ws.state = state
    if not entry or clock.now().timestamp() - entry["at"] > 300:
        raise ValidationFailed("The security-key request expired. Try again.", field="credential")
    return _unb64url(entry["challenge"])


def registration_options(session: Session, ws: WebSession, user: User) -> dict:
    from webauthn import generate_registration_options, options_to_json
    from webauthn.helpers.structs import (
        AuthenticatorSelectionCriteria,
        PublicKeyCredentialDescriptor,
        ResidentKeyRequirement,
        UserVerificationRequirement,
    )

    options = generate_registration_options(
        rp_id=rp_id(),
        rp_name=ISSUER,
        user_name=user.email,
        user_id=user.id.encode(),
        user_display_name=user.display_name or user.email,
        exclude_credentials=[PublicKeyCredentialDescriptor(id=c.credential_id) for c in webauthn_credentials(session, user.id)],
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.DISCOURAGED, user_verification=UserVerificationRequirement.PREFERRED
        ),
    )
    _remember_challenge(ws, "register", options.challenge)
    return json.loads(options_to_json(options))


def register_credential(session: Session, ws: WebSession, user: User, credential: dict, name: str) -> WebAuthnCredential:
    from webauthn import verify_registration_response

    name = (name or "").strip() or "Security key"
    if len(name) > 100:
        raise ValidationFailed("Use a name of at most 100 characters.", field="name")
    challenge = _take_challenge(ws, "register")
    try:
        verified = verify_registration_response(
            credential=credential, expected_challenge=challenge, expected_rp_id=rp_id(), expected_origin=expected_origin()
        )
    except Exception as exc:  # untrusted browser input: any parse failure is a refusal, never a 500
        raise ValidationFailed(f"The security key's response was not accepted ({type(exc).__name__}).", field="credential") from None
    if session.scalar(select(WebAuthnCredential.id).where(WebAuthnCredential.credential_id == verified.credential_id)):
        raise ValidationFailed("This security key is already registered.", field="credential")
    response = credential.get("response")
    raw_transports = response.get("transports") if isinstance(response, dict) else None
    transports = [t for t in raw_transports if isinstance(t, str)][:5] if isinstance(raw_transports, list) else []
    row = WebAuthnCredential(
        user_id=user.id,
        credential_id=verified.credential_id,
        public_key=verified.credential_public_key,
        sign_count=verified.sign_count,
        transports=transports,
        name=name,
    )
    session.add(row)
    session.flush()
    return row


def authentication_options(session: Session, ws: WebSession, user: User) -> dict:
    from webauthn import generate_authentication_options, options_to_json
    from webauthn.helpers.structs import PublicKeyCredentialDescriptor, UserVerificationRequirement

    creds = webauthn_credentials(session, user.id)
    if not creds:
        raise ValidationFailed("No security key is registered for this account.", field="credential")
    options = generate_authentication_options(
        rp_id=rp_id(),
        allow_credentials=[PublicKeyCredentialDescriptor(id=c.credential_id) for c in creds],
        user_verification=UserVerificationRequirement.PREFERRED,
    )
    _remember_challenge(ws, "authenticate", options.challenge)
    return json.loads(options_to_json(options))


def verify_assertion(session: Session, ws: WebSession, user: User, credential: dict) -> WebAuthnCredential | None:
    """The security key that signed the challenge, or None when the response does not verify."""
    from webauthn import verify_authentication_response

    challenge = _take_challenge(ws, "authenticate")
    try:
        raw_id = _unb64url(str(credential.get("rawId") or credential.get("id") or ""))
    except (ValueError, TypeError):
        return None
    row = session.scalar(
        select(WebAuthnCredential).where(WebAuthnCredential.credential_id == raw_id, WebAuthnCredential.user_id == user.id)
    )
    if row is None:
        return None
    try:
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp_id(),
            expected_origin=expected_origin(),
            credential_public_key=row.public_key,
            credential_current_sign_count=row.sign_count,
        )
    except Exception:  # untrusted browser input: any parse failure is a refusal
        return None
    row.sign_count = verified.new_sign_count
    row.last_used_at = clock.now()
    return row
