"""The delivery pipeline's link step (port ``delivery.links``, filled by ``carepost.assembly``):
the per-recipient link guard, and open/click tracking rewritten at composition time.

For every copy about to be composed:

1. **Link guard** (issue 13 item 3, every message, tracked or not): no URL of the body may carry
   the recipient's email address, one of their identifiers (MRN, member id...) or their date of
   birth in a usual written form. A copy that does fails with ``link_phi: html.links[2] carries
   the recipient's date of birth`` — the link and the kind named, never the value. (The static
   checks — merge fields, any email address — ran at acceptance: ``content.link_guard``.)
2. **Tracking** (only for messages with ``track_clicks`` / ``track_opens``):

   * each http(s) link becomes ``<base>/t/c/<token>``; the URL is recorded once per message and
     position (``MessageLink``, encrypted), so the redirect goes only there;
   * an invisible trap link (``/t/c/`` with the trap index) is added: people never see it, link
     scanners follow every link;
   * an open pixel ``<base>/t/o/<token>.gif`` is added before ``</body>``.

   Tokens are opaque (``engagement_tokens``): encrypted ids, no PHI. In privacy mode they name no
   recipient at all.

Secure methods (docs/tracking.md): a **PGP or S/MIME** copy gets click redirects but no open
pixel — a remote image inside an encrypted message tells a third party when it was decrypted
(the EFAIL lesson: clients block remote content in encrypted mail, and they should), so opens of
encrypted copies are not measured. A **portal** copy is not rewritten at all: the portal records
when the recipient reads it (``message.portal_viewed``), and its notification carries nothing to
measure.

It reads the contacts' identifier and birth-date columns directly (one set-based read per batch
of copies, not one service call per recipient): the exception ARCHITECTURE.md section 3 allows.
"""

from __future__ import annotations

import html as html_lib

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.content import link_guard
from carepost.core.crypto import get_keyring
from carepost.delivery.mime import body_end
from carepost.delivery.pipeline import LinkOutcome, LinkRequest
from carepost.tracking import engagement_tokens as tokens

PIXEL_STYLE = "display:block;border:0;width:1px;height:1px;overflow:hidden"
TRAP_STYLE = "display:none!important;font-size:0;line-height:0;max-height:0;overflow:hidden;mso-hide:all"
KIND_WORDS = {"email": "email address", "identifier": "identifier (MRN or member id)", "birth_date": "date of birth"}
UNTRACKED_METHODS = ("portal",)
NO_PIXEL_METHODS = ("pgp", "smime", "portal")


def privacy_mode(session: Session, org_id: str) -> bool:
    """The organization keeps aggregate engagement counts only (no per-recipient rows)."""
    from carepost.accounts.service import get_organization

    return bool((get_organization(session, org_id).settings or {}).get("engagement_privacy"))


def _recipient_facts(session: Session, requests: list[LinkRequest]) -> dict[str, tuple[list[str], object]]:
    """contact id -> (identifier values, birth date), decrypted in memory for this batch only."""
    from carepost.patients.models import Contact, ContactIdentifier

    ids = sorted({r.contact_id for r in requests if r.contact_id})
    out: dict[str, tuple[list[str], object]] = {cid: ([], None) for cid in ids}
    ring = get_keyring()
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for cid, org_id, birth in session.execute(
                select(Contact.id, Contact.org_id, Contact.birth_date).where(Contact.id.in_(chunk))):
            out[cid] = (out[cid][0], birth)
        for row in session.scalars(select(ContactIdentifier).where(
                ContactIdentifier.contact_id.in_(chunk), ContactIdentifier.kind.in_(("identifier", "email")))):
            if row.value_enc:
                value = ring.decrypt_text(session, row.org_id, ContactIdentifier.__tablename__, "value", row.id,
                                          row.value_enc)
                if value:
                    out[row.contact_id][0].append(value)
    return out


def pipeline_links(session: Session, requests: list[LinkRequest]) -> dict[str, LinkOutcome]:
    found_links = {r.recipient_id: (link_guard.html_links(r.html), link_guard.text_links(r.text)) for r in requests}
    # A copy without any link has nothing for the guard to check: its recipient's identifiers and
    # birth date are neither read nor decrypted.
    linked = [r for r in requests if r.contact_id and any(found_links[r.recipient_id])]
    facts = _recipient_facts(session, linked) if linked else {}
    privacy: dict[str, bool] = {}
    keys: dict[str, tuple[int, bytes]] = {}  # each organization's tracking key: looked up once per batch
    recorded = _recorded_links(session, {r.message_id for r in requests if r.track_clicks})
    added: list[dict] = []
    out: dict[str, LinkOutcome] = {}
    for r in requests:
        html_links, text_links = found_links[r.recipient_id]
        identifiers, birth = facts.get(r.contact_id or "", ([], None))
        found = link_guard.recipient_findings(html_links + text_links, address=r.address, identifiers=identifiers,
                                              birth_date=birth)
        if found is not None:
            link, kind = found
            out[r.recipient_id] = LinkOutcome(refused=f"link_phi: {link.field} carries the recipient's {KIND_WORDS[kind]}")
            continue
        if r.method in UNTRACKED_METHODS or not (r.track_clicks or r.track_opens):
            continue
        if r.org_id not in privacy:
            privacy[r.org_id] = privacy_mode(session, r.org_id)
            keys[r.org_id] = get_keyring().named_key_version(session, r.org_id, tokens.KEY_KIND)
        recipient = None if privacy[r.org_id] else r.recipient_id
        key = keys[r.org_id]
        pixel = r.track_opens and r.method not in NO_PIXEL_METHODS
        html, text = r.html, r.text
        if r.track_clicks:
            web = [lk for lk in html_links if lk.url.lower().startswith(("http://", "https://"))]
            web_text = [lk for lk in text_links if lk.url.lower().startswith(("http://", "https://"))]
            numbered = [(i, lk) for i, lk in enumerate(web)] + [(len(web) + j, lk) for j, lk in enumerate(web_text)]
            added += _links_to_record(session, r, numbered, recorded)
            click = {id(lk): _url(session, "c", r, recipient, i, key) for i, lk in numbered}
            html = _replace(r.html, [lk for _i, lk in numbered if lk.part == "html"], click, escape=True)
            text = _replace(r.text, [lk for _i, lk in numbered if lk.part == "text"], click, escape=False)
            if html is not None:
                trap = _url(session, "c", r, recipient, tokens.TRAP_INDEX, key)
                html = _before_body_end(html, f'<a href="{html_lib.escape(trap)}" style="{TRAP_STYLE}" '
                                              f'aria-hidden="true" tabindex="-1"></a>')
        if pixel and html is not None:
            src = _url(session, "o", r, recipient, None, key) + ".gif"
            html = _before_body_end(html, f'<img src="{html_lib.escape(src)}" width="1" height="1" alt="" '
                                          f'style="{PIXEL_STYLE}">')
        if html != r.html or text != r.text:
            out[r.recipient_id] = LinkOutcome(html=html, text=text)
    if added:
        from sqlalchemy import insert

        from carepost.tracking.models import MessageLink

        session.execute(insert(MessageLink), added)
    return out


def _url(session: Session, kind: str, r: LinkRequest, recipient: str | None, index: int | None,
         key: tuple[int, bytes] | None = None) -> str:
    from carepost.core.config import get_settings

    token = tokens.make(session, kind, r.org_id, r.message_id, recipient, index, r.composed_at, key=key)
    return f"{get_settings().base_url}/t/{kind}/{token}"


def _replace(source: str | None, links: list, urls: dict, *, escape: bool) -> str | None:
    if source is None or not links:
        return source
    parts, at = [], 0
    for lk in sorted(links, key=lambda lk: lk.start):
        parts.append(source[at:lk.start])
        parts.append(html_lib.escape(urls[id(lk)]) if escape else urls[id(lk)])
        at = lk.end
    parts.append(source[at:])
    return "".join(parts)


def _before_body_end(html: str, snippet: str) -> str:
    at = body_end(html)
    return html[:at] + snippet + html[at:] if at != -1 else html + snippet


def _recorded_links(session: Session, message_ids: set[str]) -> dict[str, set[int]]:
    """message id -> the link positions already recorded (a retried run, or a message whose other
    recipients went in an earlier batch): one read per 500 messages of the batch."""
    from carepost.tracking.models import MessageLink

    have: dict[str, set[int]] = {mid: set() for mid in message_ids}
    ids = sorted(message_ids)
    for start in range(0, len(ids), 500):
        for mid, index in session.execute(select(MessageLink.message_id, MessageLink.link_index)
                                          .where(MessageLink.message_id.in_(ids[start:start + 500]))):
            have[mid].add(index)
    return have


def _links_to_record(session: Session, r: LinkRequest, numbered: list, recorded: dict[str, set[int]]) -> list[dict]:
    """The URLs of a message as sent, once per message and position (idempotent: a retried run
    or another recipient of the same message finds them), encrypted, as rows for one INSERT of
    the whole batch."""
    from carepost.core import clock
    from carepost.core.ids import new_id
    from carepost.tracking.models import MessageLink

    have = recorded.setdefault(r.message_id, set())
    ring = get_keyring()
    rows = []
    for index, lk in numbered:
        if index in have:
            continue
        row_id = new_id()
        rows.append({"id": row_id, "org_id": r.org_id, "message_id": r.message_id, "link_index": index,
                     "part": lk.part, "created_at": clock.now(),
                     "url_enc": ring.encrypt(session, r.org_id, MessageLink.__tablename__, "url", row_id, lk.url)})
        have.add(index)
    return rows


def link_url(session: Session, org_id: str, message_id: str, index: int) -> str | None:
    """The URL recorded at send time for this message and position, or None."""
    from carepost.tracking.models import MessageLink

    row = session.scalars(select(MessageLink).where(MessageLink.message_id == message_id,
                                                    MessageLink.link_index == index)).first()
    if row is None or row.org_id != org_id:
        return None
    return get_keyring().decrypt_text(session, org_id, MessageLink.__tablename__, "url", row.id, row.url_enc)
