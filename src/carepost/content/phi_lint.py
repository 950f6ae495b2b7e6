"""PHI lint for subject lines (and other header text) of messages that carry PHI.

A subject travels where the body does not: in inbox lists, notifications on a locked phone,
server logs, and outside the encryption of clients that ignore header protection. So a message
marked as carrying PHI may not put PHI in its subject, on every path — the raw API, SMTP
submission and templates alike (ARCHITECTURE.md section 5).

This is a lint, not a proof: it refuses what most often leaks — the recipient's own name, an
email address, dates (of birth or of service), numbers long enough to be a record, account,
phone or social security number, and names of conditions, tests and treatments that disclose a
diagnosis. The refusal names the kind of finding, never the text (errors carry no PHI).
"""

from __future__ import annotations

import re
import unicodedata

_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("an email address", re.compile(r"[^\s@<>]+@[^\s@<>]+\.[a-z]{2,}", re.IGNORECASE)),
    ("a date", re.compile(
        r"\b\d{1,4}[/.-]\d{1,2}(?:[/.-]\d{2,4})?\b"
        rf"|\b{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?\b"
        rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTHS}(?:\s|$)", re.IGNORECASE)),
    ("a number that could identify a person (record, account, phone or social security number)",
     re.compile(r"\d(?:[\s().-]{0,2}\d){5,}")),
)
# Conditions, tests and treatments whose mere mention discloses health information. Generic
# words ("results", "appointment", "visit", "lab") are allowed: they say only that care exists.
CLINICAL_TERMS = (
    "hiv", "aids", "cancer", "tumor", "tumour", "oncology", "chemo", "chemotherapy", "radiation therapy", "biopsy",
    "malignant", "benign", "metasta", "leukemia", "lymphoma", "diabetes", "diabetic", "hba1c", "a1c", "insulin",
    "pregnan", "prenatal", "abortion", "miscarriage", "ivf", "fertility", "std", "sti", "hepatitis", "chlamydia",
    "gonorrh", "syphilis", "herpes", "hpv", "psychiatr", "depress", "anxiety", "bipolar", "schizo", "ptsd", "adhd",
    "autism", "dementia", "alzheimer", "suicid", "substance", "opioid", "methadone", "suboxone", "addiction",
    "alcohol", "overdose", "rehab", "dialysis", "kidney failure", "transplant", "hiv test", "positive", "diagnos",
    "prescription", "medication", "dosage", "covid",
)
_TERM_RE = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in CLINICAL_TERMS) + r")", re.IGNORECASE)
_NAME_STOP = {"dr", "mr", "mrs", "ms", "md", "the", "and", "of", "de", "la", "van", "von", "jr", "sr"}


_NAME_SPLIT = re.compile(r"[^\w'-]+")
_WORD_CHAR = re.compile(r"\w")


def _whole_word_in(token: str, text: str) -> bool:
    """``re.search(rf"(?<!\\w){re.escape(token)}(?!\\w)", text)`` without compiling a pattern per
    token (every recipient's name is new: the regex cache never hit, issue 11 item 7)."""
    start = text.find(token)
    while start >= 0:
        end = start + len(token)
        if (start == 0 or not _WORD_CHAR.match(text[start - 1])) and (end == len(text) or not _WORD_CHAR.match(text[end])):
            return True
        start = text.find(token, start + 1)
    return False


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text or "").casefold()


def findings(text: str, *, names: tuple[str, ...] | list[str] = ()) -> list[str]:
    """What in ``text`` looks like PHI, as kinds ("a date", ...), never the matched text."""
    folded = _fold(text)
    found = [label for label, pattern in _PATTERNS if pattern.search(folded)]
    for name in names:
        tokens = {t for t in _NAME_SPLIT.split(_fold(name)) if len(t) >= 2 and t not in _NAME_STOP}
        if any(_whole_word_in(t, folded) for t in tokens):
            found.append("the recipient's name")
            break
    if _TERM_RE.search(folded):
        found.append("a clinical term (a condition, test or treatment)")
    return found


def check_subject(subject: str, *, names=(), field: str = "subject") -> None:
    """Refuse a PHI-carrying message's subject that shows PHI; the error names the kind only."""
    from carepost.core.errors import ValidationFailed

    found = findings(subject, names=names)
    if found:
        raise ValidationFailed(
            f"The subject of a message that carries PHI may not contain {found[0]}: subjects are shown outside the "
            "protected content (inbox lists, notifications). Put it in the body, or mark the message contains_phi: "
            "false if it carries none.", field=field)


# --------------------------------------------------------------------------- templates: minimum necessary


def check_header_text(text: str, field: str, what: str) -> None:
    """From-name and portal notice: shown outside the protected content, so never PHI."""
    from carepost.core.errors import ValidationFailed

    found = findings(text)
    if found:
        raise ValidationFailed(f"The {what} may not contain {found[0]}: it is shown outside the protected content.",
                               field=field)


def check_helpers(used: dict[str, tuple[str, int]], *, purpose: str | None, declared: list[str] | None) -> None:
    """Refuse helpers beyond the minimum necessary for the template's purpose.

    ``used``: ``{helper name: (field, line)}`` of the merge-field helpers the template uses.
    ``declared``: the helpers the template says it may use (its data declaration), or None.
    The error names the field (``template.html``) and the helper, never data.
    """
    from carepost.content.helpers import DEFAULT_CATEGORIES, HELPERS, PURPOSE_CATEGORIES
    from carepost.core.errors import ValidationFailed

    allowed = PURPOSE_CATEGORIES.get(purpose or "", DEFAULT_CATEGORIES)
    for name, (field, line) in sorted(used.items(), key=lambda kv: (kv[1][0], kv[1][1])):
        helper = HELPERS[name]
        if declared is not None and name not in declared:
            raise ValidationFailed(
                f"The template uses the helper {name} ({field}, line {line}) but does not declare it in data_uses.",
                field=field, code="helper_not_declared")
        if helper.category not in allowed:
            raise ValidationFailed(
                f"A template with the purpose {purpose or '(none)'} may not use the helper {name} ({field}, line "
                f"{line}): it reveals {helper.category.replace('_', ' ')}, beyond the minimum necessary for this "
                f"purpose (allowed: {', '.join(allowed)}).", field=field, code="phi_beyond_purpose")
