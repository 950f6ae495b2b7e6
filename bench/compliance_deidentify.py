"""Benchmark: a Safe Harbor de-identified export of a segment (issue 16 item 7).

    .venv/bin/python bench/compliance_deidentify.py --contacts 2000
    .venv/bin/python bench/compliance_deidentify.py --contacts 2000 --database-url postgresql://postgres@127.0.0.1:5432/postgres

Fills one organization with N contacts (names, e-mail, phone, MRN, address — encrypted as usual,
so the known-value guard decrypts real ciphertexts) and three clinical facts each, saves a
segment selecting all of them, then runs ``compliance.service.run_export`` (the worker's code
path) ``--runs`` times per format and prints one JSON line: the median seconds and subjects per
second for jsonl and csv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date, datetime

from _scratch import bench_organization, scratch_storage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    args = p.parse_args()
    with scratch_storage(args.database_url):
        print(json.dumps(run(args)))


def run(args) -> dict:
    from carepost.compliance import service
    from carepost.core.database import get_engine, org_session
    from carepost.patients import models as pm
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact
    from carepost.segments import service as segments

    org_id = bench_organization("De-identification Bench")
    t0 = time.perf_counter()
    with org_session(org_id) as s:
        for i in range(args.contacts):
            c = save_contact(s, org_id, ContactIn(
                given_name=f"Given{i}", family_name=f"Family{i}", email=f"person{i}@example.org",
                phone=f"617555{i % 10000:04d}", mrn=f"MRN{i:08d}", address_line1=f"{i} Main Street",
                city="Boston", state="MA", postal_code=f"0{2100 + i % 90:04d}", country="US",
                birth_date=date(1930 + i % 80, 1 + i % 12, 1 + i % 28), sex="female" if i % 2 else "male",
            )).contact
            s.add(pm.Condition(org_id=org_id, contact_id=c.id, code_system="icd10cm", code="E11.9", status="active",
                               display=f"Diabetes of Given{i}", onset_date=date(2015 + i % 8, 3, 4)))
            s.add(pm.Observation(org_id=org_id, contact_id=c.id, code_system="loinc", code="4548-4",
                                 effective_at=datetime(2023, 1 + i % 12, 2), value_quantity=6.5 + i % 30 / 10,
                                 value_unit="%"))
            s.add(pm.Encounter(org_id=org_id, contact_id=c.id, code_system="snomed", code="185349003", class_code="AMB",
                               start_at=datetime(2024, 1 + i % 12, 3, 9)))
            if i % 1000 == 999:
                s.commit()
        seg = segments.create_segment(s, org_id, {"name": "All", "query": "age >= 0"}, segments.SYSTEM)
        s.commit()
        segment_id = seg.id
    fill_s = time.perf_counter() - t0
    out = {"backend": get_engine().dialect.name, "contacts": args.contacts, "facts": args.contacts * 3,
           "fill_s": round(fill_s, 1), "runs": args.runs}
    for fmt in ("jsonl", "csv"):
        times = []
        for _ in range(args.runs):
            with org_session(org_id) as s:
                job = service.create_export(s, org_id, segment_id, fmt, segments.SYSTEM)
                s.commit()
                started = time.perf_counter()
                job = service.run_export(s, org_id, job.id)
                times.append(time.perf_counter() - started)
                assert job.status == "succeeded" and job.subject_count == args.contacts, job.failure
                size = job.size_bytes
        median = statistics.median(times)
        out[fmt] = {"median_s": round(median, 2), "subjects_per_s": round(args.contacts / median), "bytes": size,
                    "runs_s": [round(t, 2) for t in times]}
    out["load_average"] = os.getloadavg()
    return out


if __name__ == "__main__":
    main()
