"""``carepost analytics rebuild --from DAY`` (issue 13 item 5, speed): the set-wise recount in the
database gives exactly the rollups the live path counted — every grain, metric and dimension —
on a mixed data set (transactional, campaign and sandbox messages; delivered, sent, bounced,
deferred, excluded, complained, portal views; opens and clicks by people, privacy proxies and
scanners, the trap link; conversions; unsubscribes; an organization in privacy mode), replaces
(never adds to) what was there, fills the sending domain of old rows, and loses nothing when
events arrive while it runs."""

from __future__ import annotations

import threading
from datetime import UTC, timedelta

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from carepost.core import clock
from carepost.core.database import org_session, read_only_session, system_session
from carepost.core.ids import new_id
from carepost.tracking.rollups import DIMENSIONS, AnalyticsRollup

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
          "Safari/537.36")
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
APPLE_MPP = "Mozilla/5.0"


def snapshot(org_ids) -> dict:
    """Every rollup row of the organizations: key (grain, period, metric, dimensions) -> n."""
    out = {}
    with read_only_session() as s:
        for row in s.scalars(select(AnalyticsRollup).where(AnalyticsRollup.org_id.in_(list(org_ids)))):
            key = (row.org_id, row.grain, clock.aware(row.period).astimezone(UTC), row.metric,
                   *(getattr(row, d) for d in DIMENSIONS))
            assert key not in out, key  # one row per key
            if row.n:
                out[key] = row.n
    return out


class Data:
    def __init__(self, sender, other_org_id):
        self.org_id, self.domain_id, self.other = sender.org_id, sender.domain_id, other_org_id
        self.start = clock.now()

    # ------------------------------------------------------------------ building blocks

    def message(self, org_id: str, *, source="api", campaign_id=None, sandbox=False, sending_domain=True,
                topic_id=None):
        from carepost.core.crypto import get_keyring
        from carepost.delivery.models import Message
        from carepost.tracking.models import MessageLink

        with org_session(org_id) as s:
            m = Message(id=new_id(), org_id=org_id, source=source, from_address="care@bar.example", subject_enc=b"",
                        security="tls_required", purpose="treatment", tags=[], contains_phi=False, track_opens=True,
                        track_clicks=True, campaign_id=campaign_id, sandbox=sandbox, template_id=new_id(),
                        topic_id=topic_id, created_at=clock.now(),
                        sending_domain_id=self.domain_id if sending_domain and org_id == self.org_id else None)
            m.subject_enc = get_keyring().encrypt(s, org_id, Message.__tablename__, "subject", m.id, "Hello")
            s.add(m)
            s.flush()
            for i in range(3):  # the links recorded at send time (a click redirects only there)
                link = MessageLink(id=new_id(), org_id=org_id, message_id=m.id, link_index=i, part="html", url_enc=b"")
                link.url_enc = get_keyring().encrypt(s, org_id, MessageLink.__tablename__, "url", link.id,
                                                     f"https://bar.example/{i}")
                s.add(link)
            s.commit()
            return m.id

    def recipient(self, org_id: str, message_id: str, domain: str | None, contact_id: str | None = None) -> str:
        from carepost.core.crypto import get_keyring
        from carepost.delivery.models import MessageRecipient

        with org_session(org_id) as s:
            ring = get_keyring()
            index = ring.blind_index(s, org_id, "domain", domain) if domain else ""
            r = MessageRecipient(id=new_id(), org_id=org_id, message_id=message_id, address_enc=b"x",
                                 address_index=new_id(), domain_index=index, contact_id=contact_id, status="queued")
            s.add(r)
            s.commit()
            return r.id

    def event(self, org_id: str, recipient_id: str, type_: str, method=None, tls=None, reason=None, **details):
        """Through delivery's own ``add_event`` (the live path publishes it to the analytics handler)."""
        from carepost.delivery.models import MessageRecipient
        from carepost.delivery.outcomes import add_event

        with org_session(org_id) as s:
            r = s.get(MessageRecipient, recipient_id)
            if method:
                r.method = method
                r.evidence = {"tls_version": tls} if tls else {}
            if reason:
                r.reason = reason
            add_event(s, r, type_, **details)
            s.commit()

    def hits(self, org_id: str, message_id: str, recipient_id: str | None, items: list) -> list:
        """Opens and clicks through the recorder's writer (one group): (kind, link index, user agent, method)."""
        from carepost.tracking import engagement_tokens
        from carepost.tracking.engagement import Hit, recorder

        with org_session(org_id) as s:
            composed = clock.now() - timedelta(seconds=3)  # a click now is a "fast click"
            long_ago = clock.now() - timedelta(days=1)
            hits = []
            for kind, link, agent, method in items:
                when = composed if link == "fast" else long_ago
                index = engagement_tokens.TRAP_INDEX if link == "trap" else (0 if link == "fast" else link)
                token = engagement_tokens.make(s, kind, org_id, message_id, recipient_id,
                                               index if kind == "c" else None, when)
                hits.append(Hit(kind=kind, token=token, user_agent=agent, ip="198.51.100.7", method=method))
            s.commit()
        return recorder().write(hits)

    # ------------------------------------------------------------------ the mixed data set

    def build(self) -> None:
        from carepost.consent.service import unsubscribe_contact
        from carepost.patients import service as patients
        from carepost.tracking import conversions

        org = self.org_id
        with org_session(org) as s:
            contact = patients.save_contact(s, org, {"given_name": "Pat", "email": "pat@gmail.com"}).contact.id
            conversions.create_goal(s, org, name="Booked", event_name="appointment.booked", window_days=7)
            s.commit()
        tx = self.message(org)  # transactional: a message row too
        tx_old = self.message(org, sending_domain=True)
        campaign = self.message(org, source="campaign", campaign_id=new_id())
        sandbox = self.message(org, sandbox=True)
        r_gmail = self.recipient(org, tx, "gmail.com", contact)
        r_other = self.recipient(org, tx, "clinic.example")
        r_none = self.recipient(org, tx, None)
        r_old = self.recipient(org, tx_old, "yahoo.com")
        c_rcpts = [self.recipient(org, campaign, d) for d in ("gmail.com", "outlook.com", "family.example")]
        r_sandbox = self.recipient(org, sandbox, "gmail.com")
        for r in (r_gmail, r_other, r_none, r_old, *c_rcpts, r_sandbox):
            self.event(org, r, "queued")
        self.event(org, r_gmail, "delivered", method="tls", tls="TLSv1.3")
        self.event(org, r_other, "deferred", method="tls", tls="TLSv1.2")
        self.event(org, r_sandbox, "delivered", method="tls", tls="TLSv1.3")
        clock.advance(timedelta(hours=2))
        self.event(org, r_other, "delivered", method="tls", tls="TLSv1.2")
        self.event(org, r_none, "bounced", bounce_type="hard")
        self.event(org, r_old, "sent", method="pgp")
        self.event(org, c_rcpts[0], "delivered", method="tls", tls="TLSv1.3")
        self.event(org, c_rcpts[1], "excluded", reason="suppressed: unsubscribe")
        self.event(org, c_rcpts[2], "bounced", bounce_type="soft")
        self.event(org, c_rcpts[2], "failed")
        # Opens and clicks: a person, Gmail's image proxy, Apple Mail Privacy Protection, a fast
        # scanner click, the trap link, repeated opens.
        self.hits(org, tx, r_gmail, [("o", None, GMAIL_PROXY, "GET"), ("o", None, CHROME, "GET"),
                                     ("c", 1, CHROME, "GET")])
        self.hits(org, campaign, c_rcpts[0], [("o", None, CHROME, "GET"), ("c", "fast", CHROME, "GET"),
                                              ("c", "trap", CHROME, "GET"), ("o", None, CHROME, "HEAD")])
        self.hits(org, tx_old, r_old, [("o", None, APPLE_MPP, "GET")])
        clock.advance(timedelta(hours=23))  # the next day
        self.event(org, r_gmail, "complained")
        self.event(org, r_gmail, "portal_viewed")
        self.hits(org, tx, r_gmail, [("o", None, CHROME, "GET"), ("c", 0, CHROME, "GET")])
        self.hits(org, campaign, c_rcpts[0], [("o", None, CHROME, "GET")])
        self.hits(org, tx_old, r_old, [("o", None, CHROME, "GET")])  # its first human open: today
        with org_session(org) as s:
            event, created = conversions.record_event(s, org, name="appointment.booked", contact_id=contact)
            assert created and event.message_id == tx
            s.commit()
        with org_session(org) as s:
            unsubscribe_contact(s, org, contact, None, source="link:test", recipient_id=r_gmail, message_id=tx)
            s.commit()
        # The organization in privacy mode: tokens name no recipient, no events, counts only.
        other = self.other
        m2 = self.message(other)
        r2 = self.recipient(other, m2, "gmail.com")
        self.event(other, r2, "queued")
        self.event(other, r2, "delivered", method="tls", tls="TLSv1.3")
        self.hits(other, m2, None, [("o", None, CHROME, "GET"), ("o", None, GMAIL_PROXY, "GET"),
                                    ("c", 0, CHROME, "GET")])


@pytest.fixture
def data(sender, session):
    from carepost.accounts.service import create_organization
    from carepost.delivery import service
    from carepost.tracking.engagement import recorder

    recorder().reset()
    other = create_organization(session, "Privacy Clinic")
    session.commit()
    with org_session(other.id) as s:
        service.update_delivery_settings(s, other.id, {"engagement_privacy": True})
        s.commit()
    d = Data(sender, other.id)
    d.build()
    yield d
    recorder().reset()


def _rebuild(*args) -> str:
    from carepost.cli import app as cli_app

    result = CliRunner().invoke(cli_app, ["analytics", "rebuild", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_rebuild_from_a_day_gives_exactly_the_live_counts(data):
    orgs = (data.org_id, data.other)
    live = snapshot(orgs)
    metrics = {k[3] for k in live}
    # The data set covers every family the rebuild recounts, and the kept ones.
    for metric in ("accepted", "sent", "delivered", "secured:tls1.3", "secured:tls1.2", "secured:pgp", "deferred",
                   "bounced_hard", "bounced_soft", "failed", "complained", "portal_viewed", "excluded:suppressed",
                   "opened", "opened_unique", "opened_human", "clicked", "clicked_unique", "clicked_human",
                   "converted", "unsubscribed"):
        assert metric in metrics, metric
    assert {k[1] for k in live} == {"h", "d", "m"}
    # Opens and clicks count under the campaign, as its delivery events do (a campaign report
    # shows them), and under the sending domain the copy went out from.
    campaign_at = 4 + DIMENSIONS.index("campaign_id")
    domain_at = 4 + DIMENSIONS.index("sending_domain_id")
    for metric in ("opened", "opened_human", "clicked", "delivered"):
        assert any(k[3] == metric and k[campaign_at] and k[1] == "d" for k in live), metric
    assert any(k[3] == "opened" and k[domain_at] == data.domain_id for k in live)
    day = data.start.strftime("%Y-%m-%d")

    # Lose some rows and spoil others: the rebuild replaces them.
    with system_session() as s:
        s.execute(AnalyticsRollup.__table__.delete().where(AnalyticsRollup.metric.in_(("opened_human", "delivered"))))
        s.execute(update(AnalyticsRollup).where(AnalyticsRollup.metric == "accepted").values(n=AnalyticsRollup.n + 5))
        s.commit()
    assert snapshot(orgs) != live
    out = _rebuild("--from", day)
    assert "events counted" in out
    assert snapshot(orgs) == live
    # Twice: the same figures (replaced, not added to).
    _rebuild("--from", day)
    assert snapshot(orgs) == live
    # One organization only, from the second day: the same again.
    from carepost.accounts.service import get_organization

    with system_session() as s:
        slug = get_organization(s, data.org_id).slug
    _rebuild("--org", slug, "--from", (data.start + timedelta(days=1)).strftime("%Y-%m-%d"))
    assert snapshot(orgs) == live
    # The privacy-mode organization's opens and clicks (no events) are kept as counted.
    assert any(k[0] == data.other and k[3] == "opened" for k in snapshot(orgs))


def test_a_rebuild_fills_the_sending_domain_of_old_rows(data):
    live = snapshot((data.org_id,))
    with system_session() as s:  # rows from before the dimension existed
        s.execute(update(AnalyticsRollup).where(AnalyticsRollup.metric == "delivered").values(sending_domain_id=""))
        s.commit()
    assert snapshot((data.org_id,)) != live
    _rebuild("--from", data.start.strftime("%Y-%m-%d"))
    after = snapshot((data.org_id,))
    assert after == live
    assert any(k[3] == "delivered" and k[-2] == data.domain_id for k in after)


def test_a_rebuild_while_events_arrive_loses_nothing(data):
    """Opens recorded by the writer thread while rebuilds run: afterwards the live rollups are
    exactly what a rebuild of the whole period gives (nothing lost, nothing counted twice)."""
    org = data.org_id
    message = data.message(org)
    recipients = [data.recipient(org, message, "gmail.com") for _ in range(6)]
    day = data.start.strftime("%Y-%m-%d")
    stop = threading.Event()
    errors: list = []

    def opening():
        i = 0
        try:
            while not stop.is_set() and i < 200:
                data.hits(org, message, recipients[i % len(recipients)], [("o", None, CHROME, "GET")])
                data.event(org, recipients[i % len(recipients)], "deferred", method="tls", tls="TLSv1.3")
                i += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=opening)
    worker.start()
    try:
        for _ in range(3):
            _rebuild("--from", day)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert not errors, errors
    live = snapshot((org,))
    assert any(k[3] == "opened" for k in live)
    _rebuild("--from", day)
    assert snapshot((org,)) == live


def test_rebuild_refuses_a_bad_day(data):
    from carepost.cli import app as cli_app

    for value in ("yesterday", "2026-13-01", "2026-12-01T05:00"):
        result = CliRunner().invoke(cli_app, ["analytics", "rebuild", "--from", value])
        assert result.exit_code == 2, (value, result.output)
        assert "--from" in result.output
