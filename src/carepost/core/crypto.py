"""Envelope encryption: the master key wraps every other key.

Layout (ARCHITECTURE.md section 2):

* master keys live in a 0600 file in the data dir (or ``CAREPOST_MASTER_KEY``); each has an id;
* the SQLCipher database secret is wrapped by the master key in ``<data dir>/database.key``;
* per-organization data keys (AES-256-GCM, versioned) and blind-index keys (HMAC-SHA256, kept
  separate from the data keys) are wrapped by the master key in the ``org_keys`` table;
* every ciphertext starts with its data-key version and is bound to organization, table, column
  and row through the AEAD associated data, so a ciphertext copied to another row, column or
  organization fails to decrypt (HIPAA 164.312(a)(2)(iv) and (c)).

Rotating the master key re-wraps; rotating data keys adds a version used by new writes while
old versions keep decrypting old ciphertexts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import unicodedata
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.exc import IntegrityError
from sqlalchemy import DateTime, Integer, LargeBinary, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from carepost.core import clock
from carepost.core.config import Settings, get_settings
from carepost.core.database import Base
from carepost.core.ids import new_id
from carepost.core.masterkeys import (  # noqa: F401 - the keyring's public names for master keys
    _b64,
    _unb64,
    _write_json_0600,
    create_database_secret,
    database_key_file,
    DecryptionFailed,
    generate_master_key,
    hkdf,
    NONCE_BYTES,
    KeyUnavailable,
    load_master_keys,
    MasterKey,
    parse_master_key_env,
    pending_master_key_file,
    read_master_key_file,
    sqlcipher_raw_key,
    unwrap,
    wrap,
    write_master_key_file,
)

CIPHERTEXT_FORMAT = 1


# --------------------------------------------------------------------------- organization keys


class OrgKey(Base):
    """A wrapped per-organization key. ``kind`` is ``data`` (AES-GCM) or ``index`` (HMAC)."""

    __tablename__ = "org_keys"
    __table_args__ = (UniqueConstraint("org_id", "kind", "version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    version: Mapped[int] = mapped_column(Integer)
    master_key_id: Mapped[str] = mapped_column(String(40))
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=clock.now)


def _purpose(org_id: str, kind: str, version: int) -> str:
    return f"org:{org_id}:{kind}:{version}"


def _aad(org_id: str, table: str, column: str, row_id: str) -> bytes:
    return f"carepost/v1|{org_id}|{table}|{column}|{row_id}".encode()


_EMAIL_RE = re.compile(r"\s+")


def normalize_for_index(kind: str, value: str, *, system: str | None = None) -> str:
    """Normalize before hashing so equal values match: NFKC, trimmed; email lower-cased;
    phone reduced to digits; identifiers (MRN, member id) scoped by their identifier system."""
    text = unicodedata.normalize("NFKC", value).strip()
    if kind == "email":
        return text.lower()
    if kind == "phone":
        digits = re.sub(r"\D", "", text)
        return digits[1:] if len(digits) == 11 and digits.startswith("1") else digits
    if kind in {"mrn", "identifier"}:
        return f"{(system or '').strip()}|{text}"
    return _EMAIL_RE.sub(" ", text).casefold()


class Keyring:
    """Per-process cache of unwrapped keys. Thread-safe; safe to share across sessions."""

    def __init__(self, current_master_id: str, masters: dict[str, MasterKey], settings: Settings | None = None):
        self.current_master_id = current_master_id
        self.masters = masters
        self._settings = settings
        self._master_stamp = self._stamp()
        self._lock = threading.Lock()
        self._data: dict[tuple[str, int], bytes] = {}
        self._current_version: dict[str, int] = {}
        self._index: dict[str, bytes] = {}

    # -- master keys on disk

    def _stamp(self) -> tuple:
        """What the master key files look like now; a change means another process rotated."""
        if self._settings is None or self._settings.master_key_external:
            return ()
        stamp = []
        for path in (self._settings.resolved_master_key_file, pending_master_key_file(self._settings)):
            try:
                st = path.stat()
                stamp.append((str(path), st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append((str(path), None, None))
        return tuple(stamp)

    def refresh_masters(self, force: bool = False) -> None:
        """Pick up a master key rotated by another process (``carepost keys rotate`` while servers
        and workers run): new wraps must use the new key, and keys it wrapped must unwrap."""
        if self._settings is None:
            return
        stamp = self._stamp()
        if not force and stamp == self._master_stamp:
            return
        current, masters = load_master_keys(self._settings)
        with self._lock:
            self.masters = {**self.masters, **masters}
            self.current_master_id = current
            self._master_stamp = stamp

    def _unwrap(self, wrapped: dict, purpose: str) -> bytes:
        if wrapped.get("mk") not in self.masters:
            self.refresh_masters(force=True)
        return unwrap(self.masters, wrapped, purpose)

    # -- key records

    def ensure_org_keys(self, session: Session, org_id: str) -> None:
        """Create the first data key and the blind-index key of a new organization."""
        existing = session.scalars(select(OrgKey.kind).where(OrgKey.org_id == org_id)).all()
        self.refresh_masters()
        master = self.masters[self.current_master_id]
        for kind in ("data", "index"):
            if kind not in existing:
                secret = secrets.token_bytes(32)
                session.add(
                    OrgKey(
                        org_id=org_id,
                        kind=kind,
                        version=1,
                        master_key_id=master.id,
                        wrapped=json.dumps(wrap(master, secret, _purpose(org_id, kind, 1))).encode(),
                    )
                )
        session.flush()

    def _load(self, session: Session, org_id: str, kind: str, version: int | None) -> tuple[int, bytes]:
        q = select(OrgKey).where(OrgKey.org_id == org_id, OrgKey.kind == kind)
        q = q.where(OrgKey.version == version) if version is not None else q.order_by(OrgKey.version.desc()).limit(1)
        rec = session.scalars(q).first()
        if rec is None:
            raise KeyUnavailable(f"no {kind} key version {version or 'current'} for organization {org_id}")
        secret = self._unwrap(json.loads(rec.wrapped), _purpose(org_id, kind, rec.version))
        return rec.version, secret

    def data_key(self, session: Session, org_id: str, version: int | None = None) -> tuple[int, bytes]:
        with self._lock:
            if version is None and org_id in self._current_version:
                version = self._current_version[org_id]
            if version is not None and (org_id, version) in self._data:
                return version, self._data[(org_id, version)]
        got_version, secret = self._load(session, org_id, "data", version)
        with self._lock:
            self._data[(org_id, got_version)] = secret
            if version is None:
                self._current_version[org_id] = got_version
        return got_version, secret

    def index_key(self, session: Session, org_id: str) -> bytes:
        with self._lock:
            if org_id in self._index:
                return self._index[org_id]
        _, secret = self._load(session, org_id, "index", 1)
        with self._lock:
            self._index[org_id] = secret
        return secret

    def named_key(self, session: Session, owner_id: str, kind: str) -> bytes:
        """A single-version secret of ``kind`` (e.g. ``audit``) for an owner, created on first use."""
        cache_key = f"{owner_id}\x00{kind}"
        with self._lock:
            if cache_key in self._index:
                return self._index[cache_key]
        rec = session.scalars(select(OrgKey).where(OrgKey.org_id == owner_id, OrgKey.kind == kind)).first()
        if rec is None:
            self.refresh_masters()
            master = self.masters[self.current_master_id]
            secret = secrets.token_bytes(32)
            try:
                with session.begin_nested():
                    session.add(
                        OrgKey(
                            org_id=owner_id,
                            kind=kind,
                            version=1,
                            master_key_id=master.id,
                            wrapped=json.dumps(wrap(master, secret, _purpose(owner_id, kind, 1))).encode(),
                        )
                    )
            except IntegrityError:
                rec = session.scalars(select(OrgKey).where(OrgKey.org_id == owner_id, OrgKey.kind == kind)).one()
                secret = self._unwrap(json.loads(rec.wrapped), _purpose(owner_id, kind, 1))
        else:
            secret = self._unwrap(json.loads(rec.wrapped), _purpose(owner_id, kind, rec.version))
        with self._lock:
            self._index[cache_key] = secret
        return secret

    # -- field encryption

    def encrypt(self, session: Session, org_id: str, table: str, column: str, row_id: str, value: str | bytes) -> bytes:
        version, key = self.data_key(session, org_id)
        data = value.encode() if isinstance(value, str) else value
        nonce = secrets.token_bytes(NONCE_BYTES)
        ct = AESGCM(key).encrypt(nonce, data, _aad(org_id, table, column, row_id))
        return bytes([CIPHERTEXT_FORMAT]) + version.to_bytes(4, "big") + nonce + ct

    def decrypt(self, session: Session, org_id: str, table: str, column: str, row_id: str, blob: bytes) -> bytes:
        if not blob or blob[0] != CIPHERTEXT_FORMAT or len(blob) < 5 + NONCE_BYTES + 16:
            raise DecryptionFailed(f"{table}.{column}: not a CarePost ciphertext")
        version = int.from_bytes(blob[1:5], "big")
        _, key = self.data_key(session, org_id, version)
        try:
            return AESGCM(key).decrypt(blob[5 : 5 + NONCE_BYTES], blob[5 + NONCE_BYTES :], _aad(org_id, table, column, row_id))
        except InvalidTag as exc:
            raise DecryptionFailed(f"{table}.{column} of row {row_id} failed authentication") from exc

    def decrypt_text(self, session: Session, org_id: str, table: str, column: str, row_id: str, blob: bytes | None) -> str | None:
        if blob is None:
            return None
        return self.decrypt(session, org_id, table, column, row_id, blob).decode()

    @staticmethod
    def key_version_of(blob: bytes) -> int:
        return int.from_bytes(blob[1:5], "big")

    def blind_index(self, session: Session, org_id: str, kind: str, value: str, *, system: str | None = None) -> str:
        """Keyed HMAC for equality look-ups; the kind is part of the input so an email and a
        phone with equal text never collide."""
        key = self.index_key(session, org_id)
        msg = f"{kind}\x00{normalize_for_index(kind, value, system=system)}".encode()
        return hmac.new(key, msg, hashlib.sha256).hexdigest()

    # -- rotation

    def rotate_data_keys(self, session: Session) -> int:
        """Add a new data-key version for every organization; new writes use it."""
        self.refresh_masters()
        master = self.masters[self.current_master_id]
        rows = session.execute(
            select(OrgKey.org_id, OrgKey.version).where(OrgKey.kind == "data").order_by(OrgKey.org_id, OrgKey.version)
        ).all()
        latest: dict[str, int] = {}
        for org_id, version in rows:
            latest[org_id] = max(version, latest.get(org_id, 0))
        for org_id, version in latest.items():
            new_version = version + 1
            session.add(
                OrgKey(
                    org_id=org_id,
                    kind="data",
                    version=new_version,
                    master_key_id=master.id,
                    wrapped=json.dumps(wrap(master, secrets.token_bytes(32), _purpose(org_id, "data", new_version))).encode(),
                )
            )
        session.flush()
        with self._lock:
            self._current_version.clear()
        return len(latest)

    def rewrap_all(self, session: Session, new_master: MasterKey) -> int:
        """Re-wrap every organization key under ``new_master`` (the old master unwraps)."""
        masters = dict(self.masters)
        masters[new_master.id] = new_master
        count = 0
        for rec in session.scalars(select(OrgKey)).all():
            purpose = _purpose(rec.org_id, rec.kind, rec.version)
            secret = unwrap(masters, json.loads(rec.wrapped), purpose)
            rec.wrapped = json.dumps(wrap(new_master, secret, purpose)).encode()
            rec.master_key_id = new_master.id
            count += 1
        session.flush()
        return count


_keyring: Keyring | None = None
_keyring_lock = threading.Lock()


def get_keyring() -> Keyring:
    global _keyring
    with _keyring_lock:
        if _keyring is None:
            settings = get_settings()
            current, masters = load_master_keys(settings)
            _keyring = Keyring(current, masters, settings)
        return _keyring


def reset_keyring() -> None:
    global _keyring
    with _keyring_lock:
        _keyring = None


def rotate_master_key(settings: Settings, session_factory) -> tuple[str, str, int]:
    """Rotate the master key without downtime for readers.

    1. write the new key to ``master.key.new`` (processes that start now know both keys);
    2. in one transaction re-wrap every organization key and add a new data-key version;
    3. re-wrap the database secret file;
    4. move ``master.key.new`` over ``master.key``.
    A crash at any step leaves every wrapped key readable by a key that is on disk.
    """
    if settings.master_key_external:
        raise KeyUnavailable("the master key comes from CAREPOST_MASTER_KEY or CAREPOST_MASTER_KEY_COMMAND: "
                             "rotate it where it is stored")
    pending = pending_master_key_file(settings)
    old_id, masters = load_master_keys(settings)  # includes a pending key from an interrupted run
    if pending.exists():
        # An earlier rotation stopped half-way and that file may hold the only copy of the key
        # that wraps some records: never overwrite it — resume that rotation with it instead.
        new = read_master_key_file(pending)
    else:
        new = generate_master_key()
        write_master_key_file(pending, new)
    ring = Keyring(old_id, {**masters, new.id: new})
    with session_factory() as session:
        session.info["scope"] = "system"
        count = ring.rewrap_all(session, new)
        ring.current_master_id = new.id
        ring.rotate_data_keys(session)
        session.commit()
    db_file = database_key_file(settings)
    if db_file.exists():
        secret = unwrap({**masters, new.id: new}, json.loads(db_file.read_text()), "database")
        _write_json_0600(db_file, wrap(new, secret, "database"))
    os.replace(pending, settings.resolved_master_key_file)
    reset_keyring()
    return old_id, new.id, count
