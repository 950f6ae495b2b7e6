"""The suppression list: addresses CarePost must not send to (everything, all marketing, or one topic).

It lives in delivery because both sides of the message path write it and read it downward:
delivery's bounce and complaint handling adds to it and the pipeline checks it before every send;
consent (above) adds unsubscribes, imports and exports lists, and lifts entries. Suppressions are
address-level: keyed by the keyed blind index of the address (kind ``email``), so they survive
patient deletion and re-import and apply to addresses that match no contact.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import NotFound, ValidationFailed
from carepost.core.ids import new_id
from carepost.delivery.models import SUPPRESSION_REASONS, SUPPRESSION_SCOPES, Suppression

# When two reasons apply to one address, the stronger one is reported and kept.
REASON_STRENGTH = {"legal_hold": 6, "complaint": 5, "bounce_hard": 4, "unsubscribe": 3, "manual": 2, "bounce_soft": 1}


def address_index(session: Session, org_id: str, address: str) -> str:
    """The blind index suppressions are keyed by (kind ``email``, normalized)."""
    return get_keyring().blind_index(session, org_id, "email", address)


def _scope_key(scope: str, topic_id: str | None) -> str:
    return f"{scope}:{topic_id or ''}"


def _check_scope(scope: str, topic_id: str | None, reason: str | None = None) -> None:
    if reason is not None and reason not in SUPPRESSION_REASONS:
        raise ValidationFailed(f"reason must be one of {', '.join(SUPPRESSION_REASONS)}.", field="reason")
    if scope not in SUPPRESSION_SCOPES:
        raise ValidationFailed(f"scope must be one of {', '.join(SUPPRESSION_SCOPES)}.", field="scope")
    if scope == "topic" and not topic_id:
        raise ValidationFailed("A topic suppression needs a topic.", field="topic_id")
    if scope != "topic" and topic_id:
        raise ValidationFailed("Only a suppression of scope 'topic' names a topic.", field="topic_id")


def _active(now: datetime):
    return or_(Suppression.expires_at.is_(None), Suppression.expires_at > now)


def add_suppression(
    session: Session,
    org_id: str,
    address: str,
    reason: str,
    scope: str = "all",
    topic_id: str | None = None,
    source: str = "",
    details: dict | None = None,
    *,
    expires_at: datetime | None = None,
    created_by: str | None = None,
    keep_address: bool = True,
) -> Suppression:
    """Suppress ``address`` (idempotent per organization, address, scope and topic).

    ``keep_address`` keeps an encrypted copy for the suppression list; the look-up itself only
    needs the blind index."""
    from carepost.accounts.service import normalize_email

    clean = normalize_email(address, "address")
    idx = address_index(session, org_id, clean)
    return _add(session, org_id, idx, clean if keep_address else None, reason, scope, topic_id, source, details,
                expires_at, created_by)


def add_suppression_by_index(
    session: Session,
    org_id: str,
    address_index: str,
    reason: str,
    scope: str = "all",
    topic_id: str | None = None,
    source: str = "",
    details: dict | None = None,
    *,
    expires_at: datetime | None = None,
    created_by: str | None = None,
) -> Suppression:
    """Suppress an address known only by its blind index (a deleted patient, a message recipient).
    The index was copied from a row the caller read: brought to the current index version if a
    blind-index rotation committed since (``carepost.core.reindex.current_copy``)."""
    from carepost.core.reindex import current_copy

    address_index = current_copy(session, org_id, address_index)
    return _add(session, org_id, address_index, None, reason, scope, topic_id, source, details, expires_at, created_by)


def _add(session, org_id, idx, clear, reason, scope, topic_id, source, details, expires_at, created_by) -> Suppression:
    _check_scope(scope, topic_id, reason)
    key = _scope_key(scope, topic_id)
    now = clock.now()
    q = select(Suppression).where(Suppression.org_id == org_id, Suppression.address_index == idx, Suppression.scope_key == key)
    row = session.scalars(q).first()
    if row is None:
        row = Suppression(id=new_id(), org_id=org_id, address_index=idx, reason=reason, scope=scope, topic_id=topic_id,
                          scope_key=key, source=(source or "")[:64], details=dict(details or {}), created_by=created_by,
                          created_at=now, updated_at=now, expires_at=expires_at)
        if clear:
            row.address_enc = get_keyring().encrypt(session, org_id, Suppression.__tablename__, "address", row.id, clear)
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            # Another transaction suppressed the same address a moment ago: use its row.
            row = session.scalars(q).one()
        else:
            return row
    _merge(session, row, clear, reason, source, details, expires_at, now)
    return row


def _merge(session, row: Suppression, clear, reason, source, details, expires_at, now) -> None:
    """Re-adding an existing suppression: renew an expired one, keep the stronger reason and the
    longer life (``None`` = for ever)."""
    expired = row.expires_at is not None and _aware(row.expires_at) <= now
    if expired or REASON_STRENGTH[reason] > REASON_STRENGTH.get(row.reason, 0):
        row.reason = reason
        row.source = (source or row.source or "")[:64]
        if details:
            row.details = dict(details)
    if expired:
        row.expires_at = expires_at
        row.created_at = now
    elif row.expires_at is not None and (expires_at is None or _aware(expires_at) > _aware(row.expires_at)):
        row.expires_at = expires_at
    if clear and row.address_enc is None:
        row.address_enc = get_keyring().encrypt(session, row.org_id, Suppression.__tablename__, "address", row.id, clear)
    row.updated_at = now
    session.flush()


def _aware(value: datetime) -> datetime:
    from datetime import timezone

    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def suppression_reason(session: Session, org_id: str, indexes: Iterable[str], scope: str = "all",
                       topic_id: str | None = None, at: datetime | None = None) -> dict[str, Suppression]:
    """For each blind index, the strongest suppression that applies to a message of ``scope``
    (``all`` = every message incl. transactional: only scope-all suppressions apply; ``marketing``
    adds marketing-wide ones) and, when ``topic_id`` is given, that topic's."""
    idx = list(dict.fromkeys(indexes))
    if not idx:
        return {}
    if scope not in ("all", "marketing"):
        raise ValidationFailed("scope must be 'all' or 'marketing'.", field="scope")
    keys = ["all:"]
    if scope == "marketing":
        keys.append("marketing:")
    if topic_id:
        keys.append(_scope_key("topic", topic_id))
    now = at or clock.now()
    best: dict[str, Suppression] = {}
    for i in range(0, len(idx), 900):
        rows = session.scalars(
            select(Suppression).where(
                Suppression.org_id == org_id,
                Suppression.address_index.in_(idx[i : i + 900]),
                Suppression.scope_key.in_(keys),
                _active(now),
            )
        )
        for row in rows:
            cur = best.get(row.address_index)
            if cur is None or _rank(row) > _rank(cur):
                best[row.address_index] = row
    return best


def _rank(row: Suppression) -> tuple[int, int]:
    # bounces, complaints, holds and manual entries outrank an unsubscribe; a wider scope wins a tie
    return (REASON_STRENGTH.get(row.reason, 0), {"all": 3, "marketing": 2, "topic": 1}.get(row.scope, 0))


def is_suppressed(session: Session, org_id: str, address: str, scope: str = "all", topic_id: str | None = None,
                  *, at: datetime | None = None) -> str | None:
    """The reason ``address`` must not get a message of ``scope`` (and ``topic_id``), or None."""
    idx = address_index(session, org_id, address)
    found = suppression_reason(session, org_id, [idx], scope, topic_id, at).get(idx)
    return found.reason if found else None


def remove_suppression(session: Session, org_id: str, address: str | None = None, scope: str = "all",
                       topic_id: str | None = None, *, suppression_id: str | None = None,
                       allow_legal_hold: bool = False) -> int:
    """Lift a suppression by address (and scope/topic) or by id. A legal hold is lifted only
    when the caller says so explicitly. Returns how many rows were removed."""
    q = select(Suppression).where(Suppression.org_id == org_id)
    if suppression_id:
        q = q.where(Suppression.id == suppression_id)
    elif address:
        _check_scope(scope, topic_id)
        q = q.where(Suppression.address_index == address_index(session, org_id, address),
                    Suppression.scope_key == _scope_key(scope, topic_id))
    else:
        raise ValidationFailed("Name the address or the suppression to remove.", field="address")
    rows = list(session.scalars(q))
    if suppression_id and not rows:
        raise NotFound("No such suppression.", field="id")
    for row in rows:
        if row.reason == "legal_hold" and not allow_legal_hold:
            raise ValidationFailed("This address is under a legal hold; lifting it needs an explicit release.",
                                   field="reason")
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)


def suppression_address(session: Session, row: Suppression) -> str | None:
    """The clear-text address of a suppression when a copy was kept (decrypted in memory)."""
    return get_keyring().decrypt_text(session, row.org_id, Suppression.__tablename__, "address", row.id, row.address_enc)
