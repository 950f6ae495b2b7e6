"""Clicks per link (issue 13 item 6): for a message or a campaign, per link position its part and
target host (never the full URL), every click, human clicks, people who clicked — from the real
click redirects; small cells suppressed for viewers without PHI rights; privacy mode: not known.
The analytics page shows the table for a campaign (Chromium)."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

import pytest
from playwright.sync_api import expect

from carepost.core import clock
from carepost.delivery.models import Message
from tests.fixtures.accounts import add_staff, ui_login
from tests.test_tracking_engagement import CHROME, Env, parts, path_of, tokens_in

SCANNER = "Mozilla/5.0 (compatible; Barracuda Sentinel)"


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client):
    from carepost.tracking.engagement import recorder

    recorder().reset()
    yield Env(delivery_env, sender, sender.key(), client)
    recorder().reset()


def clicks_of(raw: bytes) -> list[str]:
    html, text = parts(raw)
    return [t for k, t in tokens_in(html, text) if k == "c"]


def test_clicks_per_link_of_a_campaign_and_of_a_message(env, session):
    campaign_id = "0" * 31 + "c"
    ids = [env.send(to=["Pat Doe <pat@valid.test>"]), env.send(to=["Lee Roe <lee@valid.test>"])]
    session.rollback()
    for message_id in ids:  # what campaign planning does: the campaign's id on each message
        session.get(Message, message_id).campaign_id = campaign_id
    session.commit()
    copies = [env.deliver(message_id)[-1] for message_id in ids]
    pat, lee = clicks_of(copies[0].data), clicks_of(copies[1].data)
    clock.advance(timedelta(minutes=5))
    # Pat follows link 0 twice and link 1 once; Lee's gateway scans link 0, then Lee follows link 2 (text).
    for token in (pat[0], pat[0], pat[1]):
        assert env.client.get(path_of("c", token), headers={"User-Agent": CHROME}, follow_redirects=False).status_code == 302
    env.client.get(path_of("c", lee[0]), headers={"User-Agent": SCANNER}, follow_redirects=False)
    env.client.get(path_of("c", lee[3]), headers={"User-Agent": CHROME}, follow_redirects=False)
    from carepost.tracking.engagement import recorder

    recorder().drain()  # answered /t/ requests are journaled; their rows come with the ingester

    key = env.sender.key("analytics:read", "phi:read_unmasked")
    r = env.client.get("/api/v1/analytics/links", params={"campaign_id": campaign_id}, headers=key)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["privacy_mode"] is False and data["masked"] is False
    links = {row["link_index"]: row for row in data["links"]}
    assert sorted(links) == [0, 1, 2]
    assert (links[0]["part"], links[0]["host"]) == ("html", "portal.bar.example")
    assert (links[1]["part"], links[1]["host"]) == ("html", "bar.example")
    assert (links[2]["part"], links[2]["host"]) == ("text", "portal.bar.example")
    assert {k: links[0][k] for k in ("clicked", "clicked_human", "clicked_unique", "clicked_unique_human")} == \
        {"clicked": 3, "clicked_human": 2, "clicked_unique": 2, "clicked_unique_human": 1}
    assert (links[1]["clicked"], links[1]["clicked_unique_human"]) == (1, 1)
    assert (links[2]["clicked"], links[2]["clicked_human"], links[2]["clicked_unique"]) == (1, 1, 1)
    assert "results" not in r.text and "tab=labs" not in r.text and "visit" not in r.text  # hosts only

    # One message: Pat's copy only.
    r = env.client.get("/api/v1/analytics/links", params={"message_id": ids[0]}, headers=key)
    one = {row["link_index"]: row["clicked"] for row in r.json()["links"]}
    assert one == {0: 2, 1: 1, 2: 0}

    # Without PHI rights, counts of 1..10 people are suppressed.
    masked = env.client.get("/api/v1/analytics/links", params={"campaign_id": campaign_id},
                            headers=env.sender.key("analytics:read")).json()
    assert masked["masked"] is True and {row["clicked"] for row in masked["links"]} == {"<11"}

    # Bad input: neither or both ids, not an id, another organization's message.
    for params, field in (({}, "message_id"), ({"message_id": ids[0], "campaign_id": campaign_id}, "message_id"),
                          ({"campaign_id": "x' or 1=1"}, "campaign_id")):
        r = env.client.get("/api/v1/analytics/links", params=params, headers=key)
        assert r.status_code == 422 and r.json()["error"]["field"] == field
    from carepost.accounts.credentials import create_credential
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other clinic")
    cred, secret = create_credential(session, other.id, name="other", scopes=["analytics:read"])
    session.commit()
    other_key = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    assert env.client.get("/api/v1/analytics/links", params={"message_id": ids[0]}, headers=other_key).status_code == 404
    assert env.client.get("/api/v1/analytics/links", params={"campaign_id": campaign_id},
                          headers=other_key).json()["links"] == []


def test_privacy_mode_knows_no_clicks_per_link(env):
    r = env.client.patch("/api/v1/delivery-settings", json={"engagement_privacy": True},
                         headers=env.sender.key("org:manage", "messages:read"))
    assert r.status_code == 200
    message_id = env.send()
    [copy] = env.deliver(message_id)
    env.client.get(path_of("c", clicks_of(copy.data)[0]), headers={"User-Agent": CHROME}, follow_redirects=False)
    from carepost.tracking.engagement import recorder

    recorder().drain()
    data = env.client.get("/api/v1/analytics/links", params={"message_id": message_id},
                          headers=env.sender.key("analytics:read", "phi:read_unmasked")).json()
    assert data["privacy_mode"] is True and data["links"] and all(row["clicked"] is None for row in data["links"])


# --------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def campaign(live_server):
    """An organization, two messages of one campaign with their recorded links, and clicks as the
    click redirect writes them (the live server is another process: arranged here, not emptied)."""
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.core.crypto import get_keyring
    from carepost.core.database import org_session, system_session
    from carepost.core.ids import new_id
    from carepost.tracking.models import EngagementEvent, MessageLink

    with system_session() as s:
        org = create_organization(s, f"Link clicks UI {secrets.token_hex(3)}")
        owner = add_staff(s, org.id, "owner")
        s.commit()
        org_id = org.id
    campaign_id = new_id()
    with org_session(org_id) as s:
        ring = get_keyring()
        for n, who in enumerate(("r1", "r2")):
            m = Message(org_id=org_id, source="campaign", from_address="care@clinic.example", subject_enc=b"x",
                        security="tls_required", purpose="marketing", campaign_id=campaign_id)
            s.add(m)
            s.flush()
            for index, (part, url) in enumerate((("html", "https://book.clinic.example/flu?slot=morning"),
                                                 ("html", "https://www.cdc.gov/flu/"))):
                link = MessageLink(id=new_id(), org_id=org_id, message_id=m.id, link_index=index, part=part, url_enc=b"")
                link.url_enc = ring.encrypt(s, org_id, MessageLink.__tablename__, "url", link.id, url)
                s.add(link)
            for index, cls in ((0, "human"), (0, "scanner"), (1, "human")) if n == 0 else ((0, "human"),):
                s.add(EngagementEvent(org_id=org_id, message_id=m.id, recipient_id=f"{who:0>32}", type="clicked",
                                      link_index=index, classification=cls, rule="default"))
        s.commit()
    return SimpleNamespace(owner=owner, campaign_id=campaign_id)


@pytest.mark.ui
def test_analytics_page_shows_clicks_per_link_of_a_campaign(page, campaign):
    ui_login(page, campaign.owner)
    page.goto(f"/app/analytics?campaign_id={campaign.campaign_id}")
    rows = page.get_by_test_id("by-link").locator("tbody tr")
    expect(rows).to_have_count(2)
    first = [c.strip() for c in rows.nth(0).locator("th, td").all_inner_texts()]
    assert first == ["1", "html", "book.clinic.example", "3", "2", "2", "2"]
    second = [c.strip() for c in rows.nth(1).locator("th, td").all_inner_texts()]
    assert second == ["2", "html", "www.cdc.gov", "1", "1", "1", "1"]
    assert "slot=morning" not in page.content() and "/flu" not in json.dumps(first + second)
    # Without a campaign, no per-link table.
    page.goto("/app/analytics")
    expect(page.get_by_test_id("analytics-totals")).to_be_visible()
    assert page.get_by_test_id("by-link").count() == 0
