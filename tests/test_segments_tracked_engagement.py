"""Opens and clicks in the segment language (issue 12 engagement, issue 13 item 2): `has
message_opened within 30 days`, `has message_clicked in campaign "…"` — a person's events only
unless qualified `any` (privacy proxies and security scanners), counted per message, compiled into
the one SQL statement over tracking's engagement events, on both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest

from carepost.core import clock
from tests.test_tracking_engagement import CHROME, Env, parts, path_of, tokens_in

GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
SCANNER = "Mozilla/5.0 (compatible; Barracuda Sentinel)"


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client):
    from carepost.tracking.engagement import recorder

    recorder().reset()
    yield Env(delivery_env, sender, sender.key(), client)
    recorder().reset()


def _ids(org_id, query):
    from carepost.core.database import read_only_session
    from carepost.tracking.engagement import recorder

    recorder().drain()  # answered /t/ requests are journaled; their rows come with the ingester
    from carepost.segments import service

    with read_only_session(org_id) as s:
        return set(service.contact_ids(s, org_id, query, service.SYSTEM))


def _contacts(org_id, *addresses) -> list[str]:
    from carepost.core.database import org_session
    from carepost.patients.service import save_contact

    with org_session(org_id) as s:
        ids = [save_contact(s, org_id, {"given_name": a.split("@")[0].title(), "email": a}).contact.id
               for a in addresses]
        s.commit()
    return ids


def test_real_opens_and_clicks_select_people_not_machines(env, session):
    org_id = env.sender.org_id
    pat, lee, kim = _contacts(org_id, "pat@valid.test", "lee@valid.test", "kim@valid.test")
    from carepost.campaigns.models import Campaign
    from carepost.delivery.models import Message

    flu = Campaign(org_id=org_id, name="Flu shots 2026", purpose="marketing")
    session.add(flu)
    session.commit()
    first = env.send(to=["pat@valid.test", "lee@valid.test", "kim@valid.test"])
    second = env.send(to=["pat@valid.test"])
    session.rollback()
    session.get(Message, second).campaign_id = flu.id
    session.commit()
    copies = {c.rcpt_tos[0]: c for c in env.deliver(first)}
    again = env.deliver(second)[-1]
    clock.advance(timedelta(minutes=10))

    def tokens(copy):
        html, text = parts(copy.data)
        found = tokens_in(html, text)
        return next(t for k, t in found if k == "o"), [t for k, t in found if k == "c"]

    # Pat opens the first message twice in Chrome, and opens and clicks the campaign's message.
    pixel, _ = tokens(copies["pat@valid.test"])
    env.client.get(path_of("o", pixel), headers={"User-Agent": CHROME})
    env.client.get(path_of("o", pixel), headers={"User-Agent": CHROME})
    pixel2, clicks2 = tokens(again)
    env.client.get(path_of("o", pixel2), headers={"User-Agent": CHROME})
    assert env.client.get(path_of("c", clicks2[0]), headers={"User-Agent": CHROME},
                          follow_redirects=False).status_code == 302
    # Lee: only Gmail's image proxy, and a security gateway following a link — machines.
    pixel, clicks = tokens(copies["lee@valid.test"])
    env.client.get(path_of("o", pixel), headers={"User-Agent": GMAIL_PROXY})
    env.client.get(path_of("c", clicks[0]), headers={"User-Agent": SCANNER}, follow_redirects=False)
    # Kim does nothing.

    assert _ids(org_id, "has message_opened within 30 days") == {pat}
    assert _ids(org_id, "has any message_opened within 30 days") == {pat, lee}
    assert _ids(org_id, "has message_clicked") == {pat}
    assert _ids(org_id, "has any message_clicked") == {pat, lee}
    assert _ids(org_id, "has no message_opened") == {lee, kim}
    # Counted per message: Pat opened two messages (one of them twice).
    assert _ids(org_id, "has at least 2 message_opened") == {pat}
    assert _ids(org_id, "has exactly 2 message_opened") == {pat}
    assert _ids(org_id, "has at least 3 message_opened") == set()
    # One campaign, by name or id.
    assert _ids(org_id, 'has message_clicked in campaign "Flu shots 2026" within 7 days') == {pat}
    assert _ids(org_id, f'has message_opened in campaign "{flu.id}"') == {pat}
    assert _ids(org_id, 'has any message_clicked in campaign "Flu shots 2026"') == {pat}
    # The window is the event's time.
    clock.advance(timedelta(days=31))
    assert _ids(org_id, "has message_opened within 30 days") == set()
    assert _ids(org_id, "has message_opened within 60 days and not has message_received within 30 days") == {pat}
    # The same in JSON.
    assert _ids(org_id, {"type": "has", "kind": "message_clicked", "qualifier": "any",
                         "campaign": "Flu shots 2026"}) == {pat}


def test_the_language_checks_engagement_criteria(session, org):
    from carepost.core.errors import ValidationFailed
    from carepost.segments import language

    tree = language.validate(language.parse('has any message_clicked in campaign "Flu \\"B\\"" within 7 days'))
    assert tree["qualifier"] == "any" and tree["campaign"] == 'Flu "B"'
    assert language.to_text(tree) == 'has any message_clicked in campaign "Flu \\"B\\"" within 7 days'
    for query, message in (('has message_received in campaign "x"', "'in campaign' applies"),
                           ("has active message_opened", "does not qualify"),
                           ('has message_opened in campaign ""', "campaign is")):
        with pytest.raises(ValidationFailed) as caught:
            language.validate(language.parse(query))
        assert message in caught.value.message
    with pytest.raises(ValidationFailed) as caught:
        _ids(org.id, 'has message_clicked in campaign "No such campaign"')
    assert "unknown campaign" in caught.value.message


def test_another_organizations_campaign_and_events_are_not_seen(session, org):
    from carepost.accounts.service import create_organization
    from carepost.campaigns.models import Campaign
    from carepost.core.database import org_session
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.patients.models import Contact
    from carepost.tracking.models import EngagementEvent

    other = create_organization(session, "Other clinic")
    session.commit()
    with org_session(other.id) as s:
        theirs = Campaign(org_id=other.id, name="Theirs", purpose="marketing")
        contact = Contact(org_id=other.id)
        s.add_all([theirs, contact])
        s.flush()
        m = Message(org_id=other.id, from_address="x@other.example", subject_enc=b"x", security="tls_required",
                    campaign_id=theirs.id)
        s.add(m)
        s.flush()
        r = MessageRecipient(org_id=other.id, message_id=m.id, address_enc=b"x", address_index="a", domain_index="d",
                             contact_id=contact.id, status="delivered")
        s.add(r)
        s.flush()
        s.add(EngagementEvent(org_id=other.id, message_id=m.id, recipient_id=r.id, type="opened",
                              classification="human", rule="default"))
        s.commit()
        theirs_id = theirs.id
    assert _ids(org.id, "has any message_opened") == set()
    assert _ids(other.id, "has message_opened") == {contact.id}
    from carepost.core.errors import ValidationFailed

    with pytest.raises(ValidationFailed):
        _ids(org.id, f'has message_opened in campaign "{theirs_id}"')
