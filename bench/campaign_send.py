"""A campaign end to end through one worker, against the transactional rate of the same run
(issue 14, Speed: "at least 80 % of the transactional send rate measured in the same run by
bench/delivery_worker.py").

    .venv/bin/python bench/campaign_send.py                                   # 16,000 contacts, 3 runs
    .venv/bin/python bench/campaign_send.py --contacts 800 --runs 1           # a quick check
    .venv/bin/python bench/campaign_send.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/campaign_send.py --contacts 6000 --runs 1 --profile /tmp/campaign.folded  # where it goes
    .venv/bin/python bench/campaign_send.py --runs 1 --profile /tmp/c.folded --profile-gil  # GIL holder, both workers
    .venv/bin/python bench/campaign_send.py --runs 2 --profile /tmp/c.folded --profile-runs 2  # both runs' campaigns
    .venv/bin/python bench/campaign_send.py --send-batch 500       # CAREPOST_CAMPAIGN_SEND_BATCH (default 200)
    .venv/bin/python bench/campaign_send.py --contacts 4000 --keep-logs /tmp/logs  # workers' logs kept

Set-up (untimed): the segments benchmark's synthetic population (``bench/segments_population.py``)
of ``--contacts`` contacts with clinical facts, the email identifiers and ~81 % marketing
authorizations ``bench/campaigns.py`` gives them (``prepare_consent``), each email identifier
then holding an address at the sink's domain (encrypted, blind-indexed, as the product stores
them); a proven sending domain with DKIM keys (RSA-2048 + Ed25519) for the campaign's From.
A TLS sink in its own process (``bench/smtp_sink.py``, certificate of a CA of this run that the
worker trusts: verified TLS) records every message's Message-ID.

Each run, in the same database and against the same sink:

1. **Campaign.** A marketing campaign (``tls_required``) to the segment ``age >= 0`` with a
   template that personalizes (``{{ first_name }}``, decrypted per contact) and has a dynamic
   block on a clinical fact (``has condition icd10cm:E11.*``), planned in this process (timed and
   reported, not part of the rate: ``bench/campaigns.py`` measures planning), then its sending task
   is queued and ONE ``carepost worker`` process started: the clock runs from its start until
   every planned recipient is delivered — materializing (rendering each contact's message with its
   blocks, storing it), the delivery pipeline (claim, consent re-check, compose, DKIM, pooled
   verified-TLS SMTP, evidence).
2. **Transactional**, exactly as ``bench/delivery_worker.py`` measures it (its own functions:
   as many PHI messages as the campaign planned, accepted untimed through ``accept_batch`` in a
   new organization, queued, delivered by one worker started the same way).

Reported per run and as the median of the runs: campaign messages/s, the worker's CPU (kernel
accounting) per message, steady rates, the worker's RSS; the transactional figures; the ratio
campaign rate / transactional rate (goal >= 0.80); and for both phases the sink's count by
Message-ID: missing, arrived twice, unexpected (all must be 0). JSON on stdout and in
``--out`` (default bench/results/campaign_send_<database>_<messages>_<time>.json).

Speed is measured here, never asserted in tests (ARCHITECTURE.md section 7).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import campaigns as campaigns_bench
import delivery_worker as dw
import segments_population as pop

SINK_DOMAIN = "sink.test"
PENDING = ("queued", "deferred")  # a recipient whose delivery is not over


def sink_addresses(org_id: str) -> int:
    """Every email identifier of the population holds an address at the sink's domain (the
    population's addresses are at real providers' domains): encrypted and blind-indexed with the
    organization's keys, as the product stores them. How many."""
    from sqlalchemy import bindparam, select, update

    from carepost.core.database import org_session
    from carepost.patients.models import ContactIdentifier

    sealer = pop.sealer_for(org_id)
    table = ContactIdentifier.__table__
    statement = update(table).where(table.c.org_id == org_id, table.c.id == bindparam("ident")).values(
        value_enc=bindparam("enc"), blind_index=bindparam("index"))
    with org_session(org_id) as s:
        rows = s.execute(select(table.c.id, table.c.contact_id).where(
            table.c.org_id == org_id, table.c.kind == "email")).all()
        values = []
        for ident_id, contact_id in rows:
            address = f"patient.{contact_id}@{SINK_DOMAIN}"
            values.append({"ident": ident_id, "enc": sealer.enc("contact_identifiers", "value", ident_id, address),
                           "index": sealer.index("email", address)})
        for start in range(0, len(values), 5000):
            s.execute(statement, values[start:start + 5000])
        s.commit()
    return len(rows)


def sending_domain(org_id: str, domain: str) -> None:
    """A proven sending domain for the campaign's From (fresh DKIM keys: RSA-2048 + Ed25519)."""
    from carepost.core.database import org_session
    from carepost.delivery import service

    with org_session(org_id) as session:
        row = service.create_sending_domain(session, org_id, domain)
        service.confirm_ownership(session, row)  # the bench's own name: no public DNS answers for it
        session.commit()


def campaign_statuses(org_id: str, campaign_id: str) -> tuple[int, dict[str, int]]:
    """(recipients done, their statuses): the campaign's message recipients whose delivery is
    over, and the planned rows cancelled at materializing (no address any more)."""
    from sqlalchemy import func, select

    from carepost.campaigns.models import CampaignRecipient
    from carepost.core.database import read_only_session
    from carepost.delivery.models import Message, MessageRecipient

    with read_only_session(org_id) as s:
        statuses = dict(s.execute(
            select(MessageRecipient.status, func.count()).join(Message, Message.id == MessageRecipient.message_id)
            .where(Message.org_id == org_id, Message.campaign_id == campaign_id)
            .group_by(MessageRecipient.status)).all())
        cancelled = s.scalar(select(func.count()).select_from(CampaignRecipient).where(
            CampaignRecipient.campaign_id == campaign_id, CampaignRecipient.status == "cancelled")) or 0
    if cancelled:
        statuses["campaign_row_cancelled"] = cancelled
    return sum(v for k, v in statuses.items() if k not in PENDING), statuses


def message_id_headers(org_id: str, *, campaign_id: str | None = None, ids: list[str] | None = None) -> list[str]:
    from sqlalchemy import select

    from carepost.core.database import read_only_session
    from carepost.delivery.models import Message

    q = select(Message.message_id_header).where(Message.org_id == org_id)
    q = q.where(Message.campaign_id == campaign_id) if campaign_id else q
    with read_only_session(org_id) as s:
        headers = [h.strip() for h in s.scalars(q) if h]
    if ids is not None and len(headers) != len(ids):
        raise SystemExit(f"{len(headers)} Message-IDs for {len(ids)} messages")
    return headers


def sink_check(record: Path, offset: int, expected: list[str]) -> tuple[dict, int]:
    """What the sink recorded since ``offset`` (bytes), by Message-ID, against ``expected``."""
    with open(record, "rb") as f:
        f.seek(offset)
        data = f.read()
    arrived = Counter(data.decode().splitlines())
    want = set(expected)
    return {"expected": len(want), "arrived": sum(arrived.values()), "missing": len(want - set(arrived)),
            "arrived_twice": sum(1 for n in arrived.values() if n > 1),
            "unexpected": len(set(arrived) - want)}, offset + len(data)


def make_campaign(org_id: str, n: int) -> str:
    """``bench/campaigns.py``'s campaign (segment ``age >= 0``; ``{{ first_name }}`` and a block on
    ``has condition icd10cm:E11.*``), in ``tls_required`` (verified TLS to every recipient)."""
    from carepost.campaigns.models import Campaign
    from carepost.core.database import org_session

    campaign_id = campaigns_bench.make_campaign(org_id, n)
    with org_session(org_id) as s:
        s.get(Campaign, campaign_id).security = "tls_required"
        s.commit()
    return campaign_id


def campaign_phase(org_id: str, n: int, chunk: int, tmp_path: Path, env: dict, threads: int,
                   profile: str | None = None, profile_gil: bool = False) -> tuple[dict, dict, str]:
    """Plan (in this process), then send through one worker; (plan figures, worker run, campaign id)."""
    from carepost.campaigns import planning
    from carepost.campaigns.tasks import send_campaign
    from carepost.delivery.tasks import refresh_statistics

    campaign_id = make_campaign(org_id, n)
    started = time.perf_counter()
    report = planning.plan(org_id, campaign_id, chunk_size=chunk)
    plan_seconds = time.perf_counter() - started
    if not report.finished or not report.planned:
        raise SystemExit(f"planning did not finish with recipients: {report}")
    refresh_statistics.call_local()
    send_campaign(org_id, campaign_id)  # queued: the worker materializes and hands batches to delivery
    run = dw.run_worker(env, tmp_path / f"worker-campaign-{n}.log", threads, report.planned,
                        lambda: campaign_statuses(org_id, campaign_id), profile=profile, profile_gil=profile_gil)
    plan = {"plan_seconds": round(plan_seconds, 1), "planned": report.planned, "excluded": report.excluded}
    return plan, run, campaign_id


def run_profile(profile: str | None, i: int, runs: int) -> str | None:
    """Where run ``i`` (from 0) of the campaign worker is sampled: FILE for the first, FILE.run<k> after."""
    if not profile or i >= runs:
        return None
    return profile if i == 0 else f"{profile}.run{i + 1}"


def phase_figures(run: dict, total: int, check: dict) -> dict:
    out = dw.worker_figures(run, total)
    out.update({"statuses": run["statuses"], "worker_errors": len(run["errors"]), "sink": check})
    if run["errors"]:
        # The lines themselves (the product's logs carry no PHI), so that an error is diagnosed
        # from the JSON once the run's temporary directory, and its logs, are gone.
        out["worker_error_lines"] = [line.rstrip()[:4000] for line in run["errors"][:20]]
    return out


def keep_logs(tmp_path: Path, keep: str | None) -> None:
    """--keep-logs DIR: the workers' logs copied out of the run's temporary directory."""
    if not keep:
        return
    target = Path(keep)
    target.mkdir(parents=True, exist_ok=True)
    for log in sorted(tmp_path.glob("worker-*.log")):
        shutil.copy2(log, target / log.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=16_000,
                   help="contacts in the population (~62 %% are planned: email address, authorization, living)")
    p.add_argument("--runs", type=int, default=3, help="campaign + transactional pairs (medians reported)")
    p.add_argument("--threads", type=int, default=4, help="task threads of the one worker process")
    p.add_argument("--batch-size", type=int, default=500, help="CAREPOST_DELIVERY_BATCH_SIZE")
    p.add_argument("--concurrency", type=int, default=64, help="CAREPOST_DELIVERY_CONCURRENCY")
    p.add_argument("--pool-size", type=int, default=16, help="CAREPOST_SMTP_POOL_SIZE (connections to the sink)")
    p.add_argument("--chunk", type=int, default=None, help="contacts per planning transaction (default: the setting)")
    p.add_argument("--send-batch", type=int, default=None,
                   help="CAREPOST_CAMPAIGN_SEND_BATCH: recipients materialized per transaction, handed to delivery as one "
                        "task (default: the setting)")
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    p.add_argument("--queue-url", default=None, help="redis://... instead of the SQLite queue")
    p.add_argument("--out", default=None, help="write the JSON here too (default bench/results/...)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="sample the first run's campaign worker with py-spy into FILE (folded stacks) and add its "
                        "top costs to the JSON (as bench/delivery_worker.py --profile)")
    p.add_argument("--profile-runs", type=int, default=1, metavar="N",
                   help="with --profile: sample the first N runs' campaign workers (run k > 1 into FILE.run<k>)")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only the thread holding the GIL (py-spy --gil), and the first run's "
                        "transactional worker too, into FILE.transactional")
    p.add_argument("--keep-logs", default=None, metavar="DIR",
                   help="copy every worker's log into DIR before the run's temporary directory is removed (their "
                        "error lines are in the JSON as worker_error_lines either way)")
    args = p.parse_args()

    admin, scratch = pop.setup_database(args.database_url, keep=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            record = tmp_path / "arrived.txt"
            record.touch()
            sink, port, ca_file = dw.start_sink(tmp_path, record)
            try:
                result = measure(args, tmp_path, record, port, ca_file)
            finally:
                result_received = dw.stop_sink(sink)
                keep_logs(tmp_path, args.keep_logs)
    finally:
        pop.drop_database(admin, scratch)
        pop.remove_data_dir()
    result["sink_received"] = result_received
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / (
        f"campaign_send_{result['database']}_{result['messages']}_{time.strftime('%Y%m%dT%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def measure(args, tmp_path: Path, record: Path, port: int, ca_file: Path) -> dict:
    env = dw.bench_env(os.environ["CAREPOST_DATA_DIR"], port, ca_file, batch_size=args.batch_size,
                       concurrency=args.concurrency, pool_size=args.pool_size,
                       database_url=os.environ.get("CAREPOST_DATABASE_URL"), queue_url=args.queue_url,
                       mx_domains=(SINK_DOMAIN,))
    if args.send_batch:
        env["CAREPOST_CAMPAIGN_SEND_BATCH"] = str(args.send_batch)
    dw.start_carepost(env)  # applies env, then assemble() (the one composition root) and initialize_storage()
    from carepost.core.config import get_settings
    from carepost.core.database import get_engine

    chunk = args.chunk or get_settings().campaign_plan_chunk
    org_id = pop.create_org("Campaign Send Bench")
    population = pop.populate(get_engine(), org_id, args.contacts)
    pop.analyze(get_engine())
    consent = campaigns_bench.prepare_consent(org_id)
    consent["sink_addresses"] = sink_addresses(org_id)
    sending_domain(org_id, "clinic.example")  # the From of bench/campaigns.py's campaign
    print(json.dumps({"population": {k: population[k] for k in ("contacts", "load_seconds")}, "consent": consent}),
          file=sys.stderr, flush=True)

    offset, runs = 0, []
    for i in range(args.runs):
        plan, run, campaign_id = campaign_phase(org_id, args.contacts * 10 + i, chunk, tmp_path, env, args.threads,
                                                profile=run_profile(args.profile, i, args.profile_runs),
                                                profile_gil=args.profile_gil)
        check, offset = sink_check(record, offset, message_id_headers(org_id, campaign_id=campaign_id))
        campaign = {**plan, **phase_figures(run, plan["planned"], check)}
        t_profile = f"{args.profile}.transactional" if args.profile and args.profile_gil and i == 0 else None
        t_org, ids, accept_seconds, t_run = dw.transactional(plan["planned"], tmp_path, env, args.threads,
                                                             domain=f"bar{i}.example", profile=t_profile,
                                                             profile_gil=args.profile_gil)
        check, offset = sink_check(record, offset, message_id_headers(t_org, ids=ids))
        transactional = {"accept_seconds": round(accept_seconds, 1), **phase_figures(t_run, len(ids), check)}
        ratio = round(campaign["messages_per_second"] / transactional["messages_per_second"], 3)
        steady = round(campaign["steady_messages_per_second"] / transactional["steady_messages_per_second"], 3)
        r = {"run": i + 1, "ratio": ratio, "steady_ratio": steady, "campaign": campaign, "transactional": transactional}
        runs.append(r)
        print(json.dumps({"run": i + 1, "ratio": ratio, "steady_ratio": steady,
                          "campaign_messages_per_second": campaign["messages_per_second"],
                          "transactional_messages_per_second": transactional["messages_per_second"],
                          "campaign_sink": campaign["sink"], "transactional_sink": transactional["sink"]}),
              file=sys.stderr, flush=True)

    def med(phase: str, key: str):
        return statistics.median(r[phase][key] for r in runs)

    return {
        "database": get_engine().dialect.name.replace("sqlite", "sqlcipher"),
        "queue": "redis" if args.queue_url else "sqlite",
        "contacts": args.contacts, "messages": runs[0]["campaign"]["planned"], "runs_count": len(runs),
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "median_steady_ratio": statistics.median(r["steady_ratio"] for r in runs), "goal_ratio": 0.8,
        "median_campaign_messages_per_second": med("campaign", "messages_per_second"),
        "median_transactional_messages_per_second": med("transactional", "messages_per_second"),
        "median_campaign_worker_cpu_ms_per_message": med("campaign", "worker_cpu_ms_per_message"),
        "median_transactional_worker_cpu_ms_per_message": med("transactional", "worker_cpu_ms_per_message"),
        "median_campaign_plan_seconds": statistics.median(r["campaign"]["plan_seconds"] for r in runs),
        "all_counted_once": all(r[p]["sink"]["missing"] == 0 and r[p]["sink"]["arrived_twice"] == 0
                                and r[p]["sink"]["unexpected"] == 0 for r in runs for p in ("campaign", "transactional")),
        "worker_threads": args.threads, "batch_size": args.batch_size, "concurrency": args.concurrency,
        "pool_size": args.pool_size, "plan_chunk": chunk, "campaign_send_batch": get_settings().campaign_send_batch,
        "load_average_at_end": os.getloadavg(),
        "population": population, "consent": consent, "runs": runs,
        **({"campaign_profile": dw.summarize_profile(Path(args.profile))} if args.profile else {}),
        **({"transactional_profile": dw.summarize_profile(Path(f"{args.profile}.transactional"))}
           if args.profile and args.profile_gil else {}),
        **({f"campaign_profile_run{k}": dw.summarize_profile(Path(f"{args.profile}.run{k}"))
            for k in range(2, min(args.profile_runs, args.runs) + 1)} if args.profile else {}),
    }


if __name__ == "__main__":
    main()
