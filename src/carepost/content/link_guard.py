"""The link guard (issue 13 item 3): no PHI in a link's URL, tracked or not.

A URL leaves the protected body: it is requested from a web server (logged there, by every proxy
and security gateway on the way, in browser history), so it may carry no merge field, no email
address, and none of the recipient's identifiers. Three checks, at three moments:

* **template save** (:func:`check_template_links`, called by ``content.service`` when a template
  is created or changed, API and UI alike): a merge field (``{{ ... }}`` or ``{% ... %}``) anywhere
  in an ``<a href>`` of the HTML or a URL of the text — a variable in a URL is a per-patient value
  in a URL, and a variable host or a whole-URL variable (``href="{{ link }}"``) would send the
  patient anywhere — and an email address in any http(s) URL. The 422 names the link
  (``template.html.links[1]``, ``variants.es.text.links[0]``).
* **acceptance** (:func:`check_links`): the links of a message's HTML and text as they will be
  sent (rendered): an email address anywhere in an http(s) URL (decoded), and, for the template
  source, merge fields as above.
* **composition**, per recipient (:func:`recipient_findings`, called by the pipeline's link step,
  ``carepost.tracking.links``): the recipient's own email address, MRN(s) and date of birth in
  any written form, in any URL — that recipient fails with ``link_phi`` and the link named, never
  the value.

Links are numbered as the pipeline numbers them: ``html.links[i]`` is the i-th http(s)/mailto/any
``<a href>`` of the HTML (in document order), ``text.links[i]`` the i-th URL of the text part. The
error names the link and the kind of finding, never the URL (it may hold the very PHI).
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from urllib.parse import unquote

from carepost.core.errors import ValidationFailed

# <a ... href="..."> (quoted or not). Group 1: everything up to the value; 2: quote; 3: value.
HREF_RE = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(?:(["'])(.*?)\2|([^\s"'>]+))""", re.IGNORECASE | re.DOTALL)
# URLs in a text part: up to whitespace or a closing bracket/quote.
TEXT_URL_RE = re.compile(r"""https?://[^\s<>"')\]]+""", re.IGNORECASE)
EMAIL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})+")
MERGE_RE = re.compile(r"\{\{|\{%|%7B%7B|%7B%25", re.IGNORECASE)


@dataclass(frozen=True)
class Link:
    part: str  # html | text
    index: int
    url: str  # as the recipient's client will read it (entities decoded)
    start: int  # span of the value in the part's source
    end: int

    @property
    def field(self) -> str:
        return f"{self.part}.links[{self.index}]"


def html_links(html: str | None) -> list[Link]:
    """Every ``<a href>`` of the HTML, in document order (any scheme: the guard checks them all)."""
    out: list[Link] = []
    for m in HREF_RE.finditer(html or ""):
        group = 3 if m.group(2) is not None else 4
        raw = m.group(group)
        out.append(Link("html", len(out), html_lib.unescape(raw).strip(), m.start(group), m.end(group)))
    return out


def text_links(text: str | None) -> list[Link]:
    out: list[Link] = []
    for m in TEXT_URL_RE.finditer(text or ""):
        url = m.group(0).rstrip(".,;:!?")
        out.append(Link("text", len(out), url, m.start(), m.start() + len(url)))
    return out


def _web(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def _decoded(url: str) -> str:
    """The URL as a server would log it, and once more decoded (doubly encoded values)."""
    once = unquote(url)
    return once + " " + unquote(once)


def merge_field_in_url(url: str) -> bool:
    """A merge field anywhere in the URL — host, path, query or fragment — or a URL that is only a
    merge field (a variable host sends the patient, and the value, anywhere)."""
    return bool(MERGE_RE.search(url))


def _without_merge_fields(url: str) -> str:
    return re.sub(r"\{\{.*?\}\}|\{%.*?%\}", " ", url, flags=re.DOTALL)


def check_template_links(parts: dict[str, str | None], *, prefix: str = "") -> None:
    """Template save: no merge field and no email address in any URL of the HTML or text
    (ValidationFailed naming the link as ``{prefix}html.links[i]``, never its URL).

    The recipient's own MRN and date of birth can only be found per recipient, at composition
    (:func:`recipient_findings`); here a template is refused for what every message from it would
    carry: a per-patient value in a link, or an address written into one."""
    for link in html_links(parts.get("html")) + _template_text_links(parts.get("text")):
        field = prefix + link.field
        if merge_field_in_url(link.url):
            raise ValidationFailed(
                f"{field}: a link may not carry template variables (in its host, path or query); link to a page "
                "that asks the patient to sign in instead (URLs are logged outside the protected message).",
                field=field, code="link_phi")
        if _web(link.url) and EMAIL_RE.search(_decoded(_without_merge_fields(link.url))):
            raise ValidationFailed(f"{field}: a link may not carry an email address (URLs are logged outside the "
                                   "protected message).", field=field, code="link_phi")


def _template_text_links(text: str | None) -> list[Link]:
    # In a template's text, a URL may run into a merge field ("https://x/{{ id }}"): take it whole.
    out: list[Link] = []
    for m in re.finditer(r"https?://(?:[^\s<>\"')\]]|\{\{[^}]*\}\})+", text or "", re.IGNORECASE):
        out.append(Link("text", len(out), m.group(0), m.start(), m.end()))
    return out


def check_links(html: str | None, text: str | None) -> None:
    """Acceptance: no email address and no merge field in any http(s) URL of the message."""
    for link in html_links(html) + text_links(text):
        if not _web(link.url):
            continue  # mailto:, tel:, cid:, #anchors: not requested from a web server
        if merge_field_in_url(link.url):
            raise ValidationFailed(f"{link.field}: a link may not carry template variables in its path or query.",
                                   field=link.field, code="link_phi")
        if EMAIL_RE.search(_decoded(link.url)):
            raise ValidationFailed(f"{link.field}: a link may not carry an email address (URLs are logged outside "
                                   "the protected message).", field=link.field, code="link_phi")


def date_forms(value: date) -> set[str]:
    """The ways a date of birth is commonly written in a URL."""
    y, m, d = f"{value.year:04d}", f"{value.month:02d}", f"{value.day:02d}"
    forms = {f"{y}-{m}-{d}", f"{y}{m}{d}", f"{m}/{d}/{y}", f"{m}-{d}-{y}", f"{m}{d}{y}", f"{d}.{m}.{y}",
             f"{y}/{m}/{d}", f"{d}/{m}/{y}", f"{d}-{m}-{y}", f"{m}.{d}.{y}",
             f"{value.month}/{value.day}/{y}", f"{value.month}-{value.day}-{y}"}
    return forms


def _digits_bounded(needle: str, haystack: str) -> bool:
    """``needle`` in ``haystack`` not inside a longer run of letters/digits (an MRN 1234 is not in 91234)."""
    start = 0
    while True:
        at = haystack.find(needle, start)
        if at == -1:
            return False
        before = haystack[at - 1] if at > 0 else ""
        after = haystack[at + len(needle)] if at + len(needle) < len(haystack) else ""
        if not (before.isalnum()) and not (after.isalnum()):
            return True
        start = at + 1


def recipient_findings(links: Iterable[Link], *, address: str | None, identifiers: Iterable[str] = (),
                       birth_date: date | None = None) -> tuple[Link, str] | None:
    """The first link that carries one of the recipient's identifiers, and the kind of finding
    (``email`` | ``identifier`` | ``birth_date``); None when every link is clean."""
    address = (address or "").strip().lower()
    idents = [i.strip().lower() for i in identifiers if i and len(i.strip()) >= 4]
    dates = date_forms(birth_date) if birth_date else set()
    for link in links:
        seen = _decoded(link.url).lower()
        if address and address in seen:
            return link, "email"
        for ident in idents:
            if _digits_bounded(ident, seen):
                return link, "identifier"
        for form in dates:
            if _digits_bounded(form, seen):
                return link, "birth_date"
    return None
