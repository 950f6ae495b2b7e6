"""Each purpose rule of 45 CFR 164.501 ("marketing") and 164.508(a)(3)."""

from __future__ import annotations

import pytest

from carepost.core.purposes import PURPOSES, purposes_list, requirements
from carepost.core.errors import ValidationFailed


@pytest.mark.parametrize("purpose", ["treatment", "payment", "health_care_operations", "transactional"])
def test_tpo_and_administrative_need_no_authorization_nor_opt_out(purpose):
    # 164.506: treatment, payment, health care operations; administrative mail.
    r = requirements(purpose)
    assert not r.authorization_required and not r.is_marketing and not r.opt_out_required
    assert r.effective_purpose == purpose and r.suppression_scope == "all"


@pytest.mark.parametrize("remuneration", ["none", "cost_related"])
def test_refill_reminder_is_not_marketing_when_payment_covers_cost(remuneration):
    # 164.501 marketing (2)(i)
    r = requirements("refill_reminder", remuneration=remuneration)
    assert not r.authorization_required and not r.is_marketing and not r.opt_out_required
    assert "(2)(i)" in r.rules[0]


def test_refill_reminder_paid_above_cost_is_remunerated_marketing():
    r = requirements("refill_reminder", remuneration="above_cost")
    assert r.is_marketing and r.authorization_required and r.remuneration_statement_required
    assert r.effective_purpose == "marketing_remunerated"


@pytest.mark.parametrize("days,marketing", [(0, False), (30, False), (90, False), (91, True), (365, True)])
def test_lapsed_prescription_within_90_days_is_still_current(days, marketing):
    r = requirements("refill_reminder", prescription_lapsed_days=days)
    assert r.is_marketing is marketing and r.authorization_required is marketing
    if marketing:
        assert r.effective_purpose == "marketing" and not r.remuneration_statement_required


def test_lapsed_prescription_with_remuneration_states_it():
    r = requirements("refill_reminder", prescription_lapsed_days=120, remuneration="cost_related")
    assert r.effective_purpose == "marketing_remunerated" and r.remuneration_statement_required


@pytest.mark.parametrize("purpose", ["treatment", "care_coordination", "treatment_alternatives", "own_products"])
def test_treatment_and_operations_exceptions_only_without_remuneration(purpose):
    # 164.501 marketing (2)(ii): "except where the covered entity receives financial remuneration"
    free = requirements(purpose)
    assert not free.authorization_required and not free.is_marketing
    for remuneration in ("cost_related", "above_cost"):
        paid = requirements(purpose, remuneration=remuneration)
        assert paid.is_marketing and paid.authorization_required and paid.remuneration_statement_required
        assert paid.effective_purpose == "marketing_remunerated" and paid.opt_out_required


def test_own_products_carry_an_opt_out_but_no_authorization():
    r = requirements("own_products")
    assert r.opt_out_required and not r.authorization_required and r.suppression_scope == "marketing"


def test_marketing_needs_authorization_and_opt_out():
    # 164.508(a)(3)(i)
    r = requirements("marketing")
    assert r.is_marketing and r.authorization_required and r.opt_out_required
    assert not r.remuneration_statement_required and r.effective_purpose == "marketing"


def test_marketing_with_remuneration_needs_the_statement():
    # 164.508(a)(3)(ii)
    for r in (requirements("marketing_remunerated"), requirements("marketing", remuneration="cost_related")):
        assert r.authorization_required and r.remuneration_statement_required
        assert r.effective_purpose == "marketing_remunerated"


@pytest.mark.parametrize("purpose", ["payment", "health_care_operations", "transactional"])
def test_third_party_payment_makes_any_message_marketing(purpose):
    r = requirements(purpose, remuneration="above_cost")
    assert r.is_marketing and r.effective_purpose == "marketing_remunerated"


def test_bad_input_names_the_field():
    with pytest.raises(ValidationFailed) as exc:
        requirements("advertising")
    assert exc.value.field == "purpose"
    with pytest.raises(ValidationFailed) as exc:
        requirements("marketing", remuneration="lots")
    assert exc.value.field == "remuneration"
    with pytest.raises(ValidationFailed) as exc:
        requirements("refill_reminder", prescription_lapsed_days=-1)
    assert exc.value.field == "prescription_lapsed_days"


def test_list_covers_every_purpose():
    assert [p["key"] for p in purposes_list()] == list(PURPOSES)
