"""Address-level suppressions: idempotent, scoped, expiring, and kept when the patient goes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from carepost.consent import service
from carepost.consent.models import Suppression
from carepost.core import clock
from carepost.core.database import org_session
from carepost.core.errors import ValidationFailed


def test_add_is_idempotent_and_case_insensitive(org, session):
    with org_session(org.id) as s:
        a = service.add_suppression(s, org.id, "Pat@Example.test", "bounce_hard", source="smtp")
        b = service.add_suppression(s, org.id, "pat@example.test ", "bounce_hard", source="smtp")
        s.commit()
        assert a.id == b.id
        assert s.scalar(select(func.count()).select_from(Suppression)) == 1
        assert service.is_suppressed(s, org.id, "PAT@example.test") == "bounce_hard"
        assert service.suppression_address(s, a) == "pat@example.test"
        # nothing in clear text
        assert b"pat@example" not in (a.address_enc or b"")


def test_scopes(org, session):
    with org_session(org.id) as s:
        service.add_suppression(s, org.id, "m@example.test", "unsubscribe", scope="marketing")
        service.add_suppression(s, org.id, "t@example.test", "unsubscribe", scope="topic", topic_id="topic1")
        s.commit()
        assert service.is_suppressed(s, org.id, "m@example.test", "all") is None  # transactional still goes
        assert service.is_suppressed(s, org.id, "m@example.test", "marketing") == "unsubscribe"
        assert service.is_suppressed(s, org.id, "t@example.test", "marketing") is None
        assert service.is_suppressed(s, org.id, "t@example.test", "marketing", "topic1") == "unsubscribe"
        assert service.is_suppressed(s, org.id, "t@example.test", "marketing", "topic2") is None


def test_stronger_reason_wins_and_expiry(org, session):
    with org_session(org.id) as s:
        soft = service.add_suppression(s, org.id, "x@example.test", "bounce_soft", expires_at=clock.now() + timedelta(days=1))
        service.add_suppression(s, org.id, "x@example.test", "manual")
        s.commit()
        assert soft.reason == "manual"
        assert soft.expires_at is None  # the longer life is kept: a manual entry lasts for ever
        service.add_suppression(s, org.id, "x@example.test", "bounce_soft", expires_at=clock.now() + timedelta(days=1))
        s.commit()
        assert soft.reason == "manual" and soft.expires_at is None  # a weaker reason changes nothing
        service.add_suppression(s, org.id, "y@example.test", "bounce_soft", expires_at=clock.now() + timedelta(hours=1))
        s.commit()
        assert service.is_suppressed(s, org.id, "y@example.test") == "bounce_soft"
        clock.advance(timedelta(hours=2))
        assert service.is_suppressed(s, org.id, "y@example.test") is None


def test_remove_and_legal_hold(org, session):
    with org_session(org.id) as s:
        service.add_suppression(s, org.id, "r@example.test", "manual")
        service.add_suppression(s, org.id, "h@example.test", "legal_hold")
        s.commit()
        assert service.remove_suppression(s, org.id, "r@example.test") == 1
        with pytest.raises(ValidationFailed) as exc:
            service.remove_suppression(s, org.id, "h@example.test")
        assert exc.value.field == "reason"
        assert service.remove_suppression(s, org.id, "h@example.test", allow_legal_hold=True) == 1
        s.commit()
        assert service.is_suppressed(s, org.id, "h@example.test") is None


BAD = [
    ({"reason": "nope"}, "reason"),
    ({"reason": "manual", "scope": "everything"}, "scope"),
    ({"reason": "manual", "scope": "topic"}, "topic_id"),
    ({"reason": "manual", "scope": "all", "topic_id": "t"}, "topic_id"),
]


def test_bad_input_names_the_field(org, session):
    with org_session(org.id) as s:
        for kwargs, field in BAD:
            with pytest.raises(ValidationFailed) as exc:
                service.add_suppression(s, org.id, "b@example.test", **kwargs)
            assert exc.value.field == field
        with pytest.raises(ValidationFailed) as exc:
            service.add_suppression(s, org.id, "not an address", "manual")
        assert exc.value.field == "address"


def test_suppressions_are_per_organization(org, session):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    with org_session(org.id) as s:
        service.add_suppression(s, org.id, "p@example.test", "complaint")
        s.commit()
    with org_session(other.id) as s:
        assert service.is_suppressed(s, other.id, "p@example.test") is None
        assert s.scalar(select(func.count()).select_from(Suppression)) == 0


def test_patient_deletion_keeps_suppression_by_index(org, session):
    from carepost.patients import service as patients

    with org_session(org.id) as s:
        contact = patients.save_contact(s, org.id, {"given_name": "Ana", "email": "ana@example.test"}).contact
        row = service.add_suppression(s, org.id, "ana@example.test", "unsubscribe", scope="marketing")
        s.commit()
        assert row.address_enc is not None
        patients.delete_contact(s, org.id, contact.id)
        s.commit()
        s.expire_all()
        kept = s.scalars(select(Suppression)).one()
        assert kept.address_enc is None  # the clear-text copy went with the patient
        assert service.is_suppressed(s, org.id, "ana@example.test", "marketing") == "unsubscribe"
