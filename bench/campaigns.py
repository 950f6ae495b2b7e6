"""Planning a campaign over a large audience (issue 14, Speed): time and memory.

    .venv/bin/python bench/campaigns.py --recipients 100000
    .venv/bin/python bench/campaigns.py --recipients 1000000 --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/campaigns.py --recipients 100000 --runs 3 --json bench/results/campaigns-pg-100k.json
    .venv/bin/python bench/campaigns.py --recipients 1000000 --runs 0 --state /tmp/pop-1m.json   # build and keep
    .venv/bin/python bench/campaigns.py --runs 3 --state /tmp/pop-1m.json                        # plan over it

Builds the segments benchmark's population (``bench/segments_population.py``: contacts with
clinical facts and delivery history, COPY on PostgreSQL) of ``--recipients`` contacts, then
gives the contacts that have an email address in that history an email identifier (the blind
index the history carries), and ~81 % of them a signed marketing authorization (INSERT ...
SELECT, untimed set-up). Each run then creates a marketing campaign to the segment ``age >= 0``
(everybody living) with a template holding one dynamic block (``has condition icd10cm:E11.*``,
planned set-wise) and times :func:`carepost.campaigns.planning.plan` to the end: the segment in
chunks, the set-based eligibility check, the block plan, and the recipient and exclusion rows,
one transaction per chunk (``CAREPOST_CAMPAIGN_PLAN_CHUNK``). RSS of this process is sampled
every 0.25 s during planning (flat memory: the peak should not grow with the audience).

The end-to-end send (rendering, DKIM, SMTP through one worker, against the transactional rate of
the same run) is ``bench/campaign_send.py``, which reuses this script's population and campaign.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import segments_population as pop


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    def __init__(self, every: float = 0.25):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(rss_mb())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def prepare_consent(org_id: str) -> dict:
    """Email identifiers from the history's blind indexes; marketing authorizations for ~81 %."""
    from sqlalchemy import text

    from carepost.consent import authorizations
    from carepost.consent.service import set_consent_settings
    from carepost.core import clock
    from carepost.core.crypto import get_keyring
    from carepost.core.database import get_engine, org_session

    with org_session(org_id) as s:
        set_consent_settings(s, org_id, {"postal_address": "Bench Clinic, 1 Main Street, Springfield, IL 62701"})
        t = authorizations.current_text(s, org_id, "marketing")
        sig = get_keyring().encrypt(s, org_id, "authorizations", "signature", "bench", "Bench Patient")
        text_id, version, digest = t.id, t.version, authorizations.text_hash(t)
        s.commit()
    now = clock.now()
    started = time.perf_counter()
    with get_engine().begin() as conn:
        conn.execute(text(
            "INSERT INTO contact_identifiers (id, org_id, contact_id, kind, rank, blind_index, created_at) "
            "SELECT 'ci' || substr(min(id), 3, 30), org_id, contact_id, 'email', 0, address_index, :now "
            "FROM message_recipients WHERE org_id = :org AND contact_id IS NOT NULL GROUP BY org_id, contact_id, address_index"),
            {"org": org_id, "now": now})
        conn.execute(text(
            "INSERT INTO authorizations (id, org_id, contact_id, purpose, text_id, text_version, text_hash, language, "
            "signature_kind, signature_enc, signed_at, method, backdated, status, created_at) "
            "SELECT 'au' || substr(contact_id, 3, 30), org_id, contact_id, 'marketing', :text_id, :version, :digest, 'en', "
            "'typed', :sig, :now, 'api', false, 'active', :now FROM contact_identifiers "
            "WHERE org_id = :org AND kind = 'email' AND substr(contact_id, 32, 1) NOT IN ('0', '1', '2')"),
            {"org": org_id, "text_id": text_id, "version": version, "digest": digest, "sig": sig, "now": now})
        identifiers = conn.execute(text("SELECT count(*) FROM contact_identifiers WHERE org_id = :org"),
                                   {"org": org_id}).scalar()
        signed = conn.execute(text("SELECT count(*) FROM authorizations WHERE org_id = :org"), {"org": org_id}).scalar()
    pop.analyze(get_engine())
    return {"email_identifiers": identifiers, "authorizations": signed, "seconds": round(time.perf_counter() - started, 1)}


def make_campaign(org_id: str, n: int) -> str:
    from carepost.campaigns.models import Campaign
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn
    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.segments import service as segments

    with org_session(org_id) as s:
        seg = segments.create_segment(s, org_id, {"name": f"Everybody {n}", "query": "age >= 0"}, segments.SYSTEM)
        t = content.create_template(s, org_id, TemplateIn(
            name=f"Bench {n}", subject="Flu shots this week", purpose="marketing", contains_phi=False,
            html="<p>Hello {{ first_name }}.</p>{% block_if 'has condition icd10cm:E11.*' %}<p>Diabetes class."
                 "</p>{% endblock_if %}", language="en"))
        s.flush()
        version = content.current_version(s, t)
        c = Campaign(org_id=org_id, name=f"Bench {n}", purpose="marketing", segment_id=seg.id, template_id=t.id,
                     template_version_id=version.id, from_address="news@clinic.example", status="planning",
                     schedule_kind="now", launched_at=clock.now())
        s.add(c)
        s.commit()
        return c.id


def plan_once(org_id: str, n: int, chunk: int) -> dict:
    from carepost.campaigns import planning
    from carepost.campaigns.models import Campaign
    from carepost.core.database import org_session

    campaign_id = make_campaign(org_id, n)
    before = rss_mb()
    with RssSampler() as sampler:
        started = time.perf_counter()
        report = planning.plan(org_id, campaign_id, chunk_size=chunk)
        elapsed = time.perf_counter() - started
    with org_session(org_id) as s:
        c = s.get(Campaign, campaign_id)
        progress = planning.progress(s, c)
    samples = sampler.samples or [before]
    tenth = samples[: max(1, len(samples) // 10)]
    return {"seconds": round(elapsed, 1), "finished": report.finished, "chunks": report.chunks,
            "audience": report.planned + report.excluded, "planned": report.planned, "excluded": report.excluded,
            "audience_per_second": round((report.planned + report.excluded) / elapsed) if elapsed else None,
            "exclusions_by_reason": progress["exclusions_by_reason"],
            "rss_mb_before": round(before, 1), "rss_mb_first_tenth_max": round(max(tenth), 1),
            "rss_mb_max": round(max(samples), 1), "rss_mb_last": round(samples[-1], 1), "rss_samples": len(samples)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipients", type=int, default=100_000, help="contacts in the population (the audience)")
    p.add_argument("--runs", type=int, default=3, help="campaigns planned over the same population (median reported)")
    p.add_argument("--chunk", type=int, default=None, help="contacts per planning transaction (default: the setting)")
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created")
    p.add_argument("--keep", action="store_true", help="keep the scratch database / data directory")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--state", default=None,
                   help="a JSON file naming a kept population: built, kept and written there when the file does not "
                        "exist; reused (not built, not dropped) when it does — the 1,000,000-contact load takes longer "
                        "than the runs")
    args = p.parse_args()
    state = json.loads(Path(args.state).read_text()) if args.state and Path(args.state).exists() else None
    if state:
        os.environ["CAREPOST_DATA_DIR"] = state["data_dir"]
        if state.get("database_url"):
            os.environ["CAREPOST_DATABASE_URL"] = state["database_url"]
        admin, scratch = None, state.get("scratch")
        args.keep = True
    else:
        args.keep = args.keep or bool(args.state)
        admin, scratch = pop.setup_database(args.database_url, args.keep)
    try:
        from carepost.assembly import assemble

        assemble()  # the composition root (create_org assembles too; idempotent)
        from carepost.core.config import get_settings
        from carepost.core.database import get_engine

        chunk = args.chunk or get_settings().campaign_plan_chunk
        if state:
            from carepost.core.logging import configure_logging

            configure_logging("WARNING", True)
            org_id, loaded, consent = state["org_id"], state["population"], state["consent"]
            args.recipients = state["recipients"]
        else:
            org_id = pop.create_org("Campaigns Bench")
            loaded = pop.populate(get_engine(), org_id, args.recipients, progress=False)
            pop.analyze(get_engine())
            consent = prepare_consent(org_id)
            if args.state:
                Path(args.state).write_text(json.dumps({
                    "data_dir": os.environ["CAREPOST_DATA_DIR"], "database_url": os.environ.get("CAREPOST_DATABASE_URL"),
                    "scratch": scratch, "org_id": org_id, "recipients": args.recipients, "population": loaded,
                    "consent": consent}, default=str))
        print(json.dumps({"population": {k: loaded[k] for k in ("contacts", "load_seconds")}, "consent": consent}),
              flush=True)
        runs = []
        for i in range(args.runs):
            r = plan_once(org_id, args.recipients * 10 + i, chunk)
            runs.append(r)
            print(json.dumps({"run": i + 1, **r}), flush=True)
        if not runs:
            return
        result = {"database": get_engine().dialect.name.replace("sqlite", "sqlcipher"), "recipients": args.recipients, "chunk": chunk,
                  "median_seconds": statistics.median(r["seconds"] for r in runs),
                  "median_audience_per_second": statistics.median(r["audience_per_second"] for r in runs),
                  "rss_mb_max": max(r["rss_mb_max"] for r in runs), "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                  "runs": runs, "population": loaded, "consent": consent}
        print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "population")}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    finally:
        if not args.keep:
            pop.drop_database(admin, scratch)
            pop.remove_data_dir()


if __name__ == "__main__":
    os.environ.setdefault("CAREPOST_LOG_LEVEL", "WARNING")
    main()
