"""Benchmark: personalized rendering of a template version for many contacts (issue 14 item 1).

    .venv/bin/python bench/templates.py --contacts 20000
    .venv/bin/python bench/templates.py --contacts 20000 --database-url postgresql://postgres@127.0.0.1:5432/postgres

Fills one organization with N synthetic contacts and their clinical facts
(bench/segments_population.py), saves a treatment template with an English and a Spanish
variant, five merge-field helpers (first_name, next_appointment, refill_due, last_observation,
care_stage) and one dynamic block ('has condition icd10cm:E11.*'), then, in chunks of 500
contacts — as a campaign's send does — plans the blocks set-wise (``content.blocks.plan``: one
query per block per chunk) and renders every contact's message (``render_for_contacts``: the
chunk's data loaded in one query per kind of fact, PHI decrypted in memory, CSS inlined, the text
part made from the HTML). Three timed runs over all contacts; prints the median messages per
second and the share of time in planning, and writes bench/results/templates_<database>_<n>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import segments_population as population

CHUNK = 500
HTML = """<html><head><style>p { color: #063; font-family: sans-serif }</style></head><body>
<p>Hello {{ first_name }},</p>
{% if next_appointment %}<p>Your next visit: {{ next_appointment.when }}.</p>{% endif %}
{% if refill_due %}<p>{{ refill_due.name }} is due for a refill on {{ refill_due.date }}.</p>{% endif %}
{% if last_observation("loinc:4548-4") %}<p>Latest A1c: {{ last_observation("loinc:4548-4").value }}%.</p>{% endif %}
<p>Care stage: {{ care_stage }}.</p>
{% block_if 'has condition icd10cm:E11.*' %}<p>Our diabetes education class starts in May.</p>{% endblock_if %}
</body></html>"""


def run(org_id: str, runs: int) -> dict:
    from sqlalchemy import select

    from carepost.content import blocks
    from carepost.content import service as templates
    from carepost.content.schemas import TemplateIn
    from carepost.core.database import org_session
    from carepost.patients.models import Contact

    with org_session(org_id) as s:
        t = templates.create_template(s, org_id, TemplateIn(
            name="Bench visit", subject="Your care team", purpose="treatment", html=HTML,
            variants={"es": {"subject": "Su equipo de salud", "html": HTML.replace("Hello", "Hola")}}))
        s.commit()
        version_id = t.current_version_id
        ids = list(s.scalars(select(Contact.id).where(Contact.org_id == org_id).order_by(Contact.id)))
    timings, plan_shares, sizes = [], [], []
    for _ in range(runs):
        plan_seconds = 0.0
        rendered = 0
        started = time.perf_counter()
        with org_session(org_id) as s:
            version = templates.get_version_by_id(s, org_id, version_id)
            conditions = templates.version_blocks(version)
            for i in range(0, len(ids), CHUNK):
                chunk = ids[i:i + CHUNK]
                t0 = time.perf_counter()
                plan = blocks.plan(s, org_id, conditions, chunk)
                plan_seconds += time.perf_counter() - t0
                out = templates.render_for_contacts(s, org_id, version, chunk, visible=plan)
                rendered += len(out)
                if i == 0:
                    sizes.append(sum(len(m.html) for m in out.values()) / max(1, len(out)))
        elapsed = time.perf_counter() - started
        timings.append(elapsed)
        plan_shares.append(plan_seconds / elapsed)
    median = statistics.median(timings)
    return {"messages": len(ids), "runs_seconds": [round(t, 2) for t in timings],
            "median_seconds": round(median, 2), "messages_per_second": round(len(ids) / median, 1),
            "planning_share": round(statistics.median(plan_shares), 3), "html_bytes_per_message": round(sizes[0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database-url", default=None, help="PostgreSQL admin URL; a scratch database is created and dropped")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    admin, scratch = population.setup_database(args.database_url, False)
    try:
        from carepost.assembly import assemble

        assemble()
        org_id = population.create_org()
        from carepost.core.database import get_engine

        population.populate(get_engine(), org_id, args.contacts, seed=args.seed)
        population.analyze(get_engine())
        result = run(org_id, args.runs)
        result.update({"database": "postgresql" if args.database_url else "sqlcipher", "contacts": args.contacts,
                       "command": " ".join([".venv/bin/python", "bench/templates.py", *sys.argv[1:]]),
                       "loadavg_before": loadavg_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
                       "measured_at": datetime.now().astimezone().isoformat(timespec="seconds")})
        text = json.dumps(result, indent=2)
        output = Path(args.output or Path(__file__).resolve().parent / "results" / f"templates_{result['database']}_{args.contacts}.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
        print(text)
    finally:
        population.drop_database(admin, scratch)
        population.remove_data_dir()


if __name__ == "__main__":
    main()
