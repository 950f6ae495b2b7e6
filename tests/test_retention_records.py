"""Retention purge of HIPAA documentation and contacts (issue 16 item 1): authorizations and their
scanned evidence, policies and acknowledgements, inactive contacts and audit events. Records past
the maximum go, held ones stay, and after an audit purge the chain still verifies — with the real
``carepost audit verify`` code — from a signed anchor; a removed or forged anchor is detected."""

from __future__ import annotations

import io
from datetime import date, timedelta

import pytest
from rich.console import Console
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import make_transient

from carepost.core import clock
from carepost.core.database import org_session, read_only_session, system_session
from carepost.core.ids import new_id
from carepost.retention import purge, service
from carepost.retention.service import HIPAA_MIN_DAYS, Actor

SYSTEM = Actor("system", "test")
YEAR = timedelta(days=365)


def _contact(s, org_id, email):
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    return save_contact(s, org_id, ContactIn(given_name="Pat", family_name="Doe", email=email)).contact.id


def _authorization(s, org_id, *, signed, contact_id=None, revoked=None, expires=None, scan=False):
    from carepost.consent.models import (
        Authorization,
        AuthorizationScan,
        AuthorizationText,
    )

    text = s.scalars(select(AuthorizationText).where(AuthorizationText.org_id == org_id)).first()
    scan_id = None
    if scan:
        scan_id = new_id()
        s.add(AuthorizationScan(id=scan_id, org_id=org_id, content_type="application/pdf", size=5, sha256="0" * 64,
                                content_enc=b"%PDF-", created_at=signed))
        s.flush()
    a = Authorization(id=new_id(), org_id=org_id, contact_id=contact_id, purpose=text.purpose, text_id=text.id,
                      text_version=text.version, text_hash=text.content_hash, signature_kind="typed",
                      signature_enc=b"sig", signed_at=signed, method="paper", revoked_at=revoked, expires_at=expires,
                      status="revoked" if revoked else "active", scan_id=scan_id, created_at=signed)
    s.add(a)
    s.flush()
    return a.id


def _ids(org_id, model):
    with read_only_session(org_id) as s:
        return set(s.scalars(select(model.id).where(model.org_id == org_id)))


def test_authorizations_past_the_maximum_are_purged_with_their_scans_held_and_in_effect_kept(db, org):
    from carepost.consent.models import Authorization, AuthorizationScan

    org_id, now = org.id, clock.now()
    with org_session(org_id) as s:
        held_patient = _contact(s, org_id, "held@example.test")
        gone = _authorization(s, org_id, signed=now - 9 * YEAR, revoked=now - 7 * YEAR, scan=True)
        expired = _authorization(s, org_id, signed=now - 9 * YEAR, expires=now - 8 * YEAR)
        held = _authorization(s, org_id, signed=now - 9 * YEAR, revoked=now - 7 * YEAR, contact_id=held_patient)
        in_effect = _authorization(s, org_id, signed=now - 9 * YEAR)  # no end: still in effect
        recently_revoked = _authorization(s, org_id, signed=now - 9 * YEAR, revoked=now - YEAR, scan=True)
        service.set_schedule(s, org_id, "authorizations", min_days=HIPAA_MIN_DAYS, max_days=HIPAA_MIN_DAYS, actor=SYSTEM)
        service.place_hold(s, org_id, scope="patient", contact_id=held_patient, matter="Doe v. Clinic",
                           reason="litigation", actor=SYSTEM)
        s.commit()
        scans_before = _ids(org_id, AuthorizationScan)
        plan = purge.plan(s, org_id)
    entry = next(c for c in plan["classes"] if c["record_class"] == "authorizations")
    assert (entry["count"], entry["held"]) == (2, 1)
    assert _ids(org_id, Authorization) >= {gone, expired, held}  # a dry run deletes nothing

    run = purge.run_purge(org_id, SYSTEM, chunk=1)
    assert run["status"] == "finished" and run["progress"]["authorizations"]["count"] == 2
    assert _ids(org_id, Authorization) == {held, in_effect, recently_revoked}
    assert len(_ids(org_id, AuthorizationScan)) == len(scans_before) - 1  # the purged one's scan went too
    with read_only_session(org_id) as s:
        bundle = purge.certificate_bundle(s, org_id, run["id"])
    cls = next(c for c in bundle["certificate"]["classes"] if c["record_class"] == "authorizations")
    assert cls["count"] == 2 and cls["method"] == "deleted"


def test_superseded_policies_and_old_acknowledgements_are_purged_a_date_range_hold_keeps_its_days(db, org):
    from carepost.compliance.models import PolicyAcknowledgement, PolicyDocument

    org_id, now = org.id, clock.now()
    with org_session(org_id) as s:
        def doc(key, version, published):
            d = PolicyDocument(id=new_id(), org_id=org_id, key=key, kind="policy", title=key, version=version,
                               body="x" * 30, sha256="0" * 64, published_at=published)
            s.add(d)
            s.flush()
            return d.id

        def ack(document_id, key, version, at):
            a = PolicyAcknowledgement(id=new_id(), org_id=org_id, user_id=new_id(), document_id=document_id, key=key,
                                      version=version, sha256="0" * 64, acknowledged_at=at)
            s.add(a)
            s.flush()
            return a.id

        v1 = doc("privacy-policy", 1, now - 10 * YEAR)
        v2 = doc("privacy-policy", 2, now - 9 * YEAR)  # supersedes v1 nine years ago; current
        other_v1 = doc("security-training", 1, now - 10 * YEAR)
        doc("security-training", 2, now - 2 * YEAR)  # supersedes other_v1 only two years ago
        ack_v1 = ack(v1, "privacy-policy", 1, now - 10 * YEAR + timedelta(days=5))
        old_ack = ack(v2, "privacy-policy", 2, now - 8 * YEAR)
        held_day = (now - 8 * YEAR + timedelta(days=40)).date()
        held_ack = ack(v2, "privacy-policy", 2, now - 8 * YEAR + timedelta(days=40))
        new_ack = ack(v2, "privacy-policy", 2, now - timedelta(days=30))
        service.set_schedule(s, org_id, "policies", min_days=HIPAA_MIN_DAYS, max_days=HIPAA_MIN_DAYS, actor=SYSTEM)
        service.place_hold(s, org_id, scope="date_range", starts_on=held_day, ends_on=held_day, matter="Audit 2018",
                           reason="OCR review", actor=SYSTEM)
        s.commit()
    run = purge.run_purge(org_id, SYSTEM)
    assert run["progress"]["policies"]["count"] == 3  # v1, its acknowledgement and the old one of v2
    assert v1 not in _ids(org_id, PolicyDocument) and {v2, other_v1} <= _ids(org_id, PolicyDocument)
    assert _ids(org_id, PolicyAcknowledgement) == {held_ack, new_ack}
    assert ack_v1 not in _ids(org_id, PolicyAcknowledgement) and old_ack not in _ids(org_id, PolicyAcknowledgement)


def test_inactive_contacts_are_purged_active_and_held_ones_kept(db, org):
    from carepost.patients.models import Contact

    org_id = org.id
    clock.advance(-3 * YEAR)
    with org_session(org_id) as s:
        inactive = [_contact(s, org_id, f"gone{i}@example.test") for i in range(3)]
        held = _contact(s, org_id, "held@example.test")
        by_message = _contact(s, org_id, "message.held@example.test")
        active = _contact(s, org_id, "active@example.test")
        s.commit()
    clock.reset()
    from tests.test_retention import make_messages

    with org_session(org_id) as s:
        make_messages(s, org_id, clock.now() - timedelta(days=20), 1, contact_id=active)  # recent activity
        old_message = make_messages(s, org_id, clock.now() - 3 * YEAR, 1, contact_id=by_message)[0]
        from carepost.delivery.models import MessageRecipient

        s.execute(update(MessageRecipient).where(MessageRecipient.message_id == old_message)
                  .values(updated_at=clock.now() - 3 * YEAR))
        service.set_schedule(s, org_id, "contacts", min_days=0, max_days=365, inactive_months=24, actor=SYSTEM)
        service.place_hold(s, org_id, scope="patient", contact_id=held, matter="Doe v. Clinic", reason="litigation",
                           actor=SYSTEM)
        service.place_hold(s, org_id, scope="message", message_id=old_message, matter="Roe v. Clinic",
                           reason="discovery", actor=SYSTEM)
        s.commit()
        plan = purge.plan(s, org_id)
    entry = next(c for c in plan["classes"] if c["record_class"] == "contacts")
    assert (entry["count"], entry["held"]) == (3, 2)
    run = purge.run_purge(org_id, SYSTEM, chunk=2)
    assert run["progress"]["contacts"]["count"] == 3
    left = _ids(org_id, Contact)
    assert not left & set(inactive) and {held, by_message, active} <= left
    from carepost.audit.models import AuditEvent

    with read_only_session() as s:
        deleted = {e.target_id: e.details for e in s.scalars(select(AuditEvent).where(
            AuditEvent.chain == org_id, AuditEvent.action == "contact.delete"))}
    assert set(deleted) == set(inactive) and all(d["purge_run"] == run["id"] for d in deleted.values())


def test_inactive_contacts_are_purged_chunk_wise_keeping_opt_outs_and_suppressions(db, org):
    """The contacts class goes a chunk at a time through ``patients.service.delete_contacts``
    (set-based): every identifier, fact and attribute of a purged contact goes; what the law and
    the patient need kept stays — an unsubscribe becomes (stays) an address-level suppression by
    blind index, a suppression loses only its clear-text copy, an authorization stays without the
    contact; each contact's deletion is one ``contact.delete`` audit event naming the run."""
    from carepost.audit.models import AuditEvent
    from carepost.consent.models import Authorization
    from carepost.consent.service import unsubscribe_contact
    from carepost.core.crypto import get_keyring
    from carepost.delivery.models import Suppression
    from carepost.delivery.suppressions import add_suppression
    from carepost.patients.models import Contact, ContactIdentifier

    org_id, addresses = org.id, [f"old{i}@example.test" for i in range(5)]
    clock.advance(-3 * YEAR)
    with org_session(org_id) as s:
        contacts = [_contact(s, org_id, a) for a in addresses]
        unsubscribe_contact(s, org_id, contacts[0], None, source="test")
        unsubscribe_contact(s, org_id, contacts[3], None, source="test")
        add_suppression(s, org_id, addresses[1], "complaint", source="test")
        authorization = _authorization(s, org_id, signed=clock.now(), contact_id=contacts[2],
                                       revoked=clock.now())
        s.execute(update(Contact).where(Contact.id.in_(contacts)).values(updated_at=clock.now()))
        s.commit()
    clock.reset()
    with org_session(org_id) as s:
        indexes = [get_keyring().blind_index(s, org_id, "email", a) for a in addresses]
        service.set_schedule(s, org_id, "contacts", min_days=0, max_days=365, inactive_months=24, actor=SYSTEM)
        s.commit()
    chunks = []
    run = purge.run_purge(org_id, SYSTEM, chunk=2, progress=lambda c, n: chunks.append((c, n)))
    assert run["progress"]["contacts"]["count"] == 5
    assert [n for c, n in chunks if c == "contacts"] == [2, 4, 5]  # a chunk at a time
    with read_only_session(org_id) as s:
        assert not set(s.scalars(select(Contact.id).where(Contact.id.in_(contacts))))
        assert s.scalar(select(func.count()).select_from(ContactIdentifier).where(
            ContactIdentifier.contact_id.in_(contacts))) == 0
        kept = {(r.address_index, r.reason): r for r in s.scalars(select(Suppression).where(
            Suppression.org_id == org_id, Suppression.address_index.in_(indexes)))}
        assert {(indexes[0], "unsubscribe"), (indexes[3], "unsubscribe"), (indexes[1], "complaint")} <= set(kept)
        assert all(r.address_enc is None for r in kept.values())  # only the blind index is left
        assert s.get(Authorization, authorization).contact_id is None  # the evidence stays
    with read_only_session() as s:
        deleted = {e.target_id: e.details for e in s.scalars(select(AuditEvent).where(
            AuditEvent.chain == org_id, AuditEvent.action == "contact.delete"))}
    assert set(deleted) == set(contacts)
    assert all(d["purge_run"] == run["id"] and d["via"] == "retention.purge" and d["kept_index_kinds"] == ["email"]
               for d in deleted.values())
    assert _verify(org_id).ok


@pytest.mark.slow
def test_kill_9_mid_contacts_purge_resumes_and_no_contact_is_half_deleted(storage, org, tmp_path):
    """A real kill -9 of ``carepost retention purge`` while it deletes inactive contacts: each
    chunk (the contacts, their identifiers, the hooks' suppressions and the audit events) commits
    with the run's progress or not at all, so the counts are exact, every contact left is whole,
    and the next purge resumes the run to the end with one audit event per contact."""
    from carepost.audit.models import AuditEvent
    from carepost.consent.service import unsubscribe_contact
    from carepost.core.crypto import get_keyring
    from carepost.delivery.models import Suppression
    from carepost.patients.models import Contact, ContactIdentifier
    from tests.test_retention import kill_purge_midway

    org_id, n = org.id, 60
    addresses = [f"gone{i}@example.test" for i in range(n)]
    clock.advance(-3 * YEAR)
    with org_session(org_id) as s:
        contacts = [_contact(s, org_id, a) for a in addresses]
        for cid in contacts[::2]:
            unsubscribe_contact(s, org_id, cid, None, source="test")
        s.commit()
    clock.reset()
    with org_session(org_id) as s:
        indexes = [get_keyring().blind_index(s, org_id, "email", a) for a in addresses]
        service.set_schedule(s, org_id, "contacts", min_days=0, max_days=365, inactive_months=24, actor=SYSTEM)
        s.commit()

    def state():
        with read_only_session() as s:
            left = set(s.scalars(select(Contact.id).where(Contact.id.in_(contacts))))
            identifiers = s.scalar(select(func.count()).select_from(ContactIdentifier).where(
                ContactIdentifier.contact_id.in_(contacts)))
            audited = list(s.scalars(select(AuditEvent.target_id).where(
                AuditEvent.chain == org_id, AuditEvent.action == "contact.delete")))
            suppressed = set(s.scalars(select(Suppression.address_index).where(
                Suppression.org_id == org_id, Suppression.reason == "unsubscribe")))
        return left, identifiers, audited, suppressed

    per_contact = state()[1] // n  # e-mail and name indexes
    done = kill_purge_midway(storage, org_id, tmp_path, "contacts", chunk=3, after=9)
    left, identifiers, audited, suppressed = state()
    assert 0 < done < n and len(left) == n - done  # the counts are exact: chunk and progress commit together
    assert per_contact >= 1 and identifiers == per_contact * len(left)  # every contact left is whole
    assert sorted(audited) == sorted(set(contacts) - left)  # one event per deleted contact, no more
    assert {indexes[i] for i in range(0, n, 2)} <= suppressed  # opt-outs of the deleted and the left
    with pytest.raises(Exception, match="already running"):
        purge.run_purge(org_id, SYSTEM, stale_seconds=3600)
    resumed = purge.run_purge(org_id, SYSTEM, stale_seconds=0)
    assert resumed["resumed"] == 1 and resumed["status"] == "finished"
    assert resumed["progress"]["contacts"]["count"] == n
    left, identifiers, audited, suppressed = state()
    assert not left and identifiers == 0 and sorted(audited) == sorted(contacts)
    assert {indexes[i] for i in range(0, n, 2)} <= suppressed
    assert _verify(org_id).ok  # the killed chunk's events rolled back with it: the chain is whole


def test_inactive_months_is_required_for_contacts_naming_the_field(db, org):
    from carepost.core.errors import ValidationFailed

    with org_session(org.id) as s, pytest.raises(ValidationFailed) as e:
        service.set_schedule(s, org.id, "contacts", min_days=0, max_days=365, actor=SYSTEM)
    assert e.value.field == "inactive_months"


def _verify(org_id):
    from carepost.audit.verify import verify

    with read_only_session() as s:
        return verify(s, org_id=org_id)


def _cli_verify(org_ref):
    from carepost.audit.commands import run_verify

    out, err = io.StringIO(), io.StringIO()
    code = run_verify(org_ref, [], Console(file=out, width=200), Console(file=err, width=200))
    return code, out.getvalue() + err.getvalue()


def _old_chain_with_a_held_patient(name: str, before: int, event_about) -> tuple[str, str, str, str]:
    """An organization whose audit chain began eight years ago: ``before`` unrelated events, one
    event about the patient (``event_about(s, org_id, patient)`` gives its action, target type and
    target id), three more unrelated ones; then, today, a six-year audit schedule and a patient
    hold on that patient. Returns the organization, the patient, the event's target and the hold."""
    from carepost.accounts.service import create_organization
    from carepost.audit.service import record

    clock.advance(-8 * YEAR)
    with system_session() as s:
        org_id = create_organization(s, name).id
        s.commit()
    with org_session(org_id) as s:
        patient = _contact(s, org_id, "held@example.test")
        action, target_type, target_id = event_about(s, org_id, patient)
        for i in range(before):
            record(s, org_id=org_id, actor_type="system", actor_id="test", action="test.old", target_id=f"t{i}")
        record(s, org_id=org_id, actor_type="user", actor_id="u", action=action, target_type=target_type,
               target_id=target_id)
        for i in range(3):
            record(s, org_id=org_id, actor_type="system", actor_id="test", action="test.old", target_id=f"u{i}")
        s.commit()
    clock.reset()
    with org_session(org_id) as s:
        record(s, org_id=org_id, actor_type="system", actor_id="test", action="test.recent")
        service.set_schedule(s, org_id, "audit", min_days=HIPAA_MIN_DAYS, max_days=HIPAA_MIN_DAYS, actor=SYSTEM)
        hold = service.place_hold(s, org_id, scope="patient", contact_id=patient, matter="Doe v. Clinic",
                                  reason="litigation", actor=SYSTEM)
        s.commit()
        return org_id, patient, target_id, hold.id


def test_audit_purge_removes_the_chain_start_and_the_chain_still_verifies(client):
    from carepost.audit.models import AuditChainAnchor, AuditEvent

    # an organization whose first years of audit events are past six years
    org_id, held_patient, _, hold_id = _old_chain_with_a_held_patient(
        "Old Clinic", 5, lambda s, org_id, patient: ("contact.read", "contact", patient))
    with read_only_session() as s:
        held_seq = s.scalar(select(func.min(AuditEvent.seq)).where(AuditEvent.chain == org_id,
                                                                   AuditEvent.target_id == held_patient))
        old_total = s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.chain == org_id, AuditEvent.occurred_at < clock.now() - 7 * YEAR))
        plan = purge.plan(s, org_id)
    entry = next(c for c in plan["classes"] if c["record_class"] == "audit")
    assert held_seq > 2 and entry["count"] == held_seq - 1 and entry["held"] > 0

    # 1. The hold stops the cut at the first event about the held patient: the chain can only be
    #    shortened from its start, so that event and everything after it stay.
    run = purge.run_purge(org_id, SYSTEM, chunk=2)
    assert run["progress"]["audit"]["count"] == held_seq - 1
    with read_only_session() as s:
        seqs = list(s.scalars(select(AuditEvent.seq).where(AuditEvent.chain == org_id).order_by(AuditEvent.seq)))
        anchor = s.get(AuditChainAnchor, org_id)
        assert seqs[0] == held_seq and anchor.seq == held_seq - 1 and anchor.removed == held_seq - 1
    report = _verify(org_id)
    assert report.ok, report.to_dict()
    assert report.chains[0].anchor["seq"] == held_seq - 1
    code, text = _cli_verify(org_id)
    assert code == 0 and "intact" in text and f"starts after seq {held_seq - 1}" in text, text
    assert "signature valid, state valid" in text, text

    # 2. Released hold: the next purge removes the rest of the old events, still verifiable.
    with org_session(org_id) as s:
        from carepost.retention.models import LegalHold

        s.execute(update(LegalHold).where(LegalHold.id == hold_id).values(status="released"))
        s.commit()
    run = purge.run_purge(org_id, SYSTEM)
    assert run["progress"]["audit"]["count"] == old_total - (held_seq - 1)  # from the held-patient event on
    with read_only_session() as s:
        old_left = s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.chain == org_id, AuditEvent.occurred_at < clock.now() - 7 * YEAR))
        assert old_left == 0
        cert = purge.certificate_bundle(s, org_id, run["id"])["certificate"]
        audit_entry = next(c for c in cert["classes"] if c["record_class"] == "audit")
        assert audit_entry["audit_anchor"]["seq"] == old_total
        first_left = s.scalar(select(func.min(AuditEvent.seq)).where(AuditEvent.chain == org_id))
    assert first_left == old_total + 1
    assert _verify(org_id).ok
    code, text = _cli_verify(org_id)
    assert code == 0, text
    from carepost.accounts.credentials import create_credential

    with system_session() as s:
        cred, secret = create_credential(s, org_id, name="auditor", scopes=["audit:read"])
        s.commit()
    r = client.post("/api/v1/audit/verify", headers={"Authorization": f"Bearer {cred.key_id}.{secret}"})
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    assert r.json()["anchor"]["seq"] == old_total and r.json()["anchor"]["removed"] == old_total

    # 3. Tampering is still detected: deleting the next event after the anchor ...
    with system_session() as s:
        anchor_seq = s.get(AuditChainAnchor, org_id).seq
        saved = s.scalar(select(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.seq == anchor_seq + 1))
        s.expunge(saved)
        make_transient(saved)
        s.execute(delete(AuditEvent).where(AuditEvent.id == saved.id))
        s.commit()
    problem = _verify(org_id).first_problem
    assert problem.kind == "missing" and problem.seq == anchor_seq + 2
    with system_session() as s:
        s.add(saved)
        s.commit()
    assert _verify(org_id).ok
    # ... moving the anchor forward over events deleted by hand (no key: the MAC fails) ...
    with system_session() as s:
        s.execute(update(AuditChainAnchor).where(AuditChainAnchor.chain == org_id).values(seq=anchor_seq + 1))
        s.commit()
    assert _verify(org_id).first_problem.kind == "anchor_invalid"
    code, text = _cli_verify(org_id)
    assert code == 1 and "signature NOT valid, state anchor_invalid" in text, text
    with system_session() as s:
        s.execute(update(AuditChainAnchor).where(AuditChainAnchor.chain == org_id).values(seq=anchor_seq))
        s.commit()
    assert _verify(org_id).ok
    # ... and removing the anchor leaves the chain's start missing.
    with system_session() as s:
        s.execute(delete(AuditChainAnchor).where(AuditChainAnchor.chain == org_id))
        s.commit()
    problem = _verify(org_id).first_problem
    assert problem.kind == "missing" and problem.seq == anchor_seq + 1


def test_an_organization_hold_keeps_every_audit_event(db):
    from carepost.accounts.service import create_organization
    from carepost.audit.models import AuditEvent

    clock.advance(-8 * YEAR)
    with system_session() as s:
        org = create_organization(s, "Held Clinic")
        s.commit()
    clock.reset()
    org_id = org.id
    with org_session(org_id) as s:
        service.set_schedule(s, org_id, "audit", min_days=HIPAA_MIN_DAYS, max_days=HIPAA_MIN_DAYS, actor=SYSTEM)
        service.place_hold(s, org_id, scope="organization", matter="Everything", reason="subpoena", actor=SYSTEM)
        s.commit()
    with read_only_session() as s:
        before = s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.chain == org_id))
    run = purge.run_purge(org_id, SYSTEM)
    assert run["progress"]["audit"]["count"] == 0
    with read_only_session() as s:
        after = s.scalar(select(func.min(AuditEvent.seq)).where(AuditEvent.chain == org_id))
        assert after == 1 and before > 0
    assert _verify(org_id).ok


def test_date_range_hold_covers_audit_days():
    from carepost.retention.models import LegalHold

    day = date(2019, 5, 1)
    keep = purge._audit_keep("org1", [LegalHold(scope="date_range", starts_on=day, ends_on=day),
                                      LegalHold(scope="patient", contact_id="c1")], "sqlite")
    assert keep.days == ((day, day),) and keep.targets == frozenset({"c1"}) and not keep.everything
    assert keep.about is not None  # and the events about the patient's records (next tests)


def _portal_message(s, org_id, message_id, created=None):
    from carepost.core.database import Base
    from carepost.delivery.models import MessageRecipient

    rid = s.scalar(select(MessageRecipient.id).where(MessageRecipient.message_id == message_id))
    pid = new_id()
    s.execute(Base.metadata.tables["portal_messages"].insert().values(
        id=pid, org_id=org_id, message_id=message_id, recipient_id=rid, token_hash=new_id() * 2,
        address_enc=b"x", address_index="idx", **({"created_at": created} if created else {})))
    return pid


def test_holds_keep_the_audit_events_about_their_records(db, org):
    """Issue 16 item 2: a patient hold keeps the audit events about the patient's records, not only
    those whose target is the patient — a message sent to them (by any target type, and by a
    ``message_id`` in the details), its recipient copy and portal message, their authorization, a
    list view or export naming them (``contact_ids``, ``message_ids``, ``contact_id``), their own
    actions; a campaign hold its messages' events, a message hold its copies'. Checked with the
    purge's own condition (:mod:`carepost.retention.held`) on both databases."""
    from carepost.audit.models import AuditEvent
    from carepost.audit.service import record
    from carepost.delivery.models import MessageRecipient
    from carepost.retention import held
    from tests.test_retention import make_messages

    org_id, now = org.id, clock.now()
    with org_session(org_id) as s:
        patient, other = _contact(s, org_id, "held@example.test"), _contact(s, org_id, "free@example.test")
        to_patient = make_messages(s, org_id, now - YEAR, 1, contact_id=patient)[0]
        to_other = make_messages(s, org_id, now - YEAR, 1, contact_id=other, campaign_id="c" * 32)[0]
        copy = s.scalar(select(MessageRecipient.id).where(MessageRecipient.message_id == to_patient))
        other_copy = s.scalar(select(MessageRecipient.id).where(MessageRecipient.message_id == to_other))
        portal, other_portal = _portal_message(s, org_id, to_patient), _portal_message(s, org_id, to_other)
        authorization = _authorization(s, org_id, signed=now - YEAR, contact_id=patient)
        other_authorization = _authorization(s, org_id, signed=now - YEAR, contact_id=other)
        breaches = _base_table("breach_incidents")
        breach, breach_by_message, other_breach = new_id(), new_id(), new_id()
        for bid, affected, messages in ((breach, [other, patient], []), (breach_by_message, [], [to_patient]),
                                        (other_breach, [other], [to_other])):
            s.execute(breaches.insert().values(id=bid, org_id=org_id, title="Wrong address", kind="misdirected_message",
                                               discovered_on=now.date(), affected_contact_ids=affected,
                                               extra_contact_ids=[], message_ids=messages))

        def event(name, target_type=None, target_id=None, actor_type="user", actor_id="u1", **details):
            record(s, org_id=org_id, actor_type=actor_type, actor_id=actor_id, action=name, target_type=target_type,
                   target_id=target_id, details=details)
            s.flush()
            return s.scalar(select(AuditEvent.id).where(AuditEvent.chain == org_id).order_by(AuditEvent.seq.desc()))

        both_listed = event("message.list", "message_list", None, message_ids=[to_other, to_patient])
        about_patient = {
            event("contact.read", "contact", patient),
            event("message.read", "message", to_patient),
            event("archive.message_read", "archive", to_patient, format="eml"),
            event("consent.unsubscribe", "message_recipient", copy, message_id=to_patient),
            event("consent.preferences_update", "message_recipient", copy),
            event("portal.view", "portal_message", portal),
            event("authorization.read", "authorization", authorization),
            event("contact.list", "contact_list", None, contact_ids=[other, patient], view="masked"),
            both_listed,
            event("archive.search", "archive", new_id(), contact_id=patient, results=3),
            event("delivery.bounce", "message_batch", None, recipient_id=copy),
            event("consent.unsubscribe", "contact", other, actor_type="patient", actor_id=patient),
            event("breach.computed", "breach_incident", breach),
            event("breach.opened", "breach_incident", breach_by_message),
        }
        other_breach_event = event("breach.opened", "breach_incident", other_breach)
        about_other_message = {
            event("message.read", "message", to_other),
            event("consent.unsubscribe", "message_recipient", other_copy),
            event("portal.view", "portal_message", other_portal),
            event("message.list", "message_list", None, message_ids=[to_other]),
        }
        for args, details in ((("contact.read", "contact", other), {}),
                              (("authorization.read", "authorization", other_authorization), {}),
                              (("contact.list", "contact_list", None), {"contact_ids": [other]}),
                              (("contact.list", "contact_list", None), {"contact_ids": "not a list"}),
                              (("user.login", "user", "u1"), {})):
            event(*args, **details)  # about nobody held
        s.commit()
    events = _base_table("audit_events")

    def matched(h):
        with read_only_session() as s:
            cond = held.audit_condition(h, events, s.get_bind().dialect.name)
            return set(s.scalars(select(events.c.id).where(events.c.chain == org_id, cond)))

    assert matched(held.Held(org_id, contacts=(patient,))) == about_patient
    by_other_message = about_other_message | {both_listed, other_breach_event}
    assert matched(held.Held(org_id, campaigns=("c" * 32,))) == by_other_message
    assert matched(held.Held(org_id, messages=(to_other,))) == by_other_message
    assert held.audit_condition(held.Held(org_id), events, "sqlite") is None


def test_patient_and_campaign_holds_keep_their_messages_portal_messages_through_the_portal_purge(db, org):
    """The portal class: a portal message of a message addressed to a held patient, or of a held
    campaign's message, stays (before, only a message hold kept one); an unheld one goes."""
    from carepost.retention.models import LegalHold
    from tests.test_retention import make_messages

    org_id, old = org.id, clock.now() - 3 * YEAR
    with org_session(org_id) as s:
        patient = _contact(s, org_id, "held@example.test")
        to_patient = make_messages(s, org_id, old, 1, contact_id=patient)[0]
        of_campaign = make_messages(s, org_id, old, 1, campaign_id="k" * 32)[0]
        free = make_messages(s, org_id, old, 1)[0]
        kept = {_portal_message(s, org_id, to_patient, old), _portal_message(s, org_id, of_campaign, old)}
        gone = _portal_message(s, org_id, free, old)
        service.set_schedule(s, org_id, "portal", min_days=0, max_days=365, actor=SYSTEM)
        service.place_hold(s, org_id, scope="patient", contact_id=patient, matter="Doe v. Clinic", reason="litigation",
                           actor=SYSTEM)
        s.add(LegalHold(org_id=org_id, scope="campaign", campaign_id="k" * 32, matter="Roe v. Clinic",
                        reason="discovery", placed_by="test", status="active"))
        s.commit()
        entry = next(c for c in purge.plan(s, org_id)["classes"] if c["record_class"] == "portal")
    assert (entry["count"], entry["held"]) == (1, 2)
    run = purge.run_purge(org_id, SYSTEM)
    assert run["progress"]["portal"]["count"] == 1
    portal = _base_table("portal_messages")
    with read_only_session(org_id) as s:
        left = set(s.scalars(select(portal.c.id).where(portal.c.org_id == org_id)))
    assert left == kept and gone not in left


def test_every_audit_target_type_is_classified_for_legal_holds():
    """A new audit target type must say whether a hold resolves it (``retention.held``): every
    ``target_type`` literal the code writes is resolved by its table or the held ids, or declared
    not about one patient's record (then held through the details, the actor, a date range or an
    organization hold)."""
    import re
    from pathlib import Path

    from carepost.assembly import assemble
    from carepost.retention import held

    assemble()
    src = Path(held.__file__).resolve().parents[1]
    patterns = [re.compile(r'target_type\s*[:=]\s*(?:str\s*=\s*)?"([a-z_]+)"'),
                re.compile(r'"target_type":\s*"([a-z_]+)"'),
                re.compile(r'target_type="[a-z_]+" if [^"]+ else "([a-z_]+)"'),
                re.compile(r'_audit\(\s*request,\s*principal,\s*"[a-z_.]+",\s*"([a-z_]+)"'),
                re.compile(r'_audit\(\s*[a-z_.]+,\s*[a-z_.]+,\s*[a-z_.]+,\s*f?"[a-z_.{}]+",\s*"([a-z_]+)"')]
    written = {m for path in src.rglob("*.py") for p in patterns for m in p.findall(path.read_text())}
    assert {"contact", "message", "message_recipient", "portal_message", "form_submission", "authorization",
            "breach_incident", "contact_list"} <= written  # the scan finds what it must
    assert sorted(t for t in written if not held.classified(t)) == []


def _base_table(name):
    from carepost.core.database import Base

    return Base.metadata.tables[name]


def test_a_patient_hold_keeps_an_event_about_their_message_through_the_audit_purge(db):
    """The end-to-end case: the first event about a held patient's *message* (not the patient)
    stops the cut of an audit purge that would otherwise remove it; without the hold it goes."""
    from carepost.audit.models import AuditEvent
    from tests.test_retention import make_messages

    def about_their_message(s, org_id, patient):
        return "message.read", "message", make_messages(s, org_id, clock.now(), 1, contact_id=patient)[0]

    org_id, patient, message, hold_id = _old_chain_with_a_held_patient("Message Clinic", 4, about_their_message)
    with read_only_session() as s:
        held_seq = s.scalar(select(AuditEvent.seq).where(AuditEvent.chain == org_id, AuditEvent.target_id == message))
        patient_seq = s.scalar(select(func.min(AuditEvent.seq)).where(AuditEvent.chain == org_id,
                                                                      AuditEvent.target_id == patient))
        old_total = s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.chain == org_id, AuditEvent.occurred_at < clock.now() - 7 * YEAR))
        entry = next(c for c in purge.plan(s, org_id)["classes"] if c["record_class"] == "audit")
    # no older event names the patient: the event about their message stops the cut on its own
    assert patient_seq is None or patient_seq > held_seq
    assert entry["count"] == held_seq - 1 and held_seq > 2
    run = purge.run_purge(org_id, SYSTEM, chunk=2)
    assert run["progress"]["audit"]["count"] == held_seq - 1 and entry["held"] > 0
    with read_only_session() as s:
        first = s.scalar(select(func.min(AuditEvent.seq)).where(AuditEvent.chain == org_id))
        assert s.scalar(select(AuditEvent.target_id).where(AuditEvent.chain == org_id, AuditEvent.seq == first)) == message
    with org_session(org_id) as s:
        from carepost.retention.models import LegalHold

        s.execute(update(LegalHold).where(LegalHold.id == hold_id).values(status="released"))
        s.commit()
    assert _verify(org_id).ok
    run = purge.run_purge(org_id, SYSTEM)
    assert run["progress"]["audit"]["count"] == old_total - (held_seq - 1)  # released: the rest goes
    assert _verify(org_id).ok


def test_the_message_page_marks_a_held_message(client, org, make_user):
    from tests.fixtures.accounts import login_client
    from tests.test_retention import make_messages

    org_id = org.id
    with org_session(org_id) as s:
        held, free = make_messages(s, org_id, clock.now() - timedelta(days=3), 2)
        service.place_hold(s, org_id, scope="message", message_id=held, matter="Roe v. Clinic", reason="discovery",
                           actor=SYSTEM)
        s.commit()
    login_client(client, make_user(org, role="analyst"))
    page = client.get(f"/app/deliveries/{held}")
    assert page.status_code == 200
    text = page.text.replace("&#34;", '"').replace("&quot;", '"')
    assert 'data-testid="held-mark">HELD<' in text and 'Legal hold "Roe v. Clinic" (message, pending)' in text
    page = client.get(f"/app/deliveries/{free}")
    assert page.status_code == 200 and "held-mark" not in page.text and "No legal hold." in page.text
    # another organization's message is still "not found" (holds_for_message refuses it too)
    from carepost.accounts.service import create_organization

    with system_session() as s:
        other = create_organization(s, "Other Clinic")
        s.commit()
    with org_session(other.id) as s:
        [theirs] = make_messages(s, other.id, clock.now(), 1)
        s.commit()
    assert client.get(f"/app/deliveries/{theirs}").status_code == 404
