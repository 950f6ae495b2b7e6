"""Recipients' PGP and S/MIME keys on file: validation on upload, look-up by address, expiry, listing.

(Split out of ``delivery.service``, which still exports every public name.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import NotFound, ValidationFailed
from carepost.core.ids import new_id
from carepost.delivery import pgp, smime
from carepost.delivery.mime import parse_address
from carepost.delivery.models import RecipientKey

KEY_KINDS = ("pgp", "smime")
KEY_EXPIRY_WARNING = timedelta(days=30)


# --- recipient keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    id: str
    kind: str
    fingerprint: str
    expires_at: datetime | None
    expiring_soon: bool
    smime_capabilities: str | None = None


def _key_info(row: RecipientKey) -> KeyInfo:
    expires = clock.aware(row.expires_at)
    return KeyInfo(row.id, row.kind, row.fingerprint, expires,
                   expires is not None and expires - clock.now() <= KEY_EXPIRY_WARNING, row.smime_capabilities)


def add_recipient_key(session: Session, org_id: str, address: str, kind: str, key: str | bytes, *,
                      actor_id: str | None = None, legacy_cbc: bool = False) -> KeyInfo:
    """Validate and store a recipient's certificate; replaces the address's key of that kind.
    For S/MIME the content encryption the holder can read is recorded with it: AES-GCM unless
    the certificate's capabilities or ``legacy_cbc`` (the sender knows the client) say CBC."""
    if kind not in KEY_KINDS:
        raise ValidationFailed("The key kind must be pgp or smime.", field="kind")
    parsed = parse_address(address, field_name="address", allow_display_name=False)
    addr = parsed.addr_spec
    if kind == "pgp":
        info = pgp.load_certificate(key, addr, field="key")
        material, fingerprint, expires = info.armored, info.fingerprint, info.expires_at
        capabilities = None
    else:
        info = smime.load_certificate(key, addr, field="key")
        material, fingerprint, expires = info.pem, info.fingerprint, info.not_after
        capabilities = smime.capabilities_for(info.pem, legacy_cbc=legacy_cbc)
    ring = get_keyring()
    index = ring.blind_index(session, org_id, "email", addr)
    row = session.scalars(
        select(RecipientKey).where(RecipientKey.org_id == org_id, RecipientKey.address_index == index,
                                   RecipientKey.kind == kind)
    ).first()
    row_id = row.id if row is not None else new_id()
    # Encrypt before touching the row: the keyring reads key records, which would autoflush it.
    address_enc = ring.encrypt(session, org_id, RecipientKey.__tablename__, "address", row_id, addr)
    key_enc = ring.encrypt(session, org_id, RecipientKey.__tablename__, "key", row_id, material)
    if row is None:
        row = RecipientKey(id=row_id, org_id=org_id, address_index=index, kind=kind)
        session.add(row)
    row.address_enc = address_enc
    row.key_enc = key_enc
    row.fingerprint = fingerprint
    row.smime_capabilities = capabilities
    row.expires_at = expires
    row.created_by = actor_id
    row.created_at = clock.now()
    session.flush()
    return _key_info(row)


def recipient_keys(session: Session, org_id: str, address: str) -> dict[str, RecipientKey]:
    """The keys on file for an address, by kind (found through the blind index)."""
    try:
        addr = parse_address(address, field_name="address", allow_display_name=False).addr_spec
    except ValidationFailed:
        return {}
    index = get_keyring().blind_index(session, org_id, "email", addr)
    rows = session.scalars(select(RecipientKey).where(RecipientKey.org_id == org_id, RecipientKey.address_index == index)).all()
    now = clock.now()
    return {r.kind: r for r in rows if r.expires_at is None or clock.aware(r.expires_at) > now}


def recipient_key_infos(session: Session, org_id: str, address: str) -> list[KeyInfo]:
    """For the contact page: the keys on file, with a warning flag when one expires soon."""
    return [_key_info(r) for r in recipient_keys(session, org_id, address).values()]


def recipient_key_material(session: Session, row: RecipientKey) -> str:
    return get_keyring().decrypt_text(session, row.org_id, RecipientKey.__tablename__, "key", row.id, row.key_enc)


def expiring_recipient_keys(session: Session, within: timedelta = KEY_EXPIRY_WARNING) -> list[KeyInfo]:
    """Keys of the session's organization that expire within ``within`` (not yet expired)."""
    now = clock.now()
    rows = session.scalars(select(RecipientKey).where(RecipientKey.expires_at.is_not(None))).all()
    return [_key_info(r) for r in rows if now < clock.aware(r.expires_at) <= now + within]


def delete_recipient_key(session: Session, key_id: str) -> None:
    row = session.get(RecipientKey, key_id)
    if row is None or (session.info.get("org_id") and row.org_id != session.info["org_id"]):
        raise NotFound("No such recipient key.", field="id")
    session.delete(row)


# --- recipient keys: listing for the API and the UI ------------------------------------------


def key_info(row: RecipientKey) -> KeyInfo:
    return _key_info(row)


def list_recipient_keys(session: Session, *, expiring_only: bool = False, limit: int = 200) -> list[tuple[RecipientKey, str]]:
    """(key, decrypted address) of the session's organization, soonest expiry first; with
    ``expiring_only`` just those that expire within 30 days (or have expired)."""
    q = select(RecipientKey).order_by(RecipientKey.expires_at.is_(None), RecipientKey.expires_at, RecipientKey.id)
    if expiring_only:
        q = q.where(RecipientKey.expires_at.is_not(None), RecipientKey.expires_at <= clock.now() + KEY_EXPIRY_WARNING)
    ring = get_keyring()
    return [(r, ring.decrypt_text(session, r.org_id, RecipientKey.__tablename__, "address", r.id, r.address_enc))
            for r in session.scalars(q.limit(limit))]
