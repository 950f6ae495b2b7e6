"""The benchmark population generator (bench/segments_population.py) and the hand-written SQL of
bench/segments.py: realistic shape, codes that resolve in the shipped value sets, and hand SQL
that returns exactly what a slow, obviously-correct Python evaluation of the same rows returns,
on both databases."""

from __future__ import annotations

import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import segments as bench
import segments_population as population

N = 400

pytestmark = pytest.mark.slow


@pytest.fixture
def populated(db):
    from carepost.accounts.service import create_organization
    from carepost.core import clock
    from carepost.core.database import get_engine, system_session

    with system_session() as s:
        org_id = create_organization(s, "Population Test").id
        s.commit()
    result = population.populate(get_engine(), org_id, N, seed=5, today=clock.now().date(), batch_size=150, drop_indexes=False)
    return org_id, result


def _aware(v):
    return v if v is None or v.tzinfo else v.replace(tzinfo=UTC)


def test_population_shape_and_codes(populated):
    from carepost.core.database import org_session
    from carepost.patients.models import Condition, Contact, Medication, Observation
    from carepost.segments.library import shipped_value_set, value_set_matches

    org_id, result = populated
    assert result["contacts"] == N
    assert result["clinical_facts_per_contact"] >= 20
    with org_session(org_id) as s:
        assert s.scalar(select(Contact.id).where(Contact.org_id != org_id).limit(1)) is None
        contacts = s.execute(select(Contact.id, Contact.birth_date, Contact.sex, Contact.postal_code)).all()
        assert len(contacts) == N
        conditions = s.execute(select(Condition.contact_id, Condition.code_system, Condition.code)).all()
        diabetes = shipped_value_set("diabetes")
        diabetics = {c for c, sys_, code in conditions if value_set_matches(sys_, code, diabetes)}
        # prevalence in a realistic band (about 8 % of everyone, children included)
        assert 0.03 * N <= len(diabetics) <= 0.16 * N
        hypertensive = {c for c, sys_, code in conditions if value_set_matches(sys_, code, shipped_value_set("hypertension"))}
        assert 0.12 * N <= len(hypertensive) <= 0.40 * N
        a1c = defaultdict(list)
        for cid, code, value in s.execute(select(Observation.contact_id, Observation.code, Observation.value_quantity)
                                          .where(Observation.code == "4548-4")):
            a1c[cid].append(value)
        assert all(len(a1c[c]) >= 2 for c in diabetics)  # every diabetic has HbA1c results
        assert all(4.0 <= v <= 16 for values in a1c.values() for v in values)
        # diabetics take metformin or another antidiabetic most of the time
        meds = {c for c, code in s.execute(select(Medication.contact_id, Medication.code)) if code in ("861007", "861004", "310490", "1545658")}
        assert len(diabetics & meds) >= 0.8 * len(diabetics)
        # every code stored in an observation of the BP panel resolves in the blood_pressure set
        bp = shipped_value_set("blood_pressure")
        codes = {code for (code,) in s.execute(select(Observation.code).where(Observation.category == "vital-signs").distinct())}
        assert {"85354-9", "8480-6", "8462-4"} <= codes
        assert all(value_set_matches("loinc", c, bp) for c in ("85354-9", "8480-6", "8462-4"))


def test_hand_written_sql_matches_a_python_evaluation(populated):
    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.patients.models import Contact, Observation, Procedure
    from carepost.segments.library import shipped_value_set, value_set_matches

    org_id, _ = populated
    at = clock.now()
    today = at.date()
    with org_session(org_id) as s:
        contacts = s.execute(select(Contact.id, Contact.birth_date, Contact.sex, Contact.deceased)).all()
        procs = s.execute(select(Procedure.contact_id, Procedure.code_system, Procedure.code, Procedure.performed_start)).all()
        obs = s.execute(select(Observation.id, Observation.contact_id, Observation.code_system, Observation.code,
                               Observation.effective_at, Observation.value_quantity)).all()
        sends = s.execute(select(MessageRecipient.contact_id, MessageRecipient.status, Message.created_at, Message.sandbox)
                          .join(Message, Message.id == MessageRecipient.message_id)).all()

        def age(b):
            return today.year - b.year - ((today.month, today.day) < (b.month, b.day))

        def received(cid, days):
            since = at - timedelta(days=days)
            return any(r.contact_id == cid and r.status in ("delivered", "portal_viewed") and not r.sandbox
                       and since <= _aware(r.created_at) <= at for r in sends)

        mammo = shipped_value_set("mammography")
        since24 = datetime.combine(bench._months_back(today, 24), at.timetz())
        expected_gap = {
            c.id for c in contacts
            if not c.deceased and c.sex == "female" and c.birth_date and 50 <= age(c.birth_date) <= 74
            and not any(p.contact_id == c.id and value_set_matches(p.code_system, p.code, mammo)
                        and since24 <= _aware(p.performed_start) <= at for p in procs)
            and received(c.id, 365)
        }
        hba1c = shipped_value_set("hba1c")
        since12 = datetime.combine(bench._months_back(today, 12), at.timetz())
        latest = {}
        for o in obs:
            if value_set_matches(o.code_system, o.code, hba1c) and since12 <= _aware(o.effective_at) <= at:
                key = (_aware(o.effective_at), o.id)
                if o.contact_id not in latest or key > latest[o.contact_id][0]:
                    latest[o.contact_id] = (key, o.value_quantity)
        expected_a1c = {
            c.id for c in contacts
            if not c.deceased and c.birth_date and age(c.birth_date) >= 18
            and c.id in latest and latest[c.id][1] is not None and latest[c.id][1] > 8
            and received(c.id, 730)  # the benchmark's 90 days leave too few of 400 contacts
        }
        assert expected_gap and expected_a1c  # the population exercises both questions
        for name, expected, days in (("mammography_gap", expected_gap, None), ("uncontrolled_a1c", expected_a1c, 730)):
            sql, params = bench.hand_sql(name, org_id, at, message_days=days)
            ids_sql = sql.replace("SELECT count(*) FROM contacts c", "SELECT c.id FROM contacts c", 1)
            got = {r[0] for r in s.execute(text(ids_sql), params)}
            assert got == expected, name
            assert s.execute(text(sql), params).scalar() == len(expected)
