"""Signed link tokens for patients: unsubscribe, preference center, subscription confirmation,
authorization revocation and the signed copy.

A token is ``<kind><version>.<payload>.<mac>``: the payload carries ids only (organization,
recipient or contact, topic, authorization; an expiry for the kinds that expire), base64url;
the MAC is HMAC-SHA256 under the organization's ``consent`` named key (``Keyring.named_key``),
truncated to 128 bits. Kinds are domain-separated in the MAC input, so a token of one kind never
verifies as another.

The named key is created once per organization and never rotated: master-key rotation re-wraps
it, data-key rotation does not touch it, so unsubscribe tokens in old messages keep working for
ever (RFC 8058 links have no expiry; CAN-SPAM requires 30 days at least). No PHI is in a token,
and the org id in it is not a secret: without the key nobody can make a valid MAC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.ids import is_id

KEY_KIND = "consent"
MAC_BYTES = 16
VERSION = "1"

# kind -> does the token expire?
KINDS = {
    "u": False,  # unsubscribe (recipient or contact, topic)
    "p": False,  # preference center (recipient or contact)
    "c": True,  # double opt-in confirmation (subscription)
    "r": False,  # revoke an authorization
    "a": True,  # view the signed copy of an authorization
}
REF_KINDS = ("r", "c", "s", "a")  # message recipient, contact, subscription, authorization
_TOKEN_RE = re.compile(r"^([upcra])1\.([A-Za-z0-9_-]{8,400})\.([A-Za-z0-9_-]{22})$")


class InvalidToken(Exception):
    """Forged, altered, malformed or expired; the message never repeats the input."""

    def __init__(self, reason: str = "invalid"):
        super().__init__(reason)
        self.reason = reason  # invalid | expired


@dataclass(frozen=True)
class TokenData:
    kind: str
    org_id: str
    ref_kind: str
    ref_id: str
    topic_id: str | None = None
    expires_at: datetime | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(session: Session, org_id: str, kind: str, payload: str, key: bytes | None = None) -> str:
    key = key or get_keyring().named_key(session, org_id, KEY_KIND)
    digest = hmac.new(key, f"carepost-consent|{kind}{VERSION}|{payload}".encode(), hashlib.sha256).digest()
    return _b64(digest[:MAC_BYTES])


def make(session: Session, kind: str, org_id: str, ref_kind: str, ref_id: str, *, topic_id: str | None = None,
         expires_at: datetime | None = None, key: bytes | None = None) -> str:
    """``key``: the organization's current consent key when the caller looked it up once for a
    batch (the delivery pipeline's List-Unsubscribe step); else it is looked up here."""
    if kind not in KINDS or ref_kind not in REF_KINDS:
        raise ValueError("unknown token kind")
    if KINDS[kind] != (expires_at is not None):
        raise ValueError(f"tokens of kind {kind!r} {'need' if KINDS[kind] else 'take no'} expiry")
    for value in (org_id, ref_id, topic_id):
        if value is not None and not is_id(value):
            raise ValueError("tokens carry ids only")
    parts = [org_id, ref_kind, ref_id, topic_id or ""]
    if expires_at is not None:
        parts.append(str(int(expires_at.timestamp())))
    payload = _b64(bytes.fromhex(org_id) + "|".join(parts[1:]).encode())
    return f"{kind}{VERSION}.{payload}.{_mac(session, org_id, kind, payload, key)}"


def verify(session: Session, token: str, kind: str) -> TokenData:
    """Check the MAC (constant time) and the expiry; raise :class:`InvalidToken` otherwise."""
    m = _TOKEN_RE.match(token or "")
    if not m or m.group(1) != kind:
        raise InvalidToken()
    payload, mac = m.group(2), m.group(3)
    try:
        raw = _unb64(payload)
        org_id = raw[:16].hex()
        fields = raw[16:].decode("ascii").split("|")
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken() from None
    if len(raw) < 17 or len(fields) != (4 if KINDS[kind] else 3):
        raise InvalidToken()
    from carepost.accounts.models import Organization

    if session.get(Organization, org_id) is None:
        raise InvalidToken()
    # Any live version of the consent secret: links sent before `keys rotate-secret consent` keep working.
    get_keyring().named_key(session, org_id, KEY_KIND)
    if not any(hmac.compare_digest(_mac(session, org_id, kind, payload, key), mac)
               for _v, key in get_keyring().named_keys(session, org_id, KEY_KIND)):
        raise InvalidToken()
    ref_kind, ref_id, topic_id = fields[0], fields[1], fields[2] or None
    if ref_kind not in REF_KINDS or not is_id(ref_id) or (topic_id is not None and not is_id(topic_id)):
        raise InvalidToken()
    expires_at = None
    if KINDS[kind]:
        try:
            expires_at = datetime.fromtimestamp(int(fields[3]), tz=timezone.utc)
        except ValueError:
            raise InvalidToken() from None
        if clock.now() >= expires_at:
            raise InvalidToken("expired")
    return TokenData(kind, org_id, ref_kind, ref_id, topic_id, expires_at)
