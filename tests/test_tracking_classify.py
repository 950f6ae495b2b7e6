"""People vs machines (issue 13 item 2): opens and clicks classified from recorded request shapes —
real user agents of mail clients, image proxies, security gateways and scripts, with their
timing (seconds after delivery, bursts over every link, the invisible trap link)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from carepost.tracking.classify import RecentActivity, classify

SENT = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)

# Recorded user agents (as sent by the clients and services named).
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
APPLE_MPP = "Mozilla/5.0"
IPHONE_MAIL = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
               "Mobile/15E148")
MAC_MAIL = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.5.0"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
          "Safari/537.36")
SAFARI_IOS = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
              "Version/17.1.2 Mobile/15E148 Safari/604.1")
BARRACUDA = "Barracuda Sentinel (EE)"
MIMECAST = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
            "Safari/537.36 Mimecast-Link-Scanner")
PROOFPOINT = "Mozilla/5.0 (compatible; Proofpoint URL Defense/2.0; +https://www.proofpoint.com)"
SAFE_LINKS = "Mozilla/5.0 (compatible; Microsoft Defender for Office 365 Safe Links)"
PYTHON = "python-requests/2.31.0"
CURL = "curl/8.5.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


def one(kind, ua, *, ip="203.0.113.7", method="GET", after=timedelta(hours=1), memory=None, key=("m", "r"),
        link_index=0, links=3, trap=False):
    return classify(kind, user_agent=ua, ip=ip, method=method, composed_at=SENT, at=SENT + after, key=key,
                    memory=memory or RecentActivity(), trap=trap, link_index=link_index, links=links)


@pytest.mark.parametrize("ua, ip, expected, rule", [
    (GMAIL_PROXY, "66.102.8.20", "proxy", "gmail_image_proxy"),
    (YAHOO_PROXY, "98.136.0.1", "proxy", "yahoo_mail_proxy"),
    (APPLE_MPP, "17.58.101.12", "proxy", "apple_mail_privacy"),
    (APPLE_MPP, "104.28.0.9", "proxy", "apple_mail_privacy"),  # the bare agent alone is enough
    (MAC_MAIL, "17.58.101.12", "proxy", "apple_mail_privacy"),  # Apple's network, a WebKit agent without version
    (MAC_MAIL, "198.51.100.4", "human", "mail_client"),  # the same agent from the person's own network
    (IPHONE_MAIL, "198.51.100.4", "human", "mail_client"),
    (OUTLOOK, "198.51.100.4", "human", "mail_client"),
    (THUNDERBIRD, "198.51.100.4", "human", "mail_client"),
    (BARRACUDA, "64.235.144.1", "scanner", "gateway_user_agent"),
    (MIMECAST, "205.139.110.1", "scanner", "gateway_user_agent"),
    (PROOFPOINT, "148.163.128.1", "scanner", "gateway_user_agent"),
    (GOOGLEBOT, "66.249.66.1", "scanner", "crawler_user_agent"),
    (PYTHON, "192.0.2.1", "scanner", "automated_user_agent"),
    (CURL, "192.0.2.1", "scanner", "automated_user_agent"),
    ("", "192.0.2.1", "scanner", "no_user_agent"),
])
def test_opens_by_request_shape(ua, ip, expected, rule):
    verdict = one("o", ua, ip=ip)
    assert (verdict.classification, verdict.rule) == (expected, rule)


def test_the_parsed_family_is_kept_never_the_raw_agent():
    assert one("o", GMAIL_PROXY).family == "GmailImageProxy"
    assert one("o", CHROME).family == "Chrome"


def test_a_head_request_is_a_machine():
    assert one("c", CHROME, method="HEAD").rule == "head_request"


@pytest.mark.parametrize("ua, rule", [(BARRACUDA, "gateway_user_agent"), (MIMECAST, "gateway_user_agent"),
                                      (PROOFPOINT, "gateway_user_agent"), (SAFE_LINKS, "gateway_user_agent"),
                                      (PYTHON, "automated_user_agent")])
def test_clicks_by_gateway_agents_are_scanners_whenever_they_come(ua, rule):
    verdict = one("c", ua, after=timedelta(days=1))
    assert (verdict.classification, verdict.rule) == ("scanner", rule)


def test_a_click_seconds_after_delivery_with_no_open_is_a_scanner():
    # Safe Links and similar gateways fetch with an ordinary browser agent as the message passes.
    assert one("c", CHROME, after=timedelta(seconds=3)).rule == "fast_click"
    # The same click a minute later is a person's.
    assert one("c", CHROME, after=timedelta(minutes=1)).classification == "human"


def test_a_quick_click_after_a_persons_open_is_a_person():
    memory = RecentActivity()
    assert one("o", SAFARI_IOS, after=timedelta(seconds=2), memory=memory).classification == "human"
    assert one("c", SAFARI_IOS, after=timedelta(seconds=6), memory=memory).classification == "human"


def test_a_proxy_open_does_not_make_a_fast_click_human():
    memory = RecentActivity()
    one("o", APPLE_MPP, ip="17.58.101.12", after=timedelta(seconds=1), memory=memory)
    assert one("c", CHROME, after=timedelta(seconds=4), memory=memory).rule == "fast_click"


def test_a_burst_over_the_links_of_a_copy_is_a_scanner():
    memory = RecentActivity()
    late = timedelta(hours=2)
    verdicts = [one("c", CHROME, after=late, memory=memory, link_index=i, links=5) for i in range(4)]
    assert [v.classification for v in verdicts] == ["human", "human", "scanner", "scanner"]
    assert verdicts[2].rule == "click_burst"
    # Every link of a two-link message at once is a burst too.
    memory = RecentActivity()
    assert [one("c", CHROME, after=late, memory=memory, link_index=i, links=2, key=("m2", "r")).rule
            for i in range(2)] == ["browser", "click_burst"]
    # Other copies are not affected.
    assert one("c", CHROME, after=late, memory=memory, key=("m3", "r")).classification == "human"


def test_the_same_link_twice_is_not_a_burst():
    memory = RecentActivity()
    late = timedelta(hours=2)
    assert {one("c", CHROME, after=late, memory=memory, link_index=0).classification for _ in range(4)} == {"human"}


def test_the_trap_link_marks_a_scanner_and_what_it_follows_next():
    memory = RecentActivity()
    late = timedelta(hours=2)
    assert one("c", CHROME, after=late, memory=memory, trap=True, link_index=0xFFFF).rule == "trap_link"
    assert one("c", CHROME, after=late, memory=memory, link_index=1).rule == "after_trap_link"
    # Another copy's person is not affected.
    assert one("c", CHROME, after=late, memory=memory, key=("m", "other")).classification == "human"
