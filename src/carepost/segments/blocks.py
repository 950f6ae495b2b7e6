"""The segment language inside message templates: content's dynamic blocks.

``content.blocks`` declares two ports (content sits below segments); the composition root fills
them with these functions. A block's condition is any segment query; :func:`members` runs it as
one ``SELECT contacts.id ... WHERE <condition> AND id IN (<chunk>)`` — set-wise, never one query
per recipient.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from carepost.core.errors import ValidationFailed
from carepost.patients.models import Contact
from carepost.segments import compiler, language


def check(condition: str, field: str) -> None:
    """Parse a block's condition; a syntax error is a 422 naming the template part."""
    try:
        language.parse(condition)
    except ValidationFailed as exc:
        raise ValidationFailed(f"The dynamic block condition is not valid: {exc.message}", field=field,
                               code="block_condition_invalid") from None


def members(session: Session, org_id: str, condition: str, contact_ids: list[str]) -> set[str]:
    tree = language.parse(condition)
    compiled = compiler.compile_query(session, org_id, tree)
    return set(session.scalars(compiled.statement.where(Contact.org_id == org_id, Contact.id.in_(contact_ids))))
