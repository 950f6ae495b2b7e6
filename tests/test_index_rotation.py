"""Blind-index key rotation with a re-index (issue 9 item 13, the last part).

Indexes are chained (version n+1 = HMAC(k(n+1), version n)), so `carepost keys rotate-index`
moves every index column of an organization — index-only rows included — to a new key in one
transaction; every look-up keeps finding its row; a process that read the version before the
rotation never computes with it afterwards; a writer during the rotation cannot leave a row
behind; an interrupted rotation leaves the old version whole and can run again."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import String, select
from typer.testing import CliRunner

from carepost.core.config import get_settings
from carepost.core.crypto import Keyring, OrgKey, get_keyring, load_master_keys
from carepost.core.database import Base, org_session, session_factory, system_session
from carepost.core.reindex import INDEX_COLUMNS, NOT_ORG_INDEXES, rotate_index_keys
from carepost.delivery import suppressions
from carepost.patients import service as patients
from carepost.patients.schemas import ContactIn


def _ring(refresh: float) -> Keyring:
    """A keyring as another running process holds it (its own caches)."""
    settings = get_settings()
    current, masters = load_master_keys(settings)
    return Keyring(current, masters, settings, refresh_seconds=refresh)


def _rotate(*org_ids: str):
    report = rotate_index_keys(session_factory(), list(org_ids) or None)
    assert report.rotated
    return report


def _index_version(org_id: str) -> int:
    with system_session() as s:
        return max(s.scalars(select(OrgKey.version).where(OrgKey.org_id == org_id, OrgKey.kind == "index")).all())


def _contact(org_id: str, refs=(), **fields) -> str:
    with org_session(org_id) as s:
        cid = patients.save_contact(s, org_id, ContactIn(**fields), source_refs=refs).contact.id
        s.commit()
        return cid


# --------------------------------------------------------------------------- every column, every look-up


def test_every_index_column_of_the_models_is_rotated(db):
    """Fails when a model gains a blind-index column the rotation does not move."""
    from carepost.models import load_all_models

    load_all_models()
    found = set()
    for table in Base.metadata.sorted_tables:
        for col in table.c:
            if not isinstance(col.type, String):
                continue
            name = col.name
            if name.startswith("idempotency"):  # a caller's own key, not a keyed hash
                continue
            if name == "blind_index" or name.endswith("_index") or (name.endswith("_key") and col.type.length == 64):
                found.add((table.name, name))
    assert found == set(INDEX_COLUMNS) | NOT_ORG_INDEXES
    for table_name, _ in INDEX_COLUMNS:
        table = Base.metadata.tables[table_name]
        assert "org_id" in table.c and "id" in table.c


def test_every_look_up_finds_its_row_after_rotations(db, org):
    from carepost import cli as carepost_cli
    from carepost.audit.models import AuditEvent
    from carepost.consent import authorizations
    from carepost.delivery import recipient_keys
    from carepost.delivery.models import MessageRecipient, RecipientKey, Suppression
    from carepost.patients.models import Condition, ContactIdentifier
    from carepost.portal.models import PortalMessage
    from tests.fixtures.portal import arrange

    cid = _contact(org.id, given_name="Zoë", family_name="Nguyễn-Smith", email="Zoe@Example.org", phone="+1 (555) 010-0199",
                   mrn="MRN-77", refs=["Patient/abc-1"])
    with org_session(org.id) as s:
        auth_id = authorizations.record_authorization(s, org.id, contact_id=cid, purpose="marketing", method="api",
                                                      signature_name="Zoe N", send_copy=False).id
        # an index-only suppression: the address is held nowhere else
        suppressions.add_suppression(s, org.id, "gone@example.org", "complaint", keep_address=False)
        ring = get_keyring()
        key_id = "k" * 32
        s.add(RecipientKey(id=key_id, org_id=org.id, kind="pgp", fingerprint="F" * 40,
                           address_index=ring.blind_index(s, org.id, "email", "zoe@example.org"),
                           address_enc=ring.encrypt(s, org.id, "recipient_keys", "address", key_id, "zoe@example.org"),
                           key_enc=ring.encrypt(s, org.id, "recipient_keys", "key", key_id, "-----BEGIN PGP-----")))
        s.add(Condition(org_id=org.id, contact_id=cid, code="E11.9", code_system="icd10cm",
                        source_key=patients.source_index(s, org.id, "Condition|cond-9")))
        s.commit()
    with system_session() as s:
        arranged = arrange(s, org.id, address="zoe@example.org")
        s.commit()
    with system_session() as s:
        before = s.scalars(select(ContactIdentifier.blind_index).where(ContactIdentifier.contact_id == cid)).all()
        other_org_before = s.scalars(select(Suppression.address_index).where(Suppression.org_id != org.id)).all()

    runner = CliRunner()
    for expected in (2, 3):
        result = runner.invoke(carepost_cli.app, ["keys", "rotate-index", "--org", org.id])
        assert result.exit_code == 0, result.output
        assert f"-> v{expected}" in result.output
        assert _index_version(org.id) == expected
        with org_session(org.id) as s:
            assert patients.find_contact_ids(s, org.id, email="ZOE@example.org ") == [cid]
            assert patients.find_contact_ids(s, org.id, phone="555-010-0199") == [cid]
            assert patients.find_contact_ids(s, org.id, mrn="MRN-77") == [cid]
            assert patients.find_contact_ids_by_name(s, org.id, "zoe nguyen") == [cid]
            assert patients.find_contact_ids_by_name(s, org.id, "SMITH") == [cid]
            assert patients.contact_for_sources(s, org.id, ["Patient/abc-1"]) == cid
            assert suppressions.is_suppressed(s, org.id, "Gone@example.org") == "complaint"  # index-only row
            assert suppressions.is_suppressed(s, org.id, "zoe@example.org") is None
            email_index = patients.blind_index(s, org.id, "email", "zoe@example.org")
            assert s.get(authorizations.Authorization, auth_id).subject_index == email_index
            assert set(recipient_keys.recipient_keys(s, org.id, "zoe@example.org")) == {"pgp"}
            assert s.scalars(select(PortalMessage.id).where(PortalMessage.address_index == email_index)).all() == \
                [arranged.portal_message_id]
            history = s.scalars(select(MessageRecipient.id).where(MessageRecipient.address_index == email_index)).all()
            assert history == [arranged.recipient_id]
            assert s.get(MessageRecipient, arranged.recipient_id).domain_index == \
                patients.blind_index(s, org.id, "domain", "example.org")
            fact = s.scalars(select(Condition).where(
                Condition.source_key == patients.source_index(s, org.id, "Condition|cond-9"))).one()
            assert fact.contact_id == cid
            assert get_keyring().blind_indexes(s, org.id, "email", "zoe@example.org")[0] == email_index
    with system_session() as s:
        after = s.scalars(select(ContactIdentifier.blind_index).where(ContactIdentifier.contact_id == cid)).all()
        assert not set(before) & set(after)  # every stored index moved
        # another organization's rows are untouched
        assert s.scalars(select(Suppression.address_index).where(Suppression.org_id != org.id)).all() == other_org_before
        events = s.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id, AuditEvent.action == "keys.index_rotated")).all()
        assert len(events) == 2 and events[-1].details["new_version"] == 3 and events[-1].details["reindexed_count"] >= 8
    result = runner.invoke(carepost_cli.app, ["keys", "status"])
    assert result.exit_code == 0, result.output
    assert f"Blind-index version of {org.id}: 3" in result.output and "chained" in result.output


def test_organizations_rotate_separately(db, org):
    from carepost.accounts.service import create_organization

    with system_session() as s:
        other = create_organization(s, "Other Clinic")
        s.commit()
    for org_id in (org.id, other.id):
        with org_session(org_id) as s:
            suppressions.add_suppression(s, org_id, "pat@example.org", "manual")
            s.commit()
    _rotate(org.id)
    assert _index_version(org.id) == 2 and _index_version(other.id) == 1
    for org_id in (org.id, other.id):
        with org_session(org_id) as s:
            assert suppressions.is_suppressed(s, org_id, "pat@example.org") == "manual"


# --------------------------------------------------------------------------- processes and concurrency


def test_a_process_that_read_the_version_before_a_rotation_never_computes_with_it_after(db, org):
    """Another process's keyring cached version 1 (with an hour's refresh bound); after the
    rotation commits its next transaction computes version 2, so the suppression still blocks."""
    running = _ring(refresh=3600)
    with org_session(org.id) as s:
        v1 = running.blind_index(s, org.id, "email", "pat@example.org")
        suppressions.add_suppression(s, org.id, "pat@example.org", "complaint", keep_address=False)
        s.commit()
    _rotate(org.id)
    with org_session(org.id) as s:
        v2 = running.blind_index(s, org.id, "email", "pat@example.org")
        assert v2 != v1
        found = suppressions.suppression_reason(s, org.id, [v2])
        assert v2 in found and found[v2].reason == "complaint"
        assert suppressions.suppression_reason(s, org.id, [v1]) == {}


def test_a_transaction_computing_indexes_holds_the_rotation_back(db, org):
    """A writer that computed a suppression's index before the rotation started: the rotation
    waits for it to commit and then moves its row too."""
    writer = session_factory()()
    writer.info["org_id"] = org.id
    suppressions.add_suppression(writer, org.id, "early@example.org", "complaint", keep_address=False)
    writer.flush()
    done = threading.Event()
    errors = []

    def rotate():
        try:
            _rotate(org.id)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=rotate)
    thread.start()
    try:
        assert not done.wait(1.0), "the rotation did not wait for a transaction holding the index version"
    finally:
        writer.commit()
        writer.close()
    thread.join(60)
    assert not errors and done.is_set()
    with org_session(org.id) as s:
        assert suppressions.is_suppressed(s, org.id, "early@example.org") == "complaint"


def test_writers_during_a_rotation_leave_no_row_at_the_old_version(db, org):
    with org_session(org.id) as s:
        for i in range(1500):
            suppressions.add_suppression(s, org.id, f"old{i}@example.org", "manual", keep_address=False)
        s.commit()
    written: list[str] = []
    stop = threading.Event()
    started = threading.Event()
    errors = []

    def write():
        i = 0
        try:
            while not stop.is_set() or i < 5:
                address = f"new{i}@example.org"
                with org_session(org.id) as s:
                    suppressions.add_suppression(s, org.id, address, "unsubscribe", keep_address=False)
                    s.commit()
                written.append(address)
                i += 1
                if i == 3:
                    started.set()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=write)
    thread.start()
    started.wait(30)
    report = _rotate(org.id)
    stop.set()
    thread.join(60)
    assert not errors
    assert report.rotated[0].rows["suppressions.address_index"] >= 1500
    assert len(written) >= 5
    with org_session(org.id) as s:
        for i in range(0, 1500, 97):
            assert suppressions.is_suppressed(s, org.id, f"old{i}@example.org") == "manual"
        for address in written:
            assert suppressions.is_suppressed(s, org.id, address) == "unsubscribe", address


def test_an_index_copied_before_a_rotation_is_brought_forward(db, org):
    """A suppression by index (bounce, unsubscribe link, patient deletion) copies the index from
    a row read earlier; if a rotation committed in between, the copy is moved to the new version."""
    cid = _contact(org.id, given_name="Ana", email="ana@example.org")
    with org_session(org.id) as s:
        stale = patients.blind_index(s, org.id, "email", "ana@example.org")
    _rotate(org.id)
    with org_session(org.id) as s:
        row = suppressions.add_suppression_by_index(s, org.id, stale, "unsubscribe", scope="marketing")
        s.commit()
        assert row.address_index == patients.blind_index(s, org.id, "email", "ana@example.org") != stale
        assert suppressions.is_suppressed(s, org.id, "ana@example.org", "marketing") == "unsubscribe"
        assert patients.find_contact_ids(s, org.id, email="ana@example.org") == [cid]


# --------------------------------------------------------------------------- interruption


def test_an_interrupted_rotation_leaves_the_old_version_whole_and_runs_again(db, org, monkeypatch):
    from carepost import cli as carepost_cli
    from carepost.core import reindex

    cid = _contact(org.id, given_name="Ana", family_name="Silva", email="ana@example.org", mrn="M-1")
    with org_session(org.id) as s:
        suppressions.add_suppression(s, org.id, "gone@example.org", "complaint", keep_address=False)
        s.commit()

    real = reindex.chain_index
    calls = {"n": 0}

    def crash_midway(key, previous):
        calls["n"] += 1
        if calls["n"] > 3:  # the process dies after re-indexing part of the rows
            raise KeyboardInterrupt("killed")
        return real(key, previous)

    monkeypatch.setattr(reindex, "chain_index", crash_midway)
    # raised as is, or by SQLite as the error of the statement whose function failed
    with pytest.raises((KeyboardInterrupt, Exception)):
        rotate_index_keys(session_factory(), [org.id])
    monkeypatch.setattr(reindex, "chain_index", real)
    assert _index_version(org.id) == 1  # rolled back whole: no new version, no row moved
    with org_session(org.id) as s:
        assert patients.find_contact_ids(s, org.id, email="ana@example.org") == [cid]
        assert suppressions.is_suppressed(s, org.id, "gone@example.org") == "complaint"

    runner = CliRunner()
    result = runner.invoke(carepost_cli.app, ["keys", "rotate-index", "--resume"])
    assert result.exit_code == 0, result.output
    assert _index_version(org.id) == 2
    result = runner.invoke(carepost_cli.app, ["keys", "rotate-index", "--resume"])  # finished: nothing to redo
    assert result.exit_code == 0, result.output
    assert f"Skipped {org.id}: already rotated" in result.output and _index_version(org.id) == 2
    with org_session(org.id) as s:
        assert patients.find_contact_ids(s, org.id, mrn="M-1") == [cid]
        assert patients.find_contact_ids_by_name(s, org.id, "silva ana") == [cid]
        assert suppressions.is_suppressed(s, org.id, "gone@example.org") == "complaint"


def test_rotate_index_names_an_unknown_organization(db):
    from carepost import cli as carepost_cli

    result = CliRunner().invoke(carepost_cli.app, ["keys", "rotate-index", "--org", "0" * 32])
    assert result.exit_code == 1
    assert "unknown organization" in result.output


def test_rows_are_moved_in_batches(db, org):
    """Keyset pages of ``batch`` rows: every row is moved once, none skipped at a page edge."""
    with org_session(org.id) as s:
        for i in range(1000):
            suppressions.add_suppression(s, org.id, f"a{i}@example.org", "manual", keep_address=False)
        s.commit()
    from carepost.delivery.models import Suppression

    with system_session() as s:
        stamps = dict(s.execute(select(Suppression.id, Suppression.updated_at).where(Suppression.org_id == org.id)).tuples().all())
    report = rotate_index_keys(session_factory(), [org.id], batch=300)
    assert report.rotated[0].rows["suppressions.address_index"] == 1000
    with system_session() as s:  # a re-index is not an edit: updated_at stays
        assert dict(s.execute(select(Suppression.id, Suppression.updated_at).where(Suppression.org_id == org.id)).tuples().all()) == stamps
    with org_session(org.id) as s:
        ring = get_keyring()
        wanted = [ring.blind_index(s, org.id, "email", f"a{i}@example.org") for i in range(1000)]
        assert len(suppressions.suppression_reason(s, org.id, wanted)) == 1000


# --------------------------------------------------------------------------- delivery end to end


@pytest.fixture
def delivery(delivery_env, sender, delivery_queue, client):
    return delivery_env, sender, sender.key("messages:send", "messages:read"), client


def test_a_suppression_still_blocks_delivery_after_a_rotation(delivery):
    """A message accepted before the rotation (its recipients indexed under version 1), an
    index-only suppression, the rotation, then the worker: the suppressed address is excluded,
    the other delivered, and the history still finds the recipient by address."""
    from carepost.delivery import pipeline
    from carepost.delivery.models import MessageRecipient

    peers, sender, key, client = delivery
    body = {"from": "Bar Clinic <care@bar.example>", "to": ["gone@valid.test", "sam@valid.test"],
            "subject": "Your appointment", "text": "See you on Monday.", "purpose": "transactional"}
    r = client.post("/api/v1/messages", json=body, headers=key)
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]
    with org_session(sender.org_id) as s:
        suppressions.add_suppression(s, sender.org_id, "gone@valid.test", "complaint", keep_address=False)
        s.commit()
    _rotate(sender.org_id)
    pipeline.deliver([message_id])
    r = client.get(f"/api/v1/messages/{message_id}", headers=key)
    assert r.status_code == 200, r.text
    got = {x["address"]: x for x in r.json()["recipients"]}  # masked: no phi:read_unmasked
    assert (got["g***@valid.test"]["status"], got["g***@valid.test"]["reason"]) == ("excluded", "suppressed_complaint")
    assert got["s***@valid.test"]["status"] == "delivered", got
    assert [t for m in peers.mx["valid"].recorder.messages for t in m.rcpt_tos] == ["sam@valid.test"]
    with org_session(sender.org_id) as s:
        index = patients.blind_index(s, sender.org_id, "email", "sam@valid.test")
        rows = s.scalars(select(MessageRecipient).where(MessageRecipient.org_id == sender.org_id,
                                                        MessageRecipient.address_index == index)).all()
        assert [row.message_id for row in rows] == [message_id]
        assert rows[0].domain_index == patients.blind_index(s, sender.org_id, "domain", "valid.test")


def test_patient_deletion_with_indexes_read_before_a_rotation_still_clears_the_address(db, org):
    """The deletion hook gets the contact's indexes as read before the rotation committed: the
    suppressions of those addresses still lose their clear copy and keep blocking."""
    from carepost.consent import service as consent
    from carepost.delivery.models import Suppression

    cid = _contact(org.id, given_name="Ana", email="ana@example.org")
    with org_session(org.id) as s:
        suppressions.add_suppression(s, org.id, "ana@example.org", "complaint")
        stale = [patients.blind_index(s, org.id, "email", "ana@example.org")]
        s.commit()
    _rotate(org.id)
    with org_session(org.id) as s:
        consent.forget_contact(s, org.id, cid, {"email": stale})
        s.commit()
    with org_session(org.id) as s:
        row = s.scalars(select(Suppression).where(Suppression.org_id == org.id)).one()
        assert row.address_enc is None
        assert suppressions.is_suppressed(s, org.id, "ana@example.org") == "complaint"
