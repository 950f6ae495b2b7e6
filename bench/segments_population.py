"""A synthetic population for segment benchmarks, written straight into the tables.

    .venv/bin/python bench/segments_population.py --contacts 100000
    .venv/bin/python bench/segments_population.py --contacts 100000 --database-url postgresql://postgres@127.0.0.1:5432/postgres --keep

Creates one organization through the real services (keys included), then writes N contacts and
their clinical facts and delivery history with bulk INSERTs (SQLAlchemy Core executemany on
SQLCipher, COPY on PostgreSQL) — not through the importer, which would take hours at 1,000,000.

The population is skewed like a real US primary-care panel, everything relative to today:

* ages 0-95 (22 % children), 51 % female, languages, race, ethnicity, marital status, coverage
  (Medicare from 65), ~2,000 real ZIP codes from the ``zipcodes`` data with a heavy-tailed
  weight (so ZIP, ZIP3 and distance criteria have realistic selectivity); 1 % deceased;
* chronic conditions with age-dependent prevalence close to CDC figures (hypertension ~30 % of
  adults rising to ~60 % after 65, type 2 diabetes ~11 % of adults and ~25 % after 65,
  hyperlipidemia, obesity, asthma, COPD, heart failure, CKD, depression, anxiety), with
  SNOMED codes for some and ICD-10-CM for the others, as real feeds mix them;
* medications for those conditions (RxNorm, with last fill, days supply and next refill due);
* blood pressure readings (panel + systolic + diastolic rows, as the importer stores them),
  BMI and weight; HbA1c for diabetics (values around 7.5 %, worse for some) and occasionally
  for others; lipid panels for the hyperlipidemic;
* immunizations by age (flu each season for roughly half, COVID-19, Tdap, zoster after 50,
  pneumococcal after 65, childhood MMR/DTaP); screenings by age and sex (mammography for
  women 40-74, Pap tests 21-65, colonoscopy 45-75);
* encounters (ambulatory, some emergency, ~8 % hospitalized in the last year), appointments
  (past ones fulfilled / no-show / cancelled, upcoming ones booked), care plans for chronic
  patients, one coverage row;
* delivery history: 40 campaign messages over two years, each contact with an email address
  receiving some of them (delivered, bounced, failed, portal-viewed) with one event per
  recipient.

Encrypted identifier columns are left empty (segments never read them) except where the schema
requires a value (a recipient's address ciphertext), which gets an opaque filler.

The module is also imported by bench/segments.py (``populate``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

# --------------------------------------------------------------------------- vocabulary

LANGUAGES = (("en", 78), ("es", 13), ("zh", 2), ("vi", 1.5), ("tl", 1.5), ("ar", 1), ("fr", 1), ("ru", 1), ("ko", 1))
RACES = (("white", 61), ("black", 13), ("asian", 6), ("american_indian", 1), ("pacific_islander", 0.5), ("other", 10), ("unknown", 8.5))
ETHNICITIES = (("not_hispanic", 80), ("hispanic", 19), ("unknown", 1))
MARITAL = (("M", 48), ("S", 34), ("D", 11), ("W", 6), ("U", 1))
INCOME = (("<25k", 18), ("25-50k", 21), ("50-100k", 29), ("100-200k", 22), (">200k", 10))
STAGES = (("active", 55), ("overdue", 20), ("at_risk", 10), ("new", 15))

# condition key -> (system, code, display)
CONDITIONS = {
    "hypertension": [("snomed", "59621000", "Essential hypertension"), ("icd10cm", "I10", "Essential (primary) hypertension")],
    "diabetes": [("snomed", "44054006", "Diabetes mellitus type 2"), ("icd10cm", "E11.9", "Type 2 diabetes mellitus without complications"),
                 ("icd10cm", "E11.65", "Type 2 diabetes mellitus with hyperglycemia"), ("icd10cm", "E11.22", "Type 2 diabetes mellitus with diabetic chronic kidney disease")],
    "hyperlipidemia": [("icd10cm", "E78.5", "Hyperlipidemia, unspecified"), ("snomed", "55822004", "Hyperlipidemia")],
    "obesity": [("icd10cm", "E66.9", "Obesity, unspecified"), ("snomed", "414916001", "Obesity")],
    "asthma": [("snomed", "195967001", "Asthma"), ("icd10cm", "J45.909", "Unspecified asthma, uncomplicated")],
    "copd": [("snomed", "185086009", "Chronic obstructive bronchitis"), ("icd10cm", "J44.9", "Chronic obstructive pulmonary disease, unspecified")],
    "heart_failure": [("snomed", "88805009", "Chronic congestive heart failure"), ("icd10cm", "I50.9", "Heart failure, unspecified")],
    "ckd": [("icd10cm", "N18.31", "Chronic kidney disease, stage 3a"), ("icd10cm", "N18.32", "Chronic kidney disease, stage 3b")],
    "depression": [("icd10cm", "F32.9", "Major depressive disorder, single episode, unspecified"), ("snomed", "370143000", "Major depressive disorder")],
    "anxiety": [("icd10cm", "F41.1", "Generalized anxiety disorder")],
    "prediabetes": [("icd10cm", "R73.03", "Prediabetes")],
}
MEDS = {
    "hypertension": [("314076", "lisinopril 10 MG Oral Tablet"), ("197361", "amlodipine 5 MG Oral Tablet"),
                     ("310798", "hydrochlorothiazide 25 MG Oral Tablet"), ("979492", "losartan potassium 50 MG Oral Tablet")],
    "diabetes": [("861007", "metformin hydrochloride 500 MG Oral Tablet"), ("861004", "metformin hydrochloride 1000 MG Oral Tablet"),
                 ("310490", "glipizide 5 MG Oral Tablet"), ("1545658", "empagliflozin 10 MG Oral Tablet")],
    "hyperlipidemia": [("617310", "atorvastatin 20 MG Oral Tablet"), ("859747", "rosuvastatin calcium 10 MG Oral Tablet")],
    "asthma": [("745679", "albuterol 0.09 MG/ACTUAT Metered Dose Inhaler")],
    "copd": [("745679", "albuterol 0.09 MG/ACTUAT Metered Dose Inhaler")],
    "heart_failure": [("313988", "furosemide 40 MG Oral Tablet"), ("200032", "carvedilol 12.5 MG Oral Tablet")],
    "depression": [("312941", "sertraline 50 MG Oral Tablet")],
    "anxiety": [("312941", "sertraline 50 MG Oral Tablet")],
}
CARE_PLAN = {
    "diabetes": ("698360004", "Diabetes self management plan"),
    "hypertension": ("443402002", "Lifestyle education regarding hypertension"),
    "asthma": ("699728000", "Asthma self management"),
    "heart_failure": ("735984001", "Heart failure self management plan"),
    "copd": ("412776001", "Chronic obstructive pulmonary disease clinical management plan"),
}
FLU = ("140", "Influenza, seasonal, injectable, preservative free")
COVID = (("208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"), ("207", "COVID-19, mRNA, LNP-S, PF, 100 mcg/0.5 mL dose"))
PAYORS = {"medicare": ("Medicare", "Medicare Part B"), "medicaid": ("Medicaid", "State Medicaid"),
          "commercial": ("Acme Health", "Acme Gold PPO"), "self_pay": ("Self-pay", None)}

ENGAGEMENT_STATUSES = (("delivered", 86), ("bounced", 3), ("failed", 1), ("sent", 3), ("portal_viewed", 6), ("excluded", 1))


def _weighted(options):
    values = [o[0] for o in options]
    cum, total = [], 0.0
    for o in options:
        total += o[1]
        cum.append(total)
    return values, cum


def _pick(rng: random.Random, table) -> str:
    values, cum = table
    return values[_bisect(cum, rng.random() * cum[-1])]


def _bisect(cum, x):
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


_LANG, _RACE, _ETH, _MAR, _INC, _STAGE, _ENG = (_weighted(t) for t in (LANGUAGES, RACES, ETHNICITIES, MARITAL, INCOME, STAGES, ENGAGEMENT_STATUSES))


def _age(rng: random.Random) -> int:
    r = rng.random()
    for upper, lo, hi in ((0.22, 0, 17), (0.45, 18, 34), (0.64, 35, 49), (0.83, 50, 64), (0.95, 65, 79), (1.0, 80, 95)):
        if r < upper:
            return rng.randint(lo, hi)
    return 40


def _prevalence(age: int) -> dict[str, float]:
    adult = age >= 18
    return {
        "hypertension": 0.0 if not adult else 0.08 if age < 40 else 0.33 if age < 60 else 0.60,
        "diabetes": 0.002 if not adult else 0.03 if age < 45 else 0.13 if age < 65 else 0.25,
        "prediabetes": 0.0 if not adult else 0.20 if age < 65 else 0.26,
        "hyperlipidemia": 0.0 if not adult else 0.10 if age < 40 else 0.30 if age < 65 else 0.45,
        "obesity": 0.18 if not adult else 0.40,
        "asthma": 0.07 if not adult else 0.08,
        "copd": 0.0 if age < 40 else 0.04 if age < 65 else 0.11,
        "heart_failure": 0.0 if age < 45 else 0.01 if age < 65 else 0.06 if age < 80 else 0.12,
        "ckd": 0.0 if age < 40 else 0.05 if age < 65 else 0.18,
        "depression": 0.03 if age < 12 else 0.08,
        "anxiety": 0.03 if age < 12 else 0.07,
    }


# --------------------------------------------------------------------------- tables


class Batch:
    """Rows per table as tuples, in the column order of ``COLUMNS``."""

    COLUMNS = {
        "contacts": ("id", "org_id", "birth_date", "sex", "gender_identity", "preferred_language", "time_zone", "ethnicity", "race",
                     "marital_status", "income_band", "coverage_type", "coverage_plan", "city", "state", "postal_code", "country",
                     "deceased", "care_stage", "care_stage_changed_at", "source", "created_at", "updated_at"),
        "conditions": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "verification_status", "category",
                       "onset_date", "abatement_date", "recorded_date", "created_at", "updated_at"),
        "medications": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "source_type", "intent",
                        "authored_on", "start_date", "end_date", "last_fill_date", "days_supply", "refills_allowed", "next_refill_due",
                        "created_at", "updated_at"),
        "observations": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "category", "effective_at",
                         "value_quantity", "value_unit", "created_at", "updated_at"),
        "immunizations": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "occurrence_date", "created_at", "updated_at"),
        "procedures": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "performed_start", "performed_end",
                       "created_at", "updated_at"),
        "encounters": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "class_code", "start_at", "end_at",
                       "is_hospitalization", "discharge_disposition", "created_at", "updated_at"),
        "appointments": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "start_at", "end_at",
                         "minutes_duration", "created_at", "updated_at"),
        "care_plans": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "intent", "period_start", "period_end",
                       "created_at", "updated_at"),
        "coverages": ("id", "org_id", "contact_id", "code_system", "code", "display", "status", "plan_name", "payor_name",
                      "period_start", "created_at", "updated_at"),
        "message_recipients": ("id", "org_id", "message_id", "kind", "address_enc", "address_index", "domain_index", "contact_id",
                               "status", "method", "possible_duplicate", "attempts", "first_attempt_at", "evidence", "updated_at"),
        "message_events": ("id", "org_id", "message_id", "recipient_id", "type", "details", "created_at"),
    }

    def __init__(self):
        self.rows: dict[str, list[tuple]] = {t: [] for t in self.COLUMNS}


class Generator:
    def __init__(self, org_id: str, seed: int, today: date, zips: list[tuple[str, str, str, str]], messages: list[tuple[str, datetime]]):
        self.org_id = org_id
        self.seed = seed
        self.today = today
        self.now = datetime(today.year, today.month, today.day, 12, 0, tzinfo=UTC)
        self.zips = zips
        # heavy-tailed ZIP weights: a few big practices' ZIPs hold most patients
        weights = [1.0 / (i + 10) ** 0.9 for i in range(len(zips))]
        self.zip_table = _weighted(list(zip(range(len(zips)), weights)))
        self.messages = messages
        self.counters: dict[str, int] = {}
        self.filler = secrets.token_bytes(48)

    def _id(self, table: str) -> str:
        n = self.counters.get(table, 0)
        self.counters[table] = n + 1
        return f"{table[:2]}{self.seed:02x}{n:028x}"

    def _day(self, rng: random.Random, days_back_min: int, days_back_max: int) -> date:
        return self.today - timedelta(days=rng.randint(days_back_min, days_back_max))

    def _at(self, d: date, hour: int = 9) -> datetime:
        return datetime(d.year, d.month, d.day, hour, 0, tzinfo=UTC)

    def contact(self, b: Batch, index: int) -> None:
        rng = random.Random(self.seed * 10_000_019 + index)
        org, now, today = self.org_id, self.now, self.today
        cid = f"c{self.seed:02x}{index:029x}"
        age = _age(rng)
        sex = "female" if rng.random() < 0.51 else "male"
        birth = today - timedelta(days=age * 365 + rng.randint(0, 364))
        zi = int(_pick(rng, self.zip_table))
        zip5, city, state, tz = self.zips[zi]
        deceased = rng.random() < 0.01
        coverage = "medicare" if age >= 65 else ("medicaid" if rng.random() < 0.2 else "self_pay" if rng.random() < 0.08 else "commercial")
        payor, plan = PAYORS[coverage]
        stage = "deceased" if deceased else _pick(rng, _STAGE)
        b.rows["contacts"].append((
            cid, org, birth, sex, None, _pick(rng, _LANG), tz, _pick(rng, _ETH), _pick(rng, _RACE),
            _pick(rng, _MAR) if age >= 18 else "S", _pick(rng, _INC), coverage, plan, city, state, zip5, "US",
            deceased, stage, now - timedelta(days=rng.randint(0, 400)), "fhir", now, now))
        facts = b.rows
        # --- conditions
        prev = _prevalence(age)
        has = {k for k, p in prev.items() if rng.random() < p}
        if "diabetes" in has:
            has.discard("prediabetes")
        for key in has:
            system, code, display = rng.choice(CONDITIONS[key])
            onset = self._day(rng, 60, max(61, min(age * 365, 20 * 365)))
            resolved = key in ("depression", "anxiety", "asthma") and rng.random() < 0.25
            facts["conditions"].append((self._id("conditions"), org, cid, system, code, display, "resolved" if resolved else "active",
                                        "confirmed", "problem-list-item", onset,
                                        onset + timedelta(days=rng.randint(30, 400)) if resolved else None, onset, now, now))
        # --- medications
        for key in has:
            for code, display in (rng.sample(MEDS[key], min(len(MEDS[key]), 1 + (rng.random() < 0.35))) if key in MEDS else ()):
                start = self._day(rng, 30, 2000)
                active = rng.random() < 0.85
                days_supply = rng.choice((30, 30, 90))
                last_fill = today - timedelta(days=rng.randint(0, days_supply + 40)) if active else start + timedelta(days=rng.randint(0, 300))
                facts["medications"].append((self._id("medications"), org, cid, "rxnorm", code, display, "active" if active else "stopped",
                                             "MedicationRequest", "order", start, start, None if active else last_fill + timedelta(days=days_supply),
                                             last_fill, days_supply, rng.randint(0, 5), last_fill + timedelta(days=days_supply) if active else None,
                                             now, now))
        # --- vitals: blood pressure (panel + components), BMI, weight
        visits = 1 + (rng.random() < 0.6) + (rng.random() < 0.3) + (len(has) > 1)
        htn = "hypertension" in has
        for _ in range(visits):
            at = self._at(self._day(rng, 1, 1100), rng.randint(8, 17))
            sys_v = round(rng.gauss(142 if htn else 121, 14))
            dia_v = round(rng.gauss(88 if htn else 77, 9))
            facts["observations"].append((self._id("observations"), org, cid, "loinc", "85354-9", "Blood pressure panel with all children optional",
                                          "final", "vital-signs", at, None, None, now, now))
            facts["observations"].append((self._id("observations"), org, cid, "loinc", "8480-6", "Systolic blood pressure", "final", "vital-signs",
                                          at, float(sys_v), "mm[Hg]", now, now))
            facts["observations"].append((self._id("observations"), org, cid, "loinc", "8462-4", "Diastolic blood pressure", "final", "vital-signs",
                                          at, float(dia_v), "mm[Hg]", now, now))
            if age >= 2 and rng.random() < 0.6:
                bmi = rng.gauss(33 if "obesity" in has else 25, 3.5 if "obesity" in has else 3)
                facts["observations"].append((self._id("observations"), org, cid, "loinc", "39156-5", "Body mass index (BMI) [Ratio]", "final",
                                              "vital-signs", at, round(bmi, 1), "kg/m2", now, now))
                facts["observations"].append((self._id("observations"), org, cid, "loinc", "29463-7", "Body weight", "final", "vital-signs",
                                              at, round(bmi * rng.uniform(2.5, 3.2), 1), "kg", now, now))
        # --- labs
        a1c_count = (2 + rng.randint(0, 3)) if "diabetes" in has else (1 if ("prediabetes" in has or rng.random() < 0.12) and age >= 18 else 0)
        base = rng.gauss(7.6, 1.3) if "diabetes" in has else rng.gauss(6.0 if "prediabetes" in has else 5.4, 0.3)
        for _ in range(a1c_count):
            at = self._at(self._day(rng, 5, 900), 8)
            facts["observations"].append((self._id("observations"), org, cid, "loinc", "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood",
                                          "final", "laboratory", at, round(max(4.2, base + rng.gauss(0, 0.5)), 1), "%", now, now))
        if "hyperlipidemia" in has or (age >= 40 and rng.random() < 0.3):
            at = self._at(self._day(rng, 5, 900), 8)
            for code, display, mean in (("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", 205), ("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation", 125)):
                facts["observations"].append((self._id("observations"), org, cid, "loinc", code, display, "final", "laboratory", at,
                                              float(round(rng.gauss(mean, 25))), "mg/dL", now, now))
        # --- immunizations
        flu_p = 0.35 if age < 18 else 0.40 if age < 50 else 0.52 if age < 65 else 0.70
        for season in range(3):
            if rng.random() < flu_p:
                d = date(today.year - season - (1 if today.month < 9 else 0), rng.choice((9, 10, 10, 11, 12)), rng.randint(1, 28))
                if d <= today:
                    facts["immunizations"].append((self._id("immunizations"), org, cid, "cvx", FLU[0], FLU[1], "completed", d, now, now))
        if age >= 5 and rng.random() < (0.55 if age < 65 else 0.8):
            for dose in range(rng.randint(1, 3)):
                code, display = rng.choice(COVID)
                facts["immunizations"].append((self._id("immunizations"), org, cid, "cvx", code, display, "completed",
                                               self._day(rng, 30, 1400), now, now))
        if age >= 11 and rng.random() < 0.6:
            facts["immunizations"].append((self._id("immunizations"), org, cid, "cvx", "115", "Tdap", "completed", self._day(rng, 30, 3650), now, now))
        if age >= 50 and rng.random() < 0.4:
            facts["immunizations"].append((self._id("immunizations"), org, cid, "cvx", "187", "Zoster recombinant", "completed", self._day(rng, 30, 2000), now, now))
        if age >= 65 and rng.random() < 0.65:
            facts["immunizations"].append((self._id("immunizations"), org, cid, "cvx", "133", "Pneumococcal conjugate PCV 13", "completed", self._day(rng, 30, 3000), now, now))
        if age < 18:
            for code, display in (("03", "MMR"), ("20", "DTaP")):
                if rng.random() < 0.9:
                    facts["immunizations"].append((self._id("immunizations"), org, cid, "cvx", code, display, "completed",
                                                   birth + timedelta(days=rng.randint(365, 400)), now, now))
        # --- screenings
        if sex == "female" and 40 <= age <= 74 and rng.random() < 0.7:
            for _ in range(rng.randint(1, 2)):
                d = self._day(rng, 10, 1400)
                facts["procedures"].append((self._id("procedures"), org, cid, "snomed", "71651007", "Mammography", "completed",
                                            self._at(d, 9), self._at(d, 10), now, now))
        if sex == "female" and 21 <= age <= 65 and rng.random() < 0.6:
            d = self._day(rng, 10, 1800)
            facts["procedures"].append((self._id("procedures"), org, cid, "snomed", "417036008", "Cervical smear taken (liquid based cytology)",
                                        "completed", self._at(d, 9), self._at(d, 10), now, now))
        if 45 <= age <= 80 and rng.random() < 0.55:
            d = self._day(rng, 30, 3650)
            facts["procedures"].append((self._id("procedures"), org, cid, "snomed", "73761001", "Colonoscopy", "completed",
                                        self._at(d, 8), self._at(d, 10), now, now))
        # --- encounters
        n_enc = 1 + int(rng.expovariate(1 / (1.5 + 0.8 * len(has))))
        for _ in range(min(n_enc, 25)):
            d = self._day(rng, 1, 1100)
            emergency = rng.random() < 0.06
            facts["encounters"].append((self._id("encounters"), org, cid, "snomed", "50849002" if emergency else "185349003",
                                        "Emergency room admission" if emergency else "Encounter for check up", "finished",
                                        "EMER" if emergency else "AMB", self._at(d, 10), self._at(d, 11), False, None, now, now))
        if rng.random() < (0.05 + 0.03 * len(has)):
            d = self._day(rng, 3, 365)
            facts["encounters"].append((self._id("encounters"), org, cid, "snomed", "32485007", "Hospital admission", "finished", "IMP",
                                        self._at(d, 14), self._at(d + timedelta(days=rng.randint(1, 7)), 11), True, "home", now, now))
        # --- appointments
        for _ in range(rng.randint(0, 4)):
            offset = rng.randint(-365, 90)
            d = today + timedelta(days=offset)
            status = "booked" if offset > 0 else rng.choices(("fulfilled", "noshow", "cancelled"), (80, 12, 8))[0]
            facts["appointments"].append((self._id("appointments"), org, cid, "snomed", "185349003", "Encounter for check up", status,
                                          self._at(d, 10), self._at(d, 10) + timedelta(minutes=30), 30, now, now))
        # --- care plans
        for key in has & set(CARE_PLAN):
            if rng.random() < 0.5:
                code, display = CARE_PLAN[key]
                facts["care_plans"].append((self._id("care_plans"), org, cid, "snomed", code, display, "active", "plan",
                                            self._day(rng, 30, 900), None, now, now))
        # --- coverage
        facts["coverages"].append((self._id("coverages"), org, cid, None, coverage, payor, "active", plan, payor,
                                   self._day(rng, 100, 3000), now, now))
        # --- delivery history (90 % have an email address)
        if rng.random() < 0.9:
            engaged = rng.random()
            n_msg = 0 if engaged < 0.15 else rng.randint(1, 3) if engaged < 0.7 else rng.randint(3, 7)
            address_index = f"{rng.getrandbits(128):032x}{rng.getrandbits(128):032x}"
            for mi in rng.sample(range(len(self.messages)), min(n_msg, len(self.messages))):
                message_id, sent_at = self.messages[mi]
                status = _pick(rng, _ENG)
                rid = self._id("message_recipients")
                at = sent_at + timedelta(minutes=rng.randint(1, 120))
                facts["message_recipients"].append((rid, org, message_id, "to", self.filler, address_index, "d" * 64, cid, status,
                                                    "tls" if status != "portal_viewed" else "portal", False, 1, at, {}, at))
                facts["message_events"].append((self._id("message_events"), org, message_id, rid, status, {}, at))


# --------------------------------------------------------------------------- writing


_SQLITE_CACHE: dict = {}


def _sqlite_datetime(v: datetime) -> str:
    out = _SQLITE_CACHE.get(v)
    if out is None:
        u = v.astimezone(UTC)  # the format SQLAlchemy's SQLite DateTime stores
        out = _SQLITE_CACHE[v] = f"{u.year:04d}-{u.month:02d}-{u.day:02d} {u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}"
    return out


def _sqlite_date(v: date) -> str:
    out = _SQLITE_CACHE.get(v)
    if out is None:
        out = _SQLITE_CACHE[v] = v.isoformat()
    return out


_SQLITE_CONVERT = {datetime: _sqlite_datetime, date: _sqlite_date, bool: int, dict: json.dumps}


def _sqlite_row(row: tuple) -> tuple:
    conv = _SQLITE_CONVERT
    return tuple(v if (f := conv.get(type(v))) is None else f(v) for v in row)


def _required_defaults(table: str) -> tuple[tuple[str, ...], tuple]:
    """NOT NULL columns of ``table`` this generator does not fill, with their scalar defaults
    (a column added to a model later, such as a flag defaulting to True, still gets a value)."""
    from carepost.core.database import Base

    names, values = [], []
    for col in Base.metadata.tables[table].columns:
        if col.name in Batch.COLUMNS[table] or col.nullable or col.primary_key:
            continue
        if col.default is not None and getattr(col.default, "is_scalar", False):
            names.append(col.name)
            values.append(col.default.arg)
    return tuple(names), tuple(values)


def write_batch(conn, batch: Batch) -> int:
    """Write one batch in one transaction's worth of statements; returns the rows written."""
    dialect = conn.dialect.name
    total = 0
    for table, rows in batch.rows.items():
        if not rows:
            continue
        extra_cols, extra_values = _required_defaults(table)
        cols = Batch.COLUMNS[table] + extra_cols
        if extra_cols:
            rows = [row + extra_values for row in rows]
        total += len(rows)
        if dialect == "postgresql":
            raw = conn.connection.dbapi_connection
            with raw.cursor() as cur:
                with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row([json.dumps(v) if isinstance(v, dict) else v for v in row])
        else:
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            conn.exec_driver_sql(sql, [_sqlite_row(row) for row in rows])
    return total


def _zip_pool(rng: random.Random, count: int = 2000) -> list[tuple[str, str, str, str]]:
    import zipcodes

    standard = [z for z in zipcodes.list_all() if z["zip_code_type"] == "STANDARD" and z["active"] and z["state"] not in ("AA", "AE", "AP")]
    standard.sort(key=lambda z: z["zip_code"])
    picked = rng.sample(standard, min(count, len(standard)))
    # make sure the Boston and Cambridge ZIPs the benchmark query uses are well represented
    for z in ("02108", "02139", "02115", "02118", "02446"):
        picked.insert(0, next(x for x in standard if x["zip_code"] == z))
    return [(z["zip_code"], z["city"], z["state"], z["timezone"] or "America/New_York") for z in picked]


def populate(engine, org_id: str, contacts: int, seed: int = 1, today: date | None = None, batch_size: int = 2000,
             progress: bool = False, drop_indexes: bool = True) -> dict:
    """Write ``contacts`` contacts with their facts into ``org_id``; returns counts and timing.
    ``drop_indexes``: drop the written tables' secondary indexes during the load and build them
    afterwards (for an empty database; tests writing a few hundred rows keep them)."""
    from sqlalchemy import insert

    from carepost.delivery.models import Message

    rng = random.Random(seed)
    today = today or datetime.now(UTC).date()
    filler = secrets.token_bytes(48)
    messages = []
    with engine.begin() as conn:
        rows = []
        for i in range(40):
            mid = f"ms{seed:02x}{i:028x}"
            at = datetime(today.year, today.month, today.day, 15, 0, tzinfo=UTC) - timedelta(days=int(730 * (i / 40)) + 3)
            messages.append((mid, at))
            rows.append({"id": mid, "org_id": org_id, "source": "campaign", "from_address": "news@clinic.example", "subject_enc": filler,
                         "security": "tls", "purpose": "marketing" if i % 3 else "care_reminder", "tags": [], "contains_phi": False,
                         "sandbox": False, "created_at": at})
        conn.execute(insert(Message.__table__), rows)
    gen = Generator(org_id, seed, today, _zip_pool(rng), messages)
    t0 = time.perf_counter()
    # The usual bulk-load technique: drop the secondary indexes of the tables written, load,
    # build them again (one sort per index instead of millions of random B-tree inserts).
    from carepost.core.database import Base

    indexes = [ix for t in Batch.COLUMNS for ix in Base.metadata.tables[t].indexes] if drop_indexes else []
    with engine.begin() as conn:
        for ix in indexes:
            ix.drop(conn, checkfirst=True)
    written = 0
    counts: dict[str, int] = {}
    for start in range(0, contacts, batch_size):
        b = Batch()
        for i in range(start, min(start + batch_size, contacts)):
            gen.contact(b, i)
        for t, r in b.rows.items():
            counts[t] = counts.get(t, 0) + len(r)
        with engine.begin() as conn:
            written += write_batch(conn, b)
        if progress and (start // batch_size) % 25 == 0:
            el = time.perf_counter() - t0
            print(json.dumps({"contacts": min(start + batch_size, contacts), "rows": written, "seconds": round(el, 1)}), flush=True)
    loaded = time.perf_counter() - t0
    with engine.begin() as conn:
        for ix in indexes:
            ix.create(conn, checkfirst=True)
    elapsed = time.perf_counter() - t0
    facts = sum(v for k, v in counts.items() if k not in ("contacts", "message_recipients", "message_events"))
    return {"contacts": contacts, "rows": counts, "clinical_facts_per_contact": round(facts / max(1, contacts), 1),
            "facts_per_contact_with_delivery": round((written - contacts) / max(1, contacts), 1),
            "insert_seconds": round(loaded, 1), "load_seconds": round(elapsed, 1), "rows_per_second": round(written / elapsed) if elapsed else None}


def analyze(engine) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))


# --------------------------------------------------------------------------- command line


def setup_database(database_url: str | None, keep: bool) -> tuple[str | None, str | None]:
    """Point CarePost at a scratch data directory (and a scratch PostgreSQL database)."""
    work = Path(tempfile.mkdtemp(prefix="carepost-segbench-"))
    os.environ["CAREPOST_DATA_DIR"] = str(work / "data")
    if not database_url:
        return None, None
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    scratch = f"carepost_segbench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{scratch}"')
    os.environ["CAREPOST_DATABASE_URL"] = make_url(database_url).set(drivername="postgresql+psycopg", database=scratch).render_as_string(hide_password=False)
    return admin, scratch


def drop_database(admin: str | None, scratch: str | None) -> None:
    if not scratch:
        return
    import psycopg

    from carepost.core.database import dispose_engine

    dispose_engine()
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')


def create_org(name: str = "Segments Bench") -> str:
    """Initialize storage and create the organization (with its keys) through the services."""
    try:
        from carepost.assembly import assemble
    except ImportError:  # before the composition root landed
        assemble = None
    from carepost.accounts.service import create_organization
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.database import system_session
    from carepost.core.logging import configure_logging

    configure_logging("WARNING", True)
    if assemble is not None:
        assemble()
    else:
        import carepost.models  # noqa: F401
    initialize_storage()
    with system_session() as s:
        org_id = create_organization(s, name).id
        s.commit()
    return org_id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created (and dropped unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the scratch database / data directory and print where")
    args = p.parse_args()
    admin, scratch = setup_database(args.database_url, args.keep)
    try:
        org_id = create_org()
        from carepost.core.database import get_engine

        result = populate(get_engine(), org_id, args.contacts, seed=args.seed, progress=True)
        analyze(get_engine())
        result.update({"database": "postgresql" if scratch else "sqlcipher", "org_id": org_id,
                       "data_dir": os.environ["CAREPOST_DATA_DIR"], "scratch_database": scratch if args.keep else None})
        print(json.dumps(result))
    finally:
        if not args.keep:
            drop_database(admin, scratch)


if __name__ == "__main__":
    main()
