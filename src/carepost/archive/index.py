"""The keyed word index of the archive (docs/archive.md "Searching encrypted bodies").

Subjects and bodies are stored encrypted (AES-GCM under the organization's data key); to find a
message by a word without a clear-text copy, each distinct normalized word of the subject and the
text (or the HTML with its tags removed) becomes ``HMAC-SHA256(search key, "w\\0" + word)``,
truncated to 32 hex characters, kept in ``archive_terms`` per message. A search turns its words
into tokens the same way and matches them exactly. Whole words only: no prefixes, wildcards,
phrases or fuzzy matches (a token reveals nothing about the letters of its word).

:func:`index_messages` is what delivery's ``store_messages`` calls (through the port
``delivery.archive_index``) for each batch it stores: one INSERT (executemany) for the batch.
"""

from __future__ import annotations

import hashlib
import hmac
import html as html_lib
import re
import unicodedata

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from carepost.core.crypto import get_keyring

KEY_KIND = "search"
MIN_WORD, MAX_WORD = 2, 40
MAX_TOKENS_PER_MESSAGE = 5000  # a very long body indexes its first 5,000 distinct words

_WORD = re.compile(r"\w+", re.UNICODE)
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def words(text: str | None) -> list[str]:
    """The distinct indexable words of ``text``, in order of first appearance."""
    if not text:
        return []
    seen: dict[str, None] = {}
    for word in _WORD.findall(normalize(text)):
        if MIN_WORD <= len(word) <= MAX_WORD and word not in seen:
            seen[word] = None
    return list(seen)


def html_text(markup: str | None) -> str:
    if not markup:
        return ""
    return html_lib.unescape(_TAG.sub(" ", markup))


def token(key: bytes, word: str) -> str:
    return hmac.new(key, b"w\x00" + word.encode(), hashlib.sha256).hexdigest()[:32]


def search_key(session: Session, org_id: str) -> tuple[int, bytes]:
    return get_keyring().named_key_version(session, org_id, KEY_KIND)


def search_keys(session: Session, org_id: str) -> list[tuple[int, bytes]]:
    """Every live version of the search key, newest first (rows indexed before a rotation keep
    their version until ``carepost archive reindex`` rewrites them)."""
    return get_keyring().named_keys(session, org_id, KEY_KIND)


def message_words(subject: str | None, text: str | None, html: str | None) -> list[str]:
    body = text if text else html_text(html)
    found = words(subject)
    seen = set(found)
    for word in words(body):
        if word not in seen:
            seen.add(word)
            found.append(word)
    return found[:MAX_TOKENS_PER_MESSAGE]


def index_messages(session: Session, org_id: str, items: list[tuple[str, str | None, str | None, str | None]]) -> int:
    """Index a batch of stored messages: ``items`` is ``(message id, subject, text, html)`` each.
    One INSERT (executemany) for the whole batch; returns the number of tokens written."""
    if not items:
        return 0
    version, key = search_key(session, org_id)
    memo: dict[str, str] = {}
    rows = []
    for message_id, subject, text, html in items:
        for word in message_words(subject, text, html):
            tok = memo.get(word)
            if tok is None:
                tok = memo[word] = token(key, word)
            rows.append((org_id, message_id, tok, version))
    if rows:
        _insert_rows(session, rows)
    return len(rows)


def _insert_rows(session: Session, rows: list[tuple]) -> None:
    """One executemany on the driver's cursor, in the session's transaction: tens of tokens per
    message make SQLAlchemy's per-row parameter handling the larger part of the hook's cost
    (bench/archive_index.py), so the plain tuples go to the DBAPI directly."""
    connection = session.connection()
    mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    sql = (f"INSERT INTO archive_terms (org_id, message_id, token, key_version) "
           f"VALUES ({mark}, {mark}, {mark}, {mark})")
    cursor = connection.connection.cursor()
    try:
        cursor.executemany(sql, rows)
    finally:
        cursor.close()


def query_tokens(session: Session, org_id: str, query_words: list[str]) -> list[list[str]]:
    """Per query word, its tokens under every live search key version."""
    keys = search_keys(session, org_id)
    return [[token(key, w) for _v, key in keys] for w in query_words]


def backfill(session: Session, org_id: str, *, batch: int = 500, rebuild: bool = False,
             progress=None) -> tuple[int, int]:
    """Index the organization's messages that have no token yet (or all of them with
    ``rebuild``: their tokens are rewritten under the current key). Commits per batch, so an
    interrupted run resumes where it stopped. Returns (messages indexed, tokens written)."""
    from carepost.archive.models import ArchiveTerm
    from carepost.delivery.models import Message

    ring = get_keyring()
    decrypt = ring.text_decryptor(session, org_id)
    mt = Message.__tablename__
    done_messages = done_tokens = 0
    after = ""
    while True:
        q = select(Message.id, Message.subject_enc, Message.text_enc, Message.html_enc).where(
            Message.org_id == org_id, Message.id > after).order_by(Message.id).limit(batch)
        if not rebuild:
            q = q.where(~select(ArchiveTerm.message_id).where(ArchiveTerm.message_id == Message.id).exists())
        rows = session.execute(q).all()
        if not rows:
            break
        after = rows[-1][0]
        ids = [r[0] for r in rows]
        if rebuild:
            session.execute(delete(ArchiveTerm).where(ArchiveTerm.message_id.in_(ids)))
        items = [(mid, decrypt(mt, "subject", mid, s), decrypt(mt, "text", mid, t), decrypt(mt, "html", mid, h))
                 for mid, s, t, h in rows]
        done_tokens += index_messages(session, org_id, items)
        done_messages += len(rows)
        session.commit()
        if progress:
            progress(done_messages, done_tokens)
    return done_messages, done_tokens
