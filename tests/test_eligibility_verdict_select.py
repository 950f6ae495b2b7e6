"""consent.eligibility.verdict_select — the eligibility check as one SELECT, used by campaign
planning — gives exactly check_eligibility's answer for every reason code and purpose: each
verdict it decides is the reference's, and it leaves undecided (NULL) only the suppressed
addresses and the revoked or expired authorizations, which the planner sends to
check_eligibility."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.consent import authorizations, eligibility, service
from carepost.core import clock
from carepost.core.database import org_session
from carepost.delivery.models import Message, MessageRecipient
from carepost.patients.models import Contact


def make_contact(s, org_id, email=None, **extra):
    from carepost.patients import service as patients

    data = {"given_name": "Pat", **extra}
    if email:
        data["email"] = email
    return patients.save_contact(s, org_id, data).contact.id


def sign(s, org_id, contact_id, purpose="marketing", **kw):
    return authorizations.record_authorization(s, org_id, contact_id=contact_id, purpose=purpose, method="api",
                                               signature_name="Pat Example", send_copy=False, **kw)


def chunk(org_id, ids):
    return (select(Contact.id.label("id"), Contact.deceased.label("deceased"), Contact.time_zone.label("time_zone"))
            .where(Contact.org_id == org_id, Contact.id.in_(ids)).cte("chunk"))


def population(s, org_id) -> dict[str, str]:
    """A contact per rule (the name says what it meets)."""
    news = service.create_topic(s, org_id, key="newsletter", name="Newsletter")
    offers = service.create_topic(s, org_id, key="offers", name="Offers", opt_in_required=True, double_opt_in=False)
    service.set_consent_settings(s, org_id, {"frequency_cap_daily": 1, "frequency_cap_weekly": 2})
    c = {}
    c["valid"] = make_contact(s, org_id, "valid@example.test", time_zone="America/Chicago")
    c["unsigned"] = make_contact(s, org_id, "unsigned@example.test")
    c["nobody"] = make_contact(s, org_id)
    c["dead"] = make_contact(s, org_id, "dead@example.test", deceased=True)
    c["dead_noaddr"] = make_contact(s, org_id, deceased=True)
    for r in ("bounce_hard", "bounce_soft", "complaint", "manual", "legal_hold"):
        c[r] = make_contact(s, org_id, f"{r}@example.test")
        service.add_suppression(s, org_id, f"{r}@example.test", r)
    c["invalid"] = make_contact(s, org_id, "invalid@example.test")
    service.add_suppression(s, org_id, "invalid@example.test", "bounce_hard", details={"status": "5.1.1"})
    c["unsub_marketing"] = make_contact(s, org_id, "unsubm@example.test")
    service.add_suppression(s, org_id, "unsubm@example.test", "unsubscribe", scope="marketing")
    c["expired_suppression"] = make_contact(s, org_id, "expsup@example.test")
    service.add_suppression(s, org_id, "expsup@example.test", "manual", expires_at=clock.now() + timedelta(hours=1))
    # two addresses: the primary one (first) is suppressed, the other is not
    c["two_addresses"] = make_contact(s, org_id, emails=["primary2@example.test", "second2@example.test"])
    service.add_suppression(s, org_id, "primary2@example.test", "complaint")
    c["second_suppressed"] = make_contact(s, org_id, emails=["primary3@example.test", "second3@example.test"])
    service.add_suppression(s, org_id, "second3@example.test", "complaint")
    c["unsub_all"] = make_contact(s, org_id, "ua@example.test")
    c["unsub_news"] = make_contact(s, org_id, "un@example.test")
    c["offers_in"] = make_contact(s, org_id, "oi@example.test")
    for name in ("valid", "dead", "bounce_hard", "bounce_soft", "complaint", "manual", "legal_hold", "invalid",
                 "unsub_marketing", "expired_suppression", "two_addresses", "second_suppressed", "unsub_all",
                 "unsub_news", "offers_in"):
        sign(s, org_id, c[name])
    for name in ("valid", "unsub_news"):
        sign(s, org_id, c[name], "marketing_remunerated")
    c["expired"] = make_contact(s, org_id, "exp@example.test")
    sign(s, org_id, c["expired"], expires_at=clock.now() + timedelta(hours=1))
    c["revoked"] = make_contact(s, org_id, "rev@example.test")
    rv = sign(s, org_id, c["revoked"])
    authorizations.revoke_authorization(s, org_id, rv.id, by_type="staff", by="u", method="staff")
    c["resigned"] = make_contact(s, org_id, "resigned@example.test")
    old = sign(s, org_id, c["resigned"])
    authorizations.revoke_authorization(s, org_id, old.id, by_type="patient", by=None, method="link")
    sign(s, org_id, c["resigned"])
    c["topic_bound"] = make_contact(s, org_id, "tb@example.test")
    sign(s, org_id, c["topic_bound"], topic_id=news.id)
    service.unsubscribe_contact(s, org_id, c["unsub_all"], None, source="test")
    service.unsubscribe_contact(s, org_id, c["unsub_news"], news.id, source="test")
    service.resubscribe_contact(s, org_id, c["offers_in"], offers.id, source="test")
    # frequency caps: two marketing messages in the week (one today) for "capped_daily"; two
    # last week, none today, for "capped_weekly"; a transactional one and an excluded one don't count
    c["capped_daily"] = make_contact(s, org_id, "cd@example.test")
    c["capped_weekly"] = make_contact(s, org_id, "cw@example.test")
    c["not_capped"] = make_contact(s, org_id, "nc@example.test")
    for name in ("capped_daily", "capped_weekly", "not_capped"):
        sign(s, org_id, c[name])
    now = clock.now()
    for name, ago, purpose, status in (("capped_daily", timedelta(hours=2), "marketing", "delivered"),
                                       ("capped_weekly", timedelta(days=2), "marketing", "delivered"),
                                       ("capped_weekly", timedelta(days=3), "marketing_remunerated", "sent"),
                                       ("not_capped", timedelta(hours=1), "treatment", "delivered"),
                                       ("not_capped", timedelta(hours=1), "marketing", "excluded"),
                                       ("not_capped", timedelta(days=9), "marketing", "delivered")):
        m = Message(org_id=org_id, from_address="care@bar.example", subject_enc=b"x", security="tls_required",
                    purpose=purpose, created_at=now - ago)
        s.add(m)
        s.flush()
        s.add(MessageRecipient(org_id=org_id, message_id=m.id, address_enc=b"x", address_index="i" + name,
                               domain_index="d", contact_id=c[name], status=status))
    s.flush()
    return c


CASES = [("marketing", None), ("marketing", "newsletter"), ("marketing", "offers"), ("treatment", None),
         ("transactional", None), ("own_products", None), ("own_products", "offers"), ("marketing_remunerated", None),
         ("health_care_operations", "newsletter")]


@pytest.mark.parametrize("later", [False, True], ids=["now", "two_hours_later"])
def test_verdict_select_agrees_with_check_eligibility_on_every_rule(org, session, later):
    with org_session(org.id) as s:
        c = population(s, org.id)
        s.commit()
        if later:  # the expiring authorization and suppression have expired; the daily cap has passed
            clock.advance(timedelta(hours=2, minutes=1))
        ids = list(c.values())
        undecided_seen = set()
        for purpose, topic in CASES:
            expected = eligibility.check_eligibility(s, ids, purpose, topic, org_id=org.id)
            rows = s.execute(eligibility.verdict_select(s, org.id, chunk(org.id, ids), purpose, topic)).tuples().all()
            assert [r[0] for r in rows] == sorted(ids)
            got = {cid: verdict for cid, _, verdict in rows}
            undecided = {cid for cid, verdict in got.items() if verdict is None}
            undecided_seen |= undecided
            decided = {cid: verdict for cid, verdict in got.items() if verdict is not None}
            assert decided == {cid: expected[cid] for cid in decided}, (purpose, topic)
            # only suppressed addresses and revoked or expired authorizations are left to the reference
            assert all(expected[cid].startswith(("suppressed_", "invalid_address", "unsubscribed_", "authorization_"))
                       for cid in undecided), (purpose, topic, {cid: expected[cid] for cid in undecided})
            assert {cid: tz for cid, tz, _ in rows}[c["valid"]] == "America/Chicago"
        names = {v: k for k, v in c.items()}
        assert {names[cid] for cid in undecided_seen} >= {"bounce_hard", "complaint", "invalid", "revoked"}
        # every reason of the population appears somewhere (the comparison covers them all)
        reasons = set()
        for purpose, topic in CASES:
            reasons |= set(eligibility.check_eligibility(s, ids, purpose, topic, org_id=org.id).values())
        want = {"eligible", "deceased", "no_address", "no_authorization", "authorization_revoked", "unsubscribed_all",
                "unsubscribed_topic", "suppressed_bounce", "suppressed_complaint", "suppressed_manual",
                "invalid_address", "frequency_cap"}
        if later:
            want.add("authorization_expired")
        assert want <= reasons
