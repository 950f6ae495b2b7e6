"""Benchmark: blind-index key rotation (``carepost keys rotate-index``) of one organization.

    .venv/bin/python bench/index_rotation.py --contacts 10000
    .venv/bin/python bench/index_rotation.py --contacts 10000 --database-url postgresql://postgres@127.0.0.1:5432/postgres

Fills one organization with N contacts, each with an email, a phone, an MRN and two name tokens
(five ``contact_identifiers`` rows, blind indexes computed with the organization's real index
key) plus one index-only suppression per ten contacts, then runs ``rotate_index_keys`` three
times (each one re-indexes every row) and prints one JSON line: rows per rotation, the seconds
of each run and their median, and a look-up check after the last one.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import time

from _scratch import bench_organization, scratch_storage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    args = p.parse_args()
    with scratch_storage(args.database_url):
        print(json.dumps(run(args)))


def run(args) -> dict:
    from sqlalchemy import insert

    from carepost.core import clock
    from carepost.core.database import org_session, session_factory
    from carepost.core.reindex import rotate_index_keys
    from carepost.delivery.models import Suppression
    from carepost.patients import service
    from carepost.patients.models import Contact, ContactIdentifier

    org_id = bench_organization("Index Rotation Bench")
    mrn_system = "urn:carepost:mrn"
    fake_ct = secrets.token_bytes(60)  # the rotation never decrypts; rows carry a ciphertext-sized value
    with org_session(org_id) as s:
        now = clock.now()
        for start in range(0, args.contacts, 5000):
            contacts, idents, sups = [], [], []
            for n in range(start, min(start + 5000, args.contacts)):
                cid = f"{n:032x}"
                contacts.append({"id": cid, "org_id": org_id, "care_stage": "new", "deceased": False,
                                 "created_at": now, "updated_at": now})
                values = [("email", None, f"person{n}@mail.example"), ("phone", None, f"555{n:07d}"),
                          ("identifier", mrn_system, f"MRN{n:08d}"), ("name", None, f"given{n}"), ("name", None, f"family{n % 900}")]
                for i, (kind, system, value) in enumerate(values):
                    idents.append({"id": f"{i}{n:031x}", "org_id": org_id, "contact_id": cid, "kind": kind, "system": system,
                                   "type_code": "MR" if system else None, "rank": 0,
                                   "value_enc": None if kind == "name" else fake_ct, "created_at": now,
                                   "blind_index": service.blind_index(s, org_id, kind, value, system=system)})
                if n % 10 == 0:
                    sups.append({"id": f"s{n:031x}", "org_id": org_id, "reason": "unsubscribe", "scope": "all",
                                 "scope_key": "all:", "source": "bench", "details": {}, "created_at": now, "updated_at": now,
                                 "address_index": service.blind_index(s, org_id, "email", f"gone{n}@mail.example")})
            s.execute(insert(Contact.__table__), contacts)
            s.execute(insert(ContactIdentifier.__table__), idents)
            if sups:
                s.execute(insert(Suppression.__table__), sups)
            s.commit()
    seconds, rows = [], 0
    for _ in range(args.runs):
        t0 = time.perf_counter()
        report = rotate_index_keys(session_factory(), [org_id])
        seconds.append(round(time.perf_counter() - t0, 3))
        rows = report.rotated[0].total
    with org_session(org_id) as s:
        n = args.contacts - 1
        found = service.find_contact_ids(s, org_id, email=f"Person{n}@mail.example") == [f"{n:032x}"]
        found = found and service.find_contact_ids_by_name(s, org_id, f"given{n}") == [f"{n:032x}"]
    return {"backend": "postgresql" if args.database_url else "sqlcipher", "contacts": args.contacts,
            "rows_per_rotation": rows, "seconds": seconds, "median_seconds": statistics.median(seconds),
            "rows_per_second": round(rows / statistics.median(seconds)), "lookups_ok": bool(found)}


if __name__ == "__main__":
    main()
