"""The segment language: text <-> JSON, and bad input — syntax errors, unknown fields and codes,
wrong value types, SQL injection in every value position, absurd nesting, self-reference — each a
clear error naming the position, with nothing run."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from carepost.segments import language
from carepost.segments.language import SegmentQueryError, parse, strip_positions, to_text, validate


def _err(text: str) -> SegmentQueryError:
    with pytest.raises(SegmentQueryError) as exc:
        parse(text)
    return exc.value


# --------------------------------------------------------------------------- the two forms


def test_the_example_of_the_issue_in_both_forms():
    text = ("age between 50 and 75 and sex = female and not has observation loinc:24606-6 within 24 months "
            "and stage in (active, overdue)")
    tree = strip_positions(parse(text))
    assert tree == {"and": [
        {"type": "field", "field": "age", "op": "between", "value": [50, 75]},
        {"type": "field", "field": "sex", "op": "=", "value": "female"},
        {"not": {"type": "has", "kind": "observation", "codes": ["loinc:24606-6"], "time": {"within": [24, "months"]}}},
        {"type": "field", "field": "stage", "op": "in", "value": ["active", "overdue"]}]}
    assert to_text(tree) == text


@pytest.mark.parametrize("text, canonical", [
    ("AGE >= 65 AnD Sex = Female", "age >= 65 and sex = female"),
    ("has condition icd10:e11.*", "has condition icd10:E11.*"),
    ("has condition icd10:E11*", "has condition icd10:E11.*"),
    ("has no immunization cvx:140 within 1 year", "has no immunization cvx:140 within 1 years"),
    ("has at least 2 missed appointments within 6 months", "has at least 2 missed appointment within 6 months"),
    ("has visits since 2025-01-01", "has encounter since 2025-01-01"),
    ("zip = 02139 or zip3 in (021, 022)", 'zip = "02139" or zip3 in ("021", "022")'),
    ("within 5 miles of zip 02139", 'within 5 miles of zip "02139"'),
    ("age = 1 or (attr.b = 2 and city = 3)", 'age = 1 or (attr.b = 2 and city = "3")'),
    ("not (sex = male or sex = other)", "not (sex = male or sex = other)"),
    ("deceased", "deceased = true"),
    ('refill due within 7 days for rxnorm:860975', 'refill due within 7 days for rxnorm:860975'),
    ('has upcoming appointment in next 7 days', 'has upcoming appointment in next 7 days'),
    ('age at 2026-06-01 between 50 and 74', 'age at 2026-06-01 between 50 and 74'),
    ('city = "O\\"Brien \\\\ Sons"', 'city = "O\\"Brien \\\\ Sons"'),
])
def test_text_is_canonicalized_and_round_trips(text, canonical):
    tree = strip_positions(parse(text))
    assert to_text(tree) == canonical
    assert strip_positions(parse(canonical)) == tree


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ageswithn 0123456789()=<>!\"'.,:*-_andornothasicd10\n")), max_size=60))
def test_any_text_either_parses_or_fails_with_a_position(text):
    try:
        tree = parse(text)
    except SegmentQueryError as exc:
        assert exc.line is not None or exc.where == "query"
        assert exc.message
        return
    assert strip_positions(parse(to_text(strip_positions(tree)))) == strip_positions(tree)


# --------------------------------------------------------------------------- bad input: syntax and vocabulary


@pytest.mark.parametrize("text, line, column, found", [
    ("age >= ", 1, 7, "end of query"),
    ("age between 50 75", 1, 16, "75"),
    ("sex = female and\nand age > 3", 2, 5, "age"),
    ("has condition icd10:E11.* and (age > 5", 1, 39, "end of query"),
    ("age > 5)", 1, 8, ")"),
    ("city = 'Boston'", 1, 8, "'"),
    ("age >> 5", 1, 6, ">"),
])
def test_syntax_errors_name_line_column_found_and_expected(text, line, column, found):
    exc = _err(text)
    assert (exc.line, exc.column, exc.found) == (line, column, found), exc.to_dict()
    assert exc.expected, exc.to_dict()
    assert exc.message.startswith(f"line {line}, column {column}")
    assert exc.status_code == 422


@pytest.mark.parametrize("text, column, words", [
    ("agee > 5", 1, "unknown field 'agee'"),
    ("sex = female and colour = red", 18, "unknown field 'colour'"),
    ("has diagnosis icd10:E11", 5, "unknown kind 'diagnosis'"),
    ("has condition foo:123", 1, "unknown code system 'foo'"),
    ("has condition loinc:ABC", 1, "not a valid loinc code"),
    ("has condition snomed:123*", 1, "prefix matching"),
    ("has resolved medication", 5, "does not qualify medication"),
    ("age = old", 1, "compares with a number"),
    ("age between 75 and 50", 1, "low end of between is above"),
    ("sex = yes", 1, "female, male, other or unknown"),
    ("deceased = maybe", 1, "true or false"),
    ("zip = 123", 1, "five digits"),
    ("birth_date > 2025-02-30", 1, "not a calendar date"),
    ("city > Boston", 1, "does not apply to city"),
    ("has condition within 5 fortnights", 24, "unexpected"),
    ("authorized for spam", 1, "unknown purpose 'spam'"),
    ("last medication rxnorm:1 > 3", 6, "applies to observations"),
    ("birthday within 2 months", 1, "counted in days"),
    ("frobnicate", 1, "not a criterion by itself"),
    ("has condition within 999999 days", 1, "out of range"),
])
def test_unknown_fields_codes_and_wrong_types_name_the_position(text, column, words):
    exc = _err(text)
    assert exc.line == 1 and exc.column == column, exc.to_dict()
    assert words in exc.message, exc.message


def test_json_trees_are_checked_with_the_json_path():
    with pytest.raises(SegmentQueryError) as exc:
        validate({"and": [{"type": "field", "field": "age", "op": ">=", "value": 5},
                          {"or": [{"type": "has", "kind": "condition", "codes": ["icd10:E11'--"]}]}]})
    assert exc.value.field == "query.and[1].or[0]" and "not a valid icd10 code" in exc.value.message
    for bad, words in [({"type": "nope"}, "unknown criterion type"), ({"and": []}, "non-empty list"),
                       ({"and": [{"type": "suppressed"}], "or": []}, "exactly one key"),
                       ({"type": "field", "field": "age", "op": ">", "value": True}, "compares with a number"),
                       ({"type": "field", "field": "age", "op": ">", "value": 5, "sql": "1=1"}, "unknown key 'sql'"),
                       ({"type": "has", "kind": "condition", "time": {"within": [3, "fortnights"]}}, "[whole number, unit]"),
                       ({"type": "has", "kind": "condition", "count": [">", 1]}, "count is [op, whole number]"),
                       ("age > 5", "each part of a query is an object")]:
        with pytest.raises(SegmentQueryError) as exc:
            validate(bad)
        assert words in exc.value.message, (bad, exc.value.message)


def test_absurd_nesting_and_size_are_refused_before_parsing():
    exc = _err("(" * 1000 + "age > 1" + ")" * 1000)
    assert (exc.line, exc.column) == (1, language.MAX_DEPTH + 1) and "nesting deeper" in exc.message
    exc = _err("not " * 2000 + "age > 1")
    assert (exc.line, exc.column) == (1, 4 * language.MAX_DEPTH + 1) and "nesting deeper" in exc.message
    exc = _err(" or ".join(["age > 1"] * (language.MAX_NODES + 1)))
    assert "more than" in exc.message
    exc = _err("city in (" + ", ".join(f"c{i}" for i in range(language.MAX_LIST + 1)) + ")")
    assert f"more than {language.MAX_LIST} values" in exc.message
    exc = _err("age > 1 and " * 3000 + "age > 1")
    assert "longer than" in exc.message
    deep: dict = {"type": "suppressed"}
    for _ in range(200):
        deep = {"not": deep}
    with pytest.raises(SegmentQueryError) as e:
        validate(deep)
    assert "nesting deeper" in e.value.message and e.value.field.startswith("query.not.not")


# --------------------------------------------------------------------------- injection and compile-time errors (database)

PAYLOADS = ["x'); DROP TABLE contacts; --", "' OR '1'='1", "1; DELETE FROM contacts", "\" OR 1=1 --", "Robert'); --"]


@pytest.fixture
def two_contacts(db):
    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session, system_session
    from carepost.patients.models import Contact

    with system_session() as s:
        org = create_organization(s, "Injection Clinic")
        s.commit()
        org_id = org.id
    with org_session(org_id) as s:
        s.add_all([Contact(org_id=org_id, sex="female", city="Boston"), Contact(org_id=org_id, sex="male", city="Austin")])
        s.commit()
    return org_id


def _count(org_id, query):
    from carepost.core.database import org_session
    from carepost.segments import service

    with org_session(org_id) as s:
        return service.count(s, org_id, query, service.SYSTEM)["count"]


def _contacts_intact(org_id):
    from carepost.core.database import read_only_session
    from carepost.patients.models import Contact

    with read_only_session(org_id) as s:
        return s.scalar(select(func.count(Contact.id)))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_sql_injection_in_every_value_position_is_inert(two_contacts, payload):
    from carepost.core.database import read_only_session
    from carepost.segments import compiler

    org_id = two_contacts
    quoted = '"' + payload.replace("\\", "\\\\").replace('"', '\\"') + '"'
    # values that are plain text: they are bound, match nothing, and run
    for query in (f"city = {quoted}", f"city in (Boston, {quoted})", f"city != {quoted}", f"gender_identity not in ({quoted})",
                  {"type": "field", "field": "coverage_plan", "op": "=", "value": payload},
                  {"type": "field", "field": "city", "op": "in", "value": [payload, "Austin"]}):
        n = _count(org_id, query)
        assert n in (0, 1, 2)
    assert _count(org_id, f"city = {quoted} or sex = female") == 1
    with read_only_session(org_id) as s:
        sql = str(compiler.compile_query(s, org_id, parse(f"city = {quoted}")).statement)
    assert payload not in sql and "DROP" not in sql
    # values that name something: refused with the position, nothing run
    for query, words in [(f"has condition in valueset {quoted}", "value set"), (f"in segment {quoted}", "segment"),
                         (f"subscribed to {quoted}", "topic"), (f"unsubscribed from {quoted}", "topic"),
                         (f"authorized for {quoted}", "purpose"), (f"zip = {quoted}", "five digits"),
                         (f"zip3 in ({quoted})", "three digits"), (f"age = {quoted}", "number"),
                         (f"birth_date < {quoted}", "date"), (f"deceased = {quoted}", "true or false"),
                         (f"within 5 miles of zip {quoted}", "ZIP code"), (f"sex = {quoted}", "female")]:
        with pytest.raises(SegmentQueryError) as exc:
            _count(org_id, query)
        assert exc.value.line == 1 and words in exc.value.message, (query, exc.value.message)
    for tree in ({"type": "has", "kind": "condition", "codes": [f"icd10:{payload}"]},
                 {"type": "has", "kind": "condition", "time": {"before": payload}},
                 {"type": "has", "kind": payload},
                 {"type": "field", "field": f"attr.{payload}", "op": "=", "value": 1},
                 {"type": "field", "field": payload, "op": "=", "value": 1},
                 {"type": "last", "kind": "observation", "codes": ["loinc:4548-4"], "op": payload, "value": 1},
                 {"type": "birthday", "days": payload},
                 {"type": "has", "kind": "condition", "valueset": payload}):
        with pytest.raises(SegmentQueryError):
            _count(org_id, tree)
    assert _contacts_intact(org_id) == 2


def test_unknown_names_and_self_reference_are_refused_with_the_position(two_contacts):
    from carepost.core.database import org_session
    from carepost.segments import service

    org_id = two_contacts
    with org_session(org_id) as s:
        a = service.create_segment(s, org_id, {"name": "A", "query": "sex = female"}, service.SYSTEM)
        b = service.create_segment(s, org_id, {"name": "B", "query": 'in segment "A" and city = Boston'}, service.SYSTEM)
        s.commit()
        assert service.count(s, org_id, 'in segment "B"', service.SYSTEM)["count"] == 1
        with pytest.raises(SegmentQueryError) as exc:
            service.update_segment(s, org_id, a, {"query": f'sex = female and in segment "{a.id}"'}, service.SYSTEM)
        assert (exc.value.line, exc.value.column) == (1, 18) and "refer to itself" in exc.value.message
        s.rollback()
        with pytest.raises(SegmentQueryError) as exc:  # through B
            service.update_segment(s, org_id, a, {"query": 'in segment "B"'}, service.SYSTEM)
        assert "cannot be used" in exc.value.message and "refer to itself" in exc.value.message
        s.rollback()
        for query, words in [('in segment "Nope"', "unknown segment"), ("attr.nope = 1", "unknown custom attribute"),
                             ('has condition in valueset "nope"', "unknown value set"),
                             ('subscribed to "nope"', "unknown topic"), ("within 5 miles of zip 00000", "unknown ZIP")]:
            with pytest.raises(SegmentQueryError) as exc:
                service.count(s, org_id, query, service.SYSTEM)
            assert exc.value.line == 1 and words in exc.value.message, (query, exc.value.message)
        assert b.references == [a.id]
