"""Synthetic patients for the demo (``carepost run --demo``), tests and benchmarks.

``carebundle`` generates clinically coherent US Core R4 bundles offline (patient, encounter,
conditions, labs, vitals, prescriptions) but no immunizations, procedures, appointments,
coverage, care plans, inpatient stays, addresses or email. :func:`synthetic_bundle` adds them,
deterministically for a seed, with email addresses under the reserved ``.example`` domain and
phone numbers in the 555-01xx fiction range, so nothing can reach a real person.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone

PROFILES = ("type2_diabetes", "hypertension", "healthy", "ckd_stage3", "anaemia")
CITIES = [
    ("Springfield", "IL", "62701"), ("Madison", "WI", "53703"), ("Columbus", "OH", "43215"), ("Denver", "CO", "80202"),
    ("Austin", "TX", "78701"), ("Portland", "OR", "97205"), ("Raleigh", "NC", "27601"), ("Phoenix", "AZ", "85004"),
    ("Boston", "MA", "02108"), ("Nashville", "TN", "37203"), ("Sacramento", "CA", "95814"), ("Tampa", "FL", "33602"),
]
STREETS = ["Maple Ave", "Oak St", "Cedar Ln", "Elm St", "Park Rd", "Lakeview Dr", "Hillcrest Ct", "River Rd"]
LANGUAGES = [("en", 80), ("es", 14), ("zh", 2), ("vi", 2), ("fr", 2)]
VACCINES = [("140", "Influenza, seasonal, injectable, preservative free"), ("208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"),
            ("115", "Tdap"), ("133", "Pneumococcal conjugate PCV 13"), ("187", "Zoster recombinant")]
PROCEDURES = [("73761001", "Colonoscopy"), ("71651007", "Mammography"), ("252416005", "Histopathology test"),
              ("80146002", "Appendectomy"), ("232717009", "Coronary artery bypass grafting")]
PAYORS = [("Medicare", "MCPOL", "Medicare Part B"), ("Medicaid", "SUBSIDIZ", "State Medicaid"),
          ("Acme Health", "HIP", "Acme Gold PPO"), ("Blue Valley", "HIP", "Blue Valley HMO Silver"), ("Self-pay", "pay", None)]
CARE_PLANS = {
    "type2_diabetes": ("698360004", "Diabetes self management plan"),
    "hypertension": ("443402002", "Lifestyle education regarding hypertension"),
    "ckd_stage3": ("736285004", "Hyperlipidemia clinical management plan"),
}
REFERENCE_DATE = date(2026, 1, 1)


def _uuid(rng: random.Random) -> str:
    import uuid

    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _dt(d: date, hour: int = 9) -> str:
    return datetime(d.year, d.month, d.day, hour, 0, tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def synthetic_bundle(index: int, seed: int = 1, reference_date: date = REFERENCE_DATE) -> dict:
    """One patient as a FHIR R4 transaction Bundle (Synthea-like: urn:uuid references)."""
    from carebundle import generate_bundle, to_json

    rng = random.Random(seed * 1_000_003 + index)
    profile = PROFILES[rng.randrange(len(PROFILES))]
    sex = "F" if rng.random() < 0.52 else "M"
    age_low = rng.choice((25, 35, 45, 55, 65, 75))
    bundle = json.loads(to_json(generate_bundle(profile=profile, seed=seed * 100_000 + index, sex=sex,
                                                age_range=(age_low, age_low + 10), reference_date=reference_date, index=index)))
    entries = bundle["entry"]
    patient_entry = next(e for e in entries if e["resource"]["resourceType"] == "Patient")
    patient = patient_entry["resource"]
    patient_ref = patient_entry["fullUrl"]
    given = (patient.get("name") or [{}])[0].get("given", ["pat"])[0]
    family = (patient.get("name") or [{}])[0].get("family", "ient")
    city, state, zip_code = CITIES[rng.randrange(len(CITIES))]
    patient["address"] = [{"use": "home", "line": [f"{rng.randint(10, 9999)} {rng.choice(STREETS)}"], "city": city,
                           "state": state, "postalCode": zip_code, "country": "US"}]
    telecom = [{"system": "phone", "value": f"555-01{rng.randint(0, 99):02d}", "use": "mobile"}]
    if index % 10 != 9:  # one patient in ten has no email address, as in real practices
        telecom.append({"system": "email", "value": f"{given}.{family}.{index}@mail.example".lower()})
    patient["telecom"] = telecom
    patient.setdefault("identifier", []).append({
        "system": "urn:carepost:demo:mrn", "value": f"MRN{seed:02d}{index:07d}",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}})
    lang = rng.choices([c for c, _ in LANGUAGES], weights=[w for _, w in LANGUAGES])[0]
    patient["communication"] = [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": lang}]}, "preferred": True}]
    patient["maritalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                            "code": rng.choice("MSDW")}]}

    def add(resource: dict) -> None:
        full = "urn:uuid:" + _uuid(rng)
        entries.append({"fullUrl": full, "resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}})

    subject = {"reference": patient_ref}
    for code, display in rng.sample(VACCINES, rng.randint(1, 3)):
        add({"resourceType": "Immunization", "status": "completed", "patient": subject,
             "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": code, "display": display}]},
             "occurrenceDateTime": (reference_date - timedelta(days=rng.randint(10, 700))).isoformat()})
    for code, display in rng.sample(PROCEDURES, rng.randint(0, 2)):
        day = reference_date - timedelta(days=rng.randint(30, 2000))
        add({"resourceType": "Procedure", "status": "completed", "subject": subject,
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
             "performedPeriod": {"start": _dt(day, 8), "end": _dt(day, 10)}})
    for _ in range(rng.randint(1, 4)):
        offset = rng.randint(-300, 120)
        day = reference_date + timedelta(days=offset)
        status = "booked" if offset > 0 else rng.choices(["fulfilled", "noshow", "cancelled"], weights=[80, 12, 8])[0]
        add({"resourceType": "Appointment", "status": status, "start": _dt(day, 10), "end": _dt(day, 11), "minutesDuration": 30,
             "serviceType": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Encounter for check up"}]}],
             "participant": [{"actor": subject, "status": "accepted"}]})
    payor, type_code, plan = PAYORS[rng.randrange(len(PAYORS))]
    coverage = {"resourceType": "Coverage", "status": "active", "beneficiary": subject, "payor": [{"display": payor}],
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": type_code, "display": payor}]},
                "period": {"start": (reference_date - timedelta(days=rng.randint(100, 3000))).isoformat()}}
    if plan:
        coverage["class"] = [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "plan"}]},
                              "value": plan.upper().replace(" ", "-"), "name": plan}]
        coverage["subscriberId"] = f"{payor[:3].upper()}{rng.randint(10**8, 10**9 - 1)}"
    add(coverage)
    if profile in CARE_PLANS:
        code, display = CARE_PLANS[profile]
        add({"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": subject,
             "category": [{"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]}],
             "period": {"start": (reference_date - timedelta(days=rng.randint(30, 900))).isoformat()}})
    if rng.random() < 0.1:  # a recent hospitalization
        start = reference_date - timedelta(days=rng.randint(5, 200))
        add({"resourceType": "Encounter", "status": "finished", "subject": subject,
             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP", "display": "inpatient encounter"},
             "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "32485007", "display": "Hospital admission"}]}],
             "period": {"start": _dt(start, 14), "end": _dt(start + timedelta(days=rng.randint(1, 7)), 11)},
             "hospitalization": {"dischargeDisposition": {"coding": [{"code": "home", "display": "Home"}]}}})
    return bundle


def synthetic_bundles(count: int, seed: int = 1) -> Iterator[dict]:
    for i in range(count):
        yield synthetic_bundle(i, seed)


def write_ndjson(path, count: int, seed: int = 1) -> int:
    """A bulk-data style NDJSON file (one resource per line, each with an id; references as
    ``Type/id`` since NDJSON has no fullUrl); returns the number of resources written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for bundle in synthetic_bundles(count, seed):
            refs = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['fullUrl'].rsplit(':', 1)[-1]}" for e in bundle["entry"]}
            for entry in bundle["entry"]:
                resource = dict(entry["resource"], id=entry["fullUrl"].rsplit(":", 1)[-1])
                text = json.dumps(resource, separators=(",", ":"))
                for full, ref in refs.items():
                    if full in text:
                        text = text.replace(f'"{full}"', f'"{ref}"')
                f.write(text + "\n")
                n += 1
    return n


def load_demo(session, org_id: str, count: int = 200, seed: int = 1):
    """Import ``count`` synthetic patients into an organization (committing as it goes)."""
    from carepost.core.ids import new_id
    from carepost.patients.fhir import FhirImporter
    from carepost.patients.imports import DbErrorSink, create_job

    job = create_job(session, org_id, format="fhir", filename="demo-population.json", created_by="demo")
    job.status = "running"
    session.commit()
    data = json.dumps({"resourceType": "Bundle", "type": "collection",
                       "entry": [e for b in synthetic_bundles(count, seed) for e in b["entry"]]}).encode()
    sink = DbErrorSink(session, job)
    run_id = new_id()
    stats = FhirImporter(session, org_id, run_id, sink).import_json(lambda: io.BytesIO(data))
    from carepost.patients.imports import patient_counts

    stats.patients, stats.patients_without_email = patient_counts(session, org_id, run_id)
    job.status = "completed_with_errors" if sink.seq else "succeeded"
    job.counts, job.processed, job.error_count, job.warning_count = stats.as_dict(), stats.processed, sink.seq, sink.warnings
    session.commit()
    return job


DEMO_ORG_NAME = "Demo Clinic (synthetic patients)"


def ensure_demo_population(count: int = 200, seed: int = 1) -> tuple[str, int]:
    """Create the demo organization (flagged ``settings.demo``) with ``count`` synthetic
    patients, once: a second call finds it and changes nothing. Returns (organization slug,
    patients loaded now).

    Its name says what it is, so it is never mistaken for the clinic the setup link creates.
    The person who used the setup link becomes an owner of it (here when setup is already done,
    at setup otherwise: ``accounts.service.setup_first_owner``), so the demo is reachable from
    the organization menu rather than stranded in an organization nobody belongs to."""
    from sqlalchemy import select

    from carepost.accounts.models import Membership, OneTimeLink, Organization, User
    from carepost.accounts.service import add_membership, create_organization
    from carepost.audit.service import record
    from carepost.core.database import org_session, system_session

    with system_session() as s:
        org = next((o for o in s.scalars(select(Organization)) if (o.settings or {}).get("demo")), None)
        if org is not None:
            return org.slug, 0
        org = create_organization(s, DEMO_ORG_NAME)
        org.settings = {**(org.settings or {}), "demo": True}
        record(s, org_id=org.id, actor_type="system", actor_id="demo", action="organization.create",
               target_type="organization", target_id=org.id, details={"demo": True})
        owner_id = s.scalar(select(OneTimeLink.user_id).where(OneTimeLink.purpose == "setup", OneTimeLink.used_at.is_not(None),
                                                             OneTimeLink.user_id.is_not(None)).order_by(OneTimeLink.used_at))
        owner = s.get(User, owner_id) if owner_id else None
        if owner is not None and not s.scalar(select(Membership.id).where(Membership.org_id == org.id, Membership.user_id == owner.id)):
            add_membership(s, org.id, owner, "owner")
            record(s, org_id=org.id, actor_type="system", actor_id="demo", action="membership.create",
                   target_type="user", target_id=owner.id, details={"role": "owner", "demo": True})
        s.commit()
        org_id, slug = org.id, org.slug
    with org_session(org_id) as s:
        job = load_demo(s, org_id, count, seed)
        return slug, job.counts.get("patients", 0)
