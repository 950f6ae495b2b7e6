"""The README's configuration table and docs/roles.md are generated from the code; these tests
fail when they drift (a new setting, a changed description, a new permission).

Regenerate both after changing Settings or permissions:

    .venv/bin/python -m tests.test_app_docs --write
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ROLES_DOC = ROOT / "docs" / "roles.md"
SETTINGS_BEGIN, SETTINGS_END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"
ROLES_BEGIN, ROLES_END = "<!-- roles-table:begin -->", "<!-- roles-table:end -->"
REGENERATE = "run `.venv/bin/python -m tests.test_app_docs --write`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(field) -> str:
    value = field.default
    if value is None:
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table() -> str:
    from carepost.core.config import Settings

    prefix = Settings.model_config.get("env_prefix", "CAREPOST_")
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `{prefix}{name.upper()}` | {_cell(_default(field))} | {_cell(field.description or '')} |")
    return "\n".join(rows)


def roles_table() -> str:
    from carepost.accounts.permissions import API_SCOPES, PHI_PERMISSIONS, ROLE_LABELS, ROLES, Permission

    roles = list(ROLES)
    header = "| Permission | " + " | ".join(ROLE_LABELS.get(r, r) for r in roles) + " | API scope | PHI |"
    rows = [header, "| --- | " + " | ".join(":-:" for _ in roles) + " | :-: | :-: |"]
    for perm in Permission:
        marks = " | ".join("✓" if perm in ROLES[r] else "" for r in roles)
        rows.append(
            f"| `{perm.value}` | {marks} | {'✓' if perm in API_SCOPES else ''} | {'✓' if perm in PHI_PERMISSIONS else ''} |"
        )
    return "\n".join(rows)


def _between(text: str, begin: str, end: str) -> str:
    match = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    assert match, f"markers {begin} ... {end} missing"
    return match.group(1)


def _replace_between(text: str, begin: str, end: str, body: str) -> str:
    return re.sub(re.escape(begin) + r"\n.*?\n" + re.escape(end), lambda _m: f"{begin}\n{body}\n{end}", text, flags=re.S)


def test_readme_lists_every_setting():
    from carepost.core.config import Settings

    table = _between(README.read_text(), SETTINGS_BEGIN, SETTINGS_END)
    missing = [f"CAREPOST_{n.upper()}" for n in Settings.model_fields if f"`CAREPOST_{n.upper()}`" not in table]
    assert not missing, f"README configuration table lacks {', '.join(missing)}: {REGENERATE}"
    assert table == settings_table(), f"README configuration table is out of date: {REGENERATE}"


def test_readme_lists_no_setting_that_does_not_exist():
    from carepost.core.config import Settings

    table = _between(README.read_text(), SETTINGS_BEGIN, SETTINGS_END)
    listed = set(re.findall(r"`(CAREPOST_[A-Z0-9_]+)`", table))
    known = {f"CAREPOST_{n.upper()}" for n in Settings.model_fields}
    assert listed <= known, f"README lists unknown settings {sorted(listed - known)}: {REGENERATE}"


def test_roles_doc_matches_the_permissions_code():
    assert _between(ROLES_DOC.read_text(), ROLES_BEGIN, ROLES_END) == roles_table(), f"docs/roles.md is out of date: {REGENERATE}"


def test_readme_quick_start_is_the_two_commands():
    text = README.read_text()
    quick = text[text.index("## Quick start"):]
    quick = quick[: quick.index("\n## ", 4)]
    assert "make run" in quick and "make test" in quick


def test_docs_the_readme_links_to_exist():
    for link in re.findall(r"\]\((docs/[^)#]+)", README.read_text()):
        assert (ROOT / link).exists(), link


def write() -> None:
    README.write_text(_replace_between(README.read_text(), SETTINGS_BEGIN, SETTINGS_END, settings_table()))
    ROLES_DOC.write_text(_replace_between(ROLES_DOC.read_text(), ROLES_BEGIN, ROLES_END, roles_table()))


if __name__ == "__main__":
    if "--write" in sys.argv:
        write()
        print(f"updated {README.relative_to(ROOT)} and {ROLES_DOC.relative_to(ROOT)}")
    else:
        print(settings_table())
        print()
        print(roles_table())
