"""The compiled SQL returns exactly what a slow, obviously-correct Python evaluator returns.

Hypothesis draws random query trees (every criterion type, nested AND/OR/NOT, time windows,
counts, code prefixes) over a generated population (tests/segments_population.py); each tree is
compiled to one statement, run by the database (SQLCipher and PostgreSQL), and compared with the
reference evaluator contact by contact. A second organization's contacts must never appear.
Each tree also round-trips through the text form.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from carepost.segments import compiler, language
from tests.segments_population import AT, Reference, build_population

pytestmark = pytest.mark.slow

DATES = st.sampled_from(["2024-06-01", "2025-01-01", "2025-12-31", "2026-02-28", "2026-03-15", "2026-04-01"])
PERIOD = st.tuples(st.integers(0, 30), st.sampled_from(["days", "weeks", "months", "years"])).map(list)
TIME = st.one_of(
    PERIOD.map(lambda p: {"within": p}), PERIOD.map(lambda p: {"next": p}), DATES.map(lambda d: {"before": d}),
    DATES.map(lambda d: {"after": d}), DATES.map(lambda d: {"since": d}),
    st.tuples(DATES, DATES).map(lambda ab: {"between": sorted(ab)}),
)
OPT_TIME = st.one_of(st.none(), TIME)


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _text_field(name: str, pool: list[str]):
    op = st.sampled_from(["=", "!=", "in", "not in", "is empty", "is not empty"])

    def build(o, v, vs):
        node = {"type": "field", "field": name, "op": o}
        if o in ("in", "not in"):
            node["value"] = vs
        elif o not in ("is empty", "is not empty"):
            node["value"] = v
        return node

    return st.builds(build, op, st.sampled_from(pool), st.lists(st.sampled_from(pool), min_size=1, max_size=3))


def _ordered(name: str, values, extra_ops=()):
    ops = ["=", "!=", "<", "<=", ">", ">=", "between", "in", "not in", "is empty", "is not empty", *extra_ops]

    def build(o, a, b, vs, t, at):
        node = {"type": "field", "field": name, "op": o}
        if o == "between":
            node["value"] = sorted([a, b])
        elif o in ("in", "not in"):
            node["value"] = vs
        elif o == "time":
            node["time"] = t
        elif o not in ("is empty", "is not empty"):
            node["value"] = a
        if at and name == "age":
            node["at"] = at
        return node

    return st.builds(build, st.sampled_from(ops), values, values, st.lists(values, min_size=1, max_size=3), TIME,
                     st.one_of(st.none(), DATES))


CODES = {
    "condition": ["icd10:E11.*", "icd10cm:E11.9", "icd10:E11.65", "snomed:44054006", "icd10:I10", "icd10cm:E*", "icd10:B20"],
    "medication": ["rxnorm:860975", "rxnorm:197361"],
    "observation": ["loinc:4548-4", "loinc:24606-6", "loinc:8480-6"],
    "immunization": ["cvx:140", "cvx:208", "cvx:115"],
    "procedure": ["snomed:73761001", "snomed:71651007"],
    "encounter": ["snomed:185349003", "snomed:32485007"],
    "hospitalization": ["snomed:32485007"],
    "appointment": ["snomed:185349003"],
    "care_plan": ["snomed:698360004", "snomed:443402002"],
}
COUNT = st.one_of(st.none(), st.tuples(st.sampled_from(["=", ">=", "<="]), st.integers(0, 3)).map(list))


@st.composite
def has_node(draw):
    kind = draw(st.sampled_from(list(CODES) + ["message_received", "message_delivered", "message_bounced"]))
    node = {"type": "has", "kind": kind, "count": draw(COUNT), "time": draw(OPT_TIME)}
    quals = language.QUALIFIERS.get(kind, ())
    if quals and draw(st.booleans()):
        node["qualifier"] = draw(st.sampled_from(quals))
    if kind in CODES and draw(st.booleans()):
        node["codes"] = draw(st.lists(st.sampled_from(CODES[kind]), min_size=1, max_size=2, unique=True))
    return _drop_none(node)


CRITERIA = st.one_of(
    _text_field("city", ["Boston", "boston", "Springfield", "Austin", "Nowhere"]),
    _text_field("preferred_language", ["en", "es", "EN", "fr"]),
    _text_field("sex", ["female", "male", "other", "unknown"]),
    _text_field("stage", ["new", "active", "overdue", "at_risk"]),
    _text_field("zip", ["02139", "02108", "62701", "78701"]),
    _text_field("zip3", ["021", "627", "787"]),
    _ordered("age", st.integers(0, 100)),
    _ordered("birth_date", st.sampled_from(["1950-01-01", "1970-03-18", "1990-06-15", "2010-01-01"]), ("time",)),
    st.builds(lambda v, o: {"type": "field", "field": "deceased", "op": o, "value": v}, st.booleans(), st.sampled_from(["=", "!="])),
    _ordered("attr.risk", st.sampled_from([1, 2.5, 5, 9, 3])),
    _text_field("attr.program", ["diabetes", "Cardio", "none"]),
    st.builds(lambda d: {"type": "birthday", "days": d}, st.integers(0, 40)),
    st.builds(lambda t: {"type": "stage_changed", "time": t}, TIME),
    has_node(),
    has_node(),
    st.builds(lambda c, o, v, t: _drop_none({"type": "last", "kind": "observation", "codes": c, "op": o, "value": v, "time": t}),
              st.lists(st.sampled_from(CODES["observation"]), min_size=1, max_size=2, unique=True),
              st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), st.sampled_from([5, 7.5, 8, 9.9, 11]), OPT_TIME),
    st.builds(lambda d, c: _drop_none({"type": "refill_due", "days": d, "codes": c}), st.integers(0, 40),
              st.one_of(st.none(), st.lists(st.sampled_from(CODES["medication"]), min_size=1, max_size=1))),
    st.builds(lambda p: {"type": "authorized", "purpose": p}, st.sampled_from(["marketing", "own_products", "treatment"])),
    st.builds(lambda t: {"type": "subscribed", "topic": t}, st.sampled_from(["newsletter", "events", "all"])),
    st.builds(lambda t, w: _drop_none({"type": "unsubscribed", "topic": t, "time": w}),
              st.sampled_from(["newsletter", "events", "all"]), OPT_TIME),
    st.just({"type": "suppressed"}),
)
TREES = st.recursive(
    CRITERIA,
    lambda kids: st.one_of(
        st.lists(kids, min_size=2, max_size=3).map(lambda xs: {"and": xs}),
        st.lists(kids, min_size=2, max_size=3).map(lambda xs: {"or": xs}),
        kids.map(lambda x: {"not": x}),
    ),
    max_leaves=6,
)


@pytest.fixture
def population(db):
    from carepost.accounts.service import create_organization
    from carepost.core.database import system_session

    with system_session() as s:
        org = create_organization(s, "Segment Clinic")
        other = create_organization(s, "Other Clinic")
        s.commit()
        org_id, other_id = org.id, other.id
    build_population(org_id, seed=11, n=70)
    build_population(other_id, seed=12, n=15)
    return org_id, Reference(org_id)


def test_compiled_sql_matches_the_reference_evaluator(population):
    from carepost.core.database import read_only_session

    org_id, ref = population
    all_ids = {c.id for c in ref.contacts}
    seen_nonempty = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(TREES)
    def check(raw):
        tree = language.validate(raw)
        # the text form says the same thing
        assert language.strip_positions(language.parse(language.to_text(tree))) == tree
        with read_only_session(org_id) as s:
            compiled = compiler.compile_query(s, org_id, tree, at=AT)
            got = set(s.scalars(compiled.statement))
        want = ref.evaluate(tree, AT)
        assert got <= all_ids, "a contact of another organization was returned"
        assert got == want, (language.to_text(tree), sorted(got - want)[:3], sorted(want - got)[:3])
        seen_nonempty.append(bool(want) and want != all_ids)

    check()
    # the population makes the queries discriminate (not all empty, not all everyone)
    assert sum(seen_nonempty) > 40


def test_each_criterion_selects_someone_and_not_everyone(population):
    """Guards the differential test against a population where criteria never bite."""
    from carepost.core.database import read_only_session

    org_id, ref = population
    living = {c.id for c in ref.contacts if not c.deceased}
    queries = [
        "has active condition icd10:E11.*", "last observation loinc:4548-4 > 8 within 24 months",
        "refill due within 30 days", "has no immunization cvx:140 within 12 months", "has missed appointment",
        "has at least 2 encounter within 24 months", "has hospitalization", "has active care_plan",
        "has message_delivered within 30 days", "authorized for marketing", 'subscribed to "newsletter"',
        "suppressed", "attr.risk >= 5", "age between 50 and 75", "stage in (active, overdue)", "zip3 = 021",
        "birthday within 5 days", "stage changed within 60 days", 'unsubscribed from "all"',
    ]
    with read_only_session(org_id) as s:
        for text in queries:
            tree = language.parse(text)
            got = set(s.scalars(compiler.compile_query(s, org_id, tree, at=AT).statement))
            assert got == ref.evaluate(language.strip_positions(tree), AT), text
            assert got and got != living, text
    assert s is not None and select is not None
