"""The answer to a sender's portal question is a secret: it is hashed (Argon2id) the moment a
message is accepted, before anything is written, and never stored readable — not in
``messages.portal_enc`` (encrypted, but decryptable by anyone holding the keys), not in the
portal copy. The portal compares a recipient's answer with the hash, ignoring case, Unicode
composition and spacing.

This lives in ``delivery`` (below ``portal``) because acceptance hashes, and the portal imports
:func:`normalize_answer` from here so both sides normalize the same way.
"""

from __future__ import annotations

import unicodedata

from carepost.core.errors import ValidationFailed

MIN_ANSWER_CHARS = 2
MAX_ANSWER_CHARS = 200
HASH_PREFIX = "$argon2id$"


def normalize_answer(answer: str) -> str:
    """Answers compare ignoring case, accents' composition and spacing: " Blue  Heron" == "blue heron"."""
    text = unicodedata.normalize("NFKC", answer or "").casefold()
    return " ".join(text.split())


def hash_answer(answer: str, *, field: str = "portal.answer") -> str:
    """The Argon2id hash of the normalized answer; refuses a missing, short or long answer."""
    from carepost.accounts.passwords import hasher

    normalized = normalize_answer(answer or "")
    if len(normalized) < MIN_ANSWER_CHARS:
        raise ValidationFailed("The answer to the portal question is missing or too short.", field=field)
    if len(normalized) > MAX_ANSWER_CHARS:
        raise ValidationFailed(f"The answer is longer than {MAX_ANSWER_CHARS} characters.", field=field)
    return hasher().hash(normalized)


def is_answer_hash(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(HASH_PREFIX) and len(value) < 200


def protect(portal: dict | None, memo: dict[str, str] | None = None) -> dict | None:
    """The sender's portal options with ``answer`` replaced by ``answer_hash``. ``memo`` reuses one
    hash for the same answer within a batch (Argon2id is deliberately slow)."""
    if not portal or portal.get("answer") is None:
        return portal
    out = {k: v for k, v in portal.items() if k != "answer"}
    answer = portal["answer"]
    memo = {} if memo is None else memo
    if answer not in memo:
        memo[answer] = hash_answer(answer)
    out["answer_hash"] = memo[answer]
    return out
