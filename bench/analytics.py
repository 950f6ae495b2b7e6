"""Benchmark: analytics rollups and reads (issue 13 items 5 and 6).

    .venv/bin/python bench/analytics.py
    .venv/bin/python bench/analytics.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

A fresh data dir (embedded SQLCipher) or a scratch PostgreSQL database, one organization made
through the real services, then, ``--runs`` times (median reported):

1. **Update**: a day of ``--events`` (default 1,000,000) recipient events counted through
   ``carepost.tracking.rollups.add`` exactly as the event handlers count them — one to three
   metrics per event (accepted; sent, delivered and secured:<method>; deferred; bounced; opens
   and clicks), spread over the 24 hours and 12 receiving domains, 90 % from campaigns and
   10 % transactional API messages (these also keep a per-message row) — committed every 500
   events, the pipeline's batch (each commit appends its increments to
   ``analytics_increments``), while a thread folds them into the rollups every
   ``--fold-every`` seconds (the worker's periodic task; default 60), and a last fold after the
   last event. Reports the wall time from the first event to the rollups complete (nothing left
   to fold), the appending and last-fold parts, and checks the rollups sum to what was added.
2. **Read**: rollups of a 1,000,000-recipient campaign written directly (three days, every hour,
   12 providers, every metric), beside 90 days of 30 other campaigns; then the analytics API
   (summary, per source, per receiving provider, hourly series, CSV) filtered to that campaign,
   and the ``/app/analytics`` page for it, through the ASGI app in this process (TestClient):
   each request timed ``--reads`` times, the slowest and the median reported.

3. **Rebuild** (``--rebuild-events``, default 1,000,000; 0 skips it): a day of stored events
   written straight into the tables — messages (one per recipient: 90 % campaign, 10 %
   transactional), recipients over the 12 receiving domains, ``message_events`` (queued, then
   delivered, deferred or bounced) and ``engagement_events`` (opens and clicks by people,
   proxies and scanners) — then ``carepost analytics rebuild --from DAY`` (the CLI's function,
   :func:`carepost.tracking.rebuild.rebuild`, every organization) timed ``--runs`` times: each
   run deletes that day's rollups and recounts them in the database. Checks the day's totals
   against the events written.

Prints and writes one JSON document (``--out``, default ``bench/results/analytics_<db>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fixtures.accounts (a staff member and the real login)

DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "aol.com", "live.com",
           "comcast.net", "msn.com", "me.com", "att.net", "other"]
DOMAIN_WEIGHTS = [38, 9, 8, 6, 7, 2, 2, 2, 1, 1, 1, 23]


def _scratch_pg(admin_url: str) -> str:
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    name = f"carepost_bench_analytics_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin.set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


def _drop_pg(admin_url: str, url: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def setup() -> tuple[str, str]:
    from carepost.assembly import assemble

    assemble()
    from carepost.accounts.credentials import create_credential
    from carepost.accounts.service import create_organization
    from carepost.core.bootstrap import initialize_storage
    from carepost.core.config import get_settings
    from carepost.core.database import system_session

    initialize_storage(get_settings())
    with system_session() as s:
        org = create_organization(s, "Bench Clinic")
        s.commit()
        cred, secret = create_credential(s, org.id, name="bench", scopes=["analytics:read", "phi:read_unmasked"],
                                         rate_limit_per_minute=100_000)
        s.commit()
        return org.id, f"{cred.key_id}.{secret}"


def _event_plan(n: int, seed: int) -> list[tuple]:
    """(hour, metrics, domain, source, message id) per event, generated before timing."""
    rng = random.Random(seed)
    domains = rng.choices(DOMAINS, DOMAIN_WEIGHTS, k=n)
    kinds = rng.choices(["queued", "delivered", "deferred", "bounced", "opened", "clicked"],
                        [30, 28, 4, 2, 26, 10], k=n)
    secured = rng.choices(["secured:tls1.3", "secured:tls1.2", "secured:portal", "secured:pgp"], [70, 25, 4, 1], k=n)
    metrics = {"queued": ("accepted",), "deferred": ("deferred",), "bounced": ("bounced_hard",),
               "opened": ("opened", "opened_unique", "opened_human"), "clicked": ("clicked", "clicked_unique")}
    api_messages = [uuid.uuid4().hex for _ in range(n // 30)]
    plan = []
    for i in range(n):
        kind = kinds[i]
        m = ("sent", "delivered", secured[i]) if kind == "delivered" else metrics[kind]
        api = i % 10 == 0
        plan.append((i * 24 // n, m, domains[i], "api" if api else "campaign",
                     api_messages[(i // 10) % len(api_messages)] if api else None))
    return plan


def _folder(every: float, stop, folds: list) -> None:
    """The worker's periodic fold (``tracking.fold_rollups``), every ``every`` seconds."""
    from carepost.core.database import system_session
    from carepost.tracking.rollups import fold_all

    while not stop.wait(every):
        t0 = time.perf_counter()
        chunks = fold_all(system_session)
        folds.append((round(time.perf_counter() - t0, 2), chunks))


def run_update(org_id: str, n: int, seed: int, fold_every: float) -> dict:
    import threading

    from sqlalchemy import delete, func, select

    from carepost.core.database import org_session, system_session
    from carepost.tracking import rollups
    from carepost.tracking.rollups import AnalyticsRollup, fold_all

    day = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(days=seed)
    campaign = uuid.uuid4().hex
    plan = _event_plan(n, seed)
    hours = [day + timedelta(hours=h) for h in range(24)]
    added = 0
    stop, folds = threading.Event(), []
    folder = threading.Thread(target=_folder, args=(fold_every, stop, folds), daemon=True)
    started = time.perf_counter()
    folder.start()
    with org_session(org_id) as s:
        for start in range(0, n, 500):
            for hour, metrics, domain, source, message_id in plan[start:start + 500]:
                for metric in metrics:
                    rollups.add(s, org_id=org_id, at=hours[hour], metric=metric, source=source,
                                campaign_id=campaign if source == "campaign" else None, receiving_domain=domain,
                                purpose="marketing" if source == "campaign" else "treatment",
                                message_id=message_id, template_id="t" * 26)
                    added += 1
            s.commit()
    appended = time.perf_counter() - started
    stop.set()
    folder.join()
    t0 = time.perf_counter()
    fold_all(system_session)  # what is left after the day's last event: the rollups are then complete
    final_fold = time.perf_counter() - t0
    elapsed = time.perf_counter() - started
    with system_session() as s:
        pending = s.connection().exec_driver_sql("SELECT count(*) FROM analytics_increments").scalar()
        assert pending == 0, pending
        total = s.connection().exec_driver_sql(
            "SELECT sum(n) FROM analytics_rollups WHERE grain = 'd'").scalar()  # read without a fold
        assert total == added, (total, added)
    with org_session(org_id) as s:
        total = s.scalar(select(func.sum(AnalyticsRollup.n)).where(
            AnalyticsRollup.grain == "d", AnalyticsRollup.period == day))
        rows = s.scalar(select(func.count()).select_from(AnalyticsRollup).where(AnalyticsRollup.period >= day))
        assert total == added, (total, added)
        s.execute(delete(AnalyticsRollup).where(AnalyticsRollup.period >= day - timedelta(days=1),
                                                AnalyticsRollup.period < day + timedelta(days=1)))
        s.commit()
    return {"events": n, "increments": added, "seconds": round(elapsed, 2), "events_per_s": round(n / elapsed),
            "append_seconds": round(appended, 2), "final_fold_seconds": round(final_fold, 2),
            "periodic_folds": folds, "rollup_rows": rows}


def _id(at: datetime, rng: random.Random) -> str:
    return f"{int(at.timestamp() * 1000):012x}{rng.getrandbits(80):020x}"


def seed_events(org_id: str, n: int, day: datetime) -> dict:
    """``n`` stored events of one day (see the module docstring); returns what was written per kind."""
    from sqlalchemy import insert

    from carepost.core.crypto import get_keyring
    from carepost.core.database import system_session
    from carepost.delivery.models import Message, MessageEvent, MessageRecipient
    from carepost.tracking.models import EngagementEvent

    rng = random.Random(7)
    with system_session() as s:
        ring = get_keyring()
        index = {d: ring.blind_index(s, org_id, "domain", "family.example" if d == "other" else d) for d in DOMAINS}
        s.commit()
    campaign, template = uuid.uuid4().hex, "t" * 26
    messages, recipients, events, engagement = [], [], [], []
    written = {"queued": 0, "delivered": 0, "deferred": 0, "bounced": 0, "opened": 0, "clicked": 0}
    total, k = 0, 0
    started = time.perf_counter()

    def flush(final: bool = False) -> None:
        if not final and len(events) + len(engagement) < 20_000:
            return
        with system_session() as s:
            conn = s.connection()
            for model, rows in ((Message, messages), (MessageRecipient, recipients), (MessageEvent, events),
                                (EngagementEvent, engagement)):
                if rows:
                    conn.execute(insert(model.__table__), rows)
                    rows.clear()
            s.commit()

    while total < n:
        api = k % 10 == 0
        at = day + timedelta(seconds=int(k * 86_400 // max(1, n // 3.5)) % 82_800)
        mid, rid = _id(at, rng), _id(at, rng)  # ids as carepost.core.ids makes them: time first
        messages.append({"id": mid, "org_id": org_id, "source": "api" if api else "campaign",
                         "campaign_id": None if api else campaign, "from_address": "care@bench.example",
                         "subject_enc": b"", "template_id": template, "contains_phi": False,
                         "security": "tls_required", "purpose": "treatment" if api else "marketing", "tags": [],
                         "sandbox": False, "created_at": at, "track_opens": True, "track_clicks": True})
        domain = rng.choices(DOMAINS, DOMAIN_WEIGHTS)[0]
        tls = rng.random() < 0.7
        recipients.append({"id": rid, "org_id": org_id, "message_id": mid, "kind": "to", "address_enc": b"x",
                           "address_index": rid, "domain_index": index[domain], "status": "delivered",
                           "method": "tls", "evidence": {"tls_version": "TLSv1.3" if tls else "TLSv1.2"},
                           "attempts": 1, "possible_duplicate": False, "updated_at": at})
        outcome = rng.choices(["delivered", "deferred", "bounced"], [28, 4, 2])[0]
        plan = [("queued", {}), (outcome, {"bounce_type": "hard"} if outcome == "bounced" else {})]
        for kind, details in plan:
            events.append({"id": _id(at, rng), "org_id": org_id, "message_id": mid, "recipient_id": rid,
                           "type": kind, "details": details, "created_at": at + timedelta(seconds=len(events) % 60)})
            written[kind] += 1
        total += 2
        if outcome == "delivered":
            for kind, count in (("opened", rng.choices([0, 1, 2, 3], [20, 40, 25, 15])[0]),
                                ("clicked", rng.choices([0, 1, 2], [60, 30, 10])[0])):
                for j in range(count):
                    if total >= n:
                        break
                    cls = rng.choices(["human", "proxy", "scanner"], [80, 15, 5])[0]
                    engagement.append({"id": _id(at, rng), "org_id": org_id, "message_id": mid,
                                       "recipient_id": rid, "type": kind, "link_index": 0 if kind == "clicked" else None,
                                       "classification": cls, "rule": "mail_client", "agent_family": "Chrome",
                                       "occurred_at": at + timedelta(minutes=5 + 7 * j)})
                    written[kind] += 1
                    total += 1
        k += 1
        flush()
    flush(final=True)
    return {"events": total, "recipients": k, "by_kind": written, "seed_seconds": round(time.perf_counter() - started, 1)}


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a local process so far (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_rebuild(day: datetime, written: dict) -> dict:
    from sqlalchemy import func, select

    from carepost.core.database import read_only_session, system_session
    from carepost.tracking import rebuild
    from carepost.tracking.rollups import AnalyticsRollup

    backends: dict[int, float] = {}  # pid -> its CPU seconds when first seen

    @contextmanager
    def sessions():
        """system_session, noting the PostgreSQL server process that does the work (its CPU time
        is the rebuild's, on a machine other processes load)."""
        with system_session() as s:
            if s.get_bind().dialect.name == "postgresql":
                pid = s.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
                backends.setdefault(pid, _proc_cpu(pid))
            yield s

    cpu0 = time.process_time()
    started = time.perf_counter()
    result = rebuild.rebuild(sessions, start=day)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    server_cpu = sum(_proc_cpu(pid) - before for pid, before in backends.items()) if backends else None
    with read_only_session() as s:
        totals = dict(s.execute(select(AnalyticsRollup.metric, func.sum(AnalyticsRollup.n))
                                .where(AnalyticsRollup.grain == "d", AnalyticsRollup.period == day)
                                .group_by(AnalyticsRollup.metric)).all())
        rows = s.scalar(select(func.count()).select_from(AnalyticsRollup).where(AnalyticsRollup.period >= day))
    expect = {"accepted": written["queued"], "delivered": written["delivered"], "deferred": written["deferred"],
              "bounced_hard": written["bounced"], "opened": written["opened"], "clicked": written["clicked"]}
    for metric, n in expect.items():
        assert int(totals.get(metric) or 0) == n, (metric, totals.get(metric), n)
    return {"events": sum(result.events.values()), "seconds": round(elapsed, 2),
            "cpu_seconds_bench_process": round(cpu, 2),
            "cpu_seconds_postgres_backend": round(server_cpu, 2) if server_cpu is not None else None,
            "events_per_s": round(sum(result.events.values()) / elapsed), "rollup_rows": rows,
            "rows_written": result.rows}


def seed_campaign(org_id: str, recipients: int) -> str:
    """Rollups of one large campaign (three days, hourly) and 90 days of 30 others, written directly."""
    from carepost.core.database import org_session
    from carepost.tracking import rollups

    rng = random.Random(11)
    campaign = uuid.uuid4().hex
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rates = {"accepted": 1.0, "excluded:unsubscribed_all": 0.01, "excluded:no_authorization": 0.004,
             "sent": 0.985, "delivered": 0.97, "secured:tls1.3": 0.7, "secured:tls1.2": 0.26,
             "secured:portal": 0.025, "deferred": 0.03, "bounced_hard": 0.008, "bounced_soft": 0.006,
             "complained": 0.0006, "opened": 0.9, "opened_unique": 0.45, "opened_human": 0.22, "clicked": 0.08,
             "clicked_unique": 0.05, "clicked_human": 0.035, "unsubscribed": 0.002, "converted": 0.01}
    hours = [end - timedelta(hours=h) for h in range(72)]
    weights = [max(1.0, 72 - h) ** 2 for h in range(72)]  # most of it in the first hours
    total_w = sum(weights)
    with org_session(org_id) as s:
        for i, at in enumerate(hours):
            share = recipients * weights[i] / total_w
            for domain, dw in zip(DOMAINS, DOMAIN_WEIGHTS):
                for metric, rate in rates.items():
                    n = int(share * dw / 100 * rate)
                    if n:
                        rollups.add(s, org_id=org_id, at=at, metric=metric, n=n, source="campaign",
                                    campaign_id=campaign, receiving_domain=domain, purpose="marketing",
                                    template_id="t" * 26, segment_id="s" * 26)
            s.commit()
        others = [uuid.uuid4().hex for _ in range(30)]
        for day in range(90):
            for c in others[:10] if day % 3 else others:
                at = end - timedelta(days=day, hours=rng.randrange(24))
                for domain in DOMAINS:
                    for metric in ("accepted", "sent", "delivered", "opened_human", "clicked_human", "bounced_hard"):
                        rollups.add(s, org_id=org_id, at=at, metric=metric, n=rng.randrange(20, 400),
                                    source="campaign", campaign_id=c, receiving_domain=domain, purpose="marketing")
            s.commit()
    return campaign


def time_reads(org_id: str, token: str, campaign: str, reads: int) -> dict:
    from fastapi.testclient import TestClient

    from carepost.accounts.service import add_membership  # noqa: F401 - used by add_staff
    from carepost.app import create_app
    from carepost.core.database import system_session
    from tests.fixtures.accounts import add_staff, login_client

    with system_session() as s:
        owner = add_staff(s, org_id, "owner")
        s.commit()
    app = create_app()
    today = datetime.now(UTC).date()
    window = {"start": (today - timedelta(days=3)).isoformat(), "end": today.isoformat(), "campaign_id": campaign}
    headers = {"Authorization": f"Bearer {token}"}
    requests = {
        "api summary": ("/api/v1/analytics/summary", window),
        "api per source": ("/api/v1/analytics/sources", window),
        "api per provider": ("/api/v1/analytics/breakdown", {**window, "by": "receiving_domain"}),
        "api series by hour": ("/api/v1/analytics/series", {**window, "interval": "hour", "metric": [
            "accepted", "delivered", "opened_human", "clicked_human"]}),
        "api csv per provider": ("/api/v1/analytics/export.csv", {**window, "by": "receiving_domain"}),
        "api summary, 90 days, all campaigns": ("/api/v1/analytics/summary",
                                                {"start": (today - timedelta(days=89)).isoformat()}),
    }
    out = {}
    with TestClient(app, base_url="http://localhost:8000") as client:
        check = client.get("/api/v1/analytics/summary", params=window, headers=headers).json()
        out["campaign_accepted"] = check["totals"]["accepted"]
        for name, (path, params) in requests.items():
            times = []
            for _ in range(reads):
                t = time.perf_counter()
                r = client.get(path, params=params, headers=headers)
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
            out[name] = {"median_ms": round(statistics.median(times) * 1000, 1), "max_ms": round(max(times) * 1000, 1)}
        login_client(client, owner)
        times = []
        for params in ({**window, "interval": "hour"}, {**window, "interval": "day"}) * reads:
            t = time.perf_counter()
            r = client.get("/app/analytics", params=params)
            times.append(time.perf_counter() - t)
            assert r.status_code == 200 and "analytics-chart" in r.text, r.text[:500]
        out["page /app/analytics (campaign, hour and day)"] = {"median_ms": round(statistics.median(times) * 1000, 1),
                                                               "max_ms": round(max(times) * 1000, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database-url", help="PostgreSQL admin URL (a scratch database is made and dropped)")
    ap.add_argument("--events", type=int, default=1_000_000, help="0: skip the update part")
    ap.add_argument("--recipients", type=int, default=1_000_000, help="0: skip the read part")
    ap.add_argument("--rebuild-events", type=int, default=1_000_000, help="0: skip the rebuild part")
    ap.add_argument("--fold-every", type=float, default=60.0,
                    help="seconds between the periodic folds during the update (the worker's: every minute)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reads", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="carepost-bench-analytics-")
    env = {"CAREPOST_DATA_DIR": data_dir, "CAREPOST_LOG_LEVEL": "WARNING", "CAREPOST_ARGON2_TIME_COST": "1",
           "CAREPOST_ARGON2_MEMORY_COST": "1024", "CAREPOST_ARGON2_PARALLELISM": "1"}
    pg_url = _scratch_pg(args.database_url) if args.database_url else None
    if pg_url:
        env["CAREPOST_DATABASE_URL"] = pg_url
    os.environ.update(env)
    db = "postgresql" if pg_url else "sqlcipher"
    load_before = os.getloadavg()
    try:
        org_id, token = setup()
        updates, reads, rebuilds, seeded = [], [], [], None
        if args.rebuild_events:
            day = datetime(2026, 10, 1, tzinfo=UTC)
            seeded = seed_events(org_id, args.rebuild_events, day)
            print(json.dumps({"seeded": seeded, "load": os.getloadavg()}), flush=True)
            for _ in range(args.runs):
                rebuilds.append(run_rebuild(day, seeded["by_kind"]))
                print(json.dumps({"rebuild_run": rebuilds[-1], "load": os.getloadavg()}), flush=True)
        for seed in range(args.runs if args.events else 0):
            updates.append(run_update(org_id, args.events, seed, args.fold_every))
            print(json.dumps({"update_run": updates[-1], "load": os.getloadavg()}), flush=True)
        if args.recipients:
            campaign = seed_campaign(org_id, args.recipients)
            for _ in range(args.runs):
                reads.append(time_reads(org_id, token, campaign, args.reads))
                print(json.dumps({"read_run": reads[-1], "load": os.getloadavg()}), flush=True)
    finally:
        from carepost.core.database import dispose_engine

        dispose_engine()
        if pg_url:
            _drop_pg(args.database_url, pg_url)
        shutil.rmtree(data_dir, ignore_errors=True)
    result = {
        "database": db,
        "command": " ".join(["bench/analytics.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "rebuild_seeded": seeded,
        "rebuild_runs": rebuilds,
        "rebuild_median_seconds": statistics.median(r["seconds"] for r in rebuilds) if rebuilds else None,
        "update_runs": updates,
        "update_median_seconds": statistics.median(u["seconds"] for u in updates) if updates else None,
        "read_runs": reads,
        "read_median_ms": {k: statistics.median(r[k]["median_ms"] for r in reads)
                           for k in reads[0] if isinstance(reads[0][k], dict)} if reads else None,
        "read_worst_ms": {k: max(r[k]["max_ms"] for r in reads)
                          for k in reads[0] if isinstance(reads[0][k], dict)} if reads else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    parts = [name for name, on in (("update", args.events), ("reads", args.recipients),
                                   ("rebuild", args.rebuild_events)) if on]
    part = "" if len(parts) == 3 else "_" + "_".join(parts)
    out = Path(args.out or ROOT / "bench" / "results" / f"analytics_{db}{part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
