"""The delivery pipeline's List-Unsubscribe step and return paths over a batch: what depends only on
the organization (its consent key, its VERP secret) is looked up once per batch, and every
recipient still gets a link and a mailbox of their own, verified under their own organization's
key — two organizations in one batch included."""

from __future__ import annotations

from carepost.consent import eligibility, tokens
from carepost.core.crypto import Keyring
from carepost.core.database import org_session, system_session
from carepost.core.ids import new_id
from carepost.delivery import bounces
from carepost.delivery.mime import parse_verp
from carepost.delivery.pipeline import Candidate


def _candidate(org_id: str, purpose: str) -> Candidate:
    return Candidate(new_id(), new_id(), org_id, "pat@valid.test", "idx", None, purpose, "campaign", False)


def test_one_consent_key_per_organization_and_each_link_verifies_to_its_recipient(db, org, monkeypatch):
    from carepost.accounts.service import create_organization

    with system_session() as s:
        other = create_organization(s, "Other Clinic")
        s.commit()
    lookups: list[tuple[str, str]] = []
    real = Keyring.named_key
    monkeypatch.setattr(Keyring, "named_key", lambda self, session, owner, kind: (
        lookups.append((owner, kind)) if kind == tokens.KEY_KIND else None) or real(self, session, owner, kind))

    candidates = ([_candidate(org.id, "marketing") for _ in range(3)] + [_candidate(other.id, "marketing")]
                  + [_candidate(org.id, "treatment")])  # no opt-out needed, no topic: no link
    with system_session() as s:
        out = eligibility.pipeline_list_unsubscribe(s, candidates)
        s.commit()
    assert sorted(lookups) == sorted([(org.id, tokens.KEY_KIND), (other.id, tokens.KEY_KIND)])
    assert candidates[4].recipient_id not in out
    with system_session() as s:
        for c in candidates[:4]:
            [url] = out[c.recipient_id]
            data = tokens.verify(s, url.rsplit("/t/u/", 1)[1], "u")
            assert (data.org_id, data.ref_kind, data.ref_id) == (c.org_id, "r", c.recipient_id)
    assert len({out[c.recipient_id][0] for c in candidates[:4]}) == 4


def test_a_return_path_made_with_the_batch_secret_is_the_one_made_without(db, org):
    recipient_id = new_id()
    with org_session(org.id) as s:
        secret = bounces.verp_secret(s, org.id)
        s.commit()
        for make, prefix in ((bounces.return_path, "b"), (bounces.unsubscribe_mailbox, "u")):
            given = make(s, org.id, "bounces.bar.example", recipient_id, secret=secret)
            assert given == make(s, org.id, "bounces.bar.example", recipient_id)
            assert parse_verp(given, secret, prefix=prefix) == recipient_id
            assert parse_verp(given, b"\x02" * 32, prefix=prefix) is None
