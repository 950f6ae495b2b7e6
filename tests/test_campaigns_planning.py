"""Campaign planning and sending (issue 14 item 5): exclusions with their reasons, refill facts
per recipient, local-time scheduling, throttles, pause/resume/cancel, and the delivered MIME
(language, dynamic blocks) through the real pipeline to a real SMTP server — with a revocation
between plan and send winning at delivery."""

from __future__ import annotations

import email
from datetime import date, datetime, timedelta
from email import policy as email_policy
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from carepost.campaigns import planning, sending
from carepost.campaigns.models import Campaign, CampaignExclusion, CampaignRecipient
from carepost.core import clock
from carepost.core.database import org_session
from carepost.delivery.models import Message, MessageRecipient
from tests.fixtures.statements import captured_statements

BLOCK = "{% block_if 'has condition icd10cm:E11.*' %}<p>Diabetes class in May.</p>{% endblock_if %}"


def make_template(s, org_id, *, purpose="marketing", blocks=True) -> str:
    """A template with an English and a Spanish variant and (optionally) a dynamic block; the id
    of its current version."""
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn

    block = BLOCK if blocks else ""
    t = content.create_template(s, org_id, TemplateIn(
        name=f"Flu clinic {purpose} {blocks}", subject="Flu shots this week", purpose=purpose, contains_phi=False,
        html="<p>Hello {{ first_name }}, our flu clinic is open.</p>" + block, language="en",
        variants={"es": {"subject": "Vacunas esta semana",
                         "html": "<p>Hola {{ first_name }}, la clínica está abierta.</p>"
                                 + block.replace("Diabetes class in May", "Clase de diabetes en mayo")}}))
    s.flush()
    return content.current_version(s, t).id


def make_segment(s, org_id, query="city = Springfield", name="Springfield") -> str:
    from carepost.segments import service as segments

    return segments.create_segment(s, org_id, {"name": name, "query": query}, segments.SYSTEM).id


def make_contact(s, org_id, email_address, *, sign=False, city="Springfield", **extra) -> str:
    from carepost.consent import authorizations
    from carepost.patients import service as patients

    data = {"given_name": extra.pop("given_name", "Pat"), "city": city, **extra}
    if email_address:
        data["email"] = email_address
    c = patients.save_contact(s, org_id, data).contact
    if sign:
        authorizations.record_authorization(s, org_id, contact_id=c.id, purpose="marketing", method="api",
                                            signature_name="Pat Doe", send_copy=False)
    return c.id


def make_campaign(s, org_id, segment_id, version_id, **over) -> Campaign:
    """A launched campaign, as the workflow leaves it for planning (status ``planning``)."""
    from carepost.content.models import MessageTemplateVersion

    version = s.get(MessageTemplateVersion, version_id)
    values = {"org_id": org_id, "name": "Flu clinic", "purpose": "marketing", "segment_id": segment_id,
              "template_id": version.template_id, "template_version_id": version_id,
              "from_address": "care@bar.example", "status": "planning", "schedule_kind": "now",
              "launched_at": clock.now(), "track_opens": False, "track_clicks": False}
    values.update(over)
    c = Campaign(**values)
    s.add(c)
    s.flush()
    return c


def exclusions(s, campaign_id) -> dict[str, str]:
    return dict(s.execute(select(CampaignExclusion.contact_id, CampaignExclusion.reason)
                          .where(CampaignExclusion.campaign_id == campaign_id)).tuples().all())


def recipients(s, campaign_id) -> dict[str, CampaignRecipient]:
    return {r.contact_id: r for r in s.scalars(select(CampaignRecipient).where(CampaignRecipient.campaign_id == campaign_id))}


def test_plan_writes_recipients_and_exclusions_with_reasons_and_resumes_from_the_cursor(sender, session):
    from carepost.consent import service as consent

    org_id = sender.org_id
    with org_session(org_id) as s:
        consent.set_consent_settings(s, org_id, {"frequency_cap_daily": 1})
        seg = make_segment(s, org_id, "city = Springfield and (deceased = true or deceased = false)")
        excl = make_segment(s, org_id, "preferred_language = fr", name="French speakers")
        version = make_template(s, org_id, blocks=False)
        ok = [make_contact(s, org_id, f"ok{i}@valid.test", sign=True) for i in range(5)]
        reasons = {
            make_contact(s, org_id, "noauth@valid.test"): "no_authorization",
            make_contact(s, org_id, "unsub@valid.test", sign=True): "unsubscribed_all",
            make_contact(s, org_id, "bounced@valid.test", sign=True): "suppressed_bounce",
            make_contact(s, org_id, "capped@valid.test", sign=True): "frequency_cap",
            make_contact(s, org_id, "dead@valid.test", sign=True, deceased=True): "deceased",
            make_contact(s, org_id, None, sign=True): "no_address",
            make_contact(s, org_id, "fr@valid.test", sign=True, preferred_language="fr"): "exclusion_segment",
        }
        make_contact(s, org_id, "elsewhere@valid.test", sign=True, city="Shelbyville")  # not in the segment
        by_reason = {v: k for k, v in reasons.items()}
        consent.unsubscribe_contact(s, org_id, by_reason["unsubscribed_all"], None, source="staff")
        consent.add_suppression(s, org_id, "bounced@valid.test", "bounce_hard")
        # the capped patient already got a marketing message today (another campaign)
        earlier_seg = make_segment(s, org_id, "city = Springfield and preferred_language = de", name="earlier")
        s.flush()
        from carepost.patients.models import Contact

        s.get(Contact, by_reason["frequency_cap"]).preferred_language = "de"
        earlier = make_campaign(s, org_id, earlier_seg, version)
        camp = make_campaign(s, org_id, seg, version, exclusion_segment_ids=[excl])
        s.commit()
        earlier_id, camp_id = earlier.id, camp.id

    assert planning.plan(org_id, earlier_id).finished
    assert sending.materialize(org_id, earlier_id).message_ids

    # A planner stopped after two chunks of 3 (a killed worker) and a second one that resumes.
    first = planning.plan(org_id, camp_id, chunk_size=3, max_chunks=2)
    assert first.chunks == 2 and not first.finished
    with org_session(org_id) as s:
        c = s.get(Campaign, camp_id)
        assert c.status == "planning" and c.plan_cursor is not None
        assert c.planned_count + c.excluded_count == 6
    second = planning.plan(org_id, camp_id, chunk_size=3)
    assert second.finished
    assert planning.plan(org_id, camp_id).stopped == "sending"  # nothing planned twice

    with org_session(org_id) as s:
        c = s.get(Campaign, camp_id)
        assert c.status == "sending" and c.plan_finished_at is not None
        assert exclusions(s, camp_id) == reasons
        planned = recipients(s, camp_id)
        assert set(planned) == set(ok)
        assert all(r.status == "planned" and r.send_after is not None for r in planned.values())
        assert (c.planned_count, c.excluded_count) == (5, len(reasons))
        progress = planning.progress(s, c)
        assert progress["exclusions_by_reason"]["no_authorization"] == 1
        assert progress["recipients_by_status"] == {"planned": 5}


def test_refill_reminder_needs_an_authorization_only_where_the_prescription_lapsed_over_90_days(sender, session):
    from carepost.patients import service as patients
    from carepost.patients.schemas import FactIn

    org_id = sender.org_id
    today = clock.now().date()
    with org_session(org_id) as s:
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, purpose="refill_reminder", blocks=False)

        def med(cid, **values):
            patients.create_fact(s, org_id, cid, "medications", FactIn(code_system="rxnorm", code="197361",
                                                                       display="Amlodipine 5 mg", **values))

        current = make_contact(s, org_id, "current@valid.test")
        med(current, status="active", last_fill_date=today - timedelta(days=20), days_supply=30)
        recent = make_contact(s, org_id, "recent@valid.test")  # ran out 30 days ago: still "current"
        med(recent, status="completed", last_fill_date=today - timedelta(days=60), days_supply=30)
        lapsed = make_contact(s, org_id, "lapsed@valid.test")  # ran out 120 days ago: marketing
        med(lapsed, status="completed", last_fill_date=today - timedelta(days=150), days_supply=30)
        lapsed_signed = make_contact(s, org_id, "lapsed-signed@valid.test", sign=True)
        med(lapsed_signed, status="completed", last_fill_date=today - timedelta(days=150), days_supply=30)
        never = make_contact(s, org_id, "never@valid.test")  # no prescription of that drug
        other_drug = make_contact(s, org_id, "other@valid.test")
        patients.create_fact(s, org_id, other_drug, "medications", FactIn(
            code_system="rxnorm", code="860975", status="active", last_fill_date=today, days_supply=30))
        camp = make_campaign(s, org_id, seg, version, purpose="refill_reminder", refill_drug="rxnorm:197361")
        s.commit()
        camp_id = camp.id

        assert planning.refill_lapse_days(s, org_id, "rxnorm:197361", [current, recent, lapsed, never]) == {
            current: 0, recent: 30, lapsed: 120, never: None}

    assert planning.plan(org_id, camp_id).finished
    with org_session(org_id) as s:
        assert exclusions(s, camp_id) == {lapsed: "no_authorization", never: "no_authorization",
                                          other_drug: "no_authorization"}
        assert set(recipients(s, camp_id)) == {current, recent, lapsed_signed}
    report = sending.materialize(org_id, camp_id)
    with org_session(org_id) as s:
        purposes = dict(s.execute(select(MessageRecipient.contact_id, Message.purpose)
                                  .join(Message, Message.id == MessageRecipient.message_id)
                                  .where(Message.id.in_(report.message_ids))).tuples().all())
        # the message carries the purpose the rules make of it: the pipeline re-checks that one
        assert purposes == {current: "refill_reminder", recent: "refill_reminder", lapsed_signed: "marketing"}
        assert {m.source for m in s.scalars(select(Message).where(Message.campaign_id == camp_id))} == {"campaign"}


def test_local_time_in_each_contacts_time_zone_and_the_organization_default(sender, session):
    from carepost.consent import service as consent

    org_id = sender.org_id
    day = date(2031, 3, 20)
    with org_session(org_id) as s:
        consent.set_consent_settings(s, org_id, {"default_time_zone": "America/Chicago"})
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, blocks=False)
        ny = make_contact(s, org_id, "ny@valid.test", sign=True, time_zone="America/New_York")
        la = make_contact(s, org_id, "la@valid.test", sign=True, time_zone="America/Los_Angeles")
        none = make_contact(s, org_id, "none@valid.test", sign=True)
        camp = make_campaign(s, org_id, seg, version, schedule_kind="local", local_time="09:30", local_date=day)
        at = make_campaign(s, org_id, seg, version, schedule_kind="at",
                           send_at=datetime(2031, 3, 21, 15, 0, tzinfo=ZoneInfo("UTC")))
        s.commit()
        camp_id, at_id = camp.id, at.id
    assert planning.plan(org_id, camp_id).finished and planning.plan(org_id, at_id).finished

    def utc(hh, mm, zone):
        return datetime(2031, 3, 20, hh, mm, tzinfo=ZoneInfo(zone)).astimezone(ZoneInfo("UTC"))

    with org_session(org_id) as s:
        got = {cid: clock.aware(r.send_after) for cid, r in recipients(s, camp_id).items()}
        assert got == {ny: utc(9, 30, "America/New_York"), la: utc(9, 30, "America/Los_Angeles"),
                       none: utc(9, 30, "America/Chicago")}
        assert {clock.aware(r.send_after) for r in recipients(s, at_id).values()} == {
            datetime(2031, 3, 21, 15, 0, tzinfo=ZoneInfo("UTC"))}
    # nothing is due before its time
    assert sending.materialize(org_id, camp_id).message_ids == []
    report = sending.materialize(org_id, camp_id, now=datetime(2031, 3, 20, 14, 0, tzinfo=ZoneInfo("UTC")))
    with org_session(org_id) as s:
        sent_to = set(s.scalars(select(MessageRecipient.contact_id).where(MessageRecipient.message_id.in_(report.message_ids))))
    assert sent_to == {ny}  # 09:30 in New York is 13:30 UTC; Chicago 14:30, Los Angeles 16:30


def test_throttles_pause_resume_and_cancel(sender, session):
    org_id = sender.org_id
    with org_session(org_id) as s:
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, blocks=False)
        for i in range(7):
            make_contact(s, org_id, f"v{i}@valid.test", sign=True)
        for i in range(3):
            make_contact(s, org_id, f"m{i}@mta-sts.test", sign=True)
        camp = make_campaign(s, org_id, seg, version, throttle_per_hour=5, throttle_per_domain_per_hour=3)
        s.commit()
        camp_id = camp.id
    assert planning.plan(org_id, camp_id).finished

    def sent_domains(ids):
        with org_session(org_id) as s:
            rows = s.execute(select(MessageRecipient.message_id).where(MessageRecipient.message_id.in_(ids))).all()
        return len(rows)

    first = sending.materialize(org_id, camp_id)
    assert len(first.message_ids) == 5 and sent_domains(first.message_ids) == 5
    with org_session(org_id) as s:
        # at most 3 per receiving domain in the hour
        domains = s.execute(select(MessageRecipient.domain_index, func.count()).join(
            Message, Message.id == MessageRecipient.message_id).where(Message.campaign_id == camp_id)
            .group_by(MessageRecipient.domain_index)).tuples().all()
        assert sorted(n for _, n in domains) == [2, 3]
    throttled = sending.materialize(org_id, camp_id)
    assert throttled.message_ids == [] and throttled.next_due_at is not None
    assert throttled.next_due_at > clock.now() + timedelta(minutes=50)

    with org_session(org_id) as s:
        s.get(Campaign, camp_id).status = "paused"
        s.commit()
    clock.advance(timedelta(minutes=61))
    assert sending.materialize(org_id, camp_id).stopped == "paused"
    with org_session(org_id) as s:
        s.get(Campaign, camp_id).status = "sending"  # resumed
        s.commit()
    second = sending.materialize(org_id, camp_id)
    assert len(second.message_ids) == 4  # a new hour: 3 more to valid.test (its limit), 1 to mta-sts.test
    with org_session(org_id) as s:
        c = s.get(Campaign, camp_id)
        assert c.materialized_count == 9
        c.status = "cancelled"
        assert sending.cancel_remaining(s, camp_id) == 1
        s.commit()
        assert sending.materialize(org_id, camp_id).stopped == "cancelled"
        statuses = sorted(r.status for r in recipients(s, camp_id).values())
        assert statuses == ["cancelled"] + ["materialized"] * 9
        assert s.scalar(select(func.count()).select_from(Message).where(Message.campaign_id == camp_id)) == 9


def test_materializing_counts_each_message_in_the_analytics_without_reading_it_back(sender, session):
    """A batch's messages are stored without ORM objects (one INSERT); analytics takes each one's
    dimensions from what was stored (``stored_message``), not a SELECT of the message per recipient,
    and counts every recipient as accepted under the campaign."""
    from carepost.core.database import read_only_session
    from carepost.tracking import analytics

    org_id = sender.org_id
    with org_session(org_id) as s:
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, blocks=False)
        for i in range(6):
            make_contact(s, org_id, f"rows{i}@valid.test", sign=True)
        camp = make_campaign(s, org_id, seg, version)
        s.commit()
        camp_id = camp.id
    assert planning.plan(org_id, camp_id).finished
    with captured_statements() as sent:
        report = sending.materialize(org_id, camp_id)
    statements = [" ".join(sql.split()) for sql, _params in sent]
    assert len(report.message_ids) == 6
    assert any(s.startswith("INSERT INTO messages") for s in statements)
    read_back = [s for s in statements if s.startswith("SELECT") and "FROM messages WHERE messages.id =" in s]
    assert read_back == []
    today = clock.now().date()
    with read_only_session(org_id) as s:
        figures = analytics.summary(s, org_id, analytics.Filters(start=today - timedelta(days=1),
                                                                 end=today + timedelta(days=1), campaign_id=camp_id))
    assert figures.get("accepted") == 6


def test_delivered_mime_is_personalized_per_recipient_and_a_revocation_before_send_wins(
        delivery_env, sender, delivery_queue, session):
    from carepost.consent import authorizations
    from carepost.consent.models import Authorization
    from carepost.delivery import pipeline
    from carepost.patients import service as patients
    from carepost.patients.schemas import FactIn

    org_id = sender.org_id
    with org_session(org_id) as s:
        seg = make_segment(s, org_id)
        version = make_template(s, org_id)
        ann = make_contact(s, org_id, "ann@valid.test", sign=True, given_name="Ann", preferred_language="en-US")
        rosa = make_contact(s, org_id, "rosa@valid.test", sign=True, given_name="Rosa", preferred_language="es-MX")
        patients.create_fact(s, org_id, rosa, "conditions", FactIn(code_system="icd10cm", code="E11.9", status="active"))
        sam = make_contact(s, org_id, "sam@valid.test", sign=True, given_name="Sam")
        camp = make_campaign(s, org_id, seg, version)
        s.commit()
        camp_id = camp.id
    assert planning.plan(org_id, camp_id).finished
    with org_session(org_id) as s:
        planned = recipients(s, camp_id)
        assert planned[rosa].blocks and not planned[ann].blocks  # the block planned set-wise
        auth = s.scalars(select(Authorization).where(Authorization.contact_id == sam)).one()
    report = sending.materialize(org_id, camp_id)
    assert len(report.message_ids) == 3
    with org_session(org_id) as s:  # revoked after planning and materialization, before delivery
        authorizations.revoke_authorization(s, org_id, auth.id, by_type="patient", by=None, method="link")
        s.commit()
    import io

    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    logged = io.StringIO()
    configure_logging("INFO", json=True, stream=logged)
    try:
        pipeline.deliver(report.message_ids)
    finally:
        configure_logging(get_settings().log_level, get_settings().log_json)
    # Nothing after the claim's commit reads the database (the footer is read before it): no
    # transaction is found open, and committed, before the network step.
    assert "delivery_run" in logged.getvalue() and "transaction_open_before_send" not in logged.getvalue()

    got = {}
    for m in delivery_env.mx["valid"].recorder.messages:
        msg = email.message_from_bytes(m.data, policy=email_policy.default)
        html = msg.get_body(("html",)).get_content()
        got[m.rcpt_tos[0]] = (str(msg["Subject"]), html)
    assert set(got) == {"ann@valid.test", "rosa@valid.test"}
    assert got["ann@valid.test"][0] == "Flu shots this week"
    assert "Hello Ann" in got["ann@valid.test"][1] and "Diabetes class" not in got["ann@valid.test"][1]
    assert got["rosa@valid.test"][0] == "Vacunas esta semana"
    assert "Hola Rosa" in got["rosa@valid.test"][1] and "Clase de diabetes en mayo" in got["rosa@valid.test"][1]
    with org_session(org_id) as s:
        rows = {r.contact_id: r for r in s.scalars(select(MessageRecipient).where(
            MessageRecipient.message_id.in_(report.message_ids)))}
        assert rows[sam].status == "excluded" and rows[sam].reason == "authorization_revoked"
        assert {rows[ann].status, rows[rosa].status} == {"delivered"}
    assert sending.materialize(org_id, camp_id).completed
    with org_session(org_id) as s:
        assert s.get(Campaign, camp_id).status == "completed"


def test_ab_variants_and_holdout_are_deterministic():
    ab = {"variants": [{"key": "A", "subject": "One"}, {"key": "B", "subject": "Two"}], "holdout": 0.1}
    ids = [f"{i:032x}" for i in range(2000)]
    first = [planning.assign_variant("c" * 32, cid, ab) for cid in ids]
    assert first == [planning.assign_variant("c" * 32, cid, ab) for cid in ids]
    share = first.count("holdout") / len(ids)
    assert 0.07 < share < 0.13
    assert abs(first.count("A") - first.count("B")) < 200
    assert planning.assign_variant("c" * 32, ids[0], None) is None


@pytest.mark.parametrize("remuneration,expected", [("none", "marketing"), ("cost", "marketing_remunerated")])
def test_effective_purpose_follows_consents_requirements(remuneration, expected):
    c = Campaign(purpose="marketing", remuneration=remuneration, refill_drug=None)
    assert planning.effective_purpose(c, None) == expected
    refill = Campaign(purpose="refill_reminder", remuneration="none", refill_drug="rxnorm:197361")
    assert planning.effective_purpose(refill, 0) == "refill_reminder"
    assert planning.effective_purpose(refill, 90) == "refill_reminder"
    assert planning.effective_purpose(refill, 91) == "marketing"
    assert planning.effective_purpose(refill, None) == "marketing"


def test_a_launched_campaign_runs_through_the_queued_tasks_to_the_smtp_server(
        delivery_env, sender, delivery_queue, session):
    """The workflow's launch queues ``campaigns.plan_campaign``; the tasks it chains (plan, send,
    delivery) run from the real queue, in order, until it is empty."""
    from carepost.campaigns import service
    from carepost.campaigns.schemas import CampaignIn
    from carepost.core.queue import huey
    from tests.test_campaigns_service import person

    org_id = sender.org_id
    marketer, compliance = person(org_id, "marketer"), person(org_id, "compliance_officer")
    with org_session(org_id) as s:
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, blocks=False)
        for i in range(5):
            make_contact(s, org_id, f"q{i}@valid.test", sign=True)
        make_contact(s, org_id, "unsigned@valid.test")
        c = service.create_campaign(s, org_id, CampaignIn(name="Queued", purpose="marketing", segment_id=seg,
                                                         template_version_id=version,
                                                         from_address="news@bar.example"), marketer)
        service.submit(s, c, marketer)
        service.approve(s, c, compliance)
        service.launch(s, c, marketer)
        s.commit()
        camp_id = c.id
    service.start_work(org_id, camp_id, "planning")
    names = []
    for _ in range(50):
        task = huey.dequeue()
        if task is None:
            break
        names.append(task.name)
        huey.execute(task)
    assert names[:2] == ["campaigns.plan_campaign", "campaigns.send_campaign"]
    assert "delivery.deliver_messages" in names
    received = sorted(r for m in delivery_env.mx["valid"].recorder.messages for r in m.rcpt_tos)
    assert received == [f"q{i}@valid.test" for i in range(5)]
    with org_session(org_id) as s:
        c = s.get(Campaign, camp_id)
        assert c.status == "completed" and (c.planned_count, c.excluded_count, c.materialized_count) == (5, 1, 5)
