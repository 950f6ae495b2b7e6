"""Campaigns, the declarative part (issue 14 items 2-3): every bad input refused with the field
named, the approval workflow and its state machine, the organization's approval rules, the
pre-launch compliance report against real contacts, authorizations and suppressions, refill
facts per recipient, and the calendar's overlap warnings — on SQLCipher and PostgreSQL."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from sqlalchemy import select

from carepost.accounts.access import Principal
from carepost.accounts.permissions import permissions_for
from carepost.campaigns import report, service
from carepost.campaigns.models import Campaign, CampaignEvent, CampaignRecipient
from carepost.campaigns.schemas import CampaignIn, CampaignPatch, ScheduleIn
from carepost.core import clock
from carepost.core.database import org_session
from carepost.core.errors import Conflict, PermissionDenied, ValidationFailed
from carepost.core.ids import new_id

HTML = "<p>Hello {{ first_name }}, our flu clinic is open.</p>"


def person(org_id: str, role: str) -> Principal:
    uid = new_id()
    return Principal(kind="user", org_id=org_id, actor_id=uid, user_id=uid, role=role,
                     permissions=frozenset(permissions_for(role)))


def make_template(s, org_id, *, purpose="marketing", html=HTML, name=None) -> str:
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn

    t = content.create_template(s, org_id, TemplateIn(
        name=name or f"Flu {purpose} {new_id()[:6]}", subject="Flu shots this week", purpose=purpose,
        contains_phi=False, html=html, language="en",
        variants={"es": {"subject": "Vacunas esta semana", "html": "<p>Hola {{ first_name }}.</p>"}}))
    s.flush()
    return content.current_version(s, t).id


def make_segment(s, org_id, query="city = Springfield", name=None) -> str:
    from carepost.segments import service as segments

    return segments.create_segment(s, org_id, {"name": name or f"seg {new_id()[:8]}", "query": query},
                                   segments.SYSTEM).id


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


def values(seg, ver, **over) -> CampaignIn:
    data = {"name": over.pop("name", f"Flu {new_id()[:6]}"), "purpose": "marketing", "segment_id": seg,
            "template_version_id": ver, "from_address": "news@bar.example"}
    data.update(over)
    return CampaignIn(**data)


@pytest.fixture
def world(sender):
    """Springfield: 3 contacts with a marketing authorization, one without; a template; a segment."""
    org_id = sender.org_id
    with org_session(org_id) as s:
        ids = [make_contact(s, org_id, f"ok{i}@valid.test", sign=True) for i in range(3)]
        ids.append(make_contact(s, org_id, "noauth@valid.test"))
        seg = make_segment(s, org_id, name="Springfield")
        version = make_template(s, org_id)
        s.commit()
    return {"org_id": org_id, "segment": seg, "version": version, "contacts": ids, "domain": sender.domain_id}


def events(s, campaign_id) -> list[str]:
    return [e.action for e in s.scalars(select(CampaignEvent).where(CampaignEvent.campaign_id == campaign_id)
                                        .order_by(CampaignEvent.created_at, CampaignEvent.id))]


def test_workflow_submit_approve_launch_with_self_approval_and_unapproved_launch_refused(world):
    org_id = world["org_id"]
    marketer, compliance, owner = person(org_id, "marketer"), person(org_id, "compliance_officer"), person(org_id, "owner")
    with org_session(org_id) as s:
        c = service.create_campaign(s, org_id, values(world["segment"], world["version"]), marketer)
        assert c.status == "draft" and c.approval_required  # marketing needs approval by default
        with pytest.raises(Conflict) as exc:
            service.launch(s, c, marketer)
        assert exc.value.code == "approval_required"
        with pytest.raises(Conflict) as exc:  # approve before submit: illegal transition
            service.approve(s, c, compliance)
        assert exc.value.code == "illegal_transition" and exc.value.field == "status"
        service.submit(s, c, marketer, "Please review")
        with pytest.raises(PermissionDenied):  # a marketer cannot approve at all
            service.approve(s, c, marketer)
        with pytest.raises(Conflict):  # submitted, not approved: still no launch
            service.launch(s, c, marketer)
        # the owner holds campaigns:approve but submitted this one: not their own
        c2 = service.create_campaign(s, org_id, values(world["segment"], world["version"]), owner)
        service.submit(s, c2, owner)
        with pytest.raises(PermissionDenied) as exc:
            service.approve(s, c2, owner)
        assert exc.value.code == "self_approval" and c2.status == "submitted"
        service.approve(s, c, compliance, "Looks right")
        assert c.status == "approved" and c.approved_by == compliance.user_id and c.content_hash
        service.launch(s, c, marketer)
        assert c.status == "planning" and c.launched_by == marketer.user_id and c.send_at is not None
        with pytest.raises(Conflict):  # launched: no edit, no second launch
            service.update_campaign(s, c, CampaignPatch(name="Renamed"), marketer)
        with pytest.raises(Conflict):
            service.launch(s, c, marketer)
        service.pause(s, c, marketer)
        assert c.status == "paused"
        service.resume(s, c, marketer)
        assert c.status == "planning"  # the plan had not finished
        service.cancel(s, c, marketer)
        assert c.status == "cancelled"
        with pytest.raises(Conflict):
            service.resume(s, c, marketer)
        s.commit()
        assert events(s, c.id) == ["created", "submitted", "approved", "launched", "paused", "resumed", "cancelled"]
        history = service.events_of(s, c)
        assert history[1]["comment"] == "Please review" and history[2]["comment"] == "Looks right"
        # the comment is stored encrypted, never in clear
        raw = s.scalars(select(CampaignEvent.comment_enc).where(CampaignEvent.campaign_id == c.id,
                                                                CampaignEvent.action == "approved")).one()
        assert b"Looks right" not in raw


def test_edit_after_approval_returns_to_draft_and_voids_the_approval(world):
    org_id = world["org_id"]
    marketer, compliance = person(org_id, "marketer"), person(org_id, "compliance_officer")
    other_version = None
    with org_session(org_id) as s:
        other_version = make_template(s, org_id, name="Other")
        c = service.create_campaign(s, org_id, values(world["segment"], world["version"]), marketer)
        service.submit(s, c, marketer)
        service.approve(s, c, compliance)
        service.update_campaign(s, c, CampaignPatch(name="Flu clinic, renamed"), marketer)
        assert c.status == "approved"  # the name is not an approved field
        service.schedule(s, c, ScheduleIn(schedule_kind="at", send_at=clock.now() + timedelta(days=2)), marketer)
        assert c.status == "scheduled"  # a schedule change voids no approval
        service.update_campaign(s, c, CampaignPatch(template_version_id=other_version), marketer)
        assert c.status == "draft" and c.approved_by is None and c.content_hash is None
        with pytest.raises(Conflict) as exc:
            service.launch(s, c, marketer)
        assert exc.value.code == "approval_required"
        s.commit()
        assert events(s, c.id)[-2:] == ["updated", "returned_to_draft"]
        # a rejected campaign is edited and submitted again
        service.submit(s, c, marketer)
        with pytest.raises(ValidationFailed) as exc:
            service.reject(s, c, compliance, "  ")
        assert exc.value.field == "comment"
        service.reject(s, c, compliance, "The subject promises too much")
        assert c.status == "rejected"
        service.submit(s, c, marketer)
        assert c.status == "submitted"


def test_approval_rules_by_purpose_sensitive_segment_and_configuration(world):
    from carepost.patients import models as pm

    org_id = world["org_id"]
    marketer = person(org_id, "marketer")
    with org_session(org_id) as s:
        treat = make_template(s, org_id, purpose="treatment", name="Treatment")
        hiv = world["contacts"][0]
        s.add(pm.Condition(org_id=org_id, contact_id=hiv, code_system="icd10cm", code="B20", status="active"))
        s.flush()
        sensitive = make_segment(s, org_id, 'has condition in valueset "hiv"', name="HIV care")
        plain = service.create_campaign(s, org_id, values(world["segment"], treat, purpose="treatment"), marketer)
        assert not plain.approval_required
        service.launch(s, plain, marketer)  # no approval needed: launches from draft
        assert plain.status == "planning"
        sens = service.create_campaign(s, org_id, values(sensitive, treat, purpose="treatment"), marketer)
        assert sens.approval_required  # a sensitive segment needs approval
        with pytest.raises(Conflict):
            service.launch(s, sens, marketer)
        service.set_campaign_settings(s, org_id, {"approval_required_for_all": True})
        every = service.create_campaign(s, org_id, values(world["segment"], treat, purpose="treatment"), marketer)
        assert every.approval_required
        with pytest.raises(ValidationFailed) as exc:
            service.set_campaign_settings(s, org_id, {"approval_required_purposes": ["marketing", "spam"]})
        assert exc.value.field == "approval_required_purposes[1]"
        s.rollback()


def _field(exc_info) -> str:
    return exc_info.value.field


@pytest.mark.parametrize("over,field", [
    ({"segment_id": "0" * 32}, "segment_id"),
    ({"exclusion_segment_ids": ["1" * 32]}, "exclusion_segment_ids[0]"),
    ({"template_version_id": "2" * 32}, "template_version_id"),
    ({"topic_id": "3" * 32}, "topic_id"),
    ({"sending_domain_id": "4" * 32}, "sending_domain_id"),
    ({"purpose": "spam"}, "purpose"),
    ({"schedule_kind": "at"}, "send_at"),
    ({"schedule_kind": "at", "send_at": "2020-01-01T09:00:00Z"}, "send_at"),
    ({"schedule_kind": "at", "send_at": "2099-01-01T09:00:00", "time_zone": "Mars/Olympus_Mons"}, "time_zone"),
    ({"schedule_kind": "local", "local_time": "25:00", "local_date": "2099-01-01"}, "local_time"),
    ({"schedule_kind": "local", "local_time": "9am", "local_date": "2099-01-01"}, "local_time"),
    ({"schedule_kind": "local", "local_time": "09:00"}, "local_date"),
    ({"schedule_kind": "local", "local_time": "09:00", "local_date": "2001-01-01"}, "local_date"),
    ({"throttle_per_hour": 0}, "throttle_per_hour"),
    ({"throttle_per_domain_per_hour": -5}, "throttle_per_domain_per_hour"),
    ({"purpose": "refill_reminder"}, "refill_drug"),
    ({"refill_drug": "rxnorm:197361"}, "refill_drug"),  # only a refill reminder names a drug
    ({"from_address": "not an address"}, "from_address"),
    ({"ab_test": {"x": "\x00"}}, "ab_test"),
])
def test_every_bad_field_is_refused_with_its_name_and_nothing_is_stored(world, over, field):
    org_id = world["org_id"]
    marketer = person(org_id, "marketer")
    with org_session(org_id) as s:
        with pytest.raises(ValidationFailed) as exc:
            service.create_campaign(s, org_id, values(world["segment"], world["version"], **over), marketer)
        assert _field(exc) == field, exc.value.message
        s.rollback()
        assert s.scalar(select(Campaign.id)) is None


def test_references_of_another_organization_and_special_cases_are_refused(world, session):
    from carepost.accounts.service import create_organization

    org_id = world["org_id"]
    marketer = person(org_id, "marketer")
    other = create_organization(session, "Other Clinic")
    session.commit()
    with org_session(other.id) as s:
        make_contact(s, other.id, "x@valid.test")
        foreign_seg = make_segment(s, other.id, name="Theirs")
        foreign_version = make_template(s, other.id)
        s.commit()
    with org_session(org_id) as s:
        for over, field in (({"segment_id": foreign_seg}, "segment_id"),
                            ({"template_version_id": foreign_version}, "template_version_id")):
            with pytest.raises(ValidationFailed) as exc:
                service.create_campaign(s, org_id, values(world["segment"], world["version"], **over), marketer)
            assert exc.value.field == field
        # an empty segment
        empty = make_segment(s, org_id, "city = Atlantis", name="Nobody")
        with pytest.raises(ValidationFailed) as exc:
            service.create_campaign(s, org_id, values(empty, world["version"]), marketer)
        assert (exc.value.field, exc.value.code) == ("segment_id", "empty_segment")
        # the audience segment as its own exclusion
        with pytest.raises(ValidationFailed) as exc:
            service.create_campaign(s, org_id, values(world["segment"], world["version"],
                                                      exclusion_segment_ids=[world["segment"]]), marketer)
        assert exc.value.field == "exclusion_segment_ids[0]"
        # a template that prints a diagnosis may not go out as marketing (minimum necessary)
        diag = make_template(s, org_id, purpose="treatment", name="Diagnosis",
                             html="<p>{% for c in active_conditions %}{{ c.name }}{% endfor %}</p>")
        with pytest.raises(ValidationFailed) as exc:
            service.create_campaign(s, org_id, values(world["segment"], diag), marketer)
        assert (exc.value.field, exc.value.code) == ("template_version_id", "phi_beyond_purpose")
        # an update is checked the same way and leaves the stored campaign as it was
        c = service.create_campaign(s, org_id, values(world["segment"], world["version"]), marketer)
        s.commit()
        with pytest.raises(ValidationFailed) as exc:
            service.update_campaign(s, c, CampaignPatch(throttle_per_hour=0), marketer)
        assert exc.value.field == "throttle_per_hour"
        s.rollback()
        assert s.get(Campaign, c.id).throttle_per_hour is None
        with pytest.raises(ValidationFailed) as exc:
            service.update_campaign(s, c, CampaignPatch(segment_id=None), marketer)
        assert exc.value.field == "segment_id"
        s.rollback()
        # a draft may lack its sender; submitting or launching it may not
        c = s.get(Campaign, c.id)
        service.update_campaign(s, c, CampaignPatch(from_address=None), marketer)
        for step in (service.submit, service.launch):
            with pytest.raises(ValidationFailed) as exc:
                step(s, c, marketer)
            assert (exc.value.field, exc.value.code) == ("from_address", "incomplete")
        s.rollback()


def test_schedules_at_a_time_in_a_zone_and_at_local_time(world):
    org_id = world["org_id"]
    marketer = person(org_id, "marketer")
    day = (clock.now() + timedelta(days=3)).date()
    with org_session(org_id) as s:
        c = service.create_campaign(s, org_id, values(
            world["segment"], world["version"], schedule_kind="at",
            send_at=datetime.combine(day, datetime.min.time()).replace(hour=9), time_zone="America/Chicago"), marketer)
        assert clock.aware(c.send_at).hour in (14, 15)  # 09:00 Chicago (CST or CDT) in UTC
        local = service.create_campaign(s, org_id, values(world["segment"], world["version"], schedule_kind="local",
                                                          local_time="09:30", local_date=day), marketer)
        assert local.local_time == "09:30" and local.local_date == day
        # the earliest instant anyone receives it: 09:30 at UTC+14
        assert clock.aware(local.send_at) == datetime.combine(day, datetime.min.time()).replace(
            hour=19, minute=30, tzinfo=clock.now().tzinfo) - timedelta(days=1)
        s.rollback()


def test_compliance_report_counts_each_reason_against_real_consent_and_masks_the_sample(world):
    from carepost.audit.models import AuditEvent
    from carepost.consent import service as consent

    org_id = world["org_id"]
    marketer, compliance = person(org_id, "marketer"), person(org_id, "compliance_officer")
    with org_session(org_id) as s:
        unsub = make_contact(s, org_id, "unsub@valid.test", sign=True)
        make_contact(s, org_id, "bounced@valid.test", sign=True)
        make_contact(s, org_id, None, sign=True)
        make_contact(s, org_id, "dead@valid.test", sign=True, deceased=True)  # segments leave the deceased out
        make_contact(s, org_id, "fr@valid.test", sign=True, preferred_language="fr")
        make_contact(s, org_id, "elsewhere@valid.test", sign=True, city="Shelbyville")
        consent.unsubscribe_contact(s, org_id, unsub, None, source="staff")
        consent.add_suppression(s, org_id, "bounced@valid.test", "bounce_hard")
        french = make_segment(s, org_id, "preferred_language = fr", name="French")
        c = service.create_campaign(s, org_id, values(world["segment"], world["version"],
                                                      exclusion_segment_ids=[french]), marketer)
        s.commit()
        out = report.compliance_report(s, compliance, c)
        assert out["audience"] == 8 and out["eligible"] == 3 and out["exact"] is True
        assert out["excluded"] == {"exclusion_segment": 1, "no_address": 1, "no_authorization": 1,
                                   "suppressed_bounce": 1, "unsubscribed_all": 1}
        assert out["phi_categories"] == ["demographics"] and out["helpers"] == [{"name": "first_name",
                                                                                 "category": "demographics"}]
        from carepost.delivery.service import delivery_settings

        assert out["security"] == delivery_settings(s, org_id)["security_mode"]  # the organization's mode
        assert out["legal_basis"][0]["authorization_required"] is True
        sample = out["sample"]
        assert sample["contact_id"] in world["contacts"][:3] and "Hello Pat" in sample["html"] and not sample["masked"]
        # the marketer: masked sample, counts 1..10 shown as "fewer than 11"
        masked = report.compliance_report(s, marketer, c)
        assert masked["sample"]["masked"] and "Pat" not in masked["sample"]["html"]
        assert masked["eligible"] == "fewer than 11" and masked["exact"] is False
        # a sample for a contact outside the audience is refused
        with pytest.raises(ValidationFailed) as exc:
            report.compliance_report(s, compliance, c, sample_contact_id=new_id())
        assert exc.value.field == "sample_contact_id"
        s.commit()
        audited = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "campaign.sample_render")))
        assert len(audited) == 2 and {a.details["masked"] for a in audited} == {True, False}
        assert all(a.target_type == "contact" for a in audited)
        assert s.scalar(select(CampaignRecipient.id)) is None  # the report writes no recipient


def test_report_of_a_sensitive_audience_needs_unmasked_rights(world):
    from carepost.patients import models as pm

    org_id = world["org_id"]
    marketer, compliance = person(org_id, "marketer"), person(org_id, "compliance_officer")
    with org_session(org_id) as s:
        s.add(pm.Condition(org_id=org_id, contact_id=world["contacts"][0], code_system="icd10cm", code="B20",
                           status="active"))
        s.flush()
        sensitive = make_segment(s, org_id, 'has condition in valueset "hiv"', name="HIV care")
        c = service.create_campaign(s, org_id, values(sensitive, world["version"]), marketer)
        s.commit()
        with pytest.raises(PermissionDenied):
            report.compliance_report(s, marketer, c)
        out = report.compliance_report(s, compliance, c)
        assert out["sensitive_segment"] and out["sensitive_categories"] == ["hiv"] and out["audience"] == 1


def test_refill_reminder_needs_authorization_only_where_the_prescription_lapsed(world):
    from carepost.patients import models as pm

    org_id = world["org_id"]
    marketer, compliance = person(org_id, "marketer"), person(org_id, "compliance_officer")
    today = clock.now().date()
    with org_session(org_id) as s:
        current = make_contact(s, org_id, "current@valid.test", city="Shelby")
        lapsed = make_contact(s, org_id, "lapsed@valid.test", city="Shelby")
        lapsed_signed = make_contact(s, org_id, "lapsedsigned@valid.test", city="Shelby", sign=True)
        never = make_contact(s, org_id, "never@valid.test", city="Shelby")
        s.add(pm.Medication(org_id=org_id, contact_id=current, code_system="rxnorm", code="197361", status="active",
                            next_refill_due=today + timedelta(days=5)))
        for cid in (lapsed, lapsed_signed):
            s.add(pm.Medication(org_id=org_id, contact_id=cid, code_system="rxnorm", code="197361", status="stopped",
                                end_date=today - timedelta(days=200)))
        s.flush()
        seg = make_segment(s, org_id, "city = Shelby", name="Shelby")
        refill = make_template(s, org_id, purpose="refill_reminder", name="Refill")
        c = service.create_campaign(s, org_id, values(seg, refill, purpose="refill_reminder", refill_drug="RXNORM:197361"),
                                    marketer)
        assert c.refill_drug == "rxnorm:197361" and not c.approval_required
        s.commit()
        out = report.compliance_report(s, compliance, c)
        assert out["eligible"] == 2 and out["excluded"] == {"no_authorization": 2}
        assert out["refill"] == {"current": 1, "lapsed": 3}
        answer = report.eligibility_for(s, c, [current, lapsed, lapsed_signed, never])
        assert answer == {current: "eligible", lapsed: "no_authorization", lapsed_signed: "eligible",
                          never: "no_authorization"}
        assert [b["authorization_required"] for b in out["legal_basis"]] == [False, True]
        # paid by a third party (reasonably related to cost): a lapsed prescription makes it remunerated
        # marketing, which a plain marketing authorization does not cover (164.508(a)(3)(ii))
        service.update_campaign(s, c, CampaignPatch(remuneration="cost"), marketer)
        answer = report.eligibility_for(s, c, [current, lapsed_signed])
        assert answer == {current: "eligible", lapsed_signed: "no_authorization"}
        assert out["legal_basis"][1]["effective_purpose"] == "marketing"
        s.rollback()


def test_calendar_warns_when_two_sends_reach_the_same_patients_within_n_days(world):
    org_id = world["org_id"]
    marketer, compliance = person(org_id, "marketer"), person(org_id, "compliance_officer")
    base = clock.now() + timedelta(days=2)
    with org_session(org_id) as s:
        others = [make_contact(s, org_id, f"sh{i}@valid.test", city="Shelby") for i in range(2)]
        shelby = make_segment(s, org_id, "city = Shelby", name="Shelby")
        both = make_segment(s, org_id, "city = Springfield or city = Shelby", name="Both")

        def at(seg, days, name):
            return service.create_campaign(s, org_id, values(seg, world["version"], name=name, schedule_kind="at",
                                                             send_at=base + timedelta(days=days)), marketer)

        a = at(world["segment"], 0, "A")  # 4 Springfield contacts
        b = at(both, 2, "B")  # Springfield + Shelby: overlaps A by 4
        at(shelby, 3, "C")  # Shelby only: overlaps B by 2, not A
        d = at(world["segment"], 30, "D")  # a month later: outside the window
        s.commit()
        start, end = base.date(), (base + timedelta(days=40)).date()
        cal = service.calendar(s, org_id, start, end, compliance, overlap_days=7)
        assert [x["name"] for x in cal["campaigns"]] == ["A", "B", "C", "D"]
        overlaps = {tuple(w["names"]): w["overlap"] for w in cal["overlaps"]}
        assert overlaps == {("A", "B"): 4, ("B", "C"): 2}
        # the marketer sees small counts suppressed
        masked = service.calendar(s, org_id, start, end, marketer, overlap_days=7)
        assert {tuple(w["names"]): w["overlap"] for w in masked["overlaps"]} == {("A", "B"): "fewer than 11",
                                                                                ("B", "C"): "fewer than 11"}
        # planned campaigns are compared by their recipient rows (set-wise join)
        for camp, ids in ((a, world["contacts"][:2]), (b, world["contacts"][1:3] + others)):
            for cid in ids:
                s.add(CampaignRecipient(org_id=org_id, campaign_id=camp.id, contact_id=cid, status="planned"))
        s.add(CampaignRecipient(org_id=org_id, campaign_id=b.id, contact_id=world["contacts"][0], status="held_out"))
        s.commit()
        cal = service.calendar(s, org_id, start, end, compliance, overlap_days=7)
        overlaps = {tuple(w["names"]): w["overlap"] for w in cal["overlaps"]}
        assert overlaps == {("A", "B"): 1, ("B", "C"): 2}
        # a window of one day: only A-B (2 days apart) and B-C (1 day) -> B-C only
        cal = service.calendar(s, org_id, start, end, compliance, overlap_days=1)
        assert [tuple(w["names"]) for w in cal["overlaps"]] == [("B", "C")]
        assert d.id in [x["id"] for x in cal["campaigns"]]
        with pytest.raises(ValidationFailed) as exc:
            service.calendar(s, org_id, end, start, compliance)
        assert exc.value.field == "end"


def test_delete_only_a_draft_and_a_cancel_stops_planned_recipients(world):
    org_id = world["org_id"]
    marketer, compliance = person(org_id, "marketer"), person(org_id, "compliance_officer")
    with org_session(org_id) as s:
        c = service.create_campaign(s, org_id, values(world["segment"], world["version"]), marketer)
        service.submit(s, c, marketer)
        service.approve(s, c, compliance)
        with pytest.raises(Conflict):
            service.delete_campaign(s, c)
        service.launch(s, c, marketer)
        s.add(CampaignRecipient(org_id=org_id, campaign_id=c.id, contact_id=world["contacts"][0], status="planned"))
        s.flush()
        service.cancel(s, c, marketer)
        assert s.scalar(select(CampaignRecipient.status)) == "cancelled"
        draft = service.create_campaign(s, org_id, values(world["segment"], world["version"]), marketer)
        service.delete_campaign(s, draft)
        s.commit()
        assert s.get(Campaign, draft.id) is None


def test_dates_are_plain_values_in_the_dict(world):
    org_id = world["org_id"]
    marketer = person(org_id, "marketer")
    with org_session(org_id) as s:
        c = service.create_campaign(s, org_id, values(world["segment"], world["version"], from_name="Bar Clinic",
                                                      from_address="news@bar.example",
                                                      sending_domain_id=world["domain"]), marketer)
        s.commit()
        out = service.campaign_dict(s, c)
        assert out["from_name"] == "Bar Clinic" and b"Bar Clinic" not in c.from_name_enc
        assert isinstance(out["created_at"], str) and out["approval_current"] is False
        assert date.fromisoformat(out["created_at"][:10])
