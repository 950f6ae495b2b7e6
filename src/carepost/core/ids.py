"""Identifiers: time-ordered, unguessable, generated before insert.

Ids are made by the application (not the database) because encrypted columns bind their
ciphertext to the row id as associated data, so the id must exist before the row does.
"""

from __future__ import annotations

import re
import secrets
import time
import unicodedata

ID_LENGTH = 32
_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def new_id() -> str:
    """48-bit millisecond timestamp + 80 random bits, as 32 hex characters (sortable by time)."""
    ms = int(time.time() * 1000) & ((1 << 48) - 1)
    return f"{ms:012x}{secrets.token_hex(10)}"


def is_id(value: str) -> bool:
    return bool(_ID_RE.match(value or ""))


def slugify(name: str) -> str:
    """"Bar Clinic" -> "bar-clinic": ASCII, lowercase, hyphenated."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()
    return text or "org"
