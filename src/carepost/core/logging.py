"""Structured logs (structlog) that never carry PHI.

Two layers, because either alone leaks: fields whose *name* says PHI or secret are dropped
whatever their value, and every remaining string is scanned for values that *look* like
identifiers (email addresses, SSNs, phone numbers, dates of birth, bearer secrets).
The same filter runs on the standard library's records (uvicorn, SQLAlchemy, Huey).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

REDACTED = "[redacted]"

# Field names that hold PHI or secrets; matched case-insensitively as whole names or suffixes.
SENSITIVE_KEYS = {
    "name", "given_name", "family_name", "first_name", "last_name", "full_name", "display_name",
    "email", "address", "addresses", "to", "cc", "bcc", "recipient", "recipients", "phone", "mobile",
    "street", "line", "mrn", "ssn", "identifier", "birth_date", "dob", "date_of_birth",
    "subject", "body", "html", "text", "preheader", "content", "message_body", "note", "notes",
    "password", "passcode", "secret", "token", "code", "otp", "totp", "api_key", "authorization",
    "cookie", "set-cookie", "signature", "answer", "key", "private_key", "data",
}
_SAFE_SUFFIXES = ("_id", "_count", "_at", "_type", "_kind", "_status", "_ms")

_PATTERNS = [
    re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"),  # email
    re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),  # SSN
    re.compile(r"(?<![\w-])\(?\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{4}\b"),  # US phone
    re.compile(r"\b(19|20)\d{2}-\d{2}-\d{2}\b(?!T)"),  # bare dates (birth dates)
    re.compile(r"\b(cp|whsec)_[A-Za-z0-9_\-]{8,}"),  # CarePost secrets
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-~+/=]+"),
]


def _key_is_sensitive(key: str) -> bool:
    k = key.lower()
    if k.endswith(_SAFE_SUFFIXES) or k in {"event", "level", "timestamp", "logger", "request_id", "method", "path_template"}:
        return False
    return k in SENSITIVE_KEYS or any(k.endswith("_" + s) for s in SENSITIVE_KEYS)


# --- secrets in URLs (issue 9 item 24). Link tokens travel in paths (/p/<token>, /t/u/<token>,
# /app/setup/<token>, /f/confirm/<token> ...) and query strings; whatever logs a URL (uvicorn's
# access and error logs, CarePost's events, a traceback) goes through :func:`scrub_urls`.
#
# * After a segment that introduces a link secret, every following segment that is not a plain
#   lowercase word ("confirm", "message", "thanks") is redacted.
# * Anywhere in a path, a segment that looks like a random token (20+ characters of base64url
#   with letters and digits or mixed case) is redacted; CarePost ids (32 lowercase hex) stay,
#   logs reference them.
# * Every query value is redacted; parameter names stay.
SECRET_PATH_MARKERS = frozenset({
    "p", "f", "t", "u", "setup", "enroll", "invite", "invitation", "invitations", "accept", "reset",
    "password-reset", "recover", "recovery", "unsubscribe", "confirm", "preferences", "revoke",
    "authorizations", "verify-email", "magic", "link", "links", "o", "c",
})
_WORD_SEGMENT = re.compile(r"^[a-z][a-z-]{0,23}$")
_TOKEN_SEGMENT = re.compile(r"^[A-Za-z0-9_\-~.=+%]{20,}$")
_CAREPOST_ID = re.compile(r"^[0-9a-f]{32}$")
_URLISH = re.compile(r"[^\s\"'<>()\[\]{}|\\^`]*[/?][^\s\"'<>()\[\]{}|\\^`]*")


def _looks_like_token(segment: str) -> bool:
    if not _TOKEN_SEGMENT.match(segment) or _CAREPOST_ID.match(segment):
        return False
    has_digit = any(c.isdigit() for c in segment)
    has_alpha = any(c.isalpha() for c in segment)
    mixed_case = any(c.isupper() for c in segment) and any(c.islower() for c in segment)
    return (has_digit and has_alpha) or mixed_case or "." in segment.strip(".")


def _scrub_path(path: str) -> str:
    segments = path.split("/")
    secret_follows = False
    for i, segment in enumerate(segments):
        if not segment:
            continue
        if secret_follows and not _WORD_SEGMENT.match(segment):
            segments[i] = REDACTED
            continue
        if _looks_like_token(segment):
            segments[i] = REDACTED
            continue
        if segment in SECRET_PATH_MARKERS and i > 0:
            secret_follows = True
    return "/".join(segments)


def _scrub_query(query: str) -> str:
    fragment = ""
    if "#" in query:
        query, fragment = query.split("#", 1)
        fragment = "#" + REDACTED
    parts = []
    for pair in query.split("&"):
        if not pair:
            parts.append(pair)
            continue
        name, sep, _value = pair.partition("=")
        parts.append(f"{name}={REDACTED}" if sep else REDACTED if _looks_like_token(name) or len(name) > 40 else name)
    return "&".join(parts) + fragment


def _scrub_url(match: re.Match) -> str:
    text = match.group(0)
    path, sep, query = text.partition("?")
    if "/" in path:
        path = _scrub_path(path)
    return path + (sep + _scrub_query(query) if sep else "")


def scrub_urls(text: str) -> str:
    """Redact link secrets and query values from every URL or path in ``text``."""
    if "/" not in text and "?" not in text:
        return text
    return _URLISH.sub(_scrub_url, text)


def scrub_text(text: str) -> str:
    text = scrub_urls(text)
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if _key_is_sensitive(str(k)) else scrub_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [scrub_value(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return scrub_text(str(value))


def redact_processor(_logger, _method, event_dict: dict) -> dict:
    return {
        k: (REDACTED if _key_is_sensitive(k) else scrub_value(v)) for k, v in event_dict.items()
    }


class RedactingFilter(logging.Filter):
    """Scrubs standard-library records (message and args) before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not crash logging
            message = str(record.msg)
        record.msg = scrub_text(message)
        record.args = ()
        # Tracebacks quote exception messages ("... for jane@example.org"): format them here,
        # scrubbed, so the handler's formatter uses this text instead of formatting its own.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_text(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub_text(record.stack_info)
        return True


_configured = False


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of writing (it is replaced by test
    runners and CLI runners; binding the object at configuration time would write to a stale one)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "INFO", json: bool = True, stream=None, access_log: bool = True) -> None:
    """``access_log`` False: uvicorn's access logger gets no handler at all (not the root's), so
    uvicorn makes no line per request (it looks only at whether that logger has handlers; it
    formats each line's arguments before the level is checked)."""
    global _configured
    stream = stream or _CurrentStderr()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.handlers = [handler]
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "huey", "sqlalchemy"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = access_log or name != "uvicorn.access"
    _configured = True


def get_logger(name: str | None = None):
    return structlog.get_logger(name)
