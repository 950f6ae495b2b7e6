"""The journeys engine's speed (issue 15, Speed): runs advanced per second, and a date-relative
entry evaluated over a large population.

    .venv/bin/python bench/journeys.py --runs-active 100000
    .venv/bin/python bench/journeys.py --runs-active 100000 --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/journeys.py --runs-active 0 --contacts 1000000 --database-url postgresql://...

Set-up (untimed): a scratch database (SQLCipher, or a scratch PostgreSQL database), an
organization, ``max(--runs-active, --contacts)`` bare contacts written set-wise (birth dates
spread over the year, sex, no clinical facts; COPY on PostgreSQL), a live journey of non-send
steps — ``split`` (50/50) -> ``branch`` on an attribute (``sex = female``, the segment language
compiled once per group) -> ``wait 1d`` -> ``exit`` — and ``--runs-active`` runs of it, all due.

1. **Advance** (``--repeat`` times, median): one call of ``engine.run_tick`` as the worker's
   periodic task runs it (one process, chunks of ``CAREPOST_JOURNEY_TICK_CHUNK`` runs per
   transaction) advances every run through split, branch and wait (3 steps each, a step row each,
   the run parked for a day). Figure: steps per second. Between repeats the runs are put back at
   their first step and their step rows deleted (untimed).
2. **Date entry** (``--contacts`` > 0; ``--repeat`` times, median): a second live journey whose
   entry is every contact's birthday (``birth_date``, anniversary, at 09:00 in the contact's zone),
   published a day ago; ``entries.evaluate_due`` evaluates it over every contact of the
   organization and starts the runs whose moment falls in the window (about two days of
   birthdays). Between repeats those runs are deleted and the evaluation mark cleared.

Prints JSON lines; ``--json`` writes the result too. Sends are not part of this bench (a send's
cost is delivery's: rendering, storing, DKIM, SMTP — see bench/campaigns.py and the delivery benches).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import segments_population as pop

STEPS = {
    "s1": {"type": "split", "variants": [{"name": "A", "weight": 50, "next": "s2"},
                                         {"name": "B", "weight": 50, "next": "s2"}]},
    "s2": {"type": "branch", "cases": [{"when": {"kind": "attribute", "field": "sex", "op": "eq", "value": "female"},
                                        "next": "s3"}], "default": "s3"},
    "s3": {"type": "wait", "duration": "1d", "next": "s4"},
    "s4": {"type": "exit"},
}


def write_contacts(org_id: str, n: int) -> float:
    from carepost.campaigns.planning import write_rows
    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.core.ids import new_id
    from carepost.patients.models import Contact

    rng = random.Random(7)
    now = clock.now()
    started = time.perf_counter()
    base = date(1940, 1, 1)
    with org_session(org_id) as s:
        for i in range(0, n, 20_000):
            rows = [{"id": new_id(), "org_id": org_id, "birth_date": base + timedelta(days=rng.randrange(0, 365 * 80)),
                     "sex": "female" if rng.random() < 0.52 else "male", "deceased": False, "care_stage": "active",
                     "created_at": now, "updated_at": now} for _ in range(min(20_000, n - i))]
            write_rows(s, Contact.__table__, rows)
            s.commit()
    return time.perf_counter() - started


def make_journey(org_id: str, entry: dict, steps: dict, published_days_ago: float = 0.0) -> tuple[str, str, dict]:
    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.journeys.models import Journey, JourneyVersion

    definition = {"purpose": "treatment", "entry": entry, "reentry": {"mode": "never"}, "start": "s1", "steps": steps}
    with org_session(org_id) as s:
        j = Journey(org_id=org_id, name=f"Bench {entry['type']}", status="live", current_version=1)
        s.add(j)
        s.flush()
        v = JourneyVersion(org_id=org_id, journey_id=j.id, version=1, definition=definition,
                           published_at=clock.now() - timedelta(days=published_days_ago))
        s.add(v)
        s.commit()
        return j.id, v.id, definition


def start_runs(org_id: str, journey_id: str, version_id: str, n: int) -> None:
    from sqlalchemy import select

    from carepost.campaigns.planning import write_rows
    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.core.ids import new_id
    from carepost.journeys.models import JourneyRun
    from carepost.patients.models import Contact

    now = clock.now()
    with org_session(org_id) as s:
        ids = list(s.scalars(select(Contact.id).where(Contact.org_id == org_id).order_by(Contact.id).limit(n)))
        for i in range(0, len(ids), 20_000):
            write_rows(s, JourneyRun.__table__, [{
                "id": new_id(), "org_id": org_id, "journey_id": journey_id, "version": 1, "version_id": version_id,
                "contact_id": cid, "state": "active", "step_id": "s1", "wake_at": now, "waiting_event": None, "seq": 0,
                "variants": {}, "active_key": cid, "entry_key": "bench", "lease_until": None, "entered_at": now,
                "updated_at": now, "ended_at": None, "exit_reason": None, "converted_at": None}
                for cid in ids[i:i + 20_000]])
            s.commit()


def reset_runs(org_id: str, journey_id: str) -> None:
    from sqlalchemy import delete, update

    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.journeys.models import JourneyRun, JourneyRunStep

    with org_session(org_id) as s:
        s.execute(delete(JourneyRunStep).where(JourneyRunStep.journey_id == journey_id))
        s.execute(update(JourneyRun).where(JourneyRun.journey_id == journey_id).values(
            state="active", step_id="s1", seq=0, wake_at=clock.now(), variants={}, waiting_event=None))
        s.commit()


def advance_once(org_id: str, chunk: int) -> dict:
    from carepost.journeys import engine

    started = time.perf_counter()
    report = engine.run_tick(org_id, chunk=chunk, entries=False, enqueue=False)
    elapsed = time.perf_counter() - started
    return {"seconds": round(elapsed, 2), "runs": report.runs, "steps": report.steps,
            "steps_per_second": round(report.steps / elapsed) if elapsed else None,
            "runs_per_second": round(report.runs / elapsed) if elapsed else None}


def entry_once(org_id: str, journey_id: str, version_id: str) -> dict:
    from sqlalchemy import delete, update

    from carepost.core.database import org_session
    from carepost.journeys import entries
    from carepost.journeys.models import JourneyRun, JourneyVersion

    with org_session(org_id) as s:
        s.execute(delete(JourneyRun).where(JourneyRun.journey_id == journey_id))
        s.execute(update(JourneyVersion).where(JourneyVersion.id == version_id).values(entry_evaluated_at=None))
        s.commit()
    started = time.perf_counter()
    n = entries.evaluate_due(org_id, force=True)
    elapsed = time.perf_counter() - started
    return {"seconds": round(elapsed, 2), "runs_started": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-active", type=int, default=100_000, help="active runs advanced by one tick")
    p.add_argument("--contacts", type=int, default=0, help="contacts the date entry is evaluated over (0: skip)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of each part (median reported)")
    p.add_argument("--chunk", type=int, default=None, help="runs per tick transaction (default: the setting)")
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created")
    p.add_argument("--keep", action="store_true", help="keep the scratch database / data directory")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    admin, scratch = pop.setup_database(args.database_url, args.keep)
    try:
        from carepost.assembly import assemble

        assemble()
        from carepost.core.config import get_settings
        from carepost.core.database import get_engine

        chunk = args.chunk or get_settings().journey_tick_chunk
        org_id = pop.create_org("Journeys Bench")
        n_contacts = max(args.runs_active, args.contacts)
        load = write_contacts(org_id, n_contacts)
        pop.analyze(get_engine())
        result = {"database": get_engine().dialect.name.replace("sqlite", "sqlcipher"), "contacts": n_contacts,
                  "contacts_load_seconds": round(load, 1), "chunk": chunk}
        print(json.dumps(result), flush=True)
        if args.runs_active:
            jid, vid, _ = make_journey(org_id, {"type": "event", "event": "bench.started"}, STEPS)
            start_runs(org_id, jid, vid, args.runs_active)
            pop.analyze(get_engine())
            advances = []
            for i in range(args.repeat):
                if i:
                    reset_runs(org_id, jid)
                    pop.analyze(get_engine())
                r = advance_once(org_id, chunk)
                advances.append(r)
                print(json.dumps({"advance": i + 1, **r, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}),
                      flush=True)
            result["advance"] = {"runs_active": args.runs_active, "runs": advances,
                                 "median_steps_per_second": statistics.median(r["steps_per_second"] for r in advances),
                                 "median_seconds": statistics.median(r["seconds"] for r in advances)}
            reset_runs(org_id, jid)  # leave them out of the date entry's way: park them
        if args.contacts:
            entry = {"type": "date", "field": "birth_date", "anniversary": True, "at": "09:00"}
            jid2, vid2, _ = make_journey(org_id, entry, {"s1": {"type": "exit"}}, published_days_ago=1)
            tries = []
            for i in range(args.repeat):
                r = entry_once(org_id, jid2, vid2)
                tries.append(r)
                print(json.dumps({"date_entry": i + 1, **r, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}),
                      flush=True)
            result["date_entry"] = {"contacts": n_contacts, "runs": tries,
                                    "median_seconds": statistics.median(r["seconds"] for r in tries)}
        result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
        print(json.dumps({k: v for k, v in result.items()}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    finally:
        if not args.keep:
            pop.drop_database(admin, scratch)
            pop.remove_data_dir()


if __name__ == "__main__":
    os.environ.setdefault("CAREPOST_LOG_LEVEL", "WARNING")
    main()
