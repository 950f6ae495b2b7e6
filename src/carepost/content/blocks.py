"""Dynamic content blocks: parts of a template shown only to recipients matching a condition.

Syntax (a Jinja tag of CarePost's sandbox, :class:`carepost.content.rendering.BlockIf`)::

    {% block_if 'has condition in valueset "diabetes"' %}
      <p>Our diabetes education class starts in May.</p>
    {% endblock_if %}

The condition is written in the segment language (docs/segments.md). Rendering never evaluates
it per recipient: :func:`plan` evaluates each block's condition **set-wise** for a chunk of
contact ids — one SQL query per block per chunk, compiled by the segments capability — and
returns which contacts see which blocks; the render of each message is handed that set.

Segments sit above content in the layers, so the composition root fills the two ports with
``carepost.segments.blocks``.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from carepost.core.ports import Port

check_condition = Port(
    "content.check_block_condition",
    "check(condition_text, field) -> None; raises ValidationFailed naming field (segments.blocks.check).",
)
block_members = Port(
    "content.block_members",
    "members(session, org_id, condition_text, contact_ids) -> set of the ids matching (one SQL; segments.blocks.members).",
)


def plan(session: Session, org_id: str, conditions: dict[str, str], contact_ids: list[str]) -> dict[str, frozenset[str]]:
    """``{contact_id: keys of the blocks that contact sees}`` for one chunk of contacts.

    ``conditions`` is ``{block key: condition}`` (``service.version_blocks``). One query per
    block for the whole chunk; every contact of the chunk is in the answer (an empty set when it
    sees no block).
    """
    seen: dict[str, set[str]] = {cid: set() for cid in contact_ids}
    if not contact_ids:
        return {}
    for key, condition in conditions.items():
        for contact_id in block_members(session, org_id, condition, list(contact_ids)):
            if contact_id in seen:
                seen[contact_id].add(key)
    return {cid: frozenset(keys) for cid, keys in seen.items()}
