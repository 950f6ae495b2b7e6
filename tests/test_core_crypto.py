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
