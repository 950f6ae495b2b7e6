"""Benchmark: segment counts on a large synthetic population, compiled query vs hand-written SQL.

    .venv/bin/python bench/segments.py --contacts 100000
    .venv/bin/python bench/segments.py --contacts 100000 --database-url postgresql://postgres@127.0.0.1:5432/postgres

Fills one organization with N contacts and their clinical facts and delivery history
(bench/segments_population.py, bulk inserts), runs ANALYZE, then, for each benchmark question:

* ``engine``: ``carepost.segments.service.count`` — parse, compile and run the ONE statement the
  compiler builds, through an organization-scoped session (what the API and CLI call);
* ``hand``: the best SQL written by hand for the same question (uncorrelated IN / NOT IN
  semi-joins, which both planners run as one pass over each fact table's matching rows; the
  latest-value test as NOT EXISTS of a later row of the same contact), through the same session;

one warm-up, then three timed runs each, alternating, and the median; the counts must agree.
Then parse + compile time alone (median of three runs of 200 each). Prints one JSON document and
writes it to ``--output`` (default bench/results/segments_<database>_<contacts>.json), with the
query plans of both forms.

Questions (each a demographic, a clinical criterion with recency and an engagement criterion):

* ``mammography_gap``: women 50-74 without a mammogram in 24 months who received a message
  in the last 365 days;
* ``uncontrolled_a1c``: adults whose latest HbA1c within 12 months is above 8 and who received
  a message in the last 90 days.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import statistics
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import segments_population as population

QUESTIONS = {
    "mammography_gap": ('age between 50 and 74 and sex = female and not has procedure in valueset "mammography" within 24 months '
                        'and has message_delivered within 365 days'),
    "uncontrolled_a1c": 'age >= 18 and last observation in valueset "hba1c" > 8 within 12 months and has message_delivered within 90 days',
}


def _years_back(d: date, years: int) -> date:
    y = d.year - years
    return date(y, d.month, min(d.day, calendar.monthrange(y, d.month)[1]))


def _months_back(d: date, months: int) -> date:
    y, m = divmod(d.month - 1 - months, 12)
    year, month = d.year + y, m + 1
    return date(year, month, min(d.day, calendar.monthrange(year, month)[1]))


def _codes_sql(alias: str, value_set: dict, params: dict, prefix: str) -> str:
    """``(alias.code_system = 'x' AND alias.code IN (...))`` OR ... for a value set's exact codes."""
    from carepost.segments.library import sql_terms

    parts = []
    for i, (system, terms) in enumerate(sorted(sql_terms(value_set).items())):
        alts = []
        if terms["codes"]:
            names = []
            for j, code in enumerate(terms["codes"]):
                params[f"{prefix}{i}_{j}"] = code
                names.append(f":{prefix}{i}_{j}")
            alts.append(f"{alias}.code IN ({', '.join(names)})")
        for j, pattern in enumerate(terms["like"]):
            params[f"{prefix}{i}_l{j}"] = pattern
            alts.append(f"{alias}.code LIKE :{prefix}{i}_l{j}")
        params[f"{prefix}{i}_sys"] = system
        parts.append(f"({alias}.code_system = :{prefix}{i}_sys AND ({' OR '.join(alts)}))")
    return "(" + " OR ".join(parts) + ")"


def hand_sql(name: str, org_id: str, at: datetime, message_days: int | None = None) -> tuple[str, dict]:
    """The hand-written SQL for a question, with its parameters (bounds computed as documented:
    ages on the evaluation day, windows from the same instant N months ago to now).
    ``message_days`` overrides the engagement window (tests on small populations)."""
    from carepost.segments.library import shipped_value_set

    today = at.date()
    params: dict = {"org": org_id, "now": at}
    if name == "mammography_gap":
        params.update(b_old=_years_back(today, 75), b_young=_years_back(today, 50),
                      since=datetime.combine(_months_back(today, 24), at.timetz()),
                      msg_since=datetime.combine(today - timedelta(days=message_days or 365), at.timetz()))
        codes = _codes_sql("p", shipped_value_set("mammography"), params, "m")
        sql = f"""
SELECT count(*) FROM contacts c
WHERE c.org_id = :org AND (c.deceased IS NULL OR c.deceased = :false)
  AND c.sex = 'female' AND c.birth_date > :b_old AND c.birth_date <= :b_young
  AND c.id NOT IN (SELECT p.contact_id FROM procedures p
                   WHERE p.org_id = :org AND p.code_verified = :true AND {codes}
                     AND p.performed_start >= :since AND p.performed_start <= :now)
  AND c.id IN (SELECT r.contact_id FROM messages m JOIN message_recipients r ON r.message_id = m.id
               WHERE m.org_id = :org AND m.sandbox = :false AND m.created_at >= :msg_since AND m.created_at <= :now
                 AND r.org_id = :org AND r.status IN ('delivered', 'portal_viewed'))"""
    elif name == "uncontrolled_a1c":
        params.update(b_adult=_years_back(today, 18), since=datetime.combine(_months_back(today, 12), at.timetz()),
                      msg_since=datetime.combine(today - timedelta(days=message_days or 90), at.timetz()))
        vs = shipped_value_set("hba1c")
        codes_o = _codes_sql("o", vs, params, "a")
        codes_l = _codes_sql("l", vs, params, "a")
        sql = f"""
SELECT count(*) FROM contacts c
WHERE c.org_id = :org AND (c.deceased IS NULL OR c.deceased = :false)
  AND c.birth_date <= :b_adult
  AND c.id IN (SELECT o.contact_id FROM observations o
               WHERE o.org_id = :org AND o.code_verified = :true AND {codes_o}
                 AND o.effective_at >= :since AND o.effective_at <= :now AND o.value_quantity > 8
                 AND NOT EXISTS (SELECT 1 FROM observations l
                                 WHERE l.contact_id = o.contact_id AND l.org_id = :org AND l.code_verified = :true AND {codes_l}
                                   AND l.effective_at <= :now
                                   AND (l.effective_at > o.effective_at OR (l.effective_at = o.effective_at AND l.id > o.id))))
  AND c.id IN (SELECT r.contact_id FROM messages m JOIN message_recipients r ON r.message_id = m.id
               WHERE m.org_id = :org AND m.sandbox = :false AND m.created_at >= :msg_since AND m.created_at <= :now
                 AND r.org_id = :org AND r.status IN ('delivered', 'portal_viewed'))"""
    else:
        raise KeyError(name)
    params.update({"true": True, "false": False})
    return sql, params


def _plan(session, sql: str, params: dict) -> list[str]:
    from sqlalchemy import text

    if session.bind.dialect.name == "postgresql":
        rows = session.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql), params).all()
        return [r[0] for r in rows]
    rows = session.execute(text("EXPLAIN QUERY PLAN " + sql), params).all()
    return [" ".join(str(x) for x in r) for r in rows]


def _captured_statement(session, call) -> tuple[str, object]:
    """The SQL and parameters the database received during ``call()`` (the last statement):
    the statement as executed, organization scoping included."""
    from sqlalchemy import event

    seen = []

    def listener(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", listener)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    counts = [x for x in seen if "count(" in x[0].lower()]  # not the planner-settings statements around it
    return counts[-1] if counts else seen[-1]


def _server_cpu(session):
    """A function returning the CPU seconds used so far by this session's PostgreSQL backend process
    (the server runs on this machine; /proc), or None. With --serial the backend does all of the
    query's work, so the difference is the query's server-side CPU time: what it costs without the
    waiting a shared machine adds."""
    if session.bind.dialect.name != "postgresql":
        return None
    from sqlalchemy import text

    pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    return cpu


def _plan_driver(session, statement: str, parameters) -> list[str]:
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        return [r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters).all()]
    return [" ".join(str(x) for x in r) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()]


def run(args, org_id: str) -> dict:
    from sqlalchemy import text

    from carepost.core.database import get_engine, org_session

    engine = get_engine()
    try:
        from carepost.segments import compiler, language, service
    except ImportError as exc:  # the engine has not landed: hand-written SQL only
        service = None
        engine_missing = str(exc)
    else:
        engine_missing = None
    from carepost.core import clock

    at = clock.now()
    out: dict = {"questions": {}}
    # the hand-written SQL runs under the planner settings the service uses (on PostgreSQL: no JIT)
    settings = getattr(service, "planner_settings", None) if service else None
    if settings is None:
        settings = lambda _s: contextlib.nullcontext()
    with org_session(org_id) as s:
        for name, query in QUESTIONS.items():
            if args.serial and s.bind.dialect.name == "postgresql":  # each question ends in a rollback
                s.execute(text("SET max_parallel_workers_per_gather = 0"))
                out["serial"] = True
            server_cpu = _server_cpu(s) if args.serial else None  # this question's backend; all the work only when serial
            sql, params = hand_sql(name, org_id, at)
            res: dict = {"query": query, "hand_sql": " ".join(sql.split())}
            hand_times, engine_times, hand_n, engine_n = [], [], None, None
            # warm-up (caches), then three alternating timed runs
            with settings(s):
                s.execute(text(sql), params).scalar()
            if service:
                service.count(s, org_id, query, service.SYSTEM, at=at)
            hand_cpu, engine_cpu, hand_srv, engine_srv = [], [], [], []
            for _ in range(args.runs):
                t, c, sc = time.perf_counter(), time.process_time(), server_cpu() if server_cpu else None
                with settings(s):
                    hand_n = s.execute(text(sql), params).scalar()
                hand_times.append(time.perf_counter() - t)
                hand_cpu.append(time.process_time() - c)
                if server_cpu:
                    hand_srv.append(server_cpu() - sc)
                if service:
                    t, c, sc = time.perf_counter(), time.process_time(), server_cpu() if server_cpu else None
                    engine_n = service.count(s, org_id, query, service.SYSTEM, at=at)["count"]
                    engine_times.append(time.perf_counter() - t)
                    engine_cpu.append(time.process_time() - c)
                    if server_cpu:
                        engine_srv.append(server_cpu() - sc)
            # on SQLCipher the database runs inside this process, so its CPU time is the query's
            # cost without the waiting a loaded machine adds; on PostgreSQL it is only the client's
            res["hand"] = {"count": hand_n, "runs_s": [round(x, 4) for x in hand_times], "median_s": round(statistics.median(hand_times), 4),
                           "median_cpu_s": round(statistics.median(hand_cpu), 4)}
            if hand_srv:
                res["hand"]["server_cpu_runs_s"] = [round(x, 3) for x in hand_srv]
                res["hand"]["median_server_cpu_s"] = round(statistics.median(hand_srv), 3)
            with settings(s):
                res["hand_plan"] = _plan(s, sql, params)
            if service:
                res["engine"] = {"count": engine_n, "runs_s": [round(x, 4) for x in engine_times],
                                 "median_s": round(statistics.median(engine_times), 4),
                                 "median_cpu_s": round(statistics.median(engine_cpu), 4)}
                if engine_srv:
                    res["engine"]["server_cpu_runs_s"] = [round(x, 3) for x in engine_srv]
                    res["engine"]["median_server_cpu_s"] = round(statistics.median(engine_srv), 3)
                res["engine_over_hand"] = round(statistics.median(engine_times) / statistics.median(hand_times), 2)
                res["counts_agree"] = engine_n == hand_n
                csql, cparams = _captured_statement(s, lambda q=query: service.count(s, org_id, q, service.SYSTEM, at=at))
                res["engine_sql"] = " ".join(csql.split())
                with settings(s):
                    res["engine_plan"] = _plan_driver(s, csql, cparams)
                # parse + compile alone
                medians, parse_medians = [], []
                for _ in range(args.runs):
                    ts, ps = [], []
                    for _ in range(200):
                        t = time.perf_counter()
                        tree = language.parse(query)
                        p = time.perf_counter()
                        compiler.compile_query(s, org_id, tree, at)
                        ts.append(time.perf_counter() - t)
                        ps.append(p - t)
                    medians.append(statistics.median(ts))
                    parse_medians.append(statistics.median(ps))
                res["parse_compile_ms"] = {"runs_median_ms": [round(x * 1000, 3) for x in medians],
                                           "median_ms": round(statistics.median(medians) * 1000, 3),
                                           "parse_only_median_ms": round(statistics.median(parse_medians) * 1000, 3)}
            s.rollback()
            out["questions"][name] = res
    if engine_missing:
        out["engine"] = f"not measured: the segments engine could not be imported ({engine_missing})"
    out["database"] = engine.dialect.name if engine.dialect.name == "postgresql" else "sqlcipher"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--serial", action="store_true",
                   help="PostgreSQL: no parallel workers, so the backend's CPU time (server_cpu) is the whole query's")
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    p.add_argument("--keep", action="store_true", help="keep the populated database for --reuse")
    p.add_argument("--reuse", default=None, metavar="ORG_ID",
                   help="time an existing population: CAREPOST_DATABASE_URL / CAREPOST_DATA_DIR set, the organization id")
    p.add_argument("--workers", type=int, default=None, help="generating processes for the load (default: 2 on PostgreSQL, else 1)")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    admin = scratch = None
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    try:
        if args.reuse:
            from carepost.core.database import get_engine
            from carepost.core.logging import configure_logging

            configure_logging("WARNING", True)
            try:
                from carepost.assembly import assemble

                assemble()
            except ImportError:
                import carepost.models  # noqa: F401
            org_id, load = args.reuse, {"reused": True}
        else:
            admin, scratch = population.setup_database(args.database_url, args.keep)
            org_id = population.create_org()
            from carepost.core.database import get_engine

            load = population.populate(get_engine(), org_id, args.contacts, seed=args.seed, workers=args.workers)
            population.analyze(get_engine())
        result = run(args, org_id)
        result.update({
            "contacts": args.contacts, "population": load, "org_id": org_id,
            "command": " ".join([".venv/bin/python", "bench/segments.py", *sys.argv[1:]]),
            "loadavg_before": loadavg_before,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
            "measured_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        })
        if args.keep and not args.reuse:
            result["kept"] = {"CAREPOST_DATA_DIR": os.environ.get("CAREPOST_DATA_DIR"), "database": scratch}
        text = json.dumps(result, indent=2, default=str)
        output = Path(args.output or Path(__file__).resolve().parent / "results" / f"segments_{result['database']}_{args.contacts}.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
        print(text)
    finally:
        if scratch and not args.keep:
            population.drop_database(admin, scratch)
        if not args.keep and not args.reuse:
            population.remove_data_dir()


if __name__ == "__main__":
    main()
