"""check_eligibility: every reason code, set-based over thousands of contacts, and the
address-only and delivery-row variants."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event

from carepost.consent import authorizations, eligibility, service
from carepost.core import clock
from carepost.core.database import get_engine, org_session
from carepost.core.errors import ValidationFailed


def make_contact(s, org_id, email="pat@example.test", **extra):
    from carepost.patients import service as patients

    data = {"given_name": "Pat"}
    if email:
        data["email"] = email
    data.update(extra)
    return patients.save_contact(s, org_id, data).contact


def sign(s, org_id, contact_id, purpose="marketing", **kw):
    kw.setdefault("signature_name", "Pat Example")
    return authorizations.record_authorization(s, org_id, contact_id=contact_id, purpose=purpose, method="api", **kw)


def check(s, org_id, ids, purpose="marketing", topic=None, **kw):
    # through the name ARCHITECTURE.md gives it (consent.service.check_eligibility)
    return service.check_eligibility(s, ids, purpose, topic, "email", org_id=org_id, **kw)


def test_transactional_mail_is_eligible_without_authorization(org, session):
    with org_session(org.id) as s:
        c = make_contact(s, org.id)
        s.commit()
        assert check(s, org.id, [c.id], "transactional") == {c.id: "eligible"}
        assert check(s, org.id, [c.id], "treatment") == {c.id: "eligible"}


def test_authorization_reasons(org, session):
    with org_session(org.id) as s:
        none_, valid, expired, revoked, resigned = (make_contact(s, org.id, f"p{i}@example.test") for i in range(5))
        sign(s, org.id, valid.id)
        sign(s, org.id, expired.id, expires_at=clock.now() + timedelta(days=1))
        rv = sign(s, org.id, revoked.id)
        authorizations.revoke_authorization(s, org.id, rv.id, by_type="staff", by="u", method="staff")
        old = sign(s, org.id, resigned.id)
        authorizations.revoke_authorization(s, org.id, old.id, by_type="patient", by=None, method="link")
        sign(s, org.id, resigned.id)  # signed again after revoking: valid
        s.commit()
        clock.advance(timedelta(days=2))
        got = check(s, org.id, [none_.id, valid.id, expired.id, revoked.id, resigned.id])
        assert got == {none_.id: "no_authorization", valid.id: "eligible", expired.id: "authorization_expired",
                       revoked.id: "authorization_revoked", resigned.id: "eligible"}
        # an authorization for plain marketing does not cover remunerated marketing (164.508(a)(3)(ii))
        assert check(s, org.id, [valid.id], "marketing_remunerated") == {valid.id: "no_authorization"}
        # refill reminder paid above cost is remunerated marketing
        assert check(s, org.id, [valid.id], "refill_reminder", remuneration="above_cost") == {valid.id: "no_authorization"}
        assert check(s, org.id, [valid.id], "refill_reminder") == {valid.id: "eligible"}


def test_suppression_reasons(org, session):
    with org_session(org.id) as s:
        cs = {r: make_contact(s, org.id, f"{r}@example.test") for r in
              ("bounce_hard", "bounce_soft", "complaint", "manual", "legal_hold", "unsub", "invalid")}
        for c in cs.values():
            sign(s, org.id, c.id)
        for r in ("bounce_hard", "bounce_soft", "complaint", "manual", "legal_hold"):
            service.add_suppression(s, org.id, f"{r}@example.test", r)
        service.add_suppression(s, org.id, "unsub@example.test", "unsubscribe", scope="marketing")
        service.add_suppression(s, org.id, "invalid@example.test", "bounce_hard", details={"status": "5.1.1"})
        nobody = make_contact(s, org.id, email=None)
        s.commit()
        got = check(s, org.id, [c.id for c in cs.values()] + [nobody.id, "0" * 32])
        assert got == {
            cs["bounce_hard"].id: "suppressed_bounce", cs["bounce_soft"].id: "suppressed_bounce",
            cs["complaint"].id: "suppressed_complaint", cs["manual"].id: "suppressed_manual",
            cs["legal_hold"].id: "suppressed_manual", cs["unsub"].id: "unsubscribed_all",
            cs["invalid"].id: "invalid_address", nobody.id: "no_address", "0" * 32: "no_address",
        }
        # a marketing unsubscribe does not stop an appointment reminder; a bounce does
        t = check(s, org.id, [cs["unsub"].id, cs["bounce_hard"].id], "treatment")
        assert t == {cs["unsub"].id: "eligible", cs["bounce_hard"].id: "suppressed_bounce"}


def test_topic_unsubscribes_and_opt_in_topics(org, session):
    with org_session(org.id) as s:
        news = service.create_topic(s, org.id, key="newsletter", name="Newsletter")
        offers = service.create_topic(s, org.id, key="offers", name="Offers", opt_in_required=True, double_opt_in=False)
        a, b, c = (make_contact(s, org.id, f"t{i}@example.test") for i in range(3))
        for x in (a, b, c):
            sign(s, org.id, x.id)
        service.unsubscribe_contact(s, org.id, a.id, news.id, source="test")
        service.unsubscribe_contact(s, org.id, b.id, None, source="test")
        service.resubscribe_contact(s, org.id, c.id, offers.id, source="test")
        s.commit()
        assert check(s, org.id, [a.id, b.id, c.id], topic="newsletter") == {
            a.id: "unsubscribed_topic", b.id: "unsubscribed_all", c.id: "eligible"}
        assert check(s, org.id, [a.id, c.id], topic=offers.id) == {a.id: "unsubscribed_topic", c.id: "eligible"}
        with pytest.raises(Exception) as exc:
            check(s, org.id, [a.id], topic="nope")
        assert getattr(exc.value, "field", None) == "topic"


def test_frequency_cap_counts_recent_marketing(org, session):
    from carepost.delivery.models import Message, MessageRecipient

    with org_session(org.id) as s:
        service.set_consent_settings(s, org.id, {"frequency_cap_daily": 1, "frequency_cap_weekly": 2})
        a, b = make_contact(s, org.id, "a@example.test"), make_contact(s, org.id, "b@example.test")
        for x in (a, b):
            sign(s, org.id, x.id)
        idx = service.address_index(s, org.id, "a@example.test")

        def sent(when, purpose="marketing", status="delivered"):
            m = Message(org_id=org.id, from_address="care@bar.example", subject_enc=b"x", security="tls_required",
                        purpose=purpose, created_at=when)
            s.add(m)
            s.flush()
            s.add(MessageRecipient(org_id=org.id, message_id=m.id, address_enc=b"x", address_index=idx,
                                   domain_index="d", contact_id=a.id, status=status))
            s.flush()
            return m

        now = clock.now()
        sent(now - timedelta(days=3))
        sent(now - timedelta(hours=2), purpose="treatment")  # not marketing: not counted
        sent(now - timedelta(hours=1), status="excluded")  # never sent: not counted
        s.commit()
        assert check(s, org.id, [a.id, b.id]) == {a.id: "eligible", b.id: "eligible"}
        m = sent(now - timedelta(hours=3))
        s.commit()
        assert check(s, org.id, [a.id, b.id]) == {a.id: "frequency_cap", b.id: "eligible"}
        # the message being delivered does not count against itself
        assert check(s, org.id, [a.id], exclude_message_ids=[m.id]) == {a.id: "eligible"}
        # transactional mail is never capped
        assert check(s, org.id, [a.id], "transactional") == {a.id: "eligible"}
        clock.advance(timedelta(days=1))
        assert check(s, org.id, [a.id]) == {a.id: "frequency_cap"}  # still 2 in the week
        clock.advance(timedelta(days=3))
        assert check(s, org.id, [a.id]) == {a.id: "eligible"}


def test_addresses_that_match_no_contact(org, session):
    with org_session(org.id) as s:
        service.add_suppression(s, org.id, "gone@example.test", "bounce_hard")
        s.commit()
        got = eligibility.check_addresses(s, org.id, ["new@example.test", "gone@example.test", "not-an-address"],
                                          "transactional")
        assert got == {"new@example.test": "eligible", "gone@example.test": "suppressed_bounce",
                       "not-an-address": "invalid_address"}
        # nobody signed an authorization for an unknown address
        assert eligibility.check_addresses(s, org.id, ["new@example.test"], "marketing") == {"new@example.test": "no_authorization"}


def test_delivery_check_uses_the_row_address_and_contact(org, session):
    with org_session(org.id) as s:
        c = make_contact(s, org.id, "main@example.test", emails=["main@example.test", "work@example.test"])
        sign(s, org.id, c.id)
        service.add_suppression(s, org.id, "work@example.test", "complaint")
        s.commit()
        rows = [
            {"id": "r1", "contact_id": c.id, "address_index": service.address_index(s, org.id, "main@example.test")},
            {"id": "r2", "contact_id": c.id, "address_index": service.address_index(s, org.id, "work@example.test")},
            {"id": "r3", "contact_id": None, "address_index": service.address_index(s, org.id, "x@example.test")},
        ]
        assert eligibility.delivery_check(s, org.id, rows, "marketing") == {
            "r1": "eligible", "r2": "suppressed_complaint", "r3": "no_authorization"}
        authorizations.revoke_authorization(s, org.id, authorizations.authorizations_of(s, org.id, c.id)[0].id,
                                            by_type="api", by="k", method="api")
        s.commit()
        assert eligibility.delivery_check(s, org.id, rows[:1], "marketing") == {"r1": "authorization_revoked"}


def test_bad_channel_and_purpose(org, session):
    with org_session(org.id) as s:
        with pytest.raises(ValidationFailed) as exc:
            eligibility.check_eligibility(s, [], "marketing", None, "sms", org_id=org.id)
        assert exc.value.field == "channel"
        with pytest.raises(ValidationFailed) as exc:
            eligibility.check_eligibility(s, [], "spam", None, "email", org_id=org.id)
        assert exc.value.field == "purpose"


def test_set_based_on_thousands_of_contacts(org, session):
    """3,000 contacts in a fixed number of queries per chunk, not one per contact."""
    from carepost.consent.models import Authorization
    from carepost.patients.models import Contact, ContactIdentifier

    n = 3000
    with org_session(org.id) as s:
        ids = []
        contacts, idents, auths = [], [], []
        text = authorizations.current_text(s, org.id, "marketing")
        now = clock.now()
        for i in range(n):
            cid = f"{i:032x}"
            ids.append(cid)
            contacts.append({"id": cid, "org_id": org.id, "care_stage": "new", "deceased": False})
            idents.append({"id": f"{i + 10**6:032x}", "org_id": org.id, "contact_id": cid, "kind": "email", "rank": 0,
                           "blind_index": service.address_index(s, org.id, f"bulk{i}@example.test")})
            if i % 3:
                auths.append({"id": f"{i + 2 * 10**6:032x}", "org_id": org.id, "contact_id": cid, "purpose": "marketing",
                              "text_id": text.id, "text_version": 1, "text_hash": text.content_hash, "language": "en",
                              "signature_kind": "typed", "signature_enc": b"x", "signed_at": now, "method": "api",
                              "status": "revoked" if i % 3 == 2 else "active",
                              "revoked_at": now if i % 3 == 2 else None})
        s.execute(Contact.__table__.insert(), contacts)
        s.execute(ContactIdentifier.__table__.insert(), idents)
        s.execute(Authorization.__table__.insert(), auths)
        for i in range(0, n, 10):
            service.add_suppression(s, org.id, f"bulk{i}@example.test", "complaint")
        s.commit()
        statements = []

        def count(*_a, **_k):
            statements.append(1)

        engine = get_engine()
        event.listen(engine, "before_cursor_execute", count)
        try:
            got = eligibility.check_eligibility(s, ids, "marketing", None, "email",
                                                at=clock.now() + timedelta(seconds=1), org_id=org.id)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert len(got) == n
        assert len(statements) <= 6 * (n // eligibility.CHUNK + 1)
        for i, cid in enumerate(ids):
            expected = ("suppressed_complaint" if i % 10 == 0 else
                        "no_authorization" if i % 3 == 0 else "authorization_revoked" if i % 3 == 2 else "eligible")
            assert got[cid] == expected, i


def test_quiet_hours_defer_in_the_recipient_time_zone(org, session):
    with org_session(org.id) as s:
        service.set_consent_settings(s, org.id, {"quiet_hours_start": "21:00", "quiet_hours_end": "08:00",
                                                 "default_time_zone": "America/New_York"})
        la = make_contact(s, org.id, "la@example.test", time_zone="America/Los_Angeles")
        ny = make_contact(s, org.id, "ny@example.test")  # organization default
        s.commit()
        at = datetime(2025, 3, 4, 3, 30, tzinfo=timezone.utc)  # 22:30 New York, 19:30 Los Angeles
        got = eligibility.quiet_hours_deferral(s, [la.id, ny.id], at, org_id=org.id)
        assert got == {ny.id: datetime(2025, 3, 4, 13, 0, tzinfo=timezone.utc)}  # 08:00 New York
        # quiet hours never exclude
        sign(s, org.id, ny.id)
        s.commit()
        assert check(s, org.id, [ny.id]) == {ny.id: "eligible"}


@pytest.mark.parametrize("local,expected", [
    ("2025-06-01T20:59", None), ("2025-06-01T21:00", "2025-06-02T08:00"), ("2025-06-02T07:59", "2025-06-02T08:00"),
    ("2025-06-02T08:00", None), ("2025-06-01T12:00", None),
])
def test_next_allowed_time_over_midnight(local, expected):
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("Europe/Madrid")
    at = datetime.fromisoformat(local).replace(tzinfo=tz)
    got = eligibility.next_allowed_time(at, "Europe/Madrid", "21:00", "08:00")
    assert got == (datetime.fromisoformat(expected).replace(tzinfo=tz) if expected else None)


def test_next_allowed_time_same_day_window():
    at = datetime(2025, 6, 1, 13, 0, tzinfo=timezone.utc)
    assert eligibility.next_allowed_time(at, "UTC", "12:00", "14:00") == datetime(2025, 6, 1, 14, 0, tzinfo=timezone.utc)
    assert eligibility.next_allowed_time(at, "UTC", None, None) is None


def test_deceased_contacts_are_excluded_from_every_purpose(org, session):
    """Issue 10 item 2: a deceased patient is excluded with ``deceased`` whatever the purpose,
    before the address and consent checks (even a valid authorization does not reach them)."""
    with org_session(org.id) as s:
        alive = make_contact(s, org.id, "alive@example.test")
        dead = make_contact(s, org.id, "dead@example.test", deceased=True)
        no_address = make_contact(s, org.id, None, deceased=True)
        sign(s, org.id, alive.id)
        sign(s, org.id, dead.id)
        s.commit()
        ids = [alive.id, dead.id, no_address.id]
        for purpose in ("transactional", "treatment", "marketing"):
            got = check(s, org.id, ids, purpose)
            assert got == {alive.id: "eligible", dead.id: "deceased", no_address.id: "deceased"}, purpose
        rows = [{"id": "r1", "contact_id": dead.id, "address_index": service.address_index(s, org.id, "dead@example.test")},
                {"id": "r2", "contact_id": alive.id, "address_index": service.address_index(s, org.id, "alive@example.test")}]
        assert eligibility.delivery_check(s, org.id, rows, "transactional") == {"r1": "deceased", "r2": "eligible"}
        assert "deceased" in eligibility.REASONS and eligibility.REASON_TEXT["deceased"]
