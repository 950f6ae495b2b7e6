"""Core (non-ORM) SELECTs in an organization's scope, without the ORM's per-statement cost.

The central tenant scope (``core.database._scope_to_organization``) adds ``org_id = :org`` to ORM
statements through ``with_loader_criteria``; that costs about 0.3-0.7 ms per statement, most of a
hot read's time (issue 11 item 6). A Core statement run through ``session.connection().execute``
skips the ORM and so also skipped the scope — the gap this module closes for the statements that
use it: :func:`org_select` takes a Core ``SELECT`` and, before running it, adds the session's
organization to **every** organization table it reads (the tables are the ones
``core.database`` knows as :class:`~carepost.core.database.OrgScoped`):

* a table in the FROM list: ``table.org_id = :org`` in the WHERE clause;
* a table joined in (inner or outer join): ``table.org_id = :org`` in that join's ON clause, so a
  LEFT JOIN still yields its row of NULLs when the only match belongs to someone else;
* organization data read in a subquery, a full outer join or through a non-table FROM: refused
  (:class:`TenantScopeError`), as is a statement run without an organization (unless the session
  is the explicit ``system`` scope). Fail closed, like the ORM scope.

The scoped copy of a statement built once (a module constant) is cached, so each execution costs
one ``Connection.execute`` (about 0.08 ms on SQLCipher). The organization is a bound parameter
(:data:`ORG_PARAM`), taken from the session, never from the caller.
"""

from __future__ import annotations

import threading

from sqlalchemy import Table, and_, bindparam
from sqlalchemy.engine import Result
from sqlalchemy.orm import Session
from sqlalchemy.sql import visitors
from sqlalchemy.sql.selectable import Alias, FromClause, Join, Select, TableClause

from carepost.core.database import _org_scoped_tables
from carepost.core.errors import TenantScopeError

ORG_PARAM = "carepost_scope_org"

_cache: dict[int, tuple[Select, Select]] = {}  # id(statement) -> (statement, scoped copy)
_cache_lock = threading.Lock()


def _scoped_base(f: FromClause) -> TableClause | None:
    base = f.element if isinstance(f, Alias) else f
    if isinstance(base, Table) and base.name in _org_scoped_tables():
        return f
    return None


def _scope_from(f: FromClause, org, where: list) -> FromClause:
    """``f`` with the organization condition of every table joined in put into its ON clause;
    the conditions of the leftmost table are appended to ``where``."""
    if isinstance(f, Join):
        if f.full:
            raise TenantScopeError("a full outer join of organization data")
        left = _scope_from(f.left, org, where)
        on: list = []
        right = _scope_from(f.right, org, on)
        return Join(left, right, and_(f.onclause, *on) if on else f.onclause, isouter=f.isouter)
    if isinstance(f, TableClause):
        if _scoped_base(f) is not None:
            where.append(f.c.org_id == org)
        return f
    if isinstance(f, Alias) and isinstance(f.element, TableClause):
        if _scoped_base(f) is not None:
            where.append(f.c.org_id == org)
        return f
    raise TenantScopeError(f"organization scope of a {type(f).__name__} in FROM")


def scope_select(stmt: Select) -> Select:
    """The copy of ``stmt`` reading only the organization bound to :data:`ORG_PARAM`."""
    from sqlalchemy.sql.util import find_tables

    if not isinstance(stmt, Select):
        raise TenantScopeError("org_select runs SELECT statements only")
    scoped_tables = _org_scoped_tables()
    for element in visitors.iterate(stmt):
        if element is not stmt and isinstance(element, Select) and any(
                isinstance(t, Table) and t.name in scoped_tables for t in find_tables(element, include_aliases=True)):
            raise TenantScopeError("organization data read in a subquery (not scoped by org_select)")
    org = bindparam(ORG_PARAM)
    where: list = []
    for f in stmt.get_final_froms():
        _scope_from(f, org, where)  # checks every FROM; collects the leftmost tables' conditions

    def replace(element):
        if isinstance(element, Join):
            return _scope_from(element, org, [])  # conditions of joined tables into their ON clauses
        return None

    scoped = visitors.replacement_traverse(stmt, {}, replace)
    return scoped.where(*where) if where else scoped


def _cached(stmt: Select) -> Select:
    hit = _cache.get(id(stmt))
    if hit is not None and hit[0] is stmt:
        return hit[1]
    scoped = scope_select(stmt)
    with _cache_lock:
        if len(_cache) > 1000:
            _cache.clear()
        _cache[id(stmt)] = (stmt, scoped)  # holds stmt: its id cannot be reused while cached
    return scoped


def org_select(session: Session, stmt: Select, params: dict | None = None) -> Result:
    """Run a Core SELECT in ``session``'s organization (see the module docstring). Pass a statement
    built once (a module constant, its values as ``bindparam``s in ``params``): its scoped copy is
    cached by identity."""
    org_id = session.info.get("org_id")
    scoped = _cached(stmt)
    if org_id is None:
        if session.info.get("scope") != "system":
            raise TenantScopeError("query of organization data without an organization scope")
        raise TenantScopeError("org_select needs an organization's session (a system session has none)")
    return session.connection().execute(scoped, {**(params or {}), ORG_PARAM: org_id})
