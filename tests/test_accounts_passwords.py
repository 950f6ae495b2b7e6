"""Password rules (NIST 800-63B) and Argon2id hashing."""

from __future__ import annotations

import pytest

from carepost.accounts import passwords
from carepost.core.config import reset_settings
from carepost.core.errors import ValidationFailed


def test_common_password_list_is_shipped_with_the_package():
    common = passwords.common_passwords()
    assert len(common) >= 10_000
    assert "password" in common and "123456" in common


@pytest.mark.parametrize(
    "password, fragment",
    [
        ("", "Enter a password"),
        ("short pass", "at least 12"),
        ("x" * 257, "at most 256"),
        ("passwordpassword", "repeated"),
        ("zqzqzqzqzqzqzq", "repeated"),
        ("Password2024!", "too common"),
        ("!!baseball!!123", "too common"),
        ("iloveyou12345", "too common"),
        ("abcdefghijklmnop", "sequential"),
        ("1234567890123", "sequential"),
        ("ababababababab", "repeated"),
        ("MarthaHayes-winter-77", "name, email"),
        ("the bar clinic rocks", "name, email"),
        ("tab\there-and-more", "control characters"),
    ],
)
def test_weak_passwords_are_refused_with_a_reason(password, fragment):
    problem = passwords.password_problem(password, email="martha.hayes@example.test", org_name="Bar Clinic",
                                         display_name="Martha Hayes")
    assert problem is not None and fragment in problem


@pytest.mark.parametrize("password", ["correct horse battery staple", "Tidal-Lantern-Quartz-91", "ünïcödé pässwörd here", "x1" + "y" * 62 + "z9q"])
def test_long_passwords_without_composition_rules_are_accepted(password):
    assert passwords.password_problem(password, email="martha@example.test", org_name="Bar Clinic") is None


def test_validate_names_the_field():
    with pytest.raises(ValidationFailed) as exc:
        passwords.validate_password("password", field="new_password")
    assert exc.value.field == "new_password" and exc.value.status_code == 422


def test_minimum_length_is_a_setting(monkeypatch):
    monkeypatch.setenv("CAREPOST_PASSWORD_MIN_LENGTH", "20")
    reset_settings()
    try:
        assert "at least 20" in passwords.password_problem("Tidal-Lantern-Quar")
        assert passwords.password_problem("Tidal-Lantern-Quartz") is None
    finally:
        monkeypatch.delenv("CAREPOST_PASSWORD_MIN_LENGTH")
        reset_settings()


def test_argon2id_hash_verifies_and_is_salted():
    h1 = passwords.hash_password("Tidal-Lantern-Quartz-91")
    h2 = passwords.hash_password("Tidal-Lantern-Quartz-91")
    assert h1.startswith("$argon2id$") and h1 != h2
    assert passwords.verify_password(h1, "Tidal-Lantern-Quartz-91")
    assert not passwords.verify_password(h1, "Tidal-Lantern-Quartz-92")
    assert not passwords.verify_password(None, "anything at all")
    assert not passwords.verify_password("not-a-hash", "anything at all")


def test_unicode_is_normalized_before_hashing():
    composed, decomposed = "caf\u00e9-lantern-quartz", "cafe\u0301-lantern-quartz"
    assert passwords.verify_password(passwords.hash_password(composed), decomposed)


def test_rehash_needed_when_parameters_change(monkeypatch):
    old = passwords.hash_password("Tidal-Lantern-Quartz-91")
    assert not passwords.needs_rehash(old)
    monkeypatch.setenv("CAREPOST_ARGON2_TIME_COST", "2")
    reset_settings()
    try:
        assert passwords.needs_rehash(old)
        assert passwords.verify_password(old, "Tidal-Lantern-Quartz-91")  # old hashes keep working
        assert ",t=2," not in old and "t=2" in passwords.hash_password("x")
    finally:
        monkeypatch.setenv("CAREPOST_ARGON2_TIME_COST", "1")
        reset_settings()
