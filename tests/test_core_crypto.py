"""Envelope encryption: AEAD bound to org/table/column/row, blind indexes, rotation."""

from __future__ import annotations

import pytest

from carepost.core.crypto import DecryptionFailed, get_keyring, normalize_for_index


def test_ciphertext_roundtrip_and_binding(session, org):
    ring = get_keyring()
    blob = ring.encrypt(session, org.id, "contacts", "email", "row1", "jane@example.org")
    assert b"jane" not in blob
    assert ring.decrypt_text(session, org.id, "contacts", "email", "row1", blob) == "jane@example.org"
    for table, column, row in [("contacts", "email", "row2"), ("contacts", "phone", "row1"), ("users", "email", "row1")]:
        with pytest.raises(DecryptionFailed):
            ring.decrypt(session, org.id, table, column, row, blob)


def test_ciphertext_bound_to_organization(session, org):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    ring = get_keyring()
    blob = ring.encrypt(session, org.id, "contacts", "email", "row1", "x")
    with pytest.raises(DecryptionFailed):
        ring.decrypt(session, other.id, "contacts", "email", "row1", blob)


def test_tampered_ciphertext_fails(session, org):
    ring = get_keyring()
    blob = bytearray(ring.encrypt(session, org.id, "t", "c", "r", "secret"))
    blob[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        ring.decrypt(session, org.id, "t", "c", "r", bytes(blob))


def test_blind_index_normalizes_and_is_keyed_per_org(session, org):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other")
    ring = get_keyring()
    a = ring.blind_index(session, org.id, "email", "  Jane.Doe@Example.ORG ")
    b = ring.blind_index(session, org.id, "email", "jane.doe@example.org")
    assert a == b
    assert ring.blind_index(session, other.id, "email", "jane.doe@example.org") != a
    assert ring.blind_index(session, org.id, "phone", "jane.doe@example.org") != a
    assert normalize_for_index("mrn", " 123 ", system="urn:hosp") == "urn:hosp|123"
    assert ring.blind_index(session, org.id, "mrn", "123", system="A") != ring.blind_index(session, org.id, "mrn", "123", system="B")
    # NFKC: full-width digits equal ASCII digits
    assert ring.blind_index(session, org.id, "mrn", "１２３", system="A") == ring.blind_index(session, org.id, "mrn", "123", system="A")


def test_data_key_rotation_keeps_old_ciphertexts(session, org):
    ring = get_keyring()
    old = ring.encrypt(session, org.id, "t", "c", "r", "before")
    ring.rotate_data_keys(session)
    session.commit()
    new = ring.encrypt(session, org.id, "t", "c", "r", "after")
    assert ring.key_version_of(new) == ring.key_version_of(old) + 1
    assert ring.decrypt_text(session, org.id, "t", "c", "r", old) == "before"
    assert ring.decrypt_text(session, org.id, "t", "c", "r", new) == "after"


def test_master_key_rotation_rewraps(db, session, org):
    from carepost.core.config import get_settings
    from carepost.core.crypto import load_master_keys, reset_keyring, rotate_master_key
    from carepost.core.database import session_factory

    ring = get_keyring()
    blob = ring.encrypt(session, org.id, "t", "c", "r", "kept")
    session.commit()
    settings = get_settings()
    old_id, _ = load_master_keys(settings)
    old_id2, new_id, count = rotate_master_key(settings, session_factory())
    assert old_id == old_id2 and new_id != old_id and count >= 2
    assert load_master_keys(settings)[0] == new_id
    assert (settings.resolved_master_key_file.stat().st_mode & 0o777) == 0o600
    reset_keyring()
    with session_factory()() as s2:
        s2.info["scope"] = "system"
        assert get_keyring().decrypt_text(s2, org.id, "t", "c", "r", blob) == "kept"


def test_running_process_follows_a_rotation_done_elsewhere(db, session, org):
    """A server that started before `keys rotate` must wrap new keys with the new master key and
    unwrap keys wrapped by it, without a restart."""
    import json

    from sqlalchemy import select

    from carepost.accounts.service import create_organization
    from carepost.core.config import get_settings
    from carepost.core.crypto import OrgKey, load_master_keys, rotate_master_key
    from carepost.core.database import session_factory

    running = get_keyring()  # the long-running process's keyring
    running.data_key(session, org.id)
    session.commit()
    _, new_id, _ = rotate_master_key(get_settings(), session_factory())
    # the rotation reset the module keyring; `running` is the old process's object
    with session_factory()() as s:
        s.info["scope"] = "system"
        late = create_organization(s, "Late Clinic")  # uses the fresh module keyring
        s.commit()
        assert running.data_key(s, late.id)[1]  # unwraps a key wrapped by the new master
        running.ensure_org_keys(s, "late-owner")
        s.commit()
        rec = s.scalars(select(OrgKey).where(OrgKey.org_id == "late-owner", OrgKey.kind == "data")).one()
        assert json.loads(rec.wrapped)["mk"] == new_id == load_master_keys(get_settings())[0]


def test_interrupted_rotation_resumes_with_the_pending_key(db, session, org):
    from carepost.core.config import get_settings
    from carepost.core.crypto import (
        generate_master_key,
        pending_master_key_file,
        reset_keyring,
        rotate_master_key,
        write_master_key_file,
    )
    from carepost.core.database import session_factory

    blob = get_keyring().encrypt(session, org.id, "t", "c", "r", "kept")
    session.commit()
    settings = get_settings()
    pending = generate_master_key()
    write_master_key_file(pending_master_key_file(settings), pending)  # left by a crashed run
    _, new_id, _ = rotate_master_key(settings, session_factory())
    assert new_id == pending.id
    assert not pending_master_key_file(settings).exists()
    reset_keyring()
    with session_factory()() as s2:
        s2.info["scope"] = "system"
        assert get_keyring().decrypt_text(s2, org.id, "t", "c", "r", blob) == "kept"


@pytest.mark.parametrize("kind", ["verp", "period"])
def test_key_created_by_another_transaction_between_two_reads_is_used(db, org, monkeypatch, kind):
    """A key created on first use (``named_key_version``, ``period_key``) whose row another
    transaction commits between this one's read of the key (none yet) and its check for a
    retired or destroyed row: the key is loaded, not refused. On PostgreSQL (READ COMMITTED, each
    statement sees the commits before it) this happened when a worker's threads all delivered the
    first messages of a new organization and created its ``verp`` key at once: a thread's
    ``KeyUnavailable`` failed its delivery task (bench/campaign_send.py's ``worker_errors``),
    retried by the queue 30 s later. Here the other creator is a second keyring (a second worker
    process: caches of its own) in a second session that commits; on SQLite a writing transaction
    holds the single writer lock from its ``BEGIN IMMEDIATE``, so the other creator writes in this
    same transaction instead — the row appears between the two reads as it does on PostgreSQL."""
    from datetime import UTC, datetime

    from carepost.core.config import get_settings
    from carepost.core.crypto import Keyring, KeyUnavailable, load_master_keys
    from carepost.core.database import system_session

    when = datetime(2026, 3, 4, tzinfo=UTC)
    other = Keyring(*load_master_keys(get_settings()))
    ring = get_keyring()

    def create(r, s):
        if kind == "verp":
            return r.named_key_version(s, org.id, "verp")
        return r.period_key(s, org.id, "messages", when)

    with system_session() as session:
        created = {}
        original = Keyring._load

        def racing_load(self, s, owner, k, version):
            if self is ring and not created:
                with pytest.raises(KeyUnavailable):
                    original(self, s, owner, k, version)  # none yet: this transaction will create it ...
                # ... but another creates it first and commits before this one looks again
                if s.get_bind().dialect.name == "postgresql":
                    with system_session() as elsewhere:
                        created["key"] = create(other, elsewhere)
                        elsewhere.commit()
                else:
                    created["key"] = create(other, s)
                raise KeyUnavailable("no key yet")
            return original(self, s, owner, k, version)

        monkeypatch.setattr(Keyring, "_load", racing_load)
        got = create(ring, session)
        session.commit()
    assert created["key"][1] and got == created["key"]
