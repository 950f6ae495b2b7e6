"""The retention purge of the classes that go through their owner (issue 16 item 1): inactive
contacts (``patients.service.delete_contacts``, a chunk at a time, with the deletion hooks and
one audit event per contact) and audit events (cut from the chain's start under a signed anchor,
the legal holds resolved in SQL by :mod:`carepost.retention.held`).

    .venv/bin/python bench/retention_classes.py --class contacts --count 20000
    .venv/bin/python bench/retention_classes.py --class contacts --count 100000 --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/retention_classes.py --class audit --count 100000 --hold --database-url postgresql://postgres@127.0.0.1:5432/postgres

Per run, on scratch storage (embedded SQLCipher, or a scratch PostgreSQL database created and
dropped; ``bench/_scratch.py``):

* ``contacts``: ``--count`` contacts created and last changed three years ago, each with one
  e-mail identifier (ciphertext-sized value, its own blind index); every fourth has unsubscribed
  from marketing, with the address suppression ``unsubscribe_contact`` writes (it must survive
  the contact, its clear-text copy dropped); inserted set-based; a contacts
  schedule of 24 inactive months;
* ``audit``: ``--count`` audit events appended through ``audit.service.record_many`` eight years
  ago (the real hash chain), an audit schedule of six years; with ``--hold``, a patient hold on a
  contact whose message is the target of the chain's very last old event, so every chunk
  evaluates the hold condition on its events and the cut stops just before that event.

Then ``retention.purge.run_purge`` (``--chunk`` records per transaction, a duty cycle of 1: no
rest, the purge's own cost) is timed: wall seconds, this process's CPU seconds, records per second.
Prints one JSON line per run and writes a summary with the median of ``--runs`` runs
(``--out``, default ``bench/results/retention_classes_<class>_<db>_<count>.json``). Speed is
measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _scratch  # bench/ is put first on the path just above

YEAR = timedelta(days=365)
SEED_BATCH = 5000


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def seed_contacts(org_id: str, count: int) -> None:
    """``count`` inactive contacts with one e-mail identifier each; every fourth unsubscribed."""
    import hashlib

    from sqlalchemy import insert

    from carepost.consent.models import ALL_MARKETING, Subscription
    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.core.ids import new_id
    from carepost.delivery.models import Suppression
    from carepost.patients.models import Contact, ContactIdentifier

    when = clock.now() - 3 * YEAR
    blob = os.urandom(60)  # ciphertext-sized: the purge never opens it
    with org_session(org_id) as s:
        for lo in range(0, count, SEED_BATCH):
            contacts, identifiers, subscriptions, suppressions = [], [], [], []
            for i in range(lo, min(count, lo + SEED_BATCH)):
                cid = new_id()
                contacts.append({"id": cid, "org_id": org_id, "family_name_enc": blob, "created_at": when,
                                 "updated_at": when})
                identifiers.append({"id": new_id(), "org_id": org_id, "contact_id": cid, "kind": "email", "rank": 0,
                                    "value_enc": blob, "created_at": when,
                                    "blind_index": hashlib.sha256(f"bench-{i}".encode()).hexdigest()})
                if i % 4 == 0:  # as unsubscribe_contact leaves it: the opt-out and its address suppression
                    subscriptions.append({"id": new_id(), "org_id": org_id, "contact_id": cid, "topic_id": None,
                                          "topic_key": ALL_MARKETING, "status": "unsubscribed", "source": "bench",
                                          "unsubscribed_at": when, "created_at": when, "updated_at": when})
                    suppressions.append({"id": new_id(), "org_id": org_id, "address_index": identifiers[-1]["blind_index"],
                                         "reason": "unsubscribe", "scope": "marketing", "scope_key": "marketing:",
                                         "source": "bench", "created_at": when, "updated_at": when})
            s.execute(insert(Contact), contacts)
            s.execute(insert(ContactIdentifier), identifiers)
            if subscriptions:
                s.execute(insert(Subscription), subscriptions)
                s.execute(insert(Suppression), suppressions)
            s.commit()


def seed_audit(org_id: str, count: int, hold: bool) -> str | None:
    """``count`` audit events (the real chain) at the clock's time (the caller set it eight years
    back); with ``hold`` the last one reads a message sent to a patient that a legal hold will
    protect. Returns that patient's id."""
    from carepost.audit.service import record_many
    from carepost.core.database import org_session

    patient = message = None
    with org_session(org_id) as s:
        if hold:
            patient, message = _patient_with_message(s, org_id)
        for lo in range(0, count, SEED_BATCH):
            items = [{"org_id": org_id, "actor_type": "user", "actor_id": "bench", "action": "contact.read",
                      "target_type": "contact", "target_id": f"c{i}", "details": {"view": "masked"}}
                     for i in range(lo, min(count, lo + SEED_BATCH))]
            if hold and lo + SEED_BATCH >= count:
                items[-1] = {"org_id": org_id, "actor_type": "user", "actor_id": "bench", "action": "message.read",
                             "target_type": "message", "target_id": message, "details": {}}
            record_many(s, items)
            s.commit()
    return patient


def _patient_with_message(s, org_id: str) -> tuple[str, str]:
    from carepost.core.ids import new_id
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    patient = save_contact(s, org_id, ContactIn(given_name="Held", family_name="Patient",
                                                email="held@example.test")).contact.id
    mid, rid = new_id(), new_id()
    s.add(Message(id=mid, org_id=org_id, source="api", from_address="clinic@example.test", security="tls_required",
                  subject_enc=b"x" * 40))
    s.flush()
    s.add(MessageRecipient(id=rid, org_id=org_id, message_id=mid, address_enc=b"x" * 40, address_index="bench",
                           domain_index="bench", contact_id=patient, status="delivered"))
    s.flush()
    return patient, mid


def run_once(args) -> dict:
    with _scratch.scratch_storage(args.database_url, prefix="carepost-bench-retention-classes-"):
        from carepost.core.config import reset_settings
        from carepost.core.crypto import reset_keyring
        from carepost.core.database import dispose_engine

        # the purge's own cost, without the rest its duty cycle takes (a setting of this version on)
        os.environ["CAREPOST_RETENTION_PURGE_DUTY"] = "1"
        reset_settings()  # a run after the first: new data dir, master key and database
        reset_keyring()
        dispose_engine()
        from carepost.core import clock

        t = time.perf_counter()
        if args.record_class == "audit":
            clock.advance(-8 * YEAR)  # the organization and its oldest events are past six years
        try:
            org_id = _scratch.bench_organization("Retention Classes Bench")
            if args.record_class == "contacts":
                seed_contacts(org_id, args.count)
                patient = None
            else:
                patient = seed_audit(org_id, args.count, args.hold)
        finally:
            clock.reset()
        from carepost.core.database import org_session
        from carepost.retention import purge, service

        actor = service.Actor("system", "bench")
        with org_session(org_id) as s:
            if args.record_class == "contacts":
                service.set_schedule(s, org_id, "contacts", min_days=0, max_days=365, inactive_months=24, actor=actor)
            else:
                service.set_schedule(s, org_id, "audit", min_days=service.HIPAA_MIN_DAYS,
                                     max_days=service.HIPAA_MIN_DAYS, actor=actor)
            if patient:
                service.place_hold(s, org_id, scope="patient", contact_id=patient, matter="Bench v. Clinic",
                                   reason="benchmark", actor=actor)
            s.commit()
        seed_s = time.perf_counter() - t
        load_before = _loadavg()
        cpu, wall0 = _cpu(), time.perf_counter()
        run = purge.run_purge(org_id, actor, chunk=args.chunk)
        wall, cpu = time.perf_counter() - wall0, _cpu() - cpu
        deleted = run["progress"][args.record_class]["count"]
        return {"record_class": args.record_class, "count": args.count, "hold": bool(args.hold), "deleted": deleted,
                "chunk": args.chunk, "seed_seconds": round(seed_s, 1), "purge_wall_seconds": round(wall, 2),
                "purge_cpu_seconds": round(cpu, 2), "records_per_second": round(deleted / wall) if wall else None,
                "database": "postgresql" if args.database_url else "sqlite",
                "load_before": load_before, "load_after": _loadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--class", dest="record_class", choices=("contacts", "audit"), default="contacts")
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=2000)
    ap.add_argument("--hold", action="store_true", help="audit: a patient hold the purge must resolve on every chunk")
    ap.add_argument("--database-url", default=None, help="Administrator URL of a PostgreSQL server (scratch database).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.count < 1 or args.chunk < 1 or args.runs < 1:
        ap.error("--count, --chunk and --runs must be at least 1")
    if args.hold and args.record_class != "audit":
        ap.error("--hold applies to --class audit")
    db = "postgresql" if args.database_url else "sqlite"
    _scratch.repeat(args.runs, lambda: run_once(args), ("purge_wall_seconds", "purge_cpu_seconds", "records_per_second"),
                    Path(args.out or HERE / "results" / f"retention_classes_{args.record_class}_{db}_{args.count}.json"))

if __name__ == "__main__":
    main()
