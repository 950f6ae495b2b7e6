"""People vs machines (issue 13 item 2): the class of one open or click.

``human`` | ``proxy`` (a mail provider fetched the image for, or instead of, the person: Apple
Mail Privacy Protection, Gmail's and Yahoo's image proxies) | ``scanner`` (a security gateway or
other automaton followed the link or fetched the image). Each class comes with the ``rule`` that
decided it, stored beside it, so a report can say why.

What the request looks like is read with ``ua-parser`` (the maintained uap-core rules, with the
Rust accelerator): its ``Spider`` device family and automation families (curl, Python Requests,
Go, Java, headless browsers) mark machines; on top of it, the shapes the parser does not name:

* **Gmail image proxy**: ``GoogleImageProxy`` in the user agent (``via ggpht.com``).
* **Yahoo mail proxy**: ``YahooMailProxy``.
* **Apple Mail Privacy Protection**: Apple's proxies fetch every image shortly after delivery,
  whether or not anyone opened the mail, with the bare user agent ``Mozilla/5.0`` — or, from
  Apple's network (17.0.0.0/8), an Apple Mail / WebKit agent without any browser version.
* **Security gateways** by name: Barracuda, Mimecast, Proofpoint (urldefense), Microsoft Defender
  Safe Links, Cisco IronPort / Secure Email, Trend Micro, Symantec/Broadcom MessageLabs,
  Forcepoint, Sophos, Fortinet, Zscaler, Check Point, Vade, Cloudmark, AppRiver, SpamTitan.
* **Clicks seconds after delivery** (within :data:`FAST_CLICK_SECONDS` of composition) with no
  open seen from a person before: gateways click as the message passes; people open first.
* **Bursts**: the same copy's links followed :data:`BURST_LINKS` or more distinct at once (within
  :data:`BURST_SECONDS`), or every link of it.
* **The trap link**: an invisible link in every click-tracked HTML body; whoever follows it
  is a machine, and so is whatever the same copy follows in the next :data:`TRAP_MEMORY_SECONDS`.
* **HEAD requests** and requests **without a user agent**.

Memory of recent clicks and opens (bursts, traps, opens before a fast click) is per process
(:class:`RecentActivity`), keyed by message and recipient (message only in privacy mode), for a
few minutes: several ``serve`` processes behind a load balancer each see part of a burst, so
classification there leans on the user agent and timing rules.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

FAST_CLICK_SECONDS = 10
BURST_SECONDS = 5
BURST_LINKS = 3
TRAP_MEMORY_SECONDS = 60
MEMORY_SECONDS = 600

APPLE_NETWORKS = (ipaddress.ip_network("17.0.0.0/8"),)
GATEWAYS = re.compile(
    r"barracuda|mimecast|proofpoint|urldefense|safelinks|safe links|microsoft defender|atp-?safelinks|ironport|"
    r"cisco secure email|trend ?micro|messagelabs|symantec|forcepoint|sophos|fortinet|fortiguard|zscaler|"
    r"check ?point|vadesecure|vade secure|cloudmark|appriver|spamtitan|bitdefender|mcafee|trustwave|"
    r"agari|abnormal security|ironscales",
    re.IGNORECASE)
AUTOMATED_FAMILIES = {
    "python requests", "python-urllib", "curl", "wget", "go-http-client", "java", "okhttp", "apache-httpclient",
    "headlesschrome", "phantomjs", "libwww-perl", "aiohttp", "httpx", "node-fetch", "axios", "scrapy",
}


@dataclass(frozen=True)
class Verdict:
    classification: str  # human | proxy | scanner
    rule: str
    family: str | None


@lru_cache(maxsize=4096)
def agent_family(user_agent: str) -> tuple[str | None, str | None]:
    """(user agent family, device family) by ua-parser; cached (few distinct agents per day)."""
    from ua_parser import parse

    result = parse(user_agent)
    family = result.user_agent.family if result.user_agent else None
    device = result.device.family if result.device else None
    return family, device


@lru_cache(maxsize=65536)
def _apple(ip: str | None) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in APPLE_NETWORKS)


def by_request(user_agent: str | None, ip: str | None, method: str) -> Verdict | None:
    """The verdict the request's shape alone gives, or None (then timing decides)."""
    return _by_shape((user_agent or "").strip()[:512], _apple(ip), method.upper())


@lru_cache(maxsize=8192)
def _by_shape(ua: str, apple: bool, method: str) -> Verdict | None:
    if method == "HEAD":
        return Verdict("scanner", "head_request", None)
    if not ua:
        return Verdict("scanner", "no_user_agent", None)
    family, device = agent_family(ua)
    if "GoogleImageProxy" in ua or family == "GmailImageProxy":
        return Verdict("proxy", "gmail_image_proxy", family)
    if "YahooMailProxy" in ua or family == "YahooMailProxy":
        return Verdict("proxy", "yahoo_mail_proxy", family)
    if ua == "Mozilla/5.0":
        return Verdict("proxy", "apple_mail_privacy", family)
    if apple and ("Version/" not in ua and "Chrome/" not in ua and "Firefox/" not in ua):
        return Verdict("proxy", "apple_mail_privacy", family)
    if GATEWAYS.search(ua):
        return Verdict("scanner", "gateway_user_agent", family)
    if device == "Spider":
        return Verdict("scanner", "crawler_user_agent", family)
    if family and family.lower() in AUTOMATED_FAMILIES:
        return Verdict("scanner", "automated_user_agent", family)
    return None


class RecentActivity:
    """Per-process memory of recent opens and clicks per copy, for bursts, traps and fast clicks."""

    def __init__(self, limit: int = 50000):
        self._lock = threading.Lock()
        self._copies: OrderedDict[tuple, dict] = OrderedDict()
        self._limit = limit

    def _entry(self, key: tuple, now: float) -> dict:
        entry = self._copies.get(key)
        if entry is None or now - entry["seen"] > MEMORY_SECONDS:
            entry = {"clicks": [], "human_open": False, "trap_at": None, "seen": now}
            self._copies[key] = entry
        entry["seen"] = now
        self._copies.move_to_end(key)
        while len(self._copies) > self._limit:
            self._copies.popitem(last=False)
        return entry

    def opened(self, key: tuple, human: bool, now: float | None = None) -> None:
        with self._lock:
            entry = self._entry(key, now if now is not None else time.monotonic())
            entry["human_open"] = entry["human_open"] or human

    def clicked(self, key: tuple, index: int, *, links: int | None, trap: bool,
                now: float | None = None) -> Verdict | None:
        """Remember a click; a scanner verdict when the copy's recent clicks say so."""
        now = now if now is not None else time.monotonic()
        with self._lock:
            entry = self._entry(key, now)
            if trap:
                entry["trap_at"] = now
                return Verdict("scanner", "trap_link", None)
            if entry["trap_at"] is not None and now - entry["trap_at"] <= TRAP_MEMORY_SECONDS:
                return Verdict("scanner", "after_trap_link", None)
            entry["clicks"] = [(t, i) for t, i in entry["clicks"] if now - t <= BURST_SECONDS] + [(now, index)]
            distinct = {i for _t, i in entry["clicks"]}
            if len(distinct) >= BURST_LINKS or (links is not None and links >= 2 and len(distinct) >= links):
                return Verdict("scanner", "click_burst", None)
            return None

    def human_opened(self, key: tuple) -> bool:
        with self._lock:
            entry = self._copies.get(key)
            return bool(entry and entry["human_open"])


def classify(kind: str, *, user_agent: str | None, ip: str | None, method: str, composed_at: datetime,
             at: datetime, key: tuple, memory: RecentActivity, trap: bool = False, link_index: int | None = None,
             links: int | None = None) -> Verdict:
    """The class of one open (``kind`` ``o``) or click (``c``)."""
    shape = by_request(user_agent, ip, method)
    family = shape.family if shape else agent_family((user_agent or "")[:512])[0] if user_agent else None
    if kind == "o":
        verdict = shape or Verdict("human", "mail_client", family)
        memory.opened(key, verdict.classification == "human")
        return verdict
    remembered = memory.clicked(key, link_index or 0, links=links, trap=trap)
    if trap:
        return Verdict("scanner", "trap_link", family)
    if shape is not None:
        return shape
    if remembered is not None:
        return Verdict(remembered.classification, remembered.rule, family)
    if (at - composed_at).total_seconds() <= FAST_CLICK_SECONDS and not memory.human_opened(key):
        return Verdict("scanner", "fast_click", family)
    return Verdict("human", "browser", family)
