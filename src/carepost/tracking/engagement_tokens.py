"""Opaque tokens of the open pixel (``/t/o/<token>.gif``) and click redirects (``/t/c/<token>``).

A token is base64url of ``v | org | key version | nonce | AES-256-GCM(payload)``:

* the payload (39 bytes) is the kind (``o`` open, ``c`` click), the message id, the recipient id
  (all zeros for an organization in privacy mode: the token then names no recipient at all), the
  link index and the time of composition; it is **encrypted**, so nothing in the URL says which
  message, recipient, contact or campaign it is — no contact id, address, name or PHI is in it
  at all, encrypted or not;
* the key is the organization's ``tracking`` named key (``Keyring.named_key_version``, 256 bits,
  wrapped by the master key; rotatable: its version travels in the token, so links already sent
  keep working);
* the organization id is in clear (which key to use; not a secret: it is the sender) and is
  bound, with the kind, as associated data: a token moved to another organization's prefix, or an
  open token used as a click, fails authentication.

Anything else — altered, truncated, padded, unknown version or key — is :class:`InvalidToken`.
"""

from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.orm import Session

from carepost.core.crypto import KeyUnavailable, get_keyring

KEY_KIND = "tracking"
VERSION = 1
NO_RECIPIENT = "0" * 32
TRAP_INDEX = 0xFFFF  # the invisible link only machines follow
_PAYLOAD = struct.Struct(">c16s16sHI")  # kind, message, recipient, link index, composed at (epoch seconds)
_HEADER = 1 + 16 + 1 + 12
TOKEN_LENGTH = len(base64.urlsafe_b64encode(bytes(_HEADER + _PAYLOAD.size + 16)).rstrip(b"="))


class InvalidToken(Exception):
    """Forged, altered, truncated, or of another kind or organization."""


@dataclass(frozen=True)
class TokenData:
    kind: str  # o | c
    org_id: str
    message_id: str
    recipient_id: str | None  # None: privacy mode
    link_index: int | None
    composed_at: datetime

    @property
    def trap(self) -> bool:
        return self.kind == "c" and self.link_index == TRAP_INDEX


def _aad(org: bytes, kind: str) -> bytes:
    return b"carepost-tracking|1|" + org + b"|" + kind.encode()


def make(session: Session, kind: str, org_id: str, message_id: str, recipient_id: str | None,
         link_index: int | None = None, composed_at: datetime | None = None, *,
         key: tuple[int, bytes] | None = None) -> str:
    """``key``: the organization's current ``(version, secret)`` of the tracking key when the caller
    looked it up once for a batch of copies (``links.pipeline_links``); else it is looked up here."""
    if kind not in ("o", "c"):
        raise ValueError("unknown token kind")
    version, key = key or get_keyring().named_key_version(session, org_id, KEY_KIND)
    when = int((composed_at or datetime.now(UTC)).timestamp())
    payload = _PAYLOAD.pack(kind.encode(), bytes.fromhex(message_id), bytes.fromhex(recipient_id or NO_RECIPIENT),
                            0 if link_index is None else link_index, when)
    org = bytes.fromhex(org_id)
    nonce = os.urandom(12)
    sealed = _cipher(key).encrypt(nonce, payload, _aad(org, kind))
    raw = bytes([VERSION]) + org + bytes([version]) + nonce + sealed
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def split(token: str) -> tuple[str, int, bytes]:
    """(org id, key version, raw) without a database: the shape only. Raises InvalidToken."""
    if not isinstance(token, str) or len(token) != TOKEN_LENGTH or not token.isascii():
        raise InvalidToken()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        raise InvalidToken() from None
    if len(raw) != _HEADER + _PAYLOAD.size + 16 or raw[0] != VERSION:
        raise InvalidToken()
    return raw[1:17].hex(), raw[17], raw


_CIPHERS: dict[bytes, AESGCM] = {}


def _cipher(key: bytes) -> AESGCM:
    """The AES-GCM object of a key, made once (making one costs ~10 µs, a decryption ~1 µs: it was
    a third of reading a token on every /t/ request)."""
    found = _CIPHERS.get(key)
    if found is None:
        if len(_CIPHERS) > 1000:
            _CIPHERS.clear()
        found = _CIPHERS[key] = AESGCM(key)
    return found


def read(session: Session, token: str, kind: str) -> TokenData:
    """Decrypt and authenticate ``token`` of ``kind``; InvalidToken otherwise (nothing is said why)."""
    org_id, version, raw = split(token)
    try:
        key = get_keyring()._load(session, org_id, KEY_KIND, version)[1]
    except (KeyUnavailable, LookupError, ValueError):
        raise InvalidToken() from None
    try:
        payload = _cipher(key).decrypt(raw[18:30], raw[30:], _aad(raw[1:17], kind))
    except InvalidTag:
        raise InvalidToken() from None
    k, message, recipient, index, when = _PAYLOAD.unpack(payload)
    if k.decode() != kind:
        raise InvalidToken()
    recipient_id = recipient.hex()
    return TokenData(kind, org_id, message.hex(), None if recipient_id == NO_RECIPIENT else recipient_id,
                     index if kind == "c" else None, datetime.fromtimestamp(when, tz=UTC))
