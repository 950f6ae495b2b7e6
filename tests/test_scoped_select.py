"""Core statements in an organization's scope (``core.scoped_select``, issue 11 item 6): the API's
contact read runs two Core statements instead of ORM queries; the organization filter is added to
every organization table they read — FROM and joined tables alike — and organization B's rows,
even one planted to point at A's contact, never reach A."""

from __future__ import annotations

import pytest
from sqlalchemy import bindparam, exists, select

from carepost.accounts.service import create_organization
from carepost.audit.models import AuditEvent
from carepost.core.crypto import get_keyring
from carepost.core.database import org_session
from carepost.core.errors import NotFound, TenantScopeError
from carepost.core.ids import new_id
from carepost.core.scoped_select import org_select, scope_select
from carepost.patients import service
from carepost.patients.models import Contact, ContactIdentifier
from tests.test_accounts_credentials import bearer, make_credential  # noqa: F401 (fixture)

C, I = Contact.__table__, ContactIdentifier.__table__
WITH_IDENTIFIERS = (select(C.c.id, I.c.id.label("ident_id"), I.c.org_id.label("ident_org"))
                    .select_from(C.outerjoin(I, I.c.contact_id == C.c.id)).where(C.c.id == bindparam("cid")))


@pytest.fixture
def two_orgs(db, session):
    a = create_organization(session, "Alpha Clinic")
    b = create_organization(session, "Zeta Health")
    session.commit()
    ids = {}
    for org, given, email in ((a, "Ann", "ann@example.test"), (b, "Zed", "zed@example.test")):
        with org_session(org.id) as s:
            ids[org.id] = service.save_contact(s, org.id, {"given_name": given, "family_name": "Smith", "email": email},
                                               source="api").contact.id
            s.commit()
    # A row of B planted to point at A's contact (as a bug or an attacker with SQL access might).
    with org_session(b.id) as s:
        ring = get_keyring()
        rid = new_id()
        s.add(ContactIdentifier(id=rid, org_id=b.id, contact_id=ids[a.id], kind="email",
                                value_enc=ring.encrypt(s, b.id, "contact_identifiers", "value", rid, "zeta@example.test"),
                                blind_index="0" * 64))
        s.commit()
    return a, b, ids


def test_org_select_adds_the_organization_to_from_and_joined_tables(two_orgs):
    a, b, ids = two_orgs
    sql = " ".join(str(scope_select(WITH_IDENTIFIERS)).split())
    on_clause = sql.split(" ON ", 1)[1].split(" WHERE ", 1)[0]
    assert "contact_identifiers.org_id = :carepost_scope_org" in on_clause  # the outer join keeps its NULL row
    assert "contacts.org_id = :carepost_scope_org" in sql.split(" WHERE ", 1)[1]
    with org_session(a.id) as s:
        rows = org_select(s, WITH_IDENTIFIERS, {"cid": ids[a.id]}).all()
        assert rows and {r.ident_org for r in rows} == {a.id}  # B's planted identifier is not joined in
        assert org_select(s, WITH_IDENTIFIERS, {"cid": ids[b.id]}).all() == []  # B's contact: nothing
        # Without the scope the same join reaches B's row (what the filter prevents).
        unscoped = s.connection().execute(WITH_IDENTIFIERS, {"cid": ids[a.id]}).all()
        assert b.id in {r.ident_org for r in unscoped}


def test_org_select_fails_closed(two_orgs, session):
    a, _b, ids = two_orgs
    sub = select(C.c.id).where(exists(select(I.c.id).where(I.c.contact_id == C.c.id)))
    with org_session(a.id) as s:
        with pytest.raises(TenantScopeError):
            org_select(s, sub)  # organization data in a subquery is refused, not left unfiltered
        with pytest.raises(TenantScopeError):
            org_select(s, select(C.c.id).select_from(C.outerjoin(I, I.c.contact_id == C.c.id, full=True)))
    with pytest.raises(TenantScopeError):
        org_select(session, WITH_IDENTIFIERS, {"cid": ids[a.id]})  # a system session names no organization


def test_contact_view_matches_contact_dict_and_hides_b(two_orgs):
    a, b, ids = two_orgs
    with org_session(a.id) as s:
        view = service.contact_view(s, ids[a.id])
        assert view["given_name"] == "Ann" and view["emails"] == ["ann@example.test"]  # not B's planted address
        with pytest.raises(NotFound):
            service.contact_view(s, ids[b.id])
        with pytest.raises(NotFound):
            service.contact_view(s, "not-an-id")
    with org_session(b.id) as s:
        assert service.contact_view(s, ids[b.id]) == service.contact_dict(s, service.get_contact(s, ids[b.id]))


def test_api_read_of_another_organizations_contact_is_404(two_orgs, client, session, make_credential):  # noqa: F811
    a, b, ids = two_orgs
    cred, secret = make_credential(scopes=["phi:read_masked", "phi:read_unmasked"], org_id=a.id)
    r = client.get(f"/api/v1/contacts/{ids[b.id]}", headers=bearer(cred, secret))
    assert r.status_code == 404 and "Zed" not in r.text
    r = client.get(f"/api/v1/contacts/{ids[a.id]}", headers=bearer(cred, secret))
    assert r.status_code == 200 and r.json()["given_name"] == "Ann" and r.json()["emails"] == ["ann@example.test"]
    session.rollback()
    reads = session.scalars(select(AuditEvent).where(AuditEvent.org_id == a.id, AuditEvent.action == "contact.read")).all()
    assert [e.target_id for e in reads] == [ids[a.id]]  # the answered read was audited, the 404 read nothing
