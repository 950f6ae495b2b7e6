"""Password rules and hashing (NIST SP 800-63B section 3.1.1, OWASP ASVS 5.0 V6).

* Length, not composition: at least ``CAREPOST_PASSWORD_MIN_LENGTH`` characters (default 12 —
  NIST allows 8 with MFA, and CarePost always requires MFA), up to
  ``CAREPOST_PASSWORD_MAX_LENGTH`` (default 256; NIST asks for at least 64). Any printable
  Unicode is allowed, spaces included; nothing is truncated.
* Blocklist: common passwords shipped with the package (``data/common-passwords.txt``, 30,000
  entries from zxcvbn's frequency list), repeated or sequential characters, and passwords built
  from the person's email address or the organization's name.
* Argon2id (RFC 9106) with parameters from settings; a hash made with older parameters is
  replaced at the next successful sign-in.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from importlib import resources

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from carepost.core.config import get_settings
from carepost.core.errors import ValidationFailed

_SEQUENCES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm", "1qaz2wsx3edc4rfv5tgb6yhn")


@lru_cache
def common_passwords() -> frozenset[str]:
    text = resources.files("carepost.accounts").joinpath("data/common-passwords.txt").read_text("utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


@lru_cache
def _hasher(time_cost: int, memory_cost: int, parallelism: int) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=Type.ID)


def hasher() -> PasswordHasher:
    s = get_settings()
    return _hasher(s.argon2_time_cost, s.argon2_memory_cost, s.argon2_parallelism)


def _normalize(password: str) -> str:
    # NIST 800-63B 5.1.1.2: apply Unicode normalization (NFKC) before hashing.
    return unicodedata.normalize("NFKC", password)


def _is_trivial(lowered: str) -> bool:
    """One character repeated, a short pattern repeated, or a run of a keyboard/alphabet sequence."""
    if len(set(lowered)) <= 2:
        return True
    if lowered in (lowered + lowered)[1:-1]:  # a whole unit repeated: "abcabcabcabc", "passwordpassword"
        return True
    for size in range(1, 5):  # a short unit repeated with a partial tail: "ababababa"
        unit = lowered[:size]
        if unit * (len(lowered) // size) + unit[: len(lowered) % size] == lowered:
            return True
    return any(lowered in seq * 3 or lowered in (seq * 3)[::-1] for seq in _SEQUENCES)


def _base_word(lowered: str) -> str:
    """The password without the digits and symbols people append or prepend ("password2024!")."""
    return re.sub(r"^[\d\W_]+|[\d\W_]+$", "", lowered)


def password_problem(password: str, *, email: str | None = None, org_name: str | None = None,
                     display_name: str | None = None) -> str | None:
    """Why ``password`` is refused, in words a person can act on, or None when it is fine."""
    settings = get_settings()
    if not isinstance(password, str) or password == "":
        return "Enter a password."
    normalized = _normalize(password)
    if len(normalized) < settings.password_min_length:
        return f"Use at least {settings.password_min_length} characters (a few words make a good password)."
    if len(normalized) > settings.password_max_length:
        return f"Use at most {settings.password_max_length} characters."
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in normalized):
        return "The password contains control characters."
    lowered = normalized.lower()
    common = common_passwords()
    if lowered in common or _base_word(lowered) in common or lowered.replace(" ", "") in common:
        return "This password is too common. Choose one that others are unlikely to use."
    if _is_trivial(lowered):
        return "This password is a repeated or sequential pattern. Choose something less predictable."
    squashed = re.sub(r"[\W_]+", "", lowered)
    context = []
    if email:
        context.append(email.split("@", 1)[0].lower())
    if org_name:
        context.append(org_name.lower())
    if display_name:
        context.extend(part.lower() for part in display_name.split())
    for word in context:
        word_squashed = re.sub(r"[\W_]+", "", word)
        if len(word_squashed) >= 4 and word_squashed in squashed:
            return "Don't build the password from your name, email address or organization name."
    return None


def validate_password(password: str, *, email: str | None = None, org_name: str | None = None,
                      display_name: str | None = None, field: str = "password") -> None:
    problem = password_problem(password, email=email, org_name=org_name, display_name=display_name)
    if problem:
        raise ValidationFailed(problem, field=field)


def hash_password(password: str) -> str:
    return hasher().hash(_normalize(password))


def verify_password(password_hash: str | None, password: str) -> bool:
    """Constant work whether or not the account exists: an unknown user still costs one hash."""
    if not password_hash:
        _burn(password)
        return False
    try:
        return hasher().verify(password_hash, _normalize(password or ""))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@lru_cache
def _dummy_hash_for(time_cost: int, memory_cost: int, parallelism: int) -> str:
    return _hasher(time_cost, memory_cost, parallelism).hash("carepost-dummy-password")


def _dummy_hash() -> str:
    s = get_settings()
    return _dummy_hash_for(s.argon2_time_cost, s.argon2_memory_cost, s.argon2_parallelism)


def _burn(password: str) -> None:
    """Spend the time a real verification would (no user enumeration through timing)."""
    try:
        hasher().verify(_dummy_hash(), _normalize(password or "x"))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        pass


def needs_rehash(password_hash: str) -> bool:
    try:
        return hasher().check_needs_rehash(password_hash)
    except InvalidHashError:
        return True
