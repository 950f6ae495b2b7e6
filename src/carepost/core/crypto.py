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
import time
import unicodedata
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.exc import IntegrityError
from sqlalchemy import DateTime, Integer, LargeBinary, String, UniqueConstraint, bindparam, event, func, select, text
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
# A ciphertext under a per-period data key (issue 16, crypto-shredding): same layout, but the four
# bytes after the format byte name a ``period`` key version (record class and creation month, see
# ``period_key_version``) instead of a data-key version. The retention purge destroys such a key
# once every record of its class and month has passed its maximum period and none is held.
PERIOD_CIPHERTEXT_FORMAT = 2
PERIOD_KEY_KIND = "period"
# Record classes that have per-period keys, with the code that goes in the key version. Never
# renumber: the code is stored in every ciphertext of the class.
PERIOD_KEY_CLASSES = {"messages": 1, "portal": 2, "forms": 3, "imports": 4, "events": 5, "logs": 6}
# Named secrets (``Keyring.named_key``) that ``carepost keys rotate-secret`` rotates: each MAC made
# with one records or finds its version, so a rotation never breaks what was made before.
NAMED_SECRET_KINDS = ("audit", "portal", "consent", "forms", "verp", "tracking")


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
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)  # emptied when the version is retired
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=clock.now)
    # Set by the re-encryption job once no ciphertext or index needs this version: its key
    # material is destroyed (``wrapped`` emptied) and it can no longer decrypt anything.
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def _purpose(org_id: str, kind: str, version: int) -> str:
    return f"org:{org_id}:{kind}:{version}"


def period_key_version(record_class: str, when: datetime) -> int:
    """The ``period`` key version of a record class and month: ``code * 1_000_000 + yyyymm``
    (``messages`` created in December 2026 -> 1202612); fits a 32-bit integer."""
    return PERIOD_KEY_CLASSES[record_class] * 1_000_000 + when.year * 100 + when.month


def period_of_key_version(version: int) -> tuple[str, int, int]:
    """``(record class, year, month)`` of a ``period`` key version."""
    code, yyyymm = divmod(version, 1_000_000)
    record_class = next(c for c, n in PERIOD_KEY_CLASSES.items() if n == code)
    return record_class, yyyymm // 100, yyyymm % 100


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


def chain_index(key: bytes, previous: str) -> str:
    """One link of the blind-index chain: the index under the next key version, from the stored
    index under the one before (no plaintext needed)."""
    return hmac.new(key, f"chain\x00{previous}".encode(), hashlib.sha256).hexdigest()


# ``session.info`` key: {org_id: (index version, the transaction that read and locked it)},
# dropped when that transaction ends (``_forget_index_versions``).
INDEX_VERSIONS_INFO = "carepost_index_versions"


@event.listens_for(Session, "after_transaction_end")
def _forget_index_versions(session: Session, transaction) -> None:
    """An index version is valid only within the transaction that read (and locked) it. A
    savepoint rolled back releases the locks it took on PostgreSQL, so a version read inside a
    savepoint is dropped when the savepoint ends (commit or not) and the next use reads and locks
    again; one read by the outer transaction stays until it ends."""
    held = session.info.get(INDEX_VERSIONS_INFO)
    if not held:
        return
    if transaction.parent is None:
        session.info.pop(INDEX_VERSIONS_INFO, None)
        return
    for org_id in [o for o, (_, txn) in held.items() if txn is transaction]:
        del held[org_id]


_INDEX_VERSION = select(func.max(OrgKey.__table__.c.version)).where(
    OrgKey.__table__.c.org_id == bindparam("org_id"), OrgKey.__table__.c.kind == "index")


class Keyring:
    """Per-process cache of unwrapped keys. Thread-safe; safe to share across sessions.

    The current version of each versioned key (data, index, named secrets) is re-read from the
    database at most ``CAREPOST_KEY_REFRESH_SECONDS`` after it was last read, so a version added
    by another process (``carepost keys rotate``) is used for new writes within that bound.
    """

    def __init__(self, current_master_id: str, masters: dict[str, MasterKey], settings: Settings | None = None,
                 refresh_seconds: float | None = None):
        self.current_master_id = current_master_id
        self.masters = masters
        self._settings = settings
        if refresh_seconds is None:
            refresh_seconds = settings.key_refresh_seconds if settings is not None else 60
        self.refresh_seconds = float(refresh_seconds)
        self._master_stamp = self._stamp()
        self._lock = threading.Lock()
        # (owner, kind, version) -> secret; (owner, kind) -> (current version, monotonic time read)
        self._keys: dict[tuple[str, str, int], bytes] = {}
        self._rows: dict[tuple[str, str, int], str] = {}  # the org_keys row each copy came from
        self._current: dict[tuple[str, str], tuple[int, float]] = {}

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
        and workers run): new wraps must use the new key, and keys it wrapped must unwrap.

        While a rotation is under way (``master.key.new`` exists) new keys are wrapped with the
        pending key: the rotation never deletes it (it resumes with it, then moves it over
        ``master.key``), so a key made at any moment of the rotation stays readable after it."""
        if self._settings is None:
            return
        stamp = self._stamp()
        if not force and stamp == self._master_stamp:
            return
        current, masters = load_master_keys(self._settings)
        pending = next((k for k in masters if k != current), None)
        with self._lock:
            self.masters = {**self.masters, **masters}
            self.current_master_id = pending or current
            self._master_stamp = stamp

    def _unwrap(self, wrapped: dict, purpose: str) -> bytes:
        if wrapped.get("mk") not in self.masters:
            self.refresh_masters(force=True)
        return unwrap(self.masters, wrapped, purpose)

    def _wrapping_master(self, session: Session) -> MasterKey:
        """The master key new keys are wrapped with, read inside the key-creation lock so that a
        master-key rotation either re-wraps this key or happened before and is seen here."""
        key_creation_lock(session, exclusive=False)
        self.refresh_masters(force=True)
        return self.masters[self.current_master_id]

    # -- key records

    def ensure_org_keys(self, session: Session, org_id: str) -> None:
        """Create the first data key and the blind-index key of a new organization."""
        existing = session.scalars(select(OrgKey.kind).where(OrgKey.org_id == org_id)).all()
        if "data" in existing and "index" in existing:
            return
        master = self._wrapping_master(session)
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

    def _current_version(self, session: Session, owner: str, kind: str) -> int | None:
        """The newest live version of ``kind`` for ``owner``, cached for ``refresh_seconds``."""
        now = time.monotonic()
        with self._lock:
            cached = self._current.get((owner, kind))
            if cached is not None and now - cached[1] < self.refresh_seconds:
                return cached[0]
        rows = session.execute(
            select(OrgKey.version, OrgKey.retired_at, OrgKey.id).where(OrgKey.org_id == owner, OrgKey.kind == kind)
        ).all()
        live = [v for v, retired, _ in rows if retired is None]
        if not live:
            return None
        current = max(live)
        with self._lock:
            self._current[(owner, kind)] = (current, now)
            for v, retired, row_id in rows:
                # Destroyed in the database, or no longer the record our copy came from (a backup
                # restored over this database, or a test emptying it, made a new key with the same
                # version): forget our copy too.
                if retired is not None or self._rows.get((owner, kind, v), row_id) != row_id:
                    self._keys.pop((owner, kind, v), None)
                    self._rows.pop((owner, kind, v), None)
        return current

    def _load(self, session: Session, org_id: str, kind: str, version: int | None) -> tuple[int, bytes]:
        # Also when a version is named: re-reading the current version every refresh_seconds
        # drops this process's copy of versions retired meanwhile.
        current = self._current_version(session, org_id, kind)
        if version is None:
            version = current
            if version is None:
                raise KeyUnavailable(f"no {kind} key for organization {org_id}")
        with self._lock:
            secret = self._keys.get((org_id, kind, version))
        if secret is not None:
            return version, secret
        rec = session.scalars(
            select(OrgKey).where(OrgKey.org_id == org_id, OrgKey.kind == kind, OrgKey.version == version)
        ).first()
        if rec is None:
            raise KeyUnavailable(f"no {kind} key version {version} for organization {org_id}")
        if rec.retired_at is not None:
            raise KeyUnavailable(f"{kind} key version {version} of organization {org_id} was retired")
        secret = self._unwrap(json.loads(rec.wrapped), _purpose(org_id, kind, rec.version))
        with self._lock:
            self._keys[(org_id, kind, version)] = secret
            self._rows[(org_id, kind, version)] = rec.id
        return version, secret

    def data_key(self, session: Session, org_id: str, version: int | None = None) -> tuple[int, bytes]:
        return self._load(session, org_id, "data", version)

    def index_key(self, session: Session, org_id: str, version: int | None = None) -> bytes:
        if version is None:
            version = self.index_version(session, org_id)
        return self._load(session, org_id, "index", version)[1]

    def forget_current_versions(self) -> None:
        """Re-read every current version at next use (after this process rotated keys)."""
        with self._lock:
            self._current.clear()

    def forget_key(self, owner: str, kind: str, version: int) -> None:
        """Drop this process's copy of a key (it was just retired)."""
        with self._lock:
            self._keys.pop((owner, kind, version), None)
            self._current.pop((owner, kind), None)

    def live_versions(self, session: Session, owner: str, kind: str) -> list[int]:
        """Every version of ``kind`` not yet retired, newest first."""
        return sorted(session.scalars(select(OrgKey.version).where(
            OrgKey.org_id == owner, OrgKey.kind == kind, OrgKey.retired_at.is_(None))).all(), reverse=True)

    def named_key(self, session: Session, owner_id: str, kind: str) -> bytes:
        """The current secret of ``kind`` (e.g. ``audit``, ``portal``, ``consent``) for an owner,
        created on first use."""
        return self.named_key_version(session, owner_id, kind)[1]

    def named_key_version(self, session: Session, owner_id: str, kind: str) -> tuple[int, bytes]:
        """``(version, secret)`` of the current secret of ``kind``, created on first use."""
        try:
            return self._load(session, owner_id, kind, None)
        except KeyUnavailable:
            if session.scalars(select(OrgKey.id).where(OrgKey.org_id == owner_id, OrgKey.kind == kind)).first():
                # A row now: either every version was retired (``_load`` refuses again), or another
                # transaction created the first one and committed between the read above and this
                # one (PostgreSQL's READ COMMITTED: each statement sees the commits before it; a
                # worker's threads all creating a new organization's ``verp`` key at once). That
                # key is the one to use, not a KeyUnavailable that fails the caller's transaction.
                return self._load(session, owner_id, kind, None)
        master = self._wrapping_master(session)
        secret = secrets.token_bytes(32)
        try:
            with session.begin_nested():
                rec = OrgKey(id=new_id(), org_id=owner_id, kind=kind, version=1, master_key_id=master.id,
                             wrapped=json.dumps(wrap(master, secret, _purpose(owner_id, kind, 1))).encode())
                session.add(rec)
        except IntegrityError:
            return self._load(session, owner_id, kind, 1)
        with self._lock:
            self._keys[(owner_id, kind, 1)] = secret
            self._rows[(owner_id, kind, 1)] = rec.id
            self._current[(owner_id, kind)] = (1, time.monotonic())
        return 1, secret

    def named_keys(self, session: Session, owner_id: str, kind: str) -> list[tuple[int, bytes]]:
        """Every live version of a named secret, newest first: to verify a MAC made before a
        rotation (a link already sent) while new MACs use the current one."""
        self.named_key(session, owner_id, kind)
        return [self._load(session, owner_id, kind, v) for v in self.live_versions(session, owner_id, kind)]

    # -- field encryption

    # -- per-period data keys (crypto-shredding, docs/keys.md "Per-period keys")

    def period_key(self, session: Session, org_id: str, record_class: str, when: datetime) -> tuple[int, bytes]:
        """``(version, secret)`` of the organization's data key for ``record_class`` records created
        in the month of ``when``, created on first use. A destroyed (shredded) period refuses."""
        version = period_key_version(record_class, when)
        try:
            return self._load(session, org_id, PERIOD_KEY_KIND, version)
        except KeyUnavailable:
            if session.scalars(select(OrgKey.id).where(OrgKey.org_id == org_id, OrgKey.kind == PERIOD_KEY_KIND,
                                                       OrgKey.version == version)).first():
                # Destroyed by the retention purge (``_load`` refuses again: nothing may be written
                # under it), or created and committed by another transaction since the read above
                # (as in ``named_key_version``): then it is the key.
                return self._load(session, org_id, PERIOD_KEY_KIND, version)
        master = self._wrapping_master(session)
        secret = secrets.token_bytes(32)
        try:
            with session.begin_nested():
                rec = OrgKey(id=new_id(), org_id=org_id, kind=PERIOD_KEY_KIND, version=version, master_key_id=master.id,
                             wrapped=json.dumps(wrap(master, secret, _purpose(org_id, PERIOD_KEY_KIND, version))).encode())
                session.add(rec)
        except IntegrityError:
            return self._load(session, org_id, PERIOD_KEY_KIND, version)
        with self._lock:
            self._keys[(org_id, PERIOD_KEY_KIND, version)] = secret
            self._rows[(org_id, PERIOD_KEY_KIND, version)] = rec.id
        return version, secret

    def destroy_period_key(self, session: Session, org_id: str, version: int) -> bool:
        """Crypto-shred: empty the wrapped key material of a ``period`` key and mark it retired
        (under the exclusive key lock, so a master-key re-wrap never writes it back). Every
        ciphertext it made — in the database and in every backup — is unreadable from then on.
        Returns False when it did not exist or was already destroyed."""
        key_creation_lock(session, exclusive=True)
        rec = session.scalars(select(OrgKey).where(OrgKey.org_id == org_id, OrgKey.kind == PERIOD_KEY_KIND,
                                                   OrgKey.version == version)).first()
        if rec is None or rec.retired_at is not None:
            return False
        rec.wrapped = b""
        rec.retired_at = clock.now()
        session.flush()
        self.forget_key(org_id, PERIOD_KEY_KIND, version)
        return True

    def _key_for_blob(self, session: Session, org_id: str, blob: bytes, where: str) -> bytes:
        if not blob or blob[0] not in (CIPHERTEXT_FORMAT, PERIOD_CIPHERTEXT_FORMAT) or len(blob) < 5 + NONCE_BYTES + 16:
            raise DecryptionFailed(f"{where}: not a CarePost ciphertext")
        version = int.from_bytes(blob[1:5], "big")
        if blob[0] == PERIOD_CIPHERTEXT_FORMAT:
            return self._load(session, org_id, PERIOD_KEY_KIND, version)[1]
        return self.data_key(session, org_id, version)[1]

    # -- field encryption

    def encrypt(self, session: Session, org_id: str, table: str, column: str, row_id: str, value: str | bytes,
                *, period: tuple[str, datetime] | None = None) -> bytes:
        """Seal ``value`` under the organization's current data key, or — with ``period=(record
        class, created at)`` — under that class's key for the record's creation month."""
        if period is not None:
            version, key = self.period_key(session, org_id, *period)
            fmt = PERIOD_CIPHERTEXT_FORMAT
        else:
            (version, key), fmt = self.data_key(session, org_id), CIPHERTEXT_FORMAT
        data = value.encode() if isinstance(value, str) else value
        nonce = secrets.token_bytes(NONCE_BYTES)
        ct = AESGCM(key).encrypt(nonce, data, _aad(org_id, table, column, row_id))
        return bytes([fmt]) + version.to_bytes(4, "big") + nonce + ct

    def decrypt(self, session: Session, org_id: str, table: str, column: str, row_id: str, blob: bytes) -> bytes:
        key = self._key_for_blob(session, org_id, blob, f"{table}.{column}")
        try:
            return AESGCM(key).decrypt(blob[5 : 5 + NONCE_BYTES], blob[5 + NONCE_BYTES :], _aad(org_id, table, column, row_id))
        except InvalidTag as exc:
            raise DecryptionFailed(f"{table}.{column} of row {row_id} failed authentication") from exc

    def decrypt_text(self, session: Session, org_id: str, table: str, column: str, row_id: str, blob: bytes | None) -> str | None:
        if blob is None:
            return None
        return self.decrypt(session, org_id, table, column, row_id, blob).decode()

    def encryptor(self, session: Session, org_id: str, *, period: tuple[str, datetime] | None = None):
        """``encrypt`` for many fields of one organization (a batch of rows written in one
        transaction): the current data key is looked up once, for the returned function's lifetime
        (the caller's scope, never longer). Each value still gets its own nonce and AAD. With
        ``period=(record class, created at)`` the class's key for that month is used instead."""
        if period is not None:
            version, key = self.period_key(session, org_id, *period)
            fmt = PERIOD_CIPHERTEXT_FORMAT
        else:
            (version, key), fmt = self.data_key(session, org_id), CIPHERTEXT_FORMAT
        cipher, prefix = AESGCM(key), bytes([fmt]) + version.to_bytes(4, "big")

        def encrypt(table: str, column: str, row_id: str, value: str | bytes) -> bytes:
            nonce = secrets.token_bytes(NONCE_BYTES)
            data = value.encode() if isinstance(value, str) else value
            return prefix + nonce + cipher.encrypt(nonce, data, _aad(org_id, table, column, row_id))

        return encrypt

    def text_decryptor(self, session: Session, org_id: str):
        """``decrypt_text`` for many fields of one organization in one go (one request's view):
        each key version is looked up once for the returned function's lifetime (the caller's
        scope, never longer), instead of once per field."""
        ciphers: dict[tuple[int, int], AESGCM] = {}

        def decrypt(table: str, column: str, row_id: str, blob: bytes | None) -> str | None:
            if blob is None:
                return None
            if not blob or blob[0] not in (CIPHERTEXT_FORMAT, PERIOD_CIPHERTEXT_FORMAT) or len(blob) < 5 + NONCE_BYTES + 16:
                raise DecryptionFailed(f"{table}.{column}: not a CarePost ciphertext")
            version = (blob[0], int.from_bytes(blob[1:5], "big"))
            cipher = ciphers.get(version)
            if cipher is None:
                cipher = ciphers[version] = AESGCM(self._key_for_blob(session, org_id, blob, f"{table}.{column}"))
            try:
                return cipher.decrypt(blob[5 : 5 + NONCE_BYTES], blob[5 + NONCE_BYTES :],
                                      _aad(org_id, table, column, row_id)).decode()
            except InvalidTag as exc:
                raise DecryptionFailed(f"{table}.{column} of row {row_id} failed authentication") from exc

        return decrypt

    @staticmethod
    def key_version_of(blob: bytes) -> int:
        return int.from_bytes(blob[1:5], "big")

    def index_version(self, session: Session, org_id: str) -> int:
        """The organization's current blind-index version, read once per transaction and held.

        Never from a cache that outlives the transaction: on PostgreSQL a shared
        transaction-level advisory lock on the organization's index (``index_lock``; the
        re-index takes it exclusively) is taken first, then the version is read in the next
        statement (READ COMMITTED: a fresh snapshot, so a re-index that committed while this
        transaction waited is seen). The lock is held until this transaction ends, so no
        re-index can start while it computes or copies indexes. On SQLite every writing
        transaction holds the single writer lock (``BEGIN IMMEDIATE``) and a read-only one reads
        the version and the rows from the same snapshot. See docs/keys.md."""
        held = session.info.setdefault(INDEX_VERSIONS_INFO, {})
        if org_id in held:
            return held[org_id][0]
        with session.no_autoflush:  # callers compute indexes before their row is complete
            index_lock(session, org_id, exclusive=False)
            # A Core statement on the session's connection (same transaction, no flush, the
            # organization named explicitly): the ORM's compile and result handling was half of
            # this read's cost, paid by every transaction that computes a blind index.
            version = session.connection().execute(_INDEX_VERSION, {"org_id": org_id}).scalar()
        if version is None:
            raise KeyUnavailable(f"no index key for organization {org_id}")
        held[org_id] = (version, session.get_nested_transaction() or session.get_transaction())
        return version

    def blind_index(self, session: Session, org_id: str, kind: str, value: str, *, system: str | None = None,
                    version: int | None = None) -> str:
        """Keyed HMAC for equality look-ups, at the organization's current index version (what
        the rows hold); the kind is part of the input so an email and a phone with equal text
        never collide. Indexes are chained: version 1 is ``HMAC(k1, kind|normalized value)`` and
        version n+1 is ``HMAC(k(n+1), version n)``, so a re-index moves every stored index
        (index-only rows included) to a new key without the plaintext (``carepost.core.reindex``)."""
        if version is None:
            version = self.index_version(session, org_id)
        msg = f"{kind}\x00{normalize_for_index(kind, value, system=system)}".encode()
        index = hmac.new(self.index_key(session, org_id, 1), msg, hashlib.sha256).hexdigest()
        for v in range(2, version + 1):
            index = chain_index(self.index_key(session, org_id, v), index)
        return index

    def blind_indexes(self, session: Session, org_id: str, kind: str, value: str, *, system: str | None = None) -> list[str]:
        """The value's index at every version up to the current one, current first (the chain's
        links; rows only ever hold the current one — a re-index moves them all at once)."""
        current = self.index_version(session, org_id)
        return [self.blind_index(session, org_id, kind, value, system=system, version=v) for v in range(current, 0, -1)]

    # -- rotation

    def add_version(self, session: Session, owner: str, kind: str) -> int:
        """Add a new version of ``kind`` for ``owner`` (wrapped under the current master key,
        read inside the key-creation lock); new writes use it. Returns the new version."""
        master = self._wrapping_master(session)
        latest = session.scalar(select(func.max(OrgKey.version)).where(OrgKey.org_id == owner, OrgKey.kind == kind)) or 0
        new_version = latest + 1
        session.add(
            OrgKey(
                org_id=owner,
                kind=kind,
                version=new_version,
                master_key_id=master.id,
                wrapped=json.dumps(wrap(master, secrets.token_bytes(32), _purpose(owner, kind, new_version))).encode(),
            )
        )
        session.flush()
        with self._lock:
            self._current.pop((owner, kind), None)
        return new_version

    def rotate_keys(self, session: Session, kind: str, owners: list[str] | None = None) -> dict[str, int]:
        """Add a new version of ``kind`` for every owner that has one (or for ``owners``)."""
        if owners is None:
            owners = sorted(set(session.scalars(select(OrgKey.org_id).where(OrgKey.kind == kind)).all()))
        return {owner: self.add_version(session, owner, kind) for owner in owners}

    def rotate_data_keys(self, session: Session) -> int:
        """Add a new data-key version for every organization; new writes use it."""
        return len(self.rotate_keys(session, "data"))

    def rewrap_all(self, session: Session, new_master: MasterKey, *, only_other_masters: bool = False) -> int:
        """Re-wrap every organization key under ``new_master`` (the old master unwraps).
        Retired versions hold no key material and are left alone."""
        masters = dict(self.masters)
        masters[new_master.id] = new_master
        count = 0
        q = select(OrgKey).where(OrgKey.retired_at.is_(None))
        if only_other_masters:
            q = q.where(OrgKey.master_key_id != new_master.id)
        for rec in session.scalars(q).all():
            purpose = _purpose(rec.org_id, rec.kind, rec.version)
            secret = unwrap(masters, json.loads(rec.wrapped), purpose)
            rec.wrapped = json.dumps(wrap(new_master, secret, purpose)).encode()
            rec.master_key_id = new_master.id
            count += 1
        session.flush()
        return count


_KEY_LOCK_ID = 0x43617265  # pg advisory lock id of key creation vs. master-key rotation ("Care")


def key_creation_lock(session: Session, *, exclusive: bool) -> None:
    """Serialize wrapping new keys with re-wrapping them all (master-key rotation).

    PostgreSQL: a transaction-level advisory lock, shared by key creators and exclusive for the
    rotation, so the rotation waits for creators in flight and re-wraps what they made, and a
    creator that starts later reads the master key files after the rotation wrote the new one.
    SQLite: every CarePost transaction begins IMMEDIATE and holds the single writer lock, so
    beginning it is enough (a read-only session that tries to write after a rotation
    committed fails with "database is locked" rather than wrap with the old key)."""
    if session.get_bind().dialect.name == "postgresql":
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        session.execute(text(f"SELECT {fn}(:k)"), {"k": _KEY_LOCK_ID})
    else:
        session.execute(text("SELECT 1"))


_INDEX_LOCK_CLASS = 0x49647831  # first key of the two-key pg advisory lock of an organization's index ("Idx1")


def index_lock(session: Session, org_id: str, *, exclusive: bool) -> None:
    """Serialize computing an organization's blind indexes with re-indexing it (PostgreSQL:
    a transaction-level advisory lock keyed by the organization, shared by every transaction
    that computes or copies an index, exclusive for ``carepost keys rotate-index``). An
    advisory lock writes nothing (a row lock would write the key row's header and make a
    MultiXact for every overlap of concurrent transactions). SQLite: the transaction's
    ``BEGIN IMMEDIATE`` (or a read-only snapshot) already isolates it; nothing to take."""
    if session.get_bind().dialect.name != "postgresql":
        return
    objid = int.from_bytes(hashlib.sha256(org_id.encode()).digest()[:4], "big", signed=True)
    fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    session.execute(text(f"SELECT {fn}(:c, :o)"), {"c": _INDEX_LOCK_CLASS, "o": objid})


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
        key_creation_lock(session, exclusive=True)  # creators in flight finish first; later ones see master.key.new
        count = ring.rewrap_all(session, new)
        ring.current_master_id = new.id
        ring.rotate_data_keys(session)
        session.commit()
    db_file = database_key_file(settings)
    if db_file.exists():
        secret = unwrap({**masters, new.id: new}, json.loads(db_file.read_text()), "database")
        _write_json_0600(db_file, wrap(new, secret, "database"))
    os.replace(pending, settings.resolved_master_key_file)
    # Belt and braces: nothing may stay wrapped by the old key, which is no longer on disk (a key
    # made by a process that did not take the creation lock). This process still holds it.
    while True:
        with session_factory() as session:
            session.info["scope"] = "system"
            key_creation_lock(session, exclusive=True)
            late = ring.rewrap_all(session, new, only_other_masters=True)
            session.commit()
        count += late
        if not late:
            break
    reset_keyring()
    return old_id, new.id, count
