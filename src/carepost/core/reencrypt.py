"""Re-encrypt ciphertexts made under old data-key versions, then retire those versions.

After ``carepost keys rotate`` new writes use the new data-key version, but every row written
before keeps its old ciphertext, so the old version can never be destroyed. This job
(``carepost keys retire``, the ``reencrypt_data_keys`` task, nightly) closes that gap:

1. it finds every column that may hold a keyring ciphertext — each ``LargeBinary`` column of
   every table in the models, except the wrapped keys themselves and the installation's
   MTA-STS cache (sealed under its own ``mtasts`` secret) — so a column added later is covered
   without being listed here;
2. it reads each column in batches (keyset order by id) and, for a ciphertext whose version is
   older than its owner's current one, decrypts it with its binding (organization or the system
   owner, table, column, row) and writes it back under the current version — compare-and-set,
   so a value changed meanwhile is left to its writer;
3. it retires a version (``org_keys.retired_at`` set, its wrapped key material emptied) only when
   the scan found no ciphertext of it left **and** none it could not decrypt claiming that
   version, and the owner's newer version is older than twice ``CAREPOST_KEY_REFRESH_SECONDS``
   (every running process has switched to it by then, see docs/keys.md).

A ciphertext the job cannot open (a binding it does not know) blocks the retirement of the
version it names and is counted in the report (``undecodable``), never destroyed. The job is
idempotent: running it twice re-encrypts nothing the second time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import LargeBinary, Table, and_, select, update
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import (
    CIPHERTEXT_FORMAT,
    DecryptionFailed,
    KeyUnavailable,
    NONCE_BYTES,
    OrgKey,
    get_keyring,
    key_creation_lock,
)
from carepost.core.database import Base

SYSTEM_OWNER = "system"  # carepost.core.bootstrap.SYSTEM_KEY_OWNER (TOTP seeds, ...)
# Columns that are not data-key ciphertexts: the wrapped keys, and the MTA-STS policy cache
# (sealed with the installation's ``mtasts`` secret directly, bound to its domain index).
EXCLUDED = {("org_keys", "wrapped"), ("mta_sts_policies", "policy_enc")}
BATCH = 500


@dataclass
class ReencryptReport:
    scanned: int = 0
    reencrypted: int = 0
    undecodable: int = 0
    columns: int = 0
    # owner -> version -> ciphertexts still under it after the run
    remaining: dict[str, dict[int, int]] = field(default_factory=dict)
    retired: list[tuple[str, int]] = field(default_factory=list)
    kept: list[tuple[str, int, str]] = field(default_factory=list)  # owner, version, why

    def as_dict(self) -> dict:
        return {"scanned_count": self.scanned, "reencrypted_count": self.reencrypted,
                "undecodable_count": self.undecodable, "columns_count": self.columns,
                "retired": [f"{o}:v{v}" for o, v in self.retired],
                "kept": [f"{o}:v{v} ({why})" for o, v, why in self.kept]}


def ciphertext_columns() -> list[tuple[Table, str]]:
    """Every (table, column) that may hold a keyring ciphertext."""
    out = []
    for table in Base.metadata.sorted_tables:
        if "id" not in table.c:
            continue
        for col in table.c:
            if isinstance(col.type, LargeBinary) and (table.name, col.name) not in EXCLUDED:
                out.append((table, col.name))
    return out


def _versions(session: Session) -> tuple[dict[str, int], dict[str, set[int]], dict[tuple[str, int], OrgKey]]:
    """Current data-key version per owner, the live versions per owner, and the key rows."""
    rows = session.scalars(select(OrgKey).where(OrgKey.kind == "data")).all()
    current: dict[str, int] = {}
    live: dict[str, set[int]] = defaultdict(set)
    recs = {}
    for r in rows:
        recs[(r.org_id, r.version)] = r
        if r.retired_at is None:
            live[r.org_id].add(r.version)
            current[r.org_id] = max(r.version, current.get(r.org_id, 0))
    return current, live, recs


def _binding_names(column: str) -> list[str]:
    """The column name a ciphertext is bound to: by convention the column without ``_enc``
    (``address_enc`` -> ``address``); a few columns use their own name (``totp_secret``)."""
    return [column[:-4], column] if column.endswith("_enc") else [column]


def _open(session: Session, ring, owners: list[str], table: str, column: str, row_id: str, blob: bytes,
          live: dict[str, set[int]]) -> tuple[str, str, bytes] | None:
    """(owner, bound column name, plaintext) of a ciphertext, or None if no binding opens it."""
    version = int.from_bytes(blob[1:5], "big")
    for owner in owners:
        if version not in live.get(owner, ()):
            continue
        for name in _binding_names(column):
            try:
                return owner, name, ring.decrypt(session, owner, table, name, row_id, blob)
            except (DecryptionFailed, KeyUnavailable):
                continue
    return None


def _is_ciphertext(blob) -> bool:
    return isinstance(blob, (bytes, memoryview)) and len(blob) >= 5 + NONCE_BYTES + 16 and bytes(blob[:1]) == bytes([CIPHERTEXT_FORMAT])


def reencrypt_and_retire(session_factory, *, batch: int = BATCH, retire: bool = True,
                         grace_seconds: float | None = None) -> ReencryptReport:
    """Run the job over the whole database; see the module docstring. ``session_factory``
    returns a new session (one transaction per batch, so writers are never held up for long)."""
    ring = get_keyring()
    ring.forget_current_versions()
    if grace_seconds is None:
        grace_seconds = 2 * ring.refresh_seconds
    report = ReencryptReport()
    remaining: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    blocked: dict[str, set[int]] = defaultdict(set)  # owner -> versions an unopened ciphertext names
    with _system(session_factory) as session:
        current, live, _ = _versions(session)
    columns = ciphertext_columns()
    report.columns = len(columns)
    for table, column in columns:
        has_org = "org_id" in table.c
        col = table.c[column]
        last_id = ""
        while True:
            with _system(session_factory) as session:
                cols = [table.c.id, col] + ([table.c.org_id] if has_org else [])
                rows = session.execute(
                    select(*cols).where(col.is_not(None), table.c.id > last_id).order_by(table.c.id).limit(batch)
                ).all()
                if not rows:
                    break
                last_id = rows[-1][0]
                for row in rows:
                    row_id, blob = row[0], row[1]
                    org_id = row[2] if has_org else None
                    if not _is_ciphertext(blob):
                        continue
                    blob = bytes(blob)
                    report.scanned += 1
                    version = int.from_bytes(blob[1:5], "big")
                    owners = [o for o in (org_id, SYSTEM_OWNER) if o]
                    if all(current.get(o) == version for o in owners if o in current) and any(o in current for o in owners):
                        remaining[next(o for o in owners if current.get(o) == version)][version] += 1
                        continue
                    opened = _open(session, ring, owners, table.name, column, row_id, blob, live)
                    if opened is None:
                        if any(version in live.get(o, ()) for o in owners):
                            report.undecodable += 1
                            for o in owners:
                                blocked[o].add(version)
                        continue
                    owner, name, plain = opened
                    if version == current[owner]:
                        remaining[owner][version] += 1
                        continue
                    new = ring.encrypt(session, owner, table.name, name, row_id, plain)
                    done = session.execute(
                        update(table).where(and_(table.c.id == row_id, col == blob)).values({column: new})
                    ).rowcount
                    if done:
                        report.reencrypted += 1
                        remaining[owner][ring.key_version_of(new)] += 1
                    else:  # changed meanwhile: its writer used a current key, or we will see it next run
                        remaining[owner][version] += 1
                session.commit()
    report.remaining = {o: dict(v) for o, v in remaining.items()}
    if retire:
        _retire(session_factory, report, blocked, grace_seconds)
    return report


def _retire(session_factory, report: ReencryptReport, blocked: dict[str, set[int]], grace_seconds: float) -> None:
    now = clock.now()
    with _system(session_factory) as session:
        # Exclusive like a master-key rotation, so a re-wrap never writes key material back
        # into a version being retired (nor retires one a rotation is re-wrapping).
        key_creation_lock(session, exclusive=True)
        current, live, recs = _versions(session)
        for owner, versions in sorted(live.items()):
            newest = recs[(owner, current[owner])]
            created = newest.created_at if newest.created_at.tzinfo else newest.created_at.replace(tzinfo=now.tzinfo)
            for version in sorted(versions):
                if version == current[owner]:
                    continue
                if report.remaining.get(owner, {}).get(version):
                    report.kept.append((owner, version, f"{report.remaining[owner][version]} ciphertext(s) left"))
                elif version in blocked.get(owner, ()):
                    report.kept.append((owner, version, "ciphertexts the job cannot open name this version"))
                elif now - created < timedelta(seconds=grace_seconds):
                    report.kept.append((owner, version, f"version {current[owner]} is younger than {int(grace_seconds)}s: "
                                                        "processes may still write with this one"))
                else:
                    rec = recs[(owner, version)]
                    rec.retired_at = now
                    rec.wrapped = b""  # the key material is destroyed
                    report.retired.append((owner, version))
        session.commit()
    for owner, version in report.retired:
        get_keyring().forget_key(owner, "data", version)


def key_status(session: Session) -> list[dict]:
    """Every key version: owner, kind, version, state (current / previous / retired; an older
    blind-index key is ``chained``, see ``carepost.core.reindex``), master key, created."""
    rows = session.scalars(select(OrgKey).order_by(OrgKey.org_id, OrgKey.kind, OrgKey.version)).all()
    newest: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.retired_at is None:
            newest[(r.org_id, r.kind)] = max(r.version, newest.get((r.org_id, r.kind), 0))
    out = []
    for r in rows:
        state = "retired" if r.retired_at else ("current" if newest.get((r.org_id, r.kind)) == r.version else "previous")
        if state == "previous" and r.kind == "index":
            state = "chained"  # a link of the blind-index chain: no row holds it, look-ups compute through it
        out.append({"owner": r.org_id, "kind": r.kind, "version": r.version, "state": state,
                    "master_key_id": r.master_key_id if not r.retired_at else "",
                    "created_at": r.created_at, "retired_at": r.retired_at})
    return out


class _system:
    """A system-scoped session from ``session_factory`` (cross-organization key work)."""

    def __init__(self, factory):
        self.session = factory()

    def __enter__(self) -> Session:
        self.session.info["scope"] = "system"
        return self.session

    def __exit__(self, *exc) -> None:
        self.session.close()
