"""Key rotation gaps (issue 9 item 13): running processes follow a new data-key version within
CAREPOST_KEY_REFRESH_SECONDS; a key created during a master-key rotation stays readable after it;
the re-encryption job moves old ciphertexts to the current version and retires old versions;
named secrets (portal, consent, audit, ...) rotate without breaking what was made before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from carepost.core.config import get_settings
from carepost.core.crypto import (
    Keyring,
    KeyUnavailable,
    OrgKey,
    generate_master_key,
    get_keyring,
    load_master_keys,
    pending_master_key_file,
    read_master_key_file,
    rotate_master_key,
    unwrap,
    write_master_key_file,
)
from carepost.core.database import org_session, session_factory, system_session
from carepost.patients import service as patients
from carepost.patients.schemas import ContactIn


def _ring(refresh: float) -> Keyring:
    """A keyring as another process would hold it (its own caches)."""
    settings = get_settings()
    current, masters = load_master_keys(settings)
    return Keyring(current, masters, settings, refresh_seconds=refresh)


def _readable_with_only(master) -> None:
    """'Restart' with nothing but ``master``: every live key must unwrap."""
    ring = Keyring(master.id, {master.id: master})
    with system_session() as s:
        rows = s.scalars(select(OrgKey).where(OrgKey.retired_at.is_(None))).all()
        assert rows
        for rec in rows:
            assert rec.master_key_id == master.id
            assert len(unwrap(ring.masters, json.loads(rec.wrapped), f"org:{rec.org_id}:{rec.kind}:{rec.version}")) == 32


# --------------------------------------------------------------------------- bounded refresh


def test_a_running_keyring_encrypts_with_a_new_version_within_the_refresh_bound(db, org):
    running = _ring(refresh=0.5)
    with system_session() as s:
        assert Keyring.key_version_of(running.encrypt(s, org.id, "t", "c", "r", "x")) == 1
        s.commit()
    with system_session() as s:  # another process rotates
        _ring(refresh=60).rotate_keys(s, "data")
        s.commit()
    with system_session() as s:
        # within the bound the cached version may still be used ...
        assert Keyring.key_version_of(running.encrypt(s, org.id, "t", "c", "r", "x")) in (1, 2)
        time.sleep(0.6)
        # ... after it, never
        blob = running.encrypt(s, org.id, "t", "c", "r", "x")
        assert Keyring.key_version_of(blob) == 2
        assert running.decrypt_text(s, org.id, "t", "c", "r", blob) == "x"


def test_default_refresh_bound_is_the_setting(db):
    assert get_keyring().refresh_seconds == get_settings().key_refresh_seconds == 60


CHILD = r"""
import sys
from carepost.core.crypto import get_keyring, Keyring
from carepost.core.database import system_session
org = sys.argv[1]
for line in sys.stdin:
    with system_session() as s:
        blob = get_keyring().encrypt(s, org, "t", "c", "r", "x")
        s.commit()
    print(Keyring.key_version_of(blob), flush=True)
"""


def test_a_separate_process_follows_a_rotation_within_the_bound(storage, db, org):
    env = {**os.environ, **storage.env, "CAREPOST_KEY_REFRESH_SECONDS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, org.id], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=env, text=True, cwd=os.getcwd())
    try:
        def ask() -> int:
            child.stdin.write("go\n")
            child.stdin.flush()
            return int(child.stdout.readline())

        assert ask() == 1
        result = CliRunner().invoke(__import__("carepost.cli", fromlist=["app"]).app, ["keys", "rotate", "--data-only"])
        assert result.exit_code == 0, result.output
        time.sleep(1.2)
        assert ask() == 2
    finally:
        child.stdin.close()
        child.wait(timeout=30)


# --------------------------------------------------------------------------- creation during rotation


def test_a_key_created_while_a_rotation_is_pending_is_wrapped_with_the_new_key(db, org):
    """Between the rotation's re-wrap and the move of master.key.new over master.key, a new key
    must be wrapped with the new master key, not the one about to disappear."""
    settings = get_settings()
    new = generate_master_key()
    write_master_key_file(pending_master_key_file(settings), new)  # the rotation's first step
    ring = _ring(refresh=60)
    with system_session() as s:
        ring.ensure_org_keys(s, "owner-during-rotation")
        ring.named_key(s, "owner-during-rotation", "portal")
        s.commit()
        recs = s.scalars(select(OrgKey).where(OrgKey.org_id == "owner-during-rotation")).all()
        assert {r.master_key_id for r in recs} == {new.id}
    _, new_id, _ = rotate_master_key(settings, session_factory())  # resumes with the pending key
    assert new_id == new.id
    _readable_with_only(new)


def test_a_key_created_concurrently_with_a_rotation_is_readable_after_restart(db, org):
    settings = get_settings()
    creating = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def creator():
        try:
            ring = _ring(refresh=60)
            with system_session() as s:
                ring.ensure_org_keys(s, "concurrent-owner")  # wraps inside the creation lock
                creating.set()
                release.wait(20)
                s.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            creating.set()

    result: dict = {}

    def rotator():
        try:
            result["ids"] = rotate_master_key(settings, session_factory())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t1 = threading.Thread(target=creator)
    t1.start()
    assert creating.wait(20)
    t2 = threading.Thread(target=rotator)
    t2.start()
    time.sleep(1.0)
    assert "ids" not in result  # the rotation waits for the creator's transaction
    release.set()
    t1.join(30)
    t2.join(60)
    assert not errors, errors
    new = read_master_key_file(settings.resolved_master_key_file)
    assert result["ids"][1] == new.id
    _readable_with_only(new)
    with system_session() as s:
        assert s.scalars(select(OrgKey).where(OrgKey.org_id == "concurrent-owner")).all()


# --------------------------------------------------------------------------- re-encryption and retirement


def _contact(org_id: str, **fields) -> str:
    with org_session(org_id) as s:
        cid = patients.save_contact(s, org_id, ContactIn(**fields)).contact.id
        s.commit()
        return cid


def test_reencryption_moves_every_ciphertext_to_the_current_version_and_retires_the_old_one(db, org):
    from carepost.core.reencrypt import key_status, reencrypt_and_retire
    from carepost.patients.models import Contact, ContactIdentifier

    cid = _contact(org.id, given_name="Zoë", family_name="Nguyễn", email="zoe@example.org", phone="+1 555 0100")
    with system_session() as s:
        get_keyring().rotate_keys(s, "data")
        s.commit()
    get_keyring().forget_current_versions()
    cid2 = _contact(org.id, given_name="Ana", family_name="Silva", email="ana@example.org")

    report = reencrypt_and_retire(session_factory(), grace_seconds=0)
    assert report.reencrypted >= 4 and report.undecodable == 0
    assert (org.id, 1) in report.retired
    with system_session() as s:
        rec = s.scalars(select(OrgKey).where(OrgKey.org_id == org.id, OrgKey.kind == "data", OrgKey.version == 1)).one()
        assert rec.retired_at is not None and rec.wrapped == b""  # key material destroyed
        states = {(r["owner"], r["kind"], r["version"]): r["state"] for r in key_status(s)}
        assert states[(org.id, "data", 1)] == "retired" and states[(org.id, "data", 2)] == "current"
        contact = s.get(Contact, cid)
        assert Keyring.key_version_of(contact.given_name_enc) == 2
        for ident in s.scalars(select(ContactIdentifier).where(ContactIdentifier.value_enc.is_not(None))).all():
            assert Keyring.key_version_of(ident.value_enc) == 2
    get_keyring().forget_current_versions()
    with org_session(org.id) as s:  # all data still decrypts, in a fresh keyring too
        for ring in (get_keyring(), _ring(60)):
            assert patients.contact_dict(s, patients.get_contact(s, cid))["given_name"] == "Zoë"
            assert patients.contact_dict(s, patients.get_contact(s, cid2))["family_name"] == "Silva"
            with pytest.raises(KeyUnavailable):
                ring.data_key(s, org.id, 1)
        assert patients.find_contact_ids(s, org.id, email="ZOE@example.org") == [cid]
    again = reencrypt_and_retire(session_factory(), grace_seconds=0)
    assert again.reencrypted == 0 and not again.retired  # idempotent


def test_a_version_is_kept_while_processes_may_still_write_with_it(db, org):
    from carepost.core.reencrypt import reencrypt_and_retire

    _contact(org.id, given_name="Ana", family_name="Silva")
    with system_session() as s:
        get_keyring().rotate_keys(s, "data")
        s.commit()
    report = reencrypt_and_retire(session_factory())  # default grace: twice the refresh bound
    assert report.reencrypted >= 1 and not report.retired
    assert any(owner == org.id and version == 1 and "younger" in why for owner, version, why in report.kept)
    with system_session() as s:
        assert get_keyring().data_key(s, org.id, 1)[1]


def test_an_unopenable_ciphertext_keeps_its_version(db, org):
    from carepost.core.reencrypt import reencrypt_and_retire
    from carepost.patients.models import Contact

    cid = _contact(org.id, given_name="Ana", family_name="Silva")
    with system_session() as s:
        # bound to another row: no binding the job knows opens it
        foreign = get_keyring().encrypt(s, org.id, "contacts", "given_name", "another-row", "Eve")
        s.get(Contact, cid).middle_name_enc = foreign
        get_keyring().rotate_keys(s, "data")
        s.commit()
    report = reencrypt_and_retire(session_factory(), grace_seconds=0)
    assert report.undecodable == 1
    assert (org.id, 1) not in report.retired
    assert any(o == org.id and v == 1 for o, v, _ in report.kept)


def test_keys_cli_rotate_reencrypt_retire_and_status(db, org):
    from carepost import cli as carepost_cli
    from carepost.core.queue import huey

    cid = _contact(org.id, given_name="Ana", family_name="Silva")
    runner = CliRunner()
    huey.immediate = True
    try:
        result = runner.invoke(carepost_cli.app, ["keys", "rotate", "--reencrypt"])
    finally:
        huey.immediate = False
    assert result.exit_code == 0, result.output
    assert "Re-encryption job queued" in result.output
    with system_session() as s:  # the job ran (immediate mode): the contact is under version 2
        from carepost.patients.models import Contact

        assert Keyring.key_version_of(s.get(Contact, cid).given_name_enc) == 2
    result = runner.invoke(carepost_cli.app, ["keys", "retire", "--grace", "0"])
    assert result.exit_code == 0, result.output
    assert f"Retired data key {org.id} v1" in result.output
    result = runner.invoke(carepost_cli.app, ["keys", "status"])
    assert result.exit_code == 0, result.output
    assert "retired" in result.output and "current" in result.output


# --------------------------------------------------------------------------- audit key rotation


def test_a_new_audit_key_version_keeps_earlier_entries_verifying(db, org):
    import shutil

    from carepost import cli as carepost_cli
    from carepost.audit import checkpoints
    from carepost.audit.models import AuditEvent
    from carepost.audit.service import record
    from carepost.audit.verify import verify
    from carepost.core.database import read_only_session

    shutil.rmtree(checkpoints.checkpoint_dir(), ignore_errors=True)

    def append(n):
        with system_session() as s:
            for i in range(n):
                record(s, org_id=org.id, actor_type="user", actor_id="u1", action="contact.read",
                       target_type="contact", target_id=f"c{i}")
            s.commit()

    append(3)
    result = CliRunner().invoke(carepost_cli.app, ["keys", "rotate-secret", "audit"])
    assert result.exit_code == 0, result.output
    get_keyring().forget_current_versions()
    append(2)  # the checkpoint on disk was signed with version 1; appending must accept it
    with read_only_session() as s:
        versions = [e.key_version for e in s.scalars(select(AuditEvent).where(AuditEvent.chain == org.id).order_by(AuditEvent.seq))]
        assert versions[:3] == [1, 1, 1] and versions[3:] == [2, 2]
    with read_only_session() as s:
        report = verify(s, org_id=org.id)
    assert report.ok, report.to_dict()
    chain = report.chains[0]
    assert chain.events == 5 and all(cp["status"] == "ok" for cp in chain.checkpoints)

    # an event re-labelled with the other key version no longer verifies
    with system_session() as s:
        first = s.scalars(select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.seq == 1)).one()
        first.key_version = 2
        s.commit()
    with read_only_session() as s:
        problem = verify(s, org_id=org.id).first_problem
    assert problem is not None and problem.seq == 1


def test_rotate_secret_refuses_an_unknown_kind(db):
    from carepost import cli as carepost_cli

    result = CliRunner().invoke(carepost_cli.app, ["keys", "rotate-secret", "bogus"])
    assert result.exit_code == 1 and "kind must be one of" in result.output


# --------------------------------------------------------------------------- portal, consent, forms, VERP secrets


def _rotate_secret(kind: str) -> None:
    from carepost import cli as carepost_cli

    result = CliRunner().invoke(carepost_cli.app, ["keys", "rotate-secret", kind])
    assert result.exit_code == 0, result.output
    get_keyring().forget_current_versions()


def test_consent_links_sent_before_a_rotation_keep_working(db, org):
    from carepost.consent import tokens

    with system_session() as s:
        old = tokens.make(s, "u", org.id, "c", org.id)
        s.commit()
    _rotate_secret("consent")
    with system_session() as s:
        new = tokens.make(s, "u", org.id, "c", org.id)
        assert new != old  # signed with the new version
        assert tokens.verify(s, old, "u").ref_id == org.id
        assert tokens.verify(s, new, "u").ref_id == org.id
        with pytest.raises(tokens.InvalidToken):
            tokens.verify(s, old[:-2] + ("AA" if old[-2:] != "AA" else "BB"), "u")


def test_verp_return_paths_sent_before_a_rotation_keep_verifying(db, org):
    from carepost.core.ids import new_id
    from carepost.delivery import bounces

    rid = new_id()
    with system_session() as s:
        old = bounces.return_path(s, org.id, "bounce.bar.example", rid)
        s.commit()
    _rotate_secret("verp")
    with system_session() as s:
        new = bounces.return_path(s, org.id, "bounce.bar.example", rid)
        assert new != old
        assert bounces.verp_recipient_id(s, org.id, old) == rid
        assert bounces.verp_recipient_id(s, org.id, new) == rid


def test_portal_links_do_not_change_when_the_portal_secret_rotates(db, org):
    from carepost.portal import service as portal
    from carepost.portal.models import PortalMessage
    from tests.fixtures.portal import arrange

    with system_session() as s:
        a = arrange(s, org.id)
    _rotate_secret("portal")
    with system_session() as s:
        pm = s.get(PortalMessage, a.portal_message_id)
        assert portal.link_token(s, pm) == a.token  # the link already sent
        assert portal.find_by_token(s, a.token).id == pm.id
        b = arrange(s, org.id)
        assert portal.find_by_token(s, b.token).id == b.portal_message_id
        assert portal._derive_token(s, org.id, b.portal_message_id) == b.token  # made with the new version


def test_a_form_rendered_before_a_rotation_still_submits(db, org):
    from types import SimpleNamespace

    from carepost.core.clock import now
    from carepost.forms import service as forms

    form = SimpleNamespace(id="f" * 32, org_id=org.id)
    at = now()
    with system_session() as s:
        token = forms.render_token(s, form, at)
        s.commit()
    _rotate_secret("forms")
    stamp, mac = token.split(".")
    with system_session() as s:
        assert forms.render_token(s, form, at) != token  # new pages are signed with the new version
        assert forms._mac_ok(s, org.id, "render", f"{form.id}|{stamp}", mac)  # the page rendered before still submits
        assert not forms._mac_ok(s, org.id, "render", f"{form.id}|{stamp}", "x" * 43)
