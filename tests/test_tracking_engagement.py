"""Engagement capture (issue 13 items 1, 2, 3, 8): tracked messages rewritten at composition (the
DKIM signature covers the final body), opaque tokens without PHI, the open pixel and click
redirects recorded durably and classified, privacy mode, bad tokens, the link guard, webhooks."""

from __future__ import annotations

import base64
import email
import json
import re
from email import policy as email_policy

import dkim as dkimpy
import pytest
from sqlalchemy import select

from carepost.delivery import pipeline
from carepost.delivery.models import Message, MessageRecipient, SendingDomain

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
          "Safari/537.36")
HTML = ('<html><body><p>Your results are ready.</p>'
        '<p><a href="https://portal.bar.example/results?tab=labs&amp;view=1">See them</a> · '
        '<a href="https://bar.example/visit">Book a visit</a> · <a href="mailto:care@bar.example">Write</a></p>'
        '</body></html>')
TEXT = "Your results are ready: https://portal.bar.example/results?tab=labs&view=1\n"
TOKEN_RE = re.compile(r"/t/([oc])/([A-Za-z0-9_-]+)(\.gif)?")


def body(**over) -> dict:
    data = {"from": "Bar Clinic <care@bar.example>", "to": ["Pat Doe <pat@valid.test>"], "subject": "From your care team",
            "text": TEXT, "html": HTML, "track_opens": True, "track_clicks": True}
    data.update(over)
    return data


class Env:
    def __init__(self, peers, sender, key, client):
        self.peers, self.sender, self.key, self.client = peers, sender, key, client

    def send(self, **over) -> str:
        r = self.client.post("/api/v1/messages", json=body(**over), headers=self.key)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def deliver(self, message_id: str) -> list:
        pipeline.deliver([message_id])
        return self.peers.mx["valid"].recorder.messages

    def dkim_verifies(self, raw: bytes) -> list[bool]:
        from carepost.core.database import org_session
        from carepost.delivery import service

        with org_session(self.sender.org_id) as s:
            keys = service.dkim_keys(s, s.get(SendingDomain, self.sender.domain_id))
        records = {f"{k.record_name}.".encode(): k.record.encode() for k in keys}
        d = dkimpy.DKIM(raw)
        return [d.verify(idx=i, dnsfunc=lambda n, timeout=5: records.get(n if isinstance(n, bytes) else n.encode()))
                for i in range(len(keys))]


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client):
    from carepost.tracking.engagement import recorder

    recorder().reset()
    yield Env(delivery_env, sender, sender.key(), client)
    recorder().reset()


def parts(raw: bytes) -> tuple[str, str]:
    msg = email.message_from_bytes(raw, policy=email_policy.default)
    html = msg.get_body(("html",)).get_content()
    text = msg.get_body(("plain",)).get_content()
    return html, text


def tokens_in(*sources: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for s in sources for m in TOKEN_RE.finditer(s)]


def path_of(kind: str, token: str) -> str:
    return f"/t/{kind}/{token}" + (".gif" if kind == "o" else "")


def rows(session, model, **where):
    from carepost.tracking.engagement import recorder

    recorder().drain()  # answered /t/ requests are journaled; their rows come with the ingester
    session.rollback()
    q = select(model)
    for k, v in where.items():
        q = q.where(getattr(model, k) == v)
    return session.scalars(q).all()


# --------------------------------------------------------------------------- composition and redirects


def test_tracked_message_is_rewritten_before_dkim_and_redirects_only_to_the_recorded_url(env, session, clock_at=None):
    from carepost.tracking.models import EngagementCount, EngagementEvent, MessageLink

    message_id = env.send()
    [received] = env.deliver(message_id)
    assert env.dkim_verifies(received.data) == [True, True]  # signed after the rewrite
    html, text = parts(received.data)
    # Every web link goes through /t/c/; mailto is left alone; one pixel; one trap link.
    assert "portal.bar.example" not in html and "bar.example/visit" not in html and "mailto:care@bar.example" in html
    assert "portal.bar.example" not in text
    found = tokens_in(html, text)
    clicks = [t for k, t in found if k == "c"]
    opens = [t for k, t in found if k == "o"]
    assert len(opens) == 1 and len(clicks) == 4  # 2 html links, the trap, 1 text link
    assert 'style="display:none' in html  # the trap is invisible
    links = rows(session, MessageLink, message_id=message_id)
    assert sorted((lk.link_index, lk.part) for lk in links) == [(0, "html"), (1, "html"), (2, "text")]
    assert all(b"portal.bar.example" not in lk.url_enc for lk in links)  # encrypted

    # A person opens (Chrome), then clicks the first link a while later.
    from datetime import timedelta

    from carepost.core import clock

    r = env.client.get(path_of("o", opens[0]), headers={"User-Agent": CHROME})
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif" and r.content.startswith(b"GIF89a")
    clock.advance(timedelta(minutes=2))
    r = env.client.get(path_of("c", clicks[0]) + "?url=https://evil.example/", headers={"User-Agent": CHROME},
                       follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"] == "https://portal.bar.example/results?tab=labs&view=1"
    r = env.client.get(path_of("c", clicks[1]), headers={"User-Agent": CHROME}, follow_redirects=False)
    assert r.headers["location"] == "https://bar.example/visit"

    [recipient] = rows(session, MessageRecipient, message_id=message_id)
    events = rows(session, EngagementEvent, message_id=message_id)
    assert [(e.type, e.link_index, e.classification, e.recipient_id) for e in events] == [
        ("opened", None, "human", recipient.id), ("clicked", 0, "human", recipient.id),
        ("clicked", 1, "human", recipient.id)]
    assert events[0].agent_family == "Chrome"
    counts = {(c.type, c.classification): c.count for c in rows(session, EngagementCount, message_id=message_id)}
    assert counts == {("opened", "human"): 1, ("clicked", "human"): 2}


def test_untracked_message_is_sent_as_written(env):
    message_id = env.send(track_opens=False, track_clicks=False)
    [received] = env.deliver(message_id)
    html, text = parts(received.data)
    assert "https://portal.bar.example/results?tab=labs&amp;view=1" in html and "/t/" not in html + text


def test_opens_only_adds_the_pixel_and_keeps_links(env):
    message_id = env.send(track_clicks=False)
    [received] = env.deliver(message_id)
    html, _ = parts(received.data)
    assert [k for k, _t in tokens_in(html)] == ["o"] and "https://bar.example/visit" in html


def test_pgp_copy_gets_click_redirects_but_no_pixel(env, gpg):
    cert = gpg.gen_key("Tracked Pat <pat@valid.test>")  # the session's keyring may hold one already: one cert
    r = env.client.post("/api/v1/recipient-keys", json={"address": "pat@valid.test", "kind": "pgp", "key": cert},
                        headers=env.key)
    assert r.status_code == 201, r.text
    message_id = env.send(security="secure")
    [received] = env.deliver(message_id)
    clear = gpg.decrypt(received.data)
    found = tokens_in(clear.decode("utf-8", "replace").replace("=\r\n", "").replace("=\n", ""))
    assert {k for k, _t in found} == {"c"}  # no open pixel inside an encrypted body


# --------------------------------------------------------------------------- no PHI in tokens or URLs


def test_every_token_and_url_of_a_sent_message_is_free_of_the_recipients_identifiers(env, session):
    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact
    from carepost.tracking import engagement_tokens

    with org_session(env.sender.org_id) as s:
        contact_id = save_contact(s, env.sender.org_id, ContactIn(given_name="Patricia", family_name="Doerr", email="pat@valid.test", birth_date="1961-04-23", mrn="MRN-77123")).contact.id
        s.commit()
    message_id = env.send(to=["Patricia Doerr <pat@valid.test>"])
    [received] = env.deliver(message_id)
    [recipient] = rows(session, MessageRecipient, message_id=message_id)
    assert recipient.contact_id == contact_id
    html, text = parts(received.data)
    urls = re.findall(r"https?://[^\s\"'<>]+", html + "\n" + text)
    assert urls
    stored = ["pat@valid.test", "pat%40valid.test", "Patricia", "Doerr", "MRN-77123", "77123", "1961-04-23",
              "19610423", "04/23/1961", contact_id, recipient.id, message_id, env.sender.org_id[:0] or "x" * 99]
    for url in urls:
        for value in stored:
            assert value.lower() not in url.lower(), "an identifier in a URL"
        # Tokens in base64 too: the decoded bytes carry no identifier in clear either.
        for _k, token in tokens_in(url):
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            for value in stored[:-1]:
                assert value.encode() not in raw and bytes.fromhex(contact_id) not in raw
                assert bytes.fromhex(recipient.id) not in raw and bytes.fromhex(message_id) not in raw
    s = session
    s.rollback()
    for kind, token in tokens_in(html, text):
        data = engagement_tokens.read(s, token, kind)
        # Decrypted, a token holds ids only: the message, the recipient row (never the contact).
        assert data.message_id == message_id and data.recipient_id == recipient.id
        assert data.org_id == env.sender.org_id and contact_id not in (data.message_id, data.recipient_id)


# --------------------------------------------------------------------------- bad tokens


def test_forged_truncated_replayed_and_cross_organization_tokens_get_a_plain_404(env, session, org_factory=None):
    from carepost.accounts.service import create_organization
    from carepost.core.crypto import get_keyring
    from carepost.tracking import engagement_tokens
    from carepost.tracking.models import EngagementCount, EngagementEvent

    message_id = env.send()
    [received] = env.deliver(message_id)
    html, _ = parts(received.data)
    [(_, click)] = [(k, t) for k, t in tokens_in(html) if k == "c"][:1]
    [(_, pixel)] = [(k, t) for k, t in tokens_in(html) if k == "o"]

    other = create_organization(session, "Other Clinic")
    session.commit()
    get_keyring().named_key(session, other.id, engagement_tokens.KEY_KIND)
    session.commit()
    raw = bytearray(base64.urlsafe_b64decode(click + "=" * (-len(click) % 4)))
    moved = bytearray(raw)
    moved[1:17] = bytes.fromhex(other.id)  # replayed under another organization's id
    flipped = bytearray(raw)
    flipped[-1] ^= 0x01  # one bit of the tag
    payload_flip = bytearray(raw)
    payload_flip[40] ^= 0x80  # one bit of the ciphertext

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(bytes(b)).rstrip(b"=").decode()

    bad = [b64(moved), b64(flipped), b64(payload_flip), click[:-1], click[:40], click + "A", "x" * len(click),
           "", "../../etc/passwd", click.replace(click[5], "-" if click[5] != "-" else "_", 1)]
    for token in bad:
        for path in (f"/t/c/{token}", f"/t/o/{token}.gif"):
            if not token:
                continue
            r = env.client.get(path, follow_redirects=False)
            assert r.status_code == 404, (path, r.status_code)
            assert "Traceback" not in r.text and token[:20] not in r.text
            assert "location" not in r.headers
    # An open token is not a click token, nor the other way round.
    assert env.client.get(f"/t/c/{pixel}", follow_redirects=False).status_code == 404
    assert env.client.get(f"/t/o/{click}.gif").status_code == 404
    # A token of a message that no longer exists: the same plain page.
    from sqlalchemy import delete

    from carepost.core.database import system_session

    with system_session() as s:
        from carepost.delivery.models import MessageEvent
        from carepost.tracking.models import MessageLink

        for model in (MessageEvent, MessageRecipient, MessageLink):
            s.execute(delete(model).where(model.message_id == message_id))
        s.execute(delete(Message).where(Message.id == message_id))
        s.commit()
    from carepost.tracking.engagement import recorder

    recorder().reset()
    assert env.client.get(f"/t/c/{click}", follow_redirects=False).status_code == 404
    assert not rows(session, EngagementEvent) and not rows(session, EngagementCount)


# --------------------------------------------------------------------------- privacy mode


def test_privacy_mode_keeps_aggregate_counts_only(env, session):
    from carepost.tracking import engagement_tokens
    from carepost.tracking.models import EngagementCount, EngagementEvent, WebhookEvent

    r = env.client.patch("/api/v1/delivery-settings", json={"engagement_privacy": True},
                         headers=env.sender.key("org:manage", "messages:read"))
    assert r.status_code == 200 and r.json()["engagement_privacy"] is True, r.text
    message_id = env.send()
    [received] = env.deliver(message_id)
    html, _ = parts(received.data)
    found = tokens_in(html)
    session.rollback()
    assert all(engagement_tokens.read(session, t, k).recipient_id is None for k, t in found)  # names no recipient
    pixel = next(t for k, t in found if k == "o")
    click = next(t for k, t in found if k == "c")
    assert env.client.get(path_of("o", pixel), headers={"User-Agent": CHROME}).status_code == 200
    assert env.client.get(path_of("c", click), headers={"User-Agent": CHROME}, follow_redirects=False).status_code == 302
    assert not rows(session, EngagementEvent)
    counts = {(c.type, c.classification): c.count for c in rows(session, EngagementCount, message_id=message_id)}
    assert sum(counts.values()) == 2 and counts[("opened", "human")] == 1
    assert not [w for w in rows(session, WebhookEvent) if w.type in ("message.opened", "message.clicked")]


# --------------------------------------------------------------------------- the link guard


def test_link_guard_refuses_email_addresses_and_merge_fields_naming_the_link(env):
    for html, field in (
            ('<a href="https://bar.example/a">a</a><a href="https://bar.example/b?who=pat@valid.test">b</a>', "html.links[1]"),
            ('<a href="https://bar.example/u/pat%40valid.test">x</a>', "html.links[0]"),
            ('<a href="https://bar.example/x?id={{ mrn }}">x</a>', "html.links[0]")):
        r = env.client.post("/api/v1/messages", json=body(html=html, text=None), headers=env.key)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == field and "pat@" not in r.text
    r = env.client.post("/api/v1/messages", json=body(html=None, text="See https://bar.example/?e=pat@valid.test"),
                        headers=env.key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "text.links[0]"
    # Untracked messages too.
    r = env.client.post("/api/v1/messages", json=body(track_clicks=False, track_opens=False, text=None,
                                                      html='<a href="https://x.example/?m=a.b@c.org">x</a>'), headers=env.key)
    assert r.status_code == 422 and r.json()["error"]["field"] == "html.links[0]"


def test_link_guard_refuses_a_template_with_a_merge_field_in_a_url(env):
    from carepost.content import link_guard
    from carepost.core.errors import ValidationFailed

    with pytest.raises(ValidationFailed) as caught:
        link_guard.check_template_links({"html": '<a href="https://bar.example/">a</a>'
                                                 '<a href="https://bar.example/p/{{ patient.mrn }}/view">b</a>',
                                         "text": ""})
    assert caught.value.field == "html.links[1]"
    with pytest.raises(ValidationFailed) as caught:
        link_guard.check_template_links({"html": "", "text": "Go to https://bar.example/r?dob={{ dob }} now"})
    assert caught.value.field == "text.links[0]"
    link_guard.check_template_links({"html": '<a href="https://bar.example/">Hi {{ name }}</a>', "text": "{{ name }}"})


def test_link_guard_fails_the_recipient_whose_mrn_or_birth_date_is_in_a_link(env, session):
    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(env.sender.org_id) as s:
        save_contact(s, env.sender.org_id, ContactIn(given_name="Pat", family_name="Doe", email="pat@valid.test", birth_date="1961-04-23", mrn="77123"))
        s.commit()
    for html, kind in (('<a href="https://bar.example/a">a</a><a href="https://bar.example/r?d=04/23/1961">b</a>',
                        "html.links[1] carries the recipient's date of birth"),
                       ('<a href="https://bar.example/chart/77123">a</a>', "html.links[0] carries the recipient's identifier")):
        message_id = env.send(html=html, text=None, track_clicks=False, track_opens=False)
        env.peers.mx["valid"].recorder.reset()
        assert env.deliver(message_id) == []  # nothing sent
        [recipient] = rows(session, MessageRecipient, message_id=message_id)
        assert recipient.status == "failed" and recipient.reason.startswith("link_phi: ")
        assert kind in recipient.reason and "77123" not in recipient.reason and "1961" not in recipient.reason
    # An MRN inside a longer number is not that MRN.
    message_id = env.send(html='<a href="https://bar.example/page/9771234">a</a>', text=None)
    assert len(env.deliver(message_id)) == 1


# --------------------------------------------------------------------------- webhooks


def test_opens_and_clicks_join_the_webhook_stream_with_their_class(env, session, monkeypatch):
    from carepost.core.config import reset_settings
    from carepost.core.crypto import get_keyring
    from carepost.core.database import org_session
    from carepost.tracking import service as tracking
    from carepost.tracking.models import WebhookEvent

    monkeypatch.setenv("CAREPOST_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings()
    assert {"message.opened", "message.clicked"} <= set(tracking.EVENT_TYPES)
    with org_session(env.sender.org_id) as s:
        tracking.create_endpoint(s, env.sender.org_id, url="http://127.0.0.1:9/hook",
                                 event_types=["message.opened", "message.clicked"])
        s.commit()
    message_id = env.send()
    [received] = env.deliver(message_id)
    html, _ = parts(received.data)
    found = tokens_in(html)
    pixel = next(t for k, t in found if k == "o")
    first_click = next(t for k, t in found if k == "c")
    gmail = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
    env.client.get(path_of("o", pixel), headers={"User-Agent": gmail})
    env.client.get(path_of("c", first_click), headers={"User-Agent": "Mozilla/5.0 (compatible; Barracuda Sentinel)"},
                   follow_redirects=False)
    session.rollback()
    events = [w for w in rows(session, WebhookEvent) if w.type.startswith("message.") and w.type[8:] in ("opened", "clicked")]
    payloads = {w.type: json.loads(get_keyring().decrypt(session, w.org_id, "webhook_events", "payload", w.id,
                                                         w.payload_enc)) for w in events}
    assert payloads["message.opened"]["data"]["class"] == "proxy"
    assert payloads["message.opened"]["data"]["rule"] == "gmail_image_proxy"
    clicked = payloads["message.clicked"]["data"]
    assert clicked["class"] == "scanner" and clicked["link_index"] == 0 and "url" not in clicked
    assert "portal.bar.example" not in json.dumps(payloads)


def test_tracking_answers_carry_the_security_headers_and_refuse_other_methods(env):
    message_id = env.send()
    [received] = env.deliver(message_id)
    html, _ = parts(received.data)
    click = next(t for k, t in tokens_in(html) if k == "c")
    for r in (env.client.get(f"/t/c/{click}", headers={"User-Agent": CHROME}, follow_redirects=False),
              env.client.get("/t/o/forged.gif")):
        assert r.headers["cache-control"] == "no-store" and r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in r.headers["content-security-policy"]
    r = env.client.post(f"/t/c/{click}", follow_redirects=False)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    head = env.client.head(f"/t/c/{click}", headers={"User-Agent": CHROME}, follow_redirects=False)
    assert head.status_code == 302 and head.content == b""
