"""A/B/n tests of campaigns (issue 14 item 4): the deterministic split into holdout, test
fraction and rest; the significance math against known values; bad settings refused with the
field named (422); and the whole cycle on both databases — the test fraction sent through the
real pipeline to a real SMTP sink, human opens recorded by the real tracking endpoint, the
winner chosen from them once its time passed, the rest released and delivered with the winner's
subject, the holdout sent nothing and reported with its conversions (lift)."""

from __future__ import annotations

import email
import math
import re
from datetime import timedelta
from email import policy as email_policy

import pytest
from sqlalchemy import select

from carepost.campaigns import ab_tests, planning, sending, tasks
from carepost.campaigns.models import Campaign, CampaignEvent, CampaignRecipient
from carepost.core import clock
from carepost.core.database import org_session
from carepost.core.errors import ValidationFailed
from tests.test_campaigns_api import _headers, body, shop  # noqa: F401 - the fixture
from tests.test_campaigns_planning import make_campaign, make_contact, make_segment, make_template

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
          "Safari/537.36")
OPEN_RE = re.compile(r"/t/o/([A-Za-z0-9_-]+)\.gif")


# --------------------------------------------------------------------------- the split


def test_assignment_is_deterministic_and_the_fractions_hold_on_synthetic_ids():
    ab = {"variants": [{"key": "A"}, {"key": "B"}, {"key": "C"}], "holdout": 0.1, "test_fraction": 0.3,
          "metric": "human_clicks", "winner_after_hours": 4}
    ids = [f"{i:032x}" for i in range(6000)]
    first = [ab_tests.assign("c" * 32, cid, ab) for cid in ids]
    assert first == [ab_tests.assign("c" * 32, cid, ab) for cid in ids]  # a re-plan agrees
    by_status = {s: sum(1 for _, st in first if st == s) for s in ("held_out", "planned", "awaiting")}
    assert abs(by_status["held_out"] / len(ids) - 0.1) < 0.02
    assert abs(by_status["planned"] / len(ids) - 0.3) < 0.025
    assert abs(by_status["awaiting"] / len(ids) - 0.6) < 0.025
    variants = [v for v, st in first if st == "planned"]
    for key in "ABC":
        assert abs(variants.count(key) / len(variants) - 1 / 3) < 0.04
    assert all(v == "holdout" for v, st in first if st == "held_out")
    assert all(v is None for v, st in first if st == "awaiting")
    # another campaign splits the same contacts differently
    assert [ab_tests.assign("d" * 32, cid, ab) for cid in ids[:200]] != first[:200]
    # without a test fraction everyone outside the holdout gets a variant (the planner's old rule)
    whole = {k: v for k, v in ab.items() if k not in ("test_fraction", "winner_after_hours")}
    got = [ab_tests.assign("c" * 32, cid, whole) for cid in ids[:1000]]
    assert {st for _, st in got} == {"held_out", "planned"}
    assert [v for v, _ in got] == [planning.assign_variant("c" * 32, cid, whole) for cid in ids[:1000]]
    assert ab_tests.assign("c" * 32, ids[0], None) == (None, "planned")
    # a released row takes its winner's settings
    assert ab_tests.variant_settings({"variants": [{"key": "B", "subject": "x"}]}, "winner:B") == {"key": "B",
                                                                                                   "subject": "x"}


# --------------------------------------------------------------------------- the statistics


def test_significance_math_against_known_values():
    assert ab_tests.normal_cdf(1.959963984540054) == pytest.approx(0.975, abs=1e-12)
    assert ab_tests.normal_cdf(0) == 0.5
    # 120/1000 against 100/1000: pooled z = 1.4293, p = 0.1529 (not significant)
    z, p = ab_tests.two_proportion_z(120, 1000, 100, 1000)
    assert z == pytest.approx(1.42930, abs=1e-4) and p == pytest.approx(0.15290, abs=1e-4)
    # 200/1000 against 150/1000: pooled 0.175, se 0.016993, z = 2.9424, p = 0.00326 (significant)
    z, p = ab_tests.two_proportion_z(200, 1000, 150, 1000)
    assert z == pytest.approx(2.94245, abs=1e-4) and p == pytest.approx(0.003257, abs=2e-5)
    # chi-square of a 2x2 table is z squared, with the same p-value
    stat, df, p2 = ab_tests.chi_square([(120, 1000), (100, 1000)])
    assert df == 1 and stat == pytest.approx(1.42930 ** 2, abs=1e-3) and p2 == pytest.approx(0.15290, abs=1e-4)
    # critical values at 0.05 for 1, 2, 3 and 5 degrees of freedom; a far tail
    for x, k in ((3.841458820694124, 1), (5.991464547107979, 2), (7.814727903251178, 3), (11.070497693516351, 5)):
        assert ab_tests.chi2_sf(x, k) == pytest.approx(0.05, abs=1e-9)
    assert ab_tests.chi2_sf(30, 3) == pytest.approx(1.380057e-6, rel=1e-4)
    # three variants: 10 %, 12 %, 15 % of 1000 each. Expected successes 123.33 each; deviations
    # -23.33, -3.33, +26.67: sum of squares 1266.67 x (1/123.33 + 1/876.67) = 11.7151 on 2 df,
    # whose tail is exactly exp(-x/2) = 0.002858
    stat, df, p3 = ab_tests.chi_square([(100, 1000), (120, 1000), (150, 1000)])
    assert df == 2 and stat == pytest.approx(11.7151, abs=1e-3) and p3 == pytest.approx(0.0028582, abs=1e-6)
    assert ab_tests.chi2_sf(4.2, 2) == pytest.approx(math.exp(-2.1), abs=1e-12)
    # Wilson 95 % intervals
    lo, hi = ab_tests.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = ab_tests.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert ab_tests.wilson(0, 0) is None and ab_tests.two_proportion_z(0, 10, 0, 10) is None
    assert ab_tests.chi_square([(0, 10), (0, 10)]) is None


# --------------------------------------------------------------------------- bad settings


def test_bad_ab_settings_are_refused_with_the_field_named(client, shop, session):  # noqa: F811
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn

    org_id = shop["org_id"]
    with org_session(org_id) as s:  # a version of another template, and a second version of the campaign's
        other = content.create_template(s, org_id, TemplateIn(name="Other", subject="Other", purpose="marketing",
                                                              contains_phi=False, html="<p>Other</p>"))
        s.flush()
        other_version = content.current_version(s, other).id
        from carepost.content.models import MessageTemplateVersion

        base = s.get(MessageTemplateVersion, shop["version"])
        template = content.get_template(s, org_id, base.template_id)
        content.update_template(s, template, TemplateIn(
            name=template.name, subject="Flu shots: walk in", purpose="marketing", contains_phi=False,
            html="<p>Walk in, {{ first_name }}.</p>", language="en"))
        s.flush()
        second = content.current_version(s, template).id
        s.commit()
    two = [{"key": "A"}, {"key": "B", "subject": "Walk in"}]
    cases = [
        ({"variants": two, "holdout": 1.5}, "ab_test.holdout"),
        ({"variants": two, "holdout": -0.1}, "ab_test.holdout"),
        ({"variants": two, "test_fraction": 1.2, "winner_after_hours": 4}, "ab_test.test_fraction"),
        ({"variants": two, "holdout": 0.5, "test_fraction": 0.6, "winner_after_hours": 4}, "ab_test.test_fraction"),
        ({"variants": [{"key": "A"}]}, "ab_test.variants"),
        ({"variants": two, "metric": "revenue"}, "ab_test.metric"),
        ({"variants": [{"key": "A"}, {"key": "B", "template_version_id": "0" * 32}]},
         "ab_test.variants[1].template_version_id"),
        ({"variants": [{"key": "A"}, {"key": "B", "template_version_id": other_version}]},
         "ab_test.variants[1].template_version_id"),
        ({"variants": two, "test_fraction": 0.2, "winner_after_hours": 0}, "ab_test.winner_after_hours"),
        ({"variants": two, "test_fraction": 0.2, "winner_after_hours": -3}, "ab_test.winner_after_hours"),
        ({"variants": two, "test_fraction": 0.2}, "ab_test.winner_after_hours"),
        ({"variants": [{"key": "A"}, {"key": "A"}]}, "ab_test.variants[1].key"),
        ({"variants": [{"key": "A"}, {"key": "B", "send_offset_minutes": -5}]},
         "ab_test.variants[1].send_offset_minutes"),
        ({"variants": two, "colour": "red"}, "ab_test.colour"),
    ]
    for ab, field in cases:
        r = client.post("/api/v1/campaigns", json=body(shop, ab_test=ab), headers=shop["manager"])
        assert r.status_code == 422, (ab, r.text)
        assert r.json()["error"]["field"] == field, (ab, r.json())
    session.rollback()
    assert session.scalar(select(Campaign.id).where(Campaign.org_id == org_id)) is None  # nothing stored
    good = {"variants": ["A", {"key": "B", "template_version_id": second, "send_offset_minutes": 30}],
            "holdout": 0.05, "test_fraction": 0.25, "metric": "conversions", "winner_after_hours": 6}
    r = client.post("/api/v1/campaigns", json=body(shop, ab_test=good), headers=shop["manager"])
    assert r.status_code == 201, r.text
    assert r.json()["ab_test"] == {"variants": [{"key": "A"}, {"key": "B", "template_version_id": second,
                                                                 "send_offset_minutes": 30}],
                                   "holdout": 0.05, "test_fraction": 0.25, "metric": "conversions",
                                   "winner_after_hours": 6}
    with org_session(org_id) as s:  # the service refuses the same way (field named)
        from carepost.campaigns import service
        from tests.test_campaigns_service import person, values

        with pytest.raises(ValidationFailed) as exc:
            service.create_campaign(s, org_id, values(shop["segment"], shop["version"],
                                                      ab_test={"variants": two, "holdout": 2}),
                                    person(org_id, "marketer"))
        assert exc.value.field == "ab_test.holdout"


# --------------------------------------------------------------------------- the whole cycle


def _received(delivery_env, since: int) -> dict[str, tuple[str, str]]:
    """``{address: (subject, open token)}`` of the messages the sink received after ``since``."""
    out = {}
    for m in delivery_env.mx["valid"].recorder.messages[since:]:
        msg = email.message_from_bytes(m.data, policy=email_policy.default)
        html = msg.get_body(("html",)).get_content()
        found = OPEN_RE.search(html)
        assert m.rcpt_tos[0] not in out, "a recipient got two messages"
        out[m.rcpt_tos[0]] = (str(msg["Subject"]), found.group(1) if found else "")
    return out


def test_winner_from_recorded_human_opens_is_sent_to_the_rest_and_the_holdout_gets_nothing(
        delivery_env, sender, delivery_queue, client, session):
    from carepost.delivery import pipeline
    from carepost.delivery.models import Message
    from carepost.tracking import conversions
    from carepost.tracking.engagement import recorder

    recorder().reset()
    org_id = sender.org_id
    with org_session(org_id) as s:
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, blocks=False)
        contacts = {make_contact(s, org_id, f"p{i}@valid.test", sign=True, given_name=f"Pat{i}"): f"p{i}@valid.test"
                    for i in range(60)}
        ab = ab_tests.validate(s, org_id, {
            "variants": [{"key": "A"}, {"key": "B", "subject": "Flu shots: walk in today"}],
            "holdout": 0.2, "test_fraction": 0.4, "metric": "human_opens", "winner_after_hours": 1},
            purpose="marketing", template_id=None)
        camp = make_campaign(s, org_id, seg, version, ab_test=ab, track_opens=True)
        conversions.create_goal(s, org_id, name="Booked", event_name="appointment_booked", window_days=7)
        s.commit()
        camp_id = camp.id

    assert planning.plan(org_id, camp_id).finished
    with org_session(org_id) as s:
        rows = {r.contact_id: r for r in s.scalars(select(CampaignRecipient).where(
            CampaignRecipient.campaign_id == camp_id))}
        assert set(rows) == set(contacts)
        for cid, r in rows.items():
            assert (r.variant, r.status) == ab_tests.assign(camp_id, cid, ab)
    held = {c for c, r in rows.items() if r.status == "held_out"}
    test = {c: r.variant for c, r in rows.items() if r.status == "planned"}
    rest = {c for c, r in rows.items() if r.status == "awaiting"}
    assert held and rest and {"A", "B"} <= set(test.values())

    # The test fraction goes out; the rest waits (sending finds nothing due and does not complete).
    first = sending.materialize(org_id, camp_id, batch=500)
    assert len(first.message_ids) == len(test)
    pipeline.deliver(first.message_ids)
    got = _received(delivery_env, 0)
    assert set(got) == {contacts[c] for c in test}
    for cid, key in test.items():
        assert got[contacts[cid]][0] == ("Flu shots: walk in today" if key == "B" else "Flu shots this week")
    again = sending.materialize(org_id, camp_id, batch=500)
    assert not again.message_ids and not again.completed
    with org_session(org_id) as s:
        assert s.get(Campaign, camp_id).status == "sending"

    # People open every B message (a real browser user agent at the real tracking endpoint); of A, one.
    opened = [c for c, k in test.items() if k == "B"] + [next(c for c, k in test.items() if k == "A")]
    for cid in opened:
        r = client.get(f"/t/o/{got[contacts[cid]][1]}.gif", headers={"User-Agent": CHROME})
        assert r.status_code == 200 and r.content.startswith(b"GIF89a")
    recorder().drain()  # answered /t/ requests are journaled; their rows come with the ingester

    # Not yet time: nothing released.
    assert tasks.release_winners() == []
    with org_session(org_id) as s:
        report = ab_tests.results(s, s.get(Campaign, camp_id))
    by_key = {v["key"]: v for v in report["variants"]}
    n_a, n_b = (sum(1 for k in test.values() if k == key) for key in "AB")
    assert (by_key["A"]["recipients"], by_key["B"]["recipients"]) == (n_a, n_b)
    assert (by_key["A"]["human_opens"], by_key["B"]["human_opens"]) == (1, n_b)
    assert by_key["B"]["human_opens_rate"] == 1.0 and by_key["B"]["delivered"] == n_b
    assert report["leader"] == "B" and report["winner"] is None and report["awaiting"] == len(rest)
    expected_p = ab_tests.two_proportion_z(n_b, n_b, 1, n_a)[1]
    assert report["leader_vs_runner_up"]["p_value"] == pytest.approx(expected_p)
    assert report["significant"] == (expected_p < 0.05)
    assert ("not significant" in report["verdict"]) == (expected_p >= 0.05)

    # An hour after the last test send the periodic task picks B and releases the rest.
    clock.advance(timedelta(hours=1, minutes=5))
    assert tasks.release_winners() == [(camp_id, "B")]
    assert tasks.release_winners() == []  # once
    with org_session(org_id) as s:
        released = s.scalars(select(CampaignRecipient).where(CampaignRecipient.campaign_id == camp_id,
                                                             CampaignRecipient.contact_id.in_(rest))).all()
        assert {(r.status, r.variant) for r in released} == {("planned", "winner:B")}
        assert s.scalar(select(CampaignEvent.action).where(CampaignEvent.campaign_id == camp_id,
                                                           CampaignEvent.action == "winner_chosen")) == "winner_chosen"
    before = len(delivery_env.mx["valid"].recorder.messages)
    second = sending.materialize(org_id, camp_id, batch=500)
    assert len(second.message_ids) == len(rest)
    pipeline.deliver(second.message_ids)
    got_rest = _received(delivery_env, before)
    assert set(got_rest) == {contacts[c] for c in rest}
    assert {subject for subject, _ in got_rest.values()} == {"Flu shots: walk in today"}
    assert sending.materialize(org_id, camp_id, batch=500).completed
    with org_session(org_id) as s:  # the holdout received nothing at all
        assert s.get(Campaign, camp_id).status == "completed"
        assert s.scalar(select(Message.id).where(Message.campaign_id == camp_id).limit(1)) is not None
        all_to = {contacts[c] for c in test} | {contacts[c] for c in rest}
        assert not ({contacts[c] for c in held} & all_to)
    received = [m.rcpt_tos[0] for m in delivery_env.mx["valid"].recorder.messages]
    assert len(received) == len(set(received)) == len(test) + len(rest)
    assert not {contacts[c] for c in held} & set(received)

    # Conversions: one held-out patient and two treated ones book; the lift compares the rates.
    treated = sorted(set(test) | rest)[:2]
    with org_session(org_id) as s:
        for cid in [sorted(held)[0], *treated]:
            conversions.record_event(s, org_id, name="appointment_booked", contact_id=cid)
        s.commit()
    reader = _headers(session, org_id, ["campaigns:read", "phi:read_unmasked"], "ab reader")
    r = client.get(f"/api/v1/campaigns/{camp_id}/ab", headers=reader)
    assert r.status_code == 200, r.text
    out = r.json()
    assert "masked" not in out
    assert out["winner"] == "B" and out["winner_recipients"] == len(rest) and out["awaiting"] == 0
    lift = out["holdout_lift"]
    assert (lift["holdout_recipients"], lift["holdout_conversions"]) == (len(held), 1)
    assert (lift["treated_recipients"], lift["treated_conversions"]) == (len(test) + len(rest), 2)
    assert lift["lift"] == pytest.approx(2 / (len(test) + len(rest)) - 1 / len(held))
    assert lift["significant"] is False  # a handful of events: said plainly
    conv = sum(v["conversions"] for v in out["variants"])
    assert conv == sum(1 for c in treated if c in test)  # attributed to the test messages
    r = client.get(f"/api/v1/campaigns/{camp_id}/report", headers=reader)
    assert r.status_code == 200 and r.json()["ab_test"]["winner"] == "B"
    r = client.get(f"/api/v1/campaigns/{camp_id}/ab")
    assert r.status_code == 401
    # Without phi:read_unmasked, counts of 1-10 people are "<11" and the rates built on them left out.
    masked = client.get(f"/api/v1/campaigns/{camp_id}/ab",
                        headers=_headers(session, org_id, ["campaigns:read"], "ab masked")).json()
    assert masked["masked"] is True and masked["holdout_lift"]["holdout_conversions"] == "<11"
    for plain, hidden in zip(out["variants"], masked["variants"], strict=True):
        for name in ("recipients", "sent", "delivered", "human_opens", "conversions"):
            assert hidden[name] == ("<11" if 0 < plain[name] < 11 else plain[name])
        if 0 < plain["human_opens"] < 11 or 0 < plain["denominator"] < 11:
            assert hidden["human_opens_rate"] is None and hidden["human_opens_ci95"] is None
    report = client.get(f"/api/v1/campaigns/{camp_id}/report",
                        headers=_headers(session, org_id, ["campaigns:read"], "ab masked 2")).json()
    assert report["ab_test"]["masked"] is True
    recorder().reset()


def test_content_and_send_time_variants_render_their_version_and_shift_their_send_time(sender, session):
    """Variant C is another version of the campaign's template (its own subject and body); variant
    D is sent 90 minutes later. The stored messages carry C's version; D's rows wait."""
    from carepost.content import service as content
    from carepost.content.models import MessageTemplateVersion
    from carepost.content.schemas import TemplateIn
    from carepost.delivery.models import Message

    org_id = sender.org_id
    with org_session(org_id) as s:
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, blocks=False)
        base = s.get(MessageTemplateVersion, version)
        template = content.get_template(s, org_id, base.template_id)
        content.update_template(s, template, TemplateIn(
            name=template.name, subject="Walk-in flu clinic", purpose="marketing", contains_phi=False,
            html="<p>Walk in any day, {{ first_name }}.</p>", language="en"))
        s.flush()
        second = content.current_version(s, template).id
        for i in range(30):
            make_contact(s, org_id, f"v{i}@valid.test", sign=True)
        ab = ab_tests.validate(s, org_id, {"variants": [{"key": "C", "template_version_id": second},
                                                        {"key": "D", "send_offset_minutes": 90}]},
                               purpose="marketing", template_id=base.template_id)
        camp = make_campaign(s, org_id, seg, version, ab_test=ab)
        s.commit()
        camp_id = camp.id
    assert planning.plan(org_id, camp_id).finished
    with org_session(org_id) as s:
        rows = s.scalars(select(CampaignRecipient).where(CampaignRecipient.campaign_id == camp_id)).all()
        by_key = {k: [r for r in rows if r.variant == k] for k in "CD"}
        assert by_key["C"] and by_key["D"] and len(rows) == 30
        c_at = max(clock.aware(r.send_after) for r in by_key["C"])
        d_at = min(clock.aware(r.send_after) for r in by_key["D"])
        assert timedelta(minutes=89) < d_at - c_at < timedelta(minutes=91)
    now_sent = sending.materialize(org_id, camp_id, batch=500)
    assert len(now_sent.message_ids) == len(by_key["C"])  # D's rows are not due yet
    with org_session(org_id) as s:
        versions = set(s.scalars(select(Message.template_version_id).where(Message.id.in_(now_sent.message_ids))))
        assert versions == {second}
    later = sending.materialize(org_id, camp_id, batch=500, now=clock.now() + timedelta(minutes=91))
    assert len(later.message_ids) == len(by_key["D"])
    with org_session(org_id) as s:
        versions = set(s.scalars(select(Message.template_version_id).where(Message.id.in_(later.message_ids))))
        assert versions == {version}
