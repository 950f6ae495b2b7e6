"""The segment language: one grammar, two forms (text and a JSON tree), converting losslessly.

Text, as a marketer types it::

    age between 50 and 75 and sex = female
      and not has observation loinc:24606-6 within 24 months
      and stage in (active, overdue)

The same query as a JSON tree (the UI builder and the API speak it)::

    {"and": [
      {"type": "field", "field": "age", "op": "between", "value": [50, 75]},
      {"type": "field", "field": "sex", "op": "=", "value": "female"},
      {"not": {"type": "has", "kind": "observation", "codes": ["loinc:24606-6"],
               "time": {"within": [24, "months"]}}},
      {"type": "field", "field": "stage", "op": "in", "value": ["active", "overdue"]}]}

:func:`parse` turns text into the tree (lark, LALR); :func:`to_text` prints a tree back;
:func:`validate` checks a tree that arrived as JSON with the same rules. ``to_text(validate(t))``
parses back to the same tree (a hypothesis test holds this). Every error names where it is —
line and column in text, the JSON path in a tree — what was found and what was expected, and
carries no value from the query beyond the offending token.

Checks here need no database: known fields and their value types, code systems and code
formats, list and nesting limits. What needs the organization's data (value sets, custom
attributes, other segments) is checked by the compiler, which reports the same positions
(parsed nodes carry a private ``_pos``; :func:`strip_positions` removes it).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from carepost.core.errors import ValidationFailed

# --------------------------------------------------------------------------- limits

MAX_TEXT = 20_000
MAX_DEPTH = 16  # nested groups (and/or/not/parentheses)
MAX_NODES = 300  # criteria and groups in one query
MAX_LIST = 500  # values in one list
MAX_STRING = 200
LOCATION_NAME_MAX = 120  # a location of the organization, by its name

# --------------------------------------------------------------------------- vocabulary

UNITS = {"day": "days", "days": "days", "week": "weeks", "weeks": "weeks", "month": "months",
         "months": "months", "year": "years", "years": "years"}
MAX_PERIOD = {"days": 36_500, "weeks": 5_200, "months": 1_200, "years": 100}

# Contact fields: name -> (value type, group, description). Types: text (case-insensitive
# equality), enum (exact, lowercase), number, date, boolean, zip, zip3.
CONTACT_FIELDS: dict[str, tuple[str, str]] = {
    "age": ("number", "Age in whole years at the evaluation date (or `age at DATE`)"),
    "birth_date": ("date", "Date of birth"),
    "sex": ("enum", "Administrative sex: female, male, other, unknown"),
    "gender_identity": ("text", "Gender identity"),
    "preferred_language": ("text", "Preferred language (BCP 47: en, es, ...)"),
    "time_zone": ("text", "IANA time zone"),
    "ethnicity": ("text", "Ethnicity"),
    "race": ("text", "Race"),
    "marital_status": ("text", "Marital status (M, S, D, W, ...)"),
    "education": ("text", "Education"),
    "employment_status": ("text", "Employment status"),
    "household_status": ("text", "Household status"),
    "income_band": ("text", "Income band"),
    "coverage_type": ("text", "Coverage type"),
    "coverage_plan": ("text", "Coverage plan"),
    "religion": ("text", "Religion"),
    "city": ("text", "City"),
    "state": ("text", "State (two letters)"),
    "zip": ("zip", "ZIP code (five digits; ZIP+4 codes match their first five)"),
    "zip3": ("zip3", "First three digits of the ZIP code"),
    "country": ("text", "Country (ISO 3166 alpha-2)"),
    "deceased": ("boolean", "Deceased (deceased contacts are excluded unless the query names this field)"),
    "stage": ("enum", "Care-journey stage (new, active, overdue, at_risk or an organization stage)"),
}
SEXES = ("female", "male", "other", "unknown")
TEXT_OPS = ("=", "!=", "in", "not in", "is empty", "is not empty")
ORDER_OPS = ("=", "!=", "<", "<=", ">", ">=", "between", "in", "not in", "is empty", "is not empty")
OPS_BY_TYPE = {
    "text": TEXT_OPS, "enum": TEXT_OPS, "zip": TEXT_OPS, "zip3": TEXT_OPS,
    "number": ORDER_OPS, "date": ORDER_OPS + ("time",),
    "boolean": ("=", "!=", "is empty", "is not empty"),
    "list": ("=", "!=", "in", "not in", "is empty", "is not empty"),
}
COMPARE_OPS = ("=", "!=", "<", "<=", ">", ">=")

# Kinds after ``has``: clinical facts, then engagement events.
CLINICAL_KINDS = ("condition", "medication", "procedure", "observation", "immunization", "encounter",
                  "hospitalization", "appointment", "care_plan")
ENGAGEMENT_KINDS = ("message_received", "message_delivered", "message_bounced", "portal_message_opened", "form_submitted",
                    "message_opened", "message_clicked")
# Opens and clicks (tracking's engagement events): a person's only, unless qualified "any" (privacy
# proxies and security scanners too); "in campaign" narrows them to one campaign's messages.
TRACKED_KINDS = ("message_opened", "message_clicked")
KINDS = CLINICAL_KINDS + ENGAGEMENT_KINDS
KIND_ALIASES = {k + "s": k for k in KINDS} | {"visit": "encounter", "visits": "encounter",
                                               "hospitalizations": "hospitalization", "careplan": "care_plan"}
QUALIFIERS = {
    "condition": ("active", "resolved"),
    "medication": ("active",),
    "care_plan": ("active",),
    "appointment": ("upcoming", "missed", "fulfilled", "cancelled"),
    "message_opened": ("any",),
    "message_clicked": ("any",),
}
CODED_KINDS = ("condition", "medication", "procedure", "observation", "immunization", "encounter",
               "hospitalization", "appointment", "care_plan")

# Code systems as the language names them -> the short names patients/fhir.py stores.
CODE_SYSTEMS: dict[str, tuple[str, ...]] = {
    "icd10": ("icd10cm", "icd10"),
    "icd10cm": ("icd10cm",),
    "snomed": ("snomed",),
    "sct": ("snomed",),
    "loinc": ("loinc",),
    "rxnorm": ("rxnorm",),
    "cvx": ("cvx",),
    "cpt": ("cpt",),
    "ndc": ("ndc",),
    "icd10pcs": ("icd10pcs",),
}
PREFIX_SYSTEMS = ("icd10", "icd10cm", "icd10pcs", "cpt", "ndc")
CODE_FORMATS = {
    "icd10": re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{0,4})?$"),
    "icd10cm": re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{0,4})?$"),
    "icd10pcs": re.compile(r"^[0-9A-HJ-NP-Z]{1,7}$"),
    "loinc": re.compile(r"^(\d{1,7}-\d|LP\d+-\d|LA\d+-\d)$"),
    "snomed": re.compile(r"^\d{6,18}$"),
    "sct": re.compile(r"^\d{6,18}$"),
    "rxnorm": re.compile(r"^\d{1,10}$"),
    "cvx": re.compile(r"^\d{1,3}$"),
    "cpt": re.compile(r"^[0-9A-Z]{1,5}$"),
    "ndc": re.compile(r"^[0-9-]{1,13}$"),
}
PREFIX_FORMAT = re.compile(r"^[0-9A-Z][0-9A-Z.]{0,7}$")

ENGAGEMENT_NOTE = "engagement"
KEY_RE = re.compile(r"^[A-Za-z0-9_.\- ]{1,100}$")
ATTR_RE = re.compile(r"^attr\.([a-z0-9_]{1,64})$")


# --------------------------------------------------------------------------- errors


class SegmentQueryError(ValidationFailed):
    """A query that is not valid: where (line/column or JSON path), what was found, what was expected."""

    code = "segment_query_invalid"

    def __init__(self, message: str, *, where: str = "query", line: int | None = None, column: int | None = None,
                 found: str | None = None, expected: list[str] | None = None):
        loc = f"line {line}, column {column}" if line is not None else where
        super().__init__(f"{loc}: {message}", field="query" if line is not None else where)
        self.line, self.column, self.found, self.expected = line, column, found, expected or []
        self.where = where

    def to_dict(self) -> dict:
        body = super().to_dict()
        if self.line is not None:
            body["line"], body["column"] = self.line, self.column
        if self.found is not None:
            body["found"] = self.found
        if self.expected:
            body["expected"] = self.expected
        return body


@dataclass
class Pos:
    line: int | None = None
    column: int | None = None
    path: str = "query"

    def error(self, message: str, found: str | None = None, expected: list[str] | None = None) -> SegmentQueryError:
        return SegmentQueryError(message, where=self.path, line=self.line, column=self.column, found=found,
                                 expected=expected)


def where_of(node: dict, path: str) -> Pos:
    p = node.get("_pos") if isinstance(node, dict) else None
    if p:
        return Pos(p[0], p[1], path)
    return Pos(None, None, path)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- grammar

GRAMMAR = r"""
start: expr

?expr: and_expr
     | expr _OR and_expr            -> or_
?and_expr: unary
     | and_expr _AND unary          -> and_
?unary: _NOT unary                  -> not_
     | "(" expr ")"
     | criterion

?criterion: field_crit
     | has_crit
     | last_crit
     | refill_crit
     | distance_crit
     | segment_crit
     | flag_crit

field_crit: field_ref CMP value               -> f_cmp
     | field_ref _BETWEEN value _AND value     -> f_between
     | field_ref _IN vlist                     -> f_in
     | field_ref _NOT _IN vlist                -> f_not_in
     | field_ref _IS _EMPTY                    -> f_empty
     | field_ref _IS _NOT _EMPTY               -> f_not_empty
     | field_ref time                          -> f_time
     | field_ref CHANGED time                  -> f_changed
     | NAME _FOR value                         -> f_for
     | NAME _TO value                          -> f_to
     | NAME _FROM value time?                  -> f_from

field_ref: NAME
     | NAME _AT DATE

flag_crit: NAME

has_crit: _HAS count? NAME NAME? codespec? campaignspec? time?
campaignspec: _IN CAMPAIGN STRING
count: _NO                                     -> c_no
     | _AT LEAST INT                           -> c_least
     | _AT MOST INT                            -> c_most
     | EXACTLY INT                             -> c_exactly

codespec: CODE                                 -> cs_codes
     | "(" CODE ("," CODE)* ")"                -> cs_codes
     | _IN VALUESET STRING                     -> cs_valueset

last_crit: LAST NAME codespec CMP NUMBER time?
refill_crit: REFILL DUE _WITHIN INT UNIT (_FOR codespec)?
distance_crit: _WITHIN NUMBER MILES _OF ZIPWORD value
     | _WITHIN NUMBER MILES _OF LOCATIONWORD STRING -> distance_location
segment_crit: _IN SEGMENT STRING

time: _WITHIN INT UNIT                         -> t_within
     | _IN NEXT INT UNIT                       -> t_next
     | _BEFORE DATE                            -> t_before
     | _AFTER DATE                             -> t_after
     | _SINCE DATE                             -> t_since
     | _BETWEEN DATE _AND DATE                 -> t_between

vlist: "(" value ("," value)* ")"
?value: STRING | DATE | NUMBER | NAME | CODE

CMP: "<=" | ">=" | "!=" | "=" | "<" | ">"
_OR: "or"i
_AND: "and"i
_NOT: "not"i
_IN: "in"i
_IS: "is"i
_EMPTY: "empty"i
_BETWEEN: "between"i
_AT: "at"i
_HAS: "has"i
_NO: "no"i
_FOR: "for"i
_TO: "to"i
_FROM: "from"i
_OF: "of"i
_WITHIN: "within"i
_BEFORE: "before"i
_AFTER: "after"i
_SINCE: "since"i
NEXT: "next"i
LEAST: "least"i
MOST: "most"i
EXACTLY: "exactly"i
VALUESET: "valueset"i
LAST: "last"i
REFILL: "refill"i
DUE: "due"i
MILES: "miles"i | "mile"i
ZIPWORD: "zip"i
LOCATIONWORD: "location"i
SEGMENT: "segment"i
CAMPAIGN: "campaign"i
CHANGED: "changed"i
UNIT: "days"i | "day"i | "weeks"i | "week"i | "months"i | "month"i | "years"i | "year"i

CODE.3: /[A-Za-z][A-Za-z0-9]*:[A-Za-z0-9][A-Za-z0-9.\-]*\*?/
DATE.2: /\d{4}-\d{2}-\d{2}(?![0-9A-Za-z_])/
NUMBER: /-?\d+(\.\d+)?([eE][-+]?\d+)?(?![A-Za-z_])/
INT: /\d+/
NAME: /[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)?/
STRING: /"([^"\\\n]|\\["\\])*"/

%import common.WS
%ignore WS
"""


@functools.cache
def _parser() -> Lark:
    """The LALR parser, built on the first parse (about 0.05 s of CPU): a process that never reads
    a segment query — the worker, most CLI commands — does not pay for it at start-up."""
    return Lark(GRAMMAR, parser="lalr", propagate_positions=True, maybe_placeholders=False)


READABLE = {
    "CMP": "a comparison (=, !=, <, <=, >, >=)", "NAME": "a name", "NUMBER": "a number", "INT": "a whole number",
    "DATE": "a date (YYYY-MM-DD)", "STRING": 'a quoted string ("...")', "CODE": "a code (system:code)",
    "UNIT": "days, weeks, months or years", "LPAR": "(", "RPAR": ")", "COMMA": ",", "$END": "end of query",
    "_OR": "or", "_AND": "and", "_NOT": "not", "_IN": "in", "_IS": "is", "_EMPTY": "empty", "_BETWEEN": "between",
    "_AT": "at", "_HAS": "has", "_NO": "no", "_FOR": "for", "_TO": "to", "_FROM": "from", "_OF": "of",
    "_WITHIN": "within", "_BEFORE": "before", "_AFTER": "after", "_SINCE": "since",
}


def _readable(names) -> list[str]:
    out = []
    for n in sorted(names):
        out.append(READABLE.get(n, n.lower().lstrip("_")))
    return sorted(set(out))


# --------------------------------------------------------------------------- text -> tree


def _unquote(tok: str) -> str:
    return re.sub(r"\\([\"\\])", r"\1", tok[1:-1])


def _tok_value(tok: Token) -> Any:
    """A literal as the JSON tree holds it: strings stay strings, numbers become numbers."""
    if tok.type == "STRING":
        return _unquote(str(tok))
    if tok.type == "NUMBER":
        text = str(tok)
        return float(text) if any(c in text for c in ".eE") else int(text)
    return str(tok)


def _typed_value(tok: Token, field: str) -> Any:
    """A NUMBER token compared with a text field (``zip = 02139``) keeps its digits as written."""
    ftype = CONTACT_FIELDS.get(field, ("attr",))[0]
    if tok.type == "NUMBER" and ftype not in ("number", "attr"):
        return str(tok)
    return _tok_value(tok)


def _pos(tok_or_meta) -> list[int]:
    return [tok_or_meta.line, tok_or_meta.column]


def _period(n_tok: Token, unit_tok: Token) -> list:
    return [int(n_tok), UNITS[str(unit_tok).lower()]]


@v_args(meta=True)
class _ToTree(Transformer):
    def start(self, meta, c):
        return c[0]

    def or_(self, meta, c):
        return {"or": _flatten("or", c), "_pos": _pos(meta)}

    def and_(self, meta, c):
        return {"and": _flatten("and", c), "_pos": _pos(meta)}

    def not_(self, meta, c):
        return {"not": c[0], "_pos": _pos(meta)}

    # ---- fields
    def field_ref(self, meta, c):
        ref = {"field": str(c[0]).lower() if not str(c[0]).startswith("attr.") else str(c[0])}
        if len(c) > 1:
            ref["at"] = str(c[1])
        return ref, c[0]

    def _field(self, meta, ref, op, value=None, **extra):
        fref, tok = ref
        node = {"type": "field", **fref, "op": op}
        if value is not None:
            node["value"] = value
        node.update(extra)
        node["_pos"] = _pos(tok)
        return node

    def f_cmp(self, meta, c):
        return self._field(meta, c[0], str(c[1]), _typed_value(c[2], c[0][0]["field"]))

    def f_between(self, meta, c):
        f = c[0][0]["field"]
        return self._field(meta, c[0], "between", [_typed_value(c[1], f), _typed_value(c[2], f)])

    def f_in(self, meta, c):
        return self._field(meta, c[0], "in", [_typed_value(t, c[0][0]["field"]) for t in c[1]])

    def f_not_in(self, meta, c):
        return self._field(meta, c[0], "not in", [_typed_value(t, c[0][0]["field"]) for t in c[1]])

    def f_empty(self, meta, c):
        return self._field(meta, c[0], "is empty")

    def f_not_empty(self, meta, c):
        return self._field(meta, c[0], "is not empty")

    def f_time(self, meta, c):
        fref, tok = c[0]
        if fref["field"] == "birthday":
            if "at" in fref or "within" not in c[1] and "next" not in c[1]:
                raise Pos(*_pos(tok)).error("birthday takes 'within N days' or 'in next N days'", found=str(tok))
            n, unit = c[1].get("within") or c[1].get("next")
            if unit != "days":
                raise Pos(*_pos(tok)).error("birthday windows are counted in days", found=unit, expected=["days"])
            return {"type": "birthday", "days": n, "_pos": _pos(tok)}
        return self._field(meta, c[0], "time", time=c[1])

    def f_changed(self, meta, c):
        fref, tok = c[0]
        if fref != {"field": "stage"}:
            raise Pos(*_pos(tok)).error("only 'stage changed' is known", found=str(tok), expected=["stage"])
        return {"type": "stage_changed", "time": c[2], "_pos": _pos(tok)}

    def f_for(self, meta, c):
        word = str(c[0]).lower()
        if word != "authorized":
            raise Pos(*_pos(c[0])).error(f"unknown criterion '{_short(c[0])}' before 'for'", found=str(c[0]),
                                         expected=["authorized"])
        return {"type": "authorized", "purpose": str(_tok_value(c[1])), "_pos": _pos(c[0])}

    def f_to(self, meta, c):
        word = str(c[0]).lower()
        if word != "subscribed":
            raise Pos(*_pos(c[0])).error(f"unknown criterion '{_short(c[0])}' before 'to'", found=str(c[0]),
                                         expected=["subscribed"])
        return {"type": "subscribed", "topic": str(_tok_value(c[1])), "_pos": _pos(c[0])}

    def f_from(self, meta, c):
        word = str(c[0]).lower()
        if word != "unsubscribed":
            raise Pos(*_pos(c[0])).error(f"unknown criterion '{_short(c[0])}' before 'from'", found=str(c[0]),
                                         expected=["unsubscribed"])
        node = {"type": "unsubscribed", "topic": str(_tok_value(c[1])), "_pos": _pos(c[0])}
        if len(c) > 2:
            node["time"] = c[2]
        return node

    def flag_crit(self, meta, c):
        word = str(c[0]).lower()
        if word == "suppressed":
            return {"type": "suppressed", "_pos": _pos(c[0])}
        if word == "deceased":
            return {"type": "field", "field": "deceased", "op": "=", "value": True, "_pos": _pos(c[0])}
        raise Pos(*_pos(c[0])).error(f"'{_short(c[0])}' is not a criterion by itself", found=str(c[0]),
                                     expected=["a comparison after a field", "suppressed", "deceased"])

    # ---- has
    def has_crit(self, meta, c):
        node: dict = {"type": "has", "_pos": _pos(meta)}
        items = list(c)
        if items and isinstance(items[0], tuple) and items[0][0] == "count":
            node["count"] = items.pop(0)[1]
        names = []
        while items and isinstance(items[0], Token) and items[0].type == "NAME":
            names.append(items.pop(0))
        qualifier = None
        if len(names) == 2:
            qualifier, kind_tok = names
        else:
            kind_tok = names[0]
        kind = KIND_ALIASES.get(str(kind_tok).lower(), str(kind_tok).lower())
        if kind not in KINDS:
            raise Pos(*_pos(kind_tok)).error(f"unknown kind '{_short(kind_tok)}' after 'has'", found=str(kind_tok),
                                             expected=list(KINDS))
        node["kind"] = kind
        if qualifier is not None:
            node["qualifier"] = str(qualifier).lower()
            node["_qpos"] = _pos(qualifier)
        for item in items:
            if isinstance(item, tuple) and item[0] == "codes":
                node.update(item[1])
            elif isinstance(item, tuple) and item[0] == "campaign":
                node["campaign"] = item[1]
            else:
                node["time"] = item
        return node

    def campaignspec(self, meta, c):
        return ("campaign", _unquote(str(c[1])))

    def c_no(self, meta, c):
        return ("count", ["=", 0])

    def c_least(self, meta, c):
        return ("count", [">=", int(c[1])])

    def c_most(self, meta, c):
        return ("count", ["<=", int(c[1])])

    def c_exactly(self, meta, c):
        return ("count", ["=", int(c[1])])

    def cs_codes(self, meta, c):
        return ("codes", {"codes": [str(t) for t in c]})

    def cs_valueset(self, meta, c):
        return ("codes", {"valueset": _unquote(str(c[1]))})

    def last_crit(self, meta, c):
        kind = KIND_ALIASES.get(str(c[1]).lower(), str(c[1]).lower())
        if kind != "observation":
            raise Pos(*_pos(c[1])).error("'last' applies to observations", found=str(c[1]), expected=["observation"])
        node = {"type": "last", "kind": "observation", **c[2][1], "op": str(c[3]), "value": _tok_value(c[4]),
                "_pos": _pos(meta)}
        if len(c) > 5:
            node["time"] = c[5]
        return node

    def refill_crit(self, meta, c):
        period = _period(c[2], c[3])
        if period[1] != "days":
            raise Pos(*_pos(c[3])).error("refill windows are counted in days", found=str(c[3]), expected=["days"])
        node = {"type": "refill_due", "days": period[0], "_pos": _pos(meta)}
        if len(c) > 4:
            node.update(c[4][1])
        return node

    def distance_crit(self, meta, c):
        zip_tok = c[3]
        zip5 = _unquote(str(zip_tok)) if zip_tok.type == "STRING" else str(zip_tok)
        return {"type": "distance", "miles": _tok_value(c[0]), "zip": zip5, "_pos": _pos(meta)}

    def distance_location(self, meta, c):
        return {"type": "distance", "miles": _tok_value(c[0]), "location": _unquote(str(c[3])), "_pos": _pos(meta)}

    def segment_crit(self, meta, c):
        return {"type": "segment", "segment": _unquote(str(c[1])), "_pos": _pos(meta)}

    # ---- time and lists
    def t_within(self, meta, c):
        return {"within": _period(c[0], c[1])}

    def t_next(self, meta, c):
        return {"next": _period(c[1], c[2])}

    def t_before(self, meta, c):
        return {"before": str(c[0])}

    def t_after(self, meta, c):
        return {"after": str(c[0])}

    def t_since(self, meta, c):
        return {"since": str(c[0])}

    def t_between(self, meta, c):
        return {"between": [str(c[0]), str(c[1])]}

    def vlist(self, meta, c):
        return list(c)


def _flatten(op: str, children: list) -> list:
    out = []
    for ch in children:
        if isinstance(ch, dict) and op in ch and "_paren" not in ch:
            out.extend(ch[op])
        else:
            out.append(ch)
    return out


def _check_parens(text: str) -> None:
    depth, line, col, in_str = 0, 1, 0, False
    prev = ""
    for ch in text:
        col += 1
        if ch == "\n":
            line, col = line + 1, 0
        if in_str:
            if ch == '"' and prev != "\\":
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise SegmentQueryError(f"nesting deeper than {MAX_DEPTH} levels", line=line, column=col, found="(")
        elif ch == ")":
            depth = max(0, depth - 1)
        prev = ch
    run = re.search(r"(?:\bnot\s+){%d}" % (MAX_DEPTH + 1), text, re.IGNORECASE)
    if run:
        offset = [m.start() for m in re.finditer(r"\bnot\b", run.group(0), re.IGNORECASE)][MAX_DEPTH] + run.start()
        line = text.count("\n", 0, offset) + 1
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        raise SegmentQueryError(f"nesting deeper than {MAX_DEPTH} levels", line=line, column=column, found="not")


def _end_of(text: str) -> tuple[int, int]:
    """Line and column just after the last character that is not white space."""
    body = text.rstrip()
    return body.count("\n") + 1, len(body.rsplit("\n", 1)[-1]) + 1


def parse(text: str) -> dict:
    """Text -> JSON tree (with private positions; see :func:`strip_positions`)."""
    if not isinstance(text, str):
        raise SegmentQueryError("the query must be text", where="query")
    if len(text) > MAX_TEXT:
        raise SegmentQueryError(f"the query is longer than {MAX_TEXT} characters", where="query")
    if not text.strip():
        raise SegmentQueryError("the query is empty", line=1, column=1, found="end of query", expected=["a criterion"])
    _check_parens(text)
    try:
        parsed = _parser().parse(text)
    except UnexpectedEOF as exc:
        line, column = _end_of(text)
        raise SegmentQueryError("the query ends too early", line=line, column=column, found="end of query",
                                expected=_readable(exc.expected)) from None
    except UnexpectedToken as exc:
        found = "end of query" if exc.token.type == "$END" else _short(exc.token)
        if exc.token.type == "$END" or not exc.line or exc.line < 1:
            line, column = _end_of(text)
        else:
            line, column = exc.line, exc.column
        raise SegmentQueryError(f"unexpected {found!r}", line=line, column=column, found=found,
                                expected=_readable(exc.accepts or exc.expected)) from None
    except UnexpectedCharacters as exc:
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        raise SegmentQueryError(f"unexpected character {ch!r}", line=exc.line, column=exc.column, found=ch,
                                expected=_readable(exc.allowed or [])) from None
    except UnexpectedInput as exc:  # pragma: no cover - the three above are the concrete kinds
        raise SegmentQueryError("the query cannot be read", line=exc.line, column=exc.column) from None
    try:
        tree = _ToTree().transform(parsed)
    except VisitError as exc:
        if isinstance(exc.orig_exc, SegmentQueryError):
            raise exc.orig_exc from None
        raise
    return validate(tree, keep_positions=True)


# --------------------------------------------------------------------------- validation (JSON trees)


def _check_period(value: Any, pos: Pos, what: str) -> list:
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], int)
            or isinstance(value[0], bool) or value[1] not in MAX_PERIOD):
        raise pos.error(f"{what} must be [whole number, unit]", found=_short(value), expected=list(MAX_PERIOD))
    if not 0 <= value[0] <= MAX_PERIOD[value[1]]:
        raise pos.error(f"{what} is out of range", found=str(value[0]))
    return [value[0], value[1]]


def _check_date(value: Any, pos: Pos, what: str = "date") -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise pos.error(f"{what} must be a date (YYYY-MM-DD)", found=_short(value), expected=["YYYY-MM-DD"])
    try:
        date.fromisoformat(value)
    except ValueError:
        raise pos.error(f"{what} is not a calendar date", found=value) from None
    return value


def _check_time(value: Any, pos: Pos) -> dict:
    if not isinstance(value, dict) or len(value) != 1:
        raise pos.error("a time window has exactly one of within, next, before, after, since, between",
                        found=_short(value), expected=["within", "next", "before", "after", "since", "between"])
    (key, v), = value.items()
    if key in ("within", "next"):
        return {key: _check_period(v, pos, key)}
    if key in ("before", "after", "since"):
        return {key: _check_date(v, pos, key)}
    if key == "between":
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise pos.error("between takes two dates", found=_short(v))
        a, b = _check_date(v[0], pos), _check_date(v[1], pos)
        if a > b:
            raise pos.error("the first date of between is after the second", found=f"{a} .. {b}")
        return {key: [a, b]}
    raise pos.error(f"unknown time window '{_short(key)}'", found=_short(key),
                    expected=["within", "next", "before", "after", "since", "between"])


def check_code(code: Any, pos: Pos, *, allow_prefix: bool = True) -> str:
    if not isinstance(code, str) or ":" not in code:
        raise pos.error("a code is written system:code", found=_short(code), expected=sorted(CODE_SYSTEMS))
    system, _, value = code.partition(":")
    system = system.lower()
    if system not in CODE_SYSTEMS:
        raise pos.error(f"unknown code system '{_short(system)}'", found=_short(system), expected=sorted(CODE_SYSTEMS))
    if value.endswith("*"):
        if system not in PREFIX_SYSTEMS or not allow_prefix:
            raise pos.error(f"prefix matching (*) is for {', '.join(PREFIX_SYSTEMS)} codes", found=_short(code))
        prefix = value[:-1].rstrip(".").upper()
        if not PREFIX_FORMAT.match(prefix or "-"):
            raise pos.error(f"'{_short(value)}' is not a valid {system} code prefix", found=_short(code))
        return f"{system}:{prefix}.*" if system.startswith("icd10") and system != "icd10pcs" else f"{system}:{prefix}*"
    norm = value.upper() if system.startswith("icd10") or system == "cpt" else value
    if not CODE_FORMATS[system].match(norm):
        raise pos.error(f"'{_short(value)}' is not a valid {system} code", found=_short(code))
    return f"{system}:{norm}"


def _check_codespec(node: dict, out: dict, pos: Pos, required: bool) -> None:
    if "codes" in node and "valueset" in node:
        raise pos.error("give either codes or a valueset, not both")
    if "codes" in node:
        codes = node["codes"]
        if not isinstance(codes, list) or not codes:
            raise pos.error("codes must be a non-empty list", found=_short(codes))
        if len(codes) > MAX_LIST:
            raise pos.error(f"more than {MAX_LIST} codes in one list")
        out["codes"] = [check_code(c, pos) for c in codes]
    elif "valueset" in node:
        key = node["valueset"]
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise pos.error("a value set is named by its key (letters, digits, _ . -)", found=_short(key))
        out["valueset"] = key
    elif required:
        raise pos.error("codes or a valueset are required here", expected=["codes", "valueset"])


def _check_scalar(value: Any, ftype: str, pos: Pos, field: str) -> Any:
    if isinstance(value, (dict, list)) or value is None:
        raise pos.error(f"{field} needs a single value", found=_short(value))
    if ftype == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise pos.error(f"{field} compares with a number", found=_short(value), expected=["a number"])
        if not math.isfinite(value) or abs(value) > 1e12:
            raise pos.error(f"{field}: number out of range", found=_short(value))
        return value
    if ftype == "date":
        return _check_date(value, pos, field)
    if ftype == "boolean":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise pos.error(f"{field} is true or false", found=_short(value), expected=["true", "false"])
        return value
    if isinstance(value, bool):
        raise pos.error(f"{field} compares with text", found=_short(value))
    text = str(value) if not isinstance(value, float) else repr(value)
    if len(text) > MAX_STRING:
        raise pos.error(f"{field}: value longer than {MAX_STRING} characters")
    if ftype == "zip":
        if not re.fullmatch(r"\d{5}", text):
            raise pos.error("zip compares with five digits", found=_short(text), expected=["five digits"])
    elif ftype == "zip3":
        if not re.fullmatch(r"\d{3}", text):
            raise pos.error("zip3 compares with three digits", found=_short(text), expected=["three digits"])
    elif ftype == "enum" and field == "sex":
        text = text.lower()
        if text not in SEXES:
            raise pos.error("sex is female, male, other or unknown", found=_short(text), expected=list(SEXES))
    elif ftype == "enum":
        text = text.lower()
    elif ftype == "list" or ftype == "text":
        pass
    return text


def _purposes() -> dict:
    try:
        from carepost.core.purposes import PURPOSES
    except ImportError:  # before the purposes moved to core
        from carepost.consent.purposes import PURPOSES
    return PURPOSES


def field_type(field: str) -> str | None:
    """The value type of a contact field; custom attributes (``attr.key``) are typed by the
    organization's definition, which the compiler checks ("attr" here)."""
    if field in CONTACT_FIELDS:
        return CONTACT_FIELDS[field][0]
    if ATTR_RE.match(field):
        return "attr"
    return None


def check_field_value(node: dict, ftype: str, pos: Pos) -> dict:
    """Check op and value of a field criterion against a value type (also used for custom
    attributes by the compiler once it knows their type)."""
    field, op = node["field"], node.get("op")
    out = {k: v for k, v in node.items() if k in ("type", "field", "at", "_pos")}
    if op not in OPS_BY_TYPE[ftype]:
        raise pos.error(f"'{_short(op)}' does not apply to {field}", found=_short(op), expected=list(OPS_BY_TYPE[ftype]))
    out["op"] = op
    value = node.get("value")
    if op in ("is empty", "is not empty"):
        if "value" in node:
            raise pos.error(f"'{op}' takes no value")
    elif op == "time":
        out["time"] = _check_time(node.get("time"), pos)
    elif op == "between":
        if not isinstance(value, list) or len(value) != 2:
            raise pos.error("between takes two values", found=_short(value))
        a, b = (_check_scalar(v, ftype, pos, field) for v in value)
        if a > b:
            raise pos.error("the low end of between is above the high end", found=f"{a} .. {b}")
        out["value"] = [a, b]
    elif op in ("in", "not in"):
        if not isinstance(value, list) or not value:
            raise pos.error(f"'{op}' takes a non-empty list", found=_short(value))
        if len(value) > MAX_LIST:
            raise pos.error(f"more than {MAX_LIST} values in one list")
        out["value"] = [_check_scalar(v, ftype, pos, field) for v in value]
    else:
        out["value"] = _check_scalar(value, ftype, pos, field)
    if "time" in node and op != "time":
        raise pos.error("a time window needs no comparison")
    return out


_ALLOWED_KEYS = {
    "field": {"type", "field", "op", "value", "at", "time"},
    "has": {"type", "kind", "qualifier", "codes", "valueset", "time", "count", "campaign"},
    "last": {"type", "kind", "codes", "valueset", "op", "value", "time"},
    "refill_due": {"type", "days", "codes", "valueset"},
    "birthday": {"type", "days"},
    "distance": {"type", "miles", "zip", "location"},
    "stage_changed": {"type", "time"},
    "authorized": {"type", "purpose"},
    "subscribed": {"type", "topic"},
    "unsubscribed": {"type", "topic", "time"},
    "suppressed": {"type"},
    "segment": {"type", "segment"},
}
CRITERION_TYPES = tuple(_ALLOWED_KEYS)


def _check_criterion(node: dict, pos: Pos) -> dict:
    ctype = node.get("type")
    if ctype not in _ALLOWED_KEYS:
        raise pos.error(f"unknown criterion type '{_short(ctype)}'", found=_short(ctype), expected=list(CRITERION_TYPES))
    extra = set(node) - _ALLOWED_KEYS[ctype] - {"_pos", "_qpos"}
    if extra:
        raise pos.error(f"unknown key '{_short(sorted(extra)[0])}' in a {ctype} criterion", found=sorted(extra)[0],
                        expected=sorted(_ALLOWED_KEYS[ctype]))
    out: dict = {"type": ctype}
    if "_pos" in node:
        out["_pos"] = node["_pos"]
    if ctype == "field":
        field = node.get("field")
        ftype = field_type(field) if isinstance(field, str) else None
        if ftype is None:
            raise pos.error(f"unknown field '{_short(field)}'", found=_short(field),
                            expected=sorted(CONTACT_FIELDS) + ["attr.<key>", "birthday"])
        if "at" in node:
            if field != "age":
                raise pos.error("'at DATE' applies to age only", found=field)
            _check_date(node["at"], pos, "at")
        if ftype == "attr":
            # Typed later by the compiler; the shape is checked here.
            out.update({k: v for k, v in node.items() if k in ("field", "op", "value", "time")})
            if node.get("op") not in OPS_BY_TYPE["date"] + ("in", "not in"):
                raise pos.error(f"unknown comparison '{_short(node.get('op'))}'", found=_short(node.get("op")))
            return out
        return check_field_value(node, ftype, pos)
    if ctype == "has":
        kind = node.get("kind")
        if kind not in KINDS:
            raise pos.error(f"unknown kind '{_short(kind)}' after 'has'", found=_short(kind), expected=list(KINDS))
        out["kind"] = kind
        if node.get("count") is not None:
            cnt = node["count"]
            if (not isinstance(cnt, list) or len(cnt) != 2 or cnt[0] not in ("=", ">=", "<=")
                    or not isinstance(cnt[1], int) or isinstance(cnt[1], bool) or not 0 <= cnt[1] <= 100_000):
                raise pos.error("count is [op, whole number] with op =, >= or <=", found=_short(cnt))
            out["count"] = [cnt[0], cnt[1]]
        if node.get("qualifier") is not None:
            q = node["qualifier"]
            qpos = Pos(*node["_qpos"], pos.path) if node.get("_qpos") else pos
            if q not in QUALIFIERS.get(kind, ()):
                raise qpos.error(f"'{_short(q)}' does not qualify {kind}", found=_short(q),
                                 expected=list(QUALIFIERS.get(kind, ())))
            out["qualifier"] = q
        if kind in CODED_KINDS:
            _check_codespec(node, out, pos, required=False)
        elif "codes" in node or "valueset" in node:
            raise pos.error(f"{kind} takes no codes")
        if node.get("campaign") is not None:
            campaign = node["campaign"]
            if kind not in TRACKED_KINDS:
                raise pos.error(f"'in campaign' applies to {' and '.join(TRACKED_KINDS)}", found=kind,
                                expected=list(TRACKED_KINDS))
            if not isinstance(campaign, str) or not campaign.strip() or len(campaign) > 200:
                raise pos.error("campaign is a campaign's name or id (1 to 200 characters)", found=_short(campaign))
            out["campaign"] = campaign
        if node.get("time") is not None:
            out["time"] = _check_time(node["time"], pos)
        return out
    if ctype == "last":
        if node.get("kind", "observation") != "observation":
            raise pos.error("'last' applies to observations", found=_short(node.get("kind")), expected=["observation"])
        out["kind"] = "observation"
        _check_codespec(node, out, pos, required=True)
        if node.get("op") not in COMPARE_OPS:
            raise pos.error(f"unknown comparison '{_short(node.get('op'))}'", found=_short(node.get("op")),
                            expected=list(COMPARE_OPS))
        out["op"] = node["op"]
        out["value"] = _check_scalar(node.get("value"), "number", pos, "the observation value")
        if node.get("time") is not None:
            out["time"] = _check_time(node["time"], pos)
        return out
    if ctype in ("refill_due", "birthday"):
        days = node.get("days")
        if not isinstance(days, int) or isinstance(days, bool) or not 0 <= days <= 366:
            raise pos.error("days must be a whole number from 0 to 366", found=_short(days))
        out["days"] = days
        if ctype == "refill_due":
            _check_codespec(node, out, pos, required=False)
        return out
    if ctype == "distance":
        miles = node.get("miles")
        if isinstance(miles, bool) or not isinstance(miles, (int, float)) or not 0 <= miles <= 500:
            raise pos.error("miles must be a number from 0 to 500", found=_short(miles))
        if ("zip" in node) == ("location" in node):
            raise pos.error("a distance is measured from a zip or from a location of the organization, one of them",
                            expected=["zip", "location"])
        if "location" in node:
            name = node.get("location")
            if not isinstance(name, str) or not name.strip() or len(name) > LOCATION_NAME_MAX:
                raise pos.error(f"the location is the name of one of the organization's locations "
                                f"(1 to {LOCATION_NAME_MAX} characters)", found=_short(name))
            out.update(miles=miles, location=name)
            return out
        zip5 = str(node.get("zip"))
        if not re.fullmatch(r"\d{5}", zip5):
            raise pos.error("the ZIP code must be five digits", found=_short(zip5), expected=["five digits"])
        out.update(miles=miles, zip=zip5)
        return out
    if ctype == "stage_changed":
        out["time"] = _check_time(node.get("time"), pos)
        return out
    if ctype == "authorized":
        PURPOSES = _purposes()

        purpose = node.get("purpose")
        if purpose not in PURPOSES:
            raise pos.error(f"unknown purpose '{_short(purpose)}'", found=_short(purpose), expected=list(PURPOSES))
        out["purpose"] = purpose
        return out
    if ctype in ("subscribed", "unsubscribed"):
        topic = node.get("topic")
        if not isinstance(topic, str) or not KEY_RE.match(topic):
            raise pos.error("a topic is named by its key, or 'all'", found=_short(topic))
        out["topic"] = topic
        if ctype == "unsubscribed" and node.get("time") is not None:
            out["time"] = _check_time(node["time"], pos)
        return out
    if ctype == "suppressed":
        return out
    if ctype == "segment":
        ref = node.get("segment")
        if not isinstance(ref, str) or not 0 < len(ref) <= MAX_STRING or '"' in ref or "\\" in ref:
            raise pos.error("a segment is named by its id or name", found=_short(ref))
        out["segment"] = ref
        return out
    raise AssertionError(ctype)  # pragma: no cover


def validate(tree: Any, *, keep_positions: bool = False) -> dict:
    """Check a JSON tree; returns it normalized (codes upper-cased, enum values lower-cased)."""
    counter = [0]

    def walk(node: Any, path: str, depth: int) -> dict:
        pos = where_of(node, path)
        counter[0] += 1
        if counter[0] > MAX_NODES:
            raise pos.error(f"the query has more than {MAX_NODES} parts")
        if depth > MAX_DEPTH:
            raise pos.error(f"nesting deeper than {MAX_DEPTH} levels")
        if not isinstance(node, dict):
            raise pos.error("each part of a query is an object", found=type(node).__name__)
        groups = [k for k in ("and", "or", "not") if k in node]
        if groups:
            if len(groups) > 1 or set(node) - {groups[0], "_pos"}:
                raise pos.error("a group has exactly one key: and, or or not", found=",".join(sorted(set(node) - {"_pos"})))
            key = groups[0]
            if key == "not":
                out = {"not": walk(node["not"], f"{path}.not", depth + 1)}
            else:
                items = node[key]
                if not isinstance(items, list) or len(items) < 1:
                    raise pos.error(f"'{key}' takes a non-empty list")
                kids = [walk(ch, f"{path}.{key}[{i}]", depth + 1) for i, ch in enumerate(items)]
                flat = []
                for k in kids:  # and inside and is the same and
                    flat.extend(k[key] if key in k else [k])
                out = {key: flat} if len(flat) > 1 else flat[0]
            if keep_positions and "_pos" in node and isinstance(out, dict) and ("and" in out or "or" in out or "not" in out):
                out["_pos"] = node["_pos"]
            return out
        out = _check_criterion(node, pos)
        if not keep_positions:
            out.pop("_pos", None)
        return out

    return walk(tree, "query", 0)


def strip_positions(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: strip_positions(v) for k, v in tree.items() if k not in ("_pos", "_qpos")}
    if isinstance(tree, list):
        return [strip_positions(v) for v in tree]
    return tree


# --------------------------------------------------------------------------- tree -> text

_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
KEYWORDS = {"or", "and", "not", "in", "is", "empty", "between", "at", "has", "no", "for", "to", "from", "of", "within",
            "before", "after", "since", "next", "least", "most", "exactly", "valueset", "last", "refill", "due",
            "miles", "mile", "zip", "location", "segment", "campaign", "changed", "true", "false", "days", "day", "weeks", "week", "months",
            "month", "years", "year"}


def _lit(value: Any, ftype: str | None = None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if ftype in ("number", "date") and re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return text
    if _BARE.match(text) and text.lower() not in KEYWORDS:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _time_text(t: dict) -> str:
    (key, v), = t.items()
    if key == "within":
        return f"within {v[0]} {v[1]}"
    if key == "next":
        return f"in next {v[0]} {v[1]}"
    if key == "between":
        return f"between {v[0]} and {v[1]}"
    return f"{key} {v}"


def _codes_text(node: dict) -> str:
    if "valueset" in node:
        return f"in valueset {_str(node['valueset'])}"
    if "codes" in node:
        codes = node["codes"]
        return codes[0] if len(codes) == 1 else "(" + ", ".join(codes) + ")"
    return ""


def _criterion_text(n: dict) -> str:
    t = n["type"]
    if t == "field":
        ftype = CONTACT_FIELDS.get(n["field"], ("attr",))[0]
        ref = n["field"] + (f" at {n['at']}" if "at" in n else "")
        op = n["op"]
        if op in ("is empty", "is not empty"):
            return f"{ref} {op}"
        if op == "time":
            return f"{ref} {_time_text(n['time'])}"
        if op == "between":
            return f"{ref} between {_lit(n['value'][0], ftype)} and {_lit(n['value'][1], ftype)}"
        if op in ("in", "not in"):
            return f"{ref} {op} (" + ", ".join(_lit(v, ftype) for v in n["value"]) + ")"
        return f"{ref} {op} {_lit(n['value'], ftype)}"
    if t == "has":
        parts = ["has"]
        cnt = n.get("count")
        if cnt:
            parts.append({"=": "exactly", ">=": "at least", "<=": "at most"}[cnt[0]] + f" {cnt[1]}"
                         if cnt != ["=", 0] else "no")
        if n.get("qualifier"):
            parts.append(n["qualifier"])
        parts.append(n["kind"])
        if _codes_text(n):
            parts.append(_codes_text(n))
        if n.get("campaign") is not None:
            parts.append(f"in campaign {_str(n['campaign'])}")
        if n.get("time"):
            parts.append(_time_text(n["time"]))
        return " ".join(parts)
    if t == "last":
        out = f"last observation {_codes_text(n)} {n['op']} {_lit(n['value'])}"
        return out + (f" {_time_text(n['time'])}" if n.get("time") else "")
    if t == "refill_due":
        out = f"refill due within {n['days']} days"
        return out + (f" for {_codes_text(n)}" if _codes_text(n) else "")
    if t == "birthday":
        return f"birthday within {n['days']} days"
    if t == "distance":
        if "location" in n:
            return f"within {_lit(n['miles'])} miles of location {_str(n['location'])}"
        return f"within {_lit(n['miles'])} miles of zip {_str(n['zip'])}"
    if t == "stage_changed":
        return f"stage changed {_time_text(n['time'])}"
    if t == "authorized":
        return f"authorized for {_lit(n['purpose'])}"
    if t == "subscribed":
        return f"subscribed to {_str(n['topic'])}"
    if t == "unsubscribed":
        return f"unsubscribed from {_str(n['topic'])}" + (f" {_time_text(n['time'])}" if n.get("time") else "")
    if t == "suppressed":
        return "suppressed"
    if t == "segment":
        return f"in segment {_str(n['segment'])}"
    raise AssertionError(t)  # pragma: no cover


def to_text(tree: dict) -> str:
    """JSON tree -> text (canonical: one space between words, groups in parentheses)."""

    def walk(node: dict, parent: str | None) -> str:
        if "and" in node or "or" in node:
            key = "and" if "and" in node else "or"
            inner = f" {key} ".join(walk(ch, key) for ch in node[key])
            return inner if parent is None else f"({inner})"
        if "not" in node:
            return "not " + walk(node["not"], "not")
        return _criterion_text(node)

    return walk(validate(tree), None)


def dumps(tree: dict) -> str:
    return json.dumps(strip_positions(tree), sort_keys=True, separators=(",", ":"))
