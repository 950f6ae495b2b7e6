"""Benchmark: contact look-up by email or MRN through the blind index at scale.

    .venv/bin/python bench/patients_lookup.py --contacts 1000000
    .venv/bin/python bench/patients_lookup.py --contacts 1000000 --database-url postgresql://postgres@127.0.0.1:5432/postgres

Fills one organization with N contacts, each with an email address and an MRN (blind indexes
computed with the organization's real index key), then times ``service.find_contact_ids`` —
the function the API and UI search call — for random existing and missing values. Prints
one JSON line with latency percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import time

from _scratch import bench_organization, scratch_storage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--lookups", type=int, default=2000)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    args = p.parse_args()
    with scratch_storage(args.database_url):
        print(json.dumps(run(args)))


def run(args) -> dict:
    from sqlalchemy import insert, text

    from carepost.core import clock
    from carepost.core.database import get_engine, org_session
    from carepost.patients import service
    from carepost.patients.models import Contact, ContactIdentifier

    org_id = bench_organization("Lookup Bench")
    mrn_system = "urn:carepost:mrn"
    fake_ct = secrets.token_bytes(60)  # look-ups never decrypt; rows carry a ciphertext-sized value
    t0 = time.perf_counter()
    with org_session(org_id) as s:
        service.register_identifier_systems(s, org_id, [(mrn_system, "MR")])
        s.commit()
        now = clock.now()
        batch = 20000
        for start in range(0, args.contacts, batch):
            contacts, idents = [], []
            for n in range(start, min(start + batch, args.contacts)):
                cid = f"{n:032x}"
                contacts.append({"id": cid, "org_id": org_id, "care_stage": "new", "deceased": False, "created_at": now, "updated_at": now})
                idents.append({"id": f"e{n:031x}", "org_id": org_id, "contact_id": cid, "kind": "email", "system": None,
                               "type_code": None, "rank": 0, "value_enc": fake_ct,
                               "blind_index": service.blind_index(s, org_id, "email", f"person{n}@mail.example"), "created_at": now})
                idents.append({"id": f"m{n:031x}", "org_id": org_id, "contact_id": cid, "kind": "identifier", "system": mrn_system,
                               "type_code": "MR", "rank": 0, "value_enc": fake_ct,
                               "blind_index": service.blind_index(s, org_id, "identifier", f"MRN{n:08d}", system=mrn_system),
                               "created_at": now})
            s.execute(insert(Contact.__table__), contacts)
            s.execute(insert(ContactIdentifier.__table__), idents)
            s.commit()
    loaded = time.perf_counter() - t0
    with get_engine().begin() as conn:
        conn.execute(text("ANALYZE"))
    rng = random.Random(7)
    timings = {"email": [], "mrn": [], "missing": []}
    with org_session(org_id) as s:
        for i in range(args.lookups):
            n = rng.randrange(args.contacts)
            for kind in timings:
                t = time.perf_counter()
                if kind == "email":
                    found = service.find_contact_ids(s, org_id, email=f"Person{n}@Mail.Example")
                elif kind == "mrn":
                    found = service.find_contact_ids(s, org_id, mrn=f"MRN{n:08d}")
                else:
                    found = service.find_contact_ids(s, org_id, email=f"nobody{n}@mail.example")
                timings[kind].append((time.perf_counter() - t) * 1000)
                assert ((found == [f"{n:032x}"]) if kind != "missing" else found == []), (kind, n, found)
            s.rollback()

    def pct(values, q):
        values = sorted(values)
        return round(values[min(len(values) - 1, int(q * len(values)))], 3)

    return {
        "database": "postgresql" if args.database_url else "sqlcipher",
        "contacts": args.contacts,
        "identifier_rows": 2 * args.contacts,
        "load_seconds": round(loaded, 1),
        **{f"{kind}_ms": {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "p99": pct(v, 0.99), "mean": round(statistics.mean(v), 3)}
           for kind, v in timings.items()},
    }


if __name__ == "__main__":
    main()
