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


# The same format as a JSON Schema pattern, for request schemas: the OpenAPI document states it
# and the API refuses anything else with 422 naming the field (issue 9 item 28).
ID_PATTERN = _ID_RE.pattern
# A topic named by its id or its short name (``TopicIn.key``): lower-case letters, digits, _ and -.
TOPIC_REF_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"


def is_id(value: str) -> bool:
    return bool(_ID_RE.match(value or ""))


# The first id CarePost can have issued (before the project existed) and how far ahead of this
# machine's clock another machine's may run. Used where "looks like an id" is not enough.
ISSUED_SINCE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
CLOCK_SKEW_MS = 24 * 3600 * 1000


def is_issued_id(value: str) -> bool:
    """True for what :func:`new_id` makes: 32 lowercase hex whose 48-bit prefix is a millisecond
    time between ``ISSUED_SINCE_MS`` and one day past now.

    Why stricter than :func:`is_id`: the queue guard must not let a 32-hex *value* through — an
    MD5 of an e-mail address or a hex-encoded date of birth carries PHI in id clothing. Such a
    value has a random prefix, which falls inside the window with odds of about 1 in 1,000 a
    year of window; all-zero and all-``f`` strings never do."""
    if not is_id(value):
        return False
    ms = int(value[:12], 16)
    return ISSUED_SINCE_MS <= ms <= int(time.time() * 1000) + CLOCK_SKEW_MS


def slugify(name: str) -> str:
    """"Bar Clinic" -> "bar-clinic": ASCII, lowercase, hyphenated."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()
    return text or "org"
