"""GET /api/v1/messages/{id} carries the message's engagement (issue 13 item 6): per recipient
human and machine opens and clicks with first and last times, totals under the analytics metric
names (and equal to /api/v1/analytics/messages/{id}), no URL and no user agent; privacy mode
shows totals only."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from carepost.core import clock
from tests.test_tracking_engagement import CHROME, Env, parts, path_of, tokens_in

GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client):
    from carepost.tracking.engagement import recorder

    recorder().reset()
    yield Env(delivery_env, sender, sender.key(), client)
    recorder().reset()


def read(env, message_id: str) -> dict:
    from carepost.tracking.engagement import recorder

    recorder().drain()  # answered /t/ requests are journaled; their rows come with the ingester
    r = env.client.get(f"/api/v1/messages/{message_id}", headers=env.sender.key("messages:read"))
    assert r.status_code == 200, r.text
    return r.json()


def test_message_shows_each_recipients_human_and_machine_engagement(env):
    message_id = env.send(to=["Pat Doe <pat@valid.test>", "Lee Roe <lee@valid.test>"])
    received = env.deliver(message_id)
    assert len(received) == 2
    before = read(env, message_id)
    assert before["engagement"]["totals"]["opened"] == 0 and before["engagement"]["privacy_mode"] is False
    assert [r["engagement"] for r in before["recipients"]] == [None, None]

    by_address = {}
    for copy in received:
        html, _ = parts(copy.data)
        found = tokens_in(html)
        by_address[copy.rcpt_tos[0]] = (next(t for k, t in found if k == "o"), [t for k, t in found if k == "c"])
    pat_open, pat_clicks = by_address["pat@valid.test"]
    lee_open, _ = by_address["lee@valid.test"]
    # Pat: the Gmail image proxy fetches the pixel, then Pat opens in Chrome twice and clicks once.
    assert env.client.get(path_of("o", pat_open), headers={"User-Agent": GMAIL_PROXY}).status_code == 200
    clock.advance(timedelta(minutes=3))
    env.client.get(path_of("o", pat_open), headers={"User-Agent": CHROME})
    clock.advance(timedelta(minutes=2))
    env.client.get(path_of("o", pat_open), headers={"User-Agent": CHROME})
    r = env.client.get(path_of("c", pat_clicks[1]), headers={"User-Agent": CHROME}, follow_redirects=False)
    assert r.status_code == 302
    # Lee: only the proxy.
    env.client.get(path_of("o", lee_open), headers={"User-Agent": GMAIL_PROXY})

    data = read(env, message_id)
    recipients = {r["address"]: r["engagement"] for r in data["recipients"]}
    pat = next(v for k, v in recipients.items() if k.startswith("p"))
    lee = next(v for k, v in recipients.items() if k.startswith("l"))
    assert pat["opened"]["human"] == 2 and pat["opened"]["machine"] == 1
    assert pat["opened"]["first_at"] < pat["opened"]["first_human_at"] <= pat["opened"]["last_at"]
    assert pat["clicked"] == {"human": 1, "machine": 0, "first_at": pat["clicked"]["first_at"],
                              "last_at": pat["clicked"]["first_at"], "first_human_at": pat["clicked"]["first_at"]}
    assert lee["opened"]["human"] == 0 and lee["opened"]["machine"] == 1 and lee["opened"]["first_human_at"] is None
    assert lee["clicked"]["human"] == lee["clicked"]["machine"] == 0
    totals = data["engagement"]["totals"]
    assert totals == {"opened": 4, "opened_machine": 2, "opened_unique": 2, "opened_human": 1,
                      "clicked": 1, "clicked_machine": 0, "clicked_unique": 1, "clicked_human": 1}
    # The analytics API says the same (its opened/clicked figures, from the rollups).
    r = env.client.get(f"/api/v1/analytics/messages/{message_id}", headers=env.sender.key("analytics:read",
                                                                                         "phi:read_unmasked"))
    assert r.status_code == 200, r.text
    figures = r.json()["totals"]
    for metric in ("opened", "opened_unique", "opened_human", "clicked", "clicked_unique", "clicked_human"):
        assert figures.get(metric, 0) == totals[metric], metric
    # Nothing but counts, classes and times: no URL, no user agent, no token.
    text = json.dumps(data["engagement"]) + json.dumps([r["engagement"] for r in data["recipients"]])
    for needle in ("bar.example", "Chrome", "Google", "/t/", pat_open):
        assert needle not in text


def test_privacy_mode_shows_totals_without_recipients_or_unique_figures(env):
    r = env.client.patch("/api/v1/delivery-settings", json={"engagement_privacy": True},
                         headers=env.sender.key("org:manage", "messages:read"))
    assert r.status_code == 200, r.text
    message_id = env.send()
    [received] = env.deliver(message_id)
    html, _ = parts(received.data)
    pixel = next(t for k, t in tokens_in(html) if k == "o")
    env.client.get(path_of("o", pixel), headers={"User-Agent": CHROME})
    data = read(env, message_id)
    assert data["engagement"]["privacy_mode"] is True
    assert data["engagement"]["totals"]["opened"] == 1 and data["engagement"]["totals"]["opened_unique"] is None
    assert [r["engagement"] for r in data["recipients"]] == [None]


def test_another_organizations_message_is_not_found(env, session):
    from carepost.accounts.credentials import create_credential
    from carepost.accounts.service import create_organization

    message_id = env.send()
    other = create_organization(session, "Other clinic")
    cred, secret = create_credential(session, other.id, name="other", scopes=["messages:read"])
    session.commit()
    r = env.client.get(f"/api/v1/messages/{message_id}", headers={"Authorization": f"Bearer {cred.key_id}.{secret}"})
    assert r.status_code == 404 and "engagement" not in r.text
