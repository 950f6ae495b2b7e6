"""The campaign pages (issue 14 item 7) through the real sign-in, without a browser: each wizard
step's errors named at the field (422) and the draft it keeps, the live count and the preview as
a contact (audited, masked), permissions per route, CSRF, the approval workflow's refusals
(launch before approval, approving one's own, rejecting without a comment) and the audit of the
campaign page. The browser flow is tests/test_ui_campaigns.py."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.campaigns.models import Campaign
from carepost.core.database import org_session
from tests.fixtures.accounts import login_client
from tests.test_campaigns_planning import make_contact, make_segment, make_template


@pytest.fixture
def setup(sender, org, session):
    with org_session(org.id) as s:
        seg = make_segment(s, org.id)
        version = make_template(s, org.id, blocks=False)
        ana = make_contact(s, org.id, "ana@valid.test", sign=True, given_name="Anabel")
        beto = make_contact(s, org.id, "beto@valid.test", sign=True, given_name="Beto", preferred_language="es")
        make_contact(s, org.id, "cara@valid.test", given_name="Carolyn")  # no authorization
        s.commit()
    return {"segment": seg, "version": version, "ana": ana, "beto": beto}


def form(setup, csrf, step, **over) -> dict:
    values = {"csrf_token": csrf, "step": str(step), "go": "next", "name": "Flu clinic", "purpose": "marketing",
              "segment_id": setup["segment"], "remuneration": "none", "template_version_id": setup["version"],
              "from_address": "care@bar.example", "from_name": "Bar Clinic", "security": "", "track_opens": "true",
              "track_clicks": "true", "schedule_kind": "now", "ab_metric": "human_opens"}
    values.update(over)
    return values


def field_error(html: str, field: str) -> str | None:
    m = re.search(rf'data-testid="error-{re.escape(field)}">([^<]*)<', html)
    return m.group(1) if m else None


def audit_actions(session, org_id: str, actor_id: str) -> list[str]:
    session.rollback()
    return list(session.scalars(select(AuditEvent.action).where(AuditEvent.chain == org_id,
                                                                AuditEvent.actor_id == actor_id)))


def test_wizard_names_each_bad_field_at_its_step_and_keeps_the_draft(client, org, make_user, setup, session):
    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    r = client.get("/app/campaigns/new")
    assert r.status_code == 200 and 'aria-current="step"' in r.text and "1. Audience" in r.text
    assert "Content-Security-Policy" in r.headers and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]

    # step 1: no name; then an unknown segment
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 1, name=""))
    assert r.status_code == 422 and field_error(r.text, "name")
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 1, segment_id="0" * 32))
    assert r.status_code == 422 and "No such segment" in field_error(r.text, "segment_id")
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 1))
    assert r.status_code == 200 and 'aria-current="step" class="current">2. Content' in r.text
    assert r.text.count('name="preview_contact_id"') == 1 and "(es)" in r.text  # contacts of the audience
    title = r.text.split("<title>", 1)[1].split("</title>", 1)[0]
    assert "<" not in title and r.text.count('src="/static/campaigns-ab.js"') == 1  # the script once, in the body

    # step 2: a sender address that is not one
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 2, from_address="care at bar"))
    assert r.status_code == 422 and "name@domain" in field_error(r.text, "from_address")
    # an A/B test with a test fraction but no time for the winner: the service's 422, at its field
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 2, ab_enabled="true", ab_v1_subject="Walk in today",
                                                   ab_holdout="5", ab_test_fraction="20"))
    assert r.status_code == 422 and "hours" in field_error(r.text, "ab_winner_after_hours")
    # step 3: a throttle of zero, a time in the past, an unknown zone — each named
    for over, field in (({"throttle_per_hour": "0"}, "throttle_per_hour"),
                        ({"throttle_per_domain_per_hour": "many"}, "throttle_per_domain_per_hour"),
                        ({"schedule_kind": "at", "send_at": "2001-01-01T09:00"}, "send_at"),
                        ({"schedule_kind": "local", "local_time": "09:00", "local_date": "2031-03-20",
                          "time_zone": "Mars/Olympus"}, "time_zone")):
        r = client.post("/app/campaigns/new", data=form(setup, csrf, 3, **over))
        assert r.status_code == 422 and field_error(r.text, field), (field, r.status_code)
        assert 'aria-current="step" class="current">3. Schedule' in r.text
    # a bad step 1 field found at step 3 goes back to step 1
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 3, refill_drug="rxnorm:197361"))
    assert r.status_code == 422 and field_error(r.text, "refill_drug") and "current\">1. Audience" in r.text
    session.rollback()
    assert session.scalar(select(Campaign.id).where(Campaign.org_id == org.id)) is None  # nothing kept yet

    r = client.post("/app/campaigns/new", data=form(setup, csrf, 3, throttle_per_domain_per_hour="500",
                                                   ab_enabled="true", ab_v1_subject="Flu shots: walk in",
                                                   ab_holdout="5"),
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("/review")
    campaign_id = r.headers["location"].split("/")[3]
    session.rollback()
    row = session.get(Campaign, campaign_id)
    assert (row.status, row.throttle_per_domain_per_hour, row.created_by) == ("draft", 500, marketer.id)
    assert row.ab_test == {"variants": [{"key": "A"}, {"key": "B", "subject": "Flu shots: walk in"}],
                           "metric": "human_opens", "holdout": 0.05}
    review = client.get(f"/app/campaigns/{campaign_id}/review")
    assert review.status_code == 200 and "Submit for approval" in review.text
    report = client.get(f"/app/campaigns/{campaign_id}/compliance")
    assert report.status_code == 200 and "No authorization for this purpose" in report.text
    assert "fewer than 11" in report.text  # masked viewer
    assert "campaign.created" in audit_actions(session, org.id, marketer.id)


def test_live_count_and_preview_as_a_contact_are_masked_and_audited(client, org, make_user, setup, session):
    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    r = client.post("/app/campaigns/audience-count", data={"segment_id": setup["segment"]},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and 'data-testid="audience-count-value">fewer than 11<' in r.text
    r = client.post("/app/campaigns/preview", data={"template_version_id": setup["version"],
                                                    "preview_contact_id": setup["beto"]},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    assert 'data-testid="preview-language">es<' in r.text and "Vacunas esta semana" in r.text
    assert "Beto" not in r.text and "masked" in r.text  # a marketer sees merge values masked
    assert "template.preview" in audit_actions(session, org.id, marketer.id)
    r = client.post("/app/campaigns/audience-count", data={"segment_id": setup["segment"]})  # no CSRF token
    assert r.status_code == 403


def test_permissions_and_the_approval_workflow(app, client, org, make_user, setup, session):
    marketer, officer, analyst = (make_user(org, role=role) for role in ("marketer", "compliance_officer", "analyst"))
    csrf = login_client(client, marketer)
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 3), follow_redirects=False)
    campaign_id = r.headers["location"].split("/")[3]
    page = client.get(f"/app/campaigns/{campaign_id}")
    assert page.status_code == 200 and 'data-testid="action-launch"' not in page.text  # approval first
    r = client.post(f"/app/campaigns/{campaign_id}/launch", data={"csrf_token": csrf})
    assert r.status_code == 409 and "needs approval" in r.text
    r = client.post(f"/app/campaigns/{campaign_id}/submit", data={"csrf_token": csrf, "comment": "For May"},
                    follow_redirects=False)
    assert r.status_code == 303
    assert client.post(f"/app/campaigns/{campaign_id}/approve", data={"csrf_token": csrf}).status_code == 403
    assert client.get("/app/campaigns/approvals").status_code == 403
    assert "campaign.read" in audit_actions(session, org.id, marketer.id)

    with TestClient(app, base_url="http://localhost:8000") as other:
        csrf2 = login_client(other, officer)
        inbox = other.get("/app/campaigns/approvals")
        assert inbox.status_code == 200 and f"/app/campaigns/{campaign_id}" in inbox.text
        assert other.get("/app/campaigns/new").status_code == 403  # compliance does not build campaigns
        r = other.post(f"/app/campaigns/{campaign_id}/reject", data={"csrf_token": csrf2, "comment": " "})
        assert r.status_code == 422 and 'data-testid="error-comment"' in r.text
        assert other.post(f"/app/campaigns/{campaign_id}/launch", data={"csrf_token": csrf2}).status_code == 403
        r = other.post(f"/app/campaigns/{campaign_id}/approve", data={"csrf_token": csrf2, "comment": "Checked"},
                       follow_redirects=False)
        assert r.status_code == 303
        page = other.get(f"/app/campaigns/{campaign_id}")
        assert 'data-testid="campaign-status">approved<' in page.text and "Checked" in page.text

    with TestClient(app, base_url="http://localhost:8000") as third:
        login_client(third, analyst)
        assert third.get("/app/campaigns").status_code == 200
        assert third.get("/app/campaigns/new").status_code == 403
        assert 'data-testid="new-campaign"' not in third.get("/app/campaigns").text

    page = client.get(f"/app/campaigns/{campaign_id}")
    assert 'data-testid="action-launch"' in page.text
    session.rollback()
    assert session.get(Campaign, campaign_id).status == "approved"


def test_an_owner_cannot_approve_their_own_campaign(client, org, make_user, setup, session):
    owner = make_user(org, role="owner")
    csrf = login_client(client, owner)
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 3), follow_redirects=False)
    campaign_id = r.headers["location"].split("/")[3]
    client.post(f"/app/campaigns/{campaign_id}/submit", data={"csrf_token": csrf})
    page = client.get(f"/app/campaigns/{campaign_id}")
    assert 'data-testid="own-submission"' in page.text and 'data-testid="approve"' not in page.text
    r = client.post(f"/app/campaigns/{campaign_id}/approve", data={"csrf_token": csrf})
    assert r.status_code == 403 and "cannot approve" in r.text
    session.rollback()
    assert session.get(Campaign, campaign_id).status == "submitted"
    denied = session.scalars(select(AuditEvent).where(AuditEvent.chain == org.id,
                                                      AuditEvent.action == "campaign.approved")).all()
    assert [e.outcome for e in denied] == ["denied"]


def test_the_calendar_shows_two_sends_to_the_same_patients_as_an_overlap(client, org, make_user, setup, session):
    """The month view in the organization's time zone: each send on its day, the overlap
    warning with a masked count, month navigation, and bad input named at its field."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    from carepost.consent.service import set_consent_settings
    from carepost.core import clock

    with org_session(org.id) as s:
        set_consent_settings(s, org.id, {"default_time_zone": "Pacific/Auckland"})
        s.commit()
    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    zone = ZoneInfo("Pacific/Auckland")
    # 00:30 in Auckland is the day before in UTC: the calendar puts it on the Auckland day
    day = (clock.now().astimezone(zone) + timedelta(days=3)).date()
    if (day + timedelta(days=1)).month != day.month:  # both sends in one month
        day += timedelta(days=2)
    sends = [("Flu clinic", datetime.combine(day, datetime.min.time()).replace(hour=0, minute=30)),
             ("Flu clinic reminder", datetime.combine(day + timedelta(days=1), datetime.min.time()).replace(hour=9))]
    for name, at in sends:
        r = client.post("/app/campaigns/new", data=form(setup, csrf, 3, name=name, schedule_kind="at",
                                                         send_at=at.strftime("%Y-%m-%dT%H:%M"),
                                                         time_zone="Pacific/Auckland"), follow_redirects=False)
        assert r.status_code == 303, r.text[-1500:]
    page = client.get("/app/campaigns", params={"month": day.strftime("%Y-%m")})
    assert page.status_code == 200
    cells = dict(re.findall(r'data-day="([0-9-]{10})" data-testid="calendar-day"[^>]*>(.*?)</td>', page.text, re.DOTALL))
    assert "00:30 Flu clinic<" in cells[day.isoformat()] and "Flu clinic reminder" not in cells[day.isoformat()]
    assert "09:00 Flu clinic reminder" in cells[(day + timedelta(days=1)).isoformat()]
    assert page.text.count('data-testid="calendar-entry"') == 2
    assert page.text.count('data-testid="calendar-overlap"') == 2  # both marked in the grid
    assert page.text.count('data-testid="calendar-list-entry"') == 2  # the narrow screens' list
    assert "Days in Pacific/Auckland" in page.text
    warnings = re.findall(r'data-testid="overlap-warning">(.*?)</p>', page.text, re.DOTALL)
    assert len(warnings) == 1 and "Flu clinic reminder" in warnings[0] and "fewer than 11" in warnings[0]
    # a narrower window than the gap (1.4 days): no warning
    page = client.get("/app/campaigns", params={"month": day.strftime("%Y-%m"), "overlap_days": "1"})
    assert page.status_code == 200 and 'data-testid="overlap-warning"' not in page.text
    # the month before has neither
    prev = (day.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    assert f'href="/app/campaigns?month={prev}"' in client.get("/app/campaigns", params={"month": day.strftime("%Y-%m")}).text
    page = client.get("/app/campaigns", params={"month": prev})
    assert page.status_code == 200 and 'data-testid="overlap-warning"' not in page.text
    for params, field, text in (({"month": "2031-13"}, "month", "YYYY-MM"), ({"month": "1999-12"}, "month", "2000"),
                                ({"overlap_days": "x"}, "overlap_days", "0 to 90"),
                                ({"overlap_days": "91"}, "overlap_days", "0 to 90")):
        r = client.get("/app/campaigns", params=params)
        assert r.status_code == 422 and text in (field_error(r.text, field) or ""), (params, field_error(r.text, field))


def test_the_campaign_page_after_launch_shows_progress_and_the_ab_test(client, org, make_user, setup, session):
    from carepost.campaigns import planning

    owner = make_user(org, role="owner")
    csrf = login_client(client, owner)
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 3, purpose="treatment", ab_enabled="true",
                                                   ab_v1_subject="Walk in today", ab_metric="human_clicks"), follow_redirects=False)
    campaign_id = r.headers["location"].split("/")[3]
    r = client.post(f"/app/campaigns/{campaign_id}/launch", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text[-1500:]
    planning.plan(org.id, campaign_id)
    page = client.get(f"/app/campaigns/{campaign_id}")
    assert page.status_code == 200
    assert 'data-testid="progress-planned">3<' in page.text  # treatment: no authorization needed
    assert page.text.count('data-testid="ab-variant"') == 2 and "Human clicks" in page.text
    assert "not significant" in page.text  # nothing sent yet: said plainly
    assert 'data-testid="action-pause"' in page.text and 'data-testid="action-launch"' not in page.text
    r = client.post(f"/app/campaigns/{campaign_id}/pause", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get(r.headers["location"])
    assert 'data-testid="campaign-status">paused<' in page.text and 'data-testid="action-resume"' in page.text
    assert 'hx-trigger="every 2s"' not in page.text  # no polling once nothing runs


def test_wizard_ab_n_variants_on_subject_content_and_send_time_each_error_at_its_row(client, org, make_user, setup,
                                                                                     session):
    """Three variant rows — a subject, another template version (content), a later send — stored
    as such; a bad row names its own field; adding and removing rows works without the script."""
    from carepost.content import service as content
    from carepost.content.models import MessageTemplateVersion
    from carepost.content.schemas import TemplateIn

    with org_session(org.id) as s:
        template = content.get_template(s, org.id, s.get(MessageTemplateVersion, setup["version"]).template_id)
        content.update_template(s, template, TemplateIn(
            name=template.name, subject="Flu shots this week", purpose="marketing", contains_phi=False,
            html="<p>Hello {{ first_name }}, walk in any day this week.</p>", language="en"))
        s.flush()
        version_2 = content.current_version(s, template).id
        other = make_template(s, org.id, purpose="marketing", blocks=True)  # another template's version
        s.commit()
    marketer = make_user(org, role="marketer")
    csrf = login_client(client, marketer)
    ab = {"ab_enabled": "true", "ab_v1_subject": "Walk in today", "ab_v2_template_version_id": version_2,
          "ab_v3_send_offset_minutes": "90", "ab_holdout": "10", "ab_test_fraction": "50",
          "ab_winner_after_hours": "4", "ab_metric": "human_clicks"}

    # without the script, Add and Remove are round trips that keep what was typed
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 2, **{**ab, "go": "add_variant"}))
    assert r.status_code == 200 and r.text.count('data-testid="ab-variant-row"') == 6  # 5 rows + the template
    assert 'value="90"' in r.text
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 2, **{**ab, "go": "remove_variant:1"}))
    assert r.status_code == 200 and r.text.count('data-testid="ab-variant-row"') == 4
    assert "Walk in today" not in r.text and 'name="ab_v2_send_offset_minutes" data-setting="send_offset_minutes"' \
        ' inputmode="numeric" value="90"' in r.text

    # each bad setting at its own row's field (the service's checks, mapped back from ab_test.variants[i])
    for over, field, text in (
            ({"ab_v3_send_offset_minutes": "soon"}, "ab_v3_send_offset_minutes", "whole number"),
            ({"ab_v3_send_offset_minutes": "20000"}, "ab_v3_send_offset_minutes", "10080"),
            ({"ab_v2_template_version_id": other}, "ab_v2_template_version_id", "campaign&#39;s template"),
            ({"ab_v2_template_version_id": "f" * 32}, "ab_v2_template_version_id", "Unknown template version"),
            ({"ab_v1_subject": ""}, "ab_variants", "same"),  # A and B the same
            ({"ab_v1_subject": "", "ab_v2_template_version_id": "", "ab_v3_send_offset_minutes": ""}, "ab_variants",
             "same"),
            ({"ab_test_fraction": "95"}, "ab_test_fraction", "at most 1")):
        r = client.post("/app/campaigns/new", data=form(setup, csrf, 2, **{**ab, **over}))
        assert r.status_code == 422 and text in (field_error(r.text, field) or ""), (field, field_error(r.text, field))
        assert 'aria-current="step" class="current">2. Content' in r.text and '<details class="card-inner ab-test"' \
            ' id="ab-test" data-testid="ab-test" open>' in r.text
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 2, ab_enabled="true", ab_v0_subject="Only one",
                                                   ab_v1_subject="Only one"))
    assert r.status_code == 422 and "same" in field_error(r.text, "ab_variants")

    # step 2 passes; the rows travel hidden through step 3 and are stored as four variants
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 2, **ab))
    assert r.status_code == 200 and 'current">3. Schedule' in r.text
    assert 'name="ab_v2_template_version_id" value="' + version_2 + '"' in r.text
    r = client.post("/app/campaigns/new", data=form(setup, csrf, 3, **ab), follow_redirects=False)
    assert r.status_code == 303, r.text[-2000:]
    campaign_id = r.headers["location"].split("/")[3]
    session.rollback()
    row = session.get(Campaign, campaign_id)
    assert row.ab_test == {"variants": [{"key": "A"}, {"key": "B", "subject": "Walk in today"},
                                        {"key": "C", "template_version_id": version_2},
                                        {"key": "D", "send_offset_minutes": 90}],
                           "holdout": 0.1, "test_fraction": 0.5, "metric": "human_clicks", "winner_after_hours": 4}
    # editing shows the stored rows again
    r = client.post(f"/app/campaigns/{campaign_id}/edit", data=form(setup, csrf, 1, **ab))
    assert r.status_code == 200 and r.text.count('data-testid="ab-variant-row"') == 5
    edit = client.get(f"/app/campaigns/{campaign_id}/edit")
    assert 'name="ab_v3_send_offset_minutes" value="90"' in edit.text  # carried hidden from step 1
