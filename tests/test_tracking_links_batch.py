"""The link step over a batch of copies (``tracking.links.pipeline_links``) does once per batch what
depends only on the organization — its tracking key — and reads a recipient's identifiers only
when their copy has a link to check; the outcome for each copy is what it was: the guard still
fails the copy whose link carries the recipient's MRN, every token still reads back to its own
message and recipient under the organization's key."""

from __future__ import annotations

import re

import pytest

from carepost.core import clock
from carepost.core.crypto import Keyring, get_keyring
from carepost.core.database import org_session
from carepost.core.ids import new_id
from carepost.delivery.pipeline import LinkRequest
from carepost.tracking import engagement_tokens as tokens
from carepost.tracking import links

TOKEN_RE = re.compile(r"/t/o/([A-Za-z0-9_-]+)\.gif")


def _contact(s, org_id, given, mrn):
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    return save_contact(s, org_id, ContactIn(given_name=given, family_name="Doe", mrn=mrn)).contact


def _request(org_id, contact_id, html, *, opens=True):
    return LinkRequest(new_id(), new_id(), org_id, contact_id, "pat@valid.test", "tls", opens, False, html, None,
                       clock.now())


def test_one_key_per_batch_facts_only_for_linked_copies_and_the_guard_still_refuses(db, org, monkeypatch):
    read_for: list[str] = []
    real_facts = links._recipient_facts
    monkeypatch.setattr(links, "_recipient_facts",
                        lambda session, requests: read_for.extend(r.contact_id for r in requests)
                        or real_facts(session, requests))
    key_lookups: list[str] = []
    real_key = Keyring.named_key_version
    monkeypatch.setattr(Keyring, "named_key_version", lambda self, session, owner, kind: (
        key_lookups.append(kind) if kind == tokens.KEY_KIND else None) or real_key(self, session, owner, kind))

    with org_session(org.id) as s:
        plain = [_contact(s, org.id, f"Ann{i}", f"5500{i}1") for i in range(3)]
        leaky = _contact(s, org.id, "Bo", "77123")
        clean = _contact(s, org.id, "Cy", "88234")
        s.flush()
        requests = [_request(org.id, c.id, "<html><body><p>Hello.</p></body></html>") for c in plain]
        requests.append(_request(org.id, leaky.id, '<p><a href="https://bar.example/chart/77123">chart</a></p>'))
        requests.append(_request(org.id, clean.id, '<p><a href="https://bar.example/chart/77123">chart</a></p>'))
        out = links.pipeline_links(s, requests)
        s.commit()

        # Identifiers were read for the two copies with a link only.
        assert sorted(read_for) == sorted([leaky.id, clean.id])
        # The guard: Bo's own MRN is in his link; the same link is clean for Cy.
        assert out[requests[3].recipient_id].refused.startswith("link_phi: html.links[0] carries the recipient's identifier")
        assert "77123" not in out[requests[3].recipient_id].refused
        assert out[requests[4].recipient_id].refused is None
        # Four pixels (the refused copy gets none), one key lookup for the batch.
        assert key_lookups == [tokens.KEY_KIND]
        pixels = {r.recipient_id: TOKEN_RE.findall(out[r.recipient_id].html) for r in requests if r is not requests[3]}
        assert all(len(found) == 1 for found in pixels.values())
        for r in requests:
            if r is requests[3]:
                continue
            data = tokens.read(s, pixels[r.recipient_id][0], "o")
            assert (data.org_id, data.message_id, data.recipient_id) == (org.id, r.message_id, r.recipient_id)
        assert len({p[0] for p in pixels.values()}) == 4  # a fresh nonce per token


def test_a_batch_key_and_a_looked_up_key_make_equally_valid_tokens(db, org):
    with org_session(org.id) as s:
        message_id, recipient_id = new_id(), new_id()
        version, secret = get_keyring().named_key_version(s, org.id, tokens.KEY_KIND)
        given = tokens.make(s, "c", org.id, message_id, recipient_id, 3, key=(version, secret))
        looked_up = tokens.make(s, "c", org.id, message_id, recipient_id, 3)
        s.commit()
        for token in (given, looked_up):
            data = tokens.read(s, token, "c")
            assert (data.message_id, data.recipient_id, data.link_index) == (message_id, recipient_id, 3)
        # A token sealed under a key that is not the organization's does not read as this organization's.
        forged = tokens.make(s, "c", org.id, message_id, recipient_id, 3, key=(version, b"\x01" * 32))
        with pytest.raises(tokens.InvalidToken):
            tokens.read(s, forged, "c")
