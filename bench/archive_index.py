"""Benchmark: the archive's word-index hook in ``store_messages`` (issue 16 item 8).

    .venv/bin/python bench/archive_index.py --messages 2000
    .venv/bin/python bench/archive_index.py --messages 2000 --database-url postgresql://postgres@127.0.0.1:5432/postgres

Stores N messages (subject + a ~150-word body, 1 recipient) through ``delivery.store_messages`` in
batches of 500 (the campaign path), then times what the hook adds: ``archive.index.index_messages``
over the same batches (tokens deleted before each run; one INSERT per batch, committed), ``--runs``
times, and the whole ``store_messages`` of a batch for comparison. Prints one JSON line: median
wall and process CPU seconds, tokens per message, and the hook's share of a stored batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _scratch import bench_organization, scratch_storage

WORDS = ['appointment', 'reminder', 'patient', 'clinic', 'result', 'ready', 'please', 'call', 'schedule', 'visit', 'doctor', 'nurse', 'lab', 'blood', 'pressure', 'medication', 'refill', 'pharmacy', 'insurance', 'billing', 'statement', 'portal', 'secure', 'message', 'follow', 'up', 'screening', 'vaccine', 'flu', 'covid', 'annual', 'wellness', 'exam', 'imaging', 'radiology', 'cardiology', 'dermatology']


def body(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] + ("" if k % 5 else str(i % 97)) for k in range(150))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database-url", default=None)
    args = p.parse_args()
    with scratch_storage(args.database_url):
        print(json.dumps(run(args)))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run(args) -> dict:
    from sqlalchemy import delete

    from carepost.archive import index
    from carepost.archive.models import ArchiveTerm
    from carepost.assembly import assemble
    from carepost.core.database import get_engine, org_session
    from carepost.delivery import service
    from carepost.delivery.messages import prepare_message, store_messages
    from carepost.delivery.schemas import MessageIn

    assemble()  # bench_organization assembles too; every entry point names the composition root
    org_id = bench_organization("Archive Index Bench")
    with org_session(org_id) as s:
        domain = service.create_sending_domain(s, org_id, "archive-bench.example")
        service.confirm_ownership(s, domain)
        service.update_delivery_settings(s, org_id, {"default_purpose": "treatment"})
        s.commit()
    batches = []
    store_times = []
    with org_session(org_id) as s:
        for start in range(0, args.messages, args.batch):
            prepared = [prepare_message(s, org_id, MessageIn.model_validate({
                "from": "care@archive-bench.example", "to": [f"p{i}@example.org"], "subject": f"Visit summary {i}",
                "text": body(i), "contains_phi": True})) for i in range(start, min(start + args.batch, args.messages))]
            w0, c0 = time.perf_counter(), _cpu()
            stored = store_messages(s, org_id, prepared, source="campaign", created_by=None)
            s.commit()
            store_times.append((time.perf_counter() - w0, _cpu() - c0))
            batches.append([(m.id, p.subject, p.text, p.html) for m, p in zip(stored, prepared)])
    walls, cpus, tokens = [], [], 0
    for _ in range(args.runs):
        with org_session(org_id) as s:
            s.execute(delete(ArchiveTerm))
            s.commit()
            w0, c0 = time.perf_counter(), _cpu()
            tokens = 0
            for items in batches:
                tokens += index.index_messages(s, org_id, items)
                s.commit()
            walls.append(time.perf_counter() - w0)
            cpus.append(_cpu() - c0)
    store_wall = sum(w for w, _ in store_times)
    store_cpu = sum(c for _, c in store_times)
    return {
        "backend": get_engine().dialect.name, "messages": args.messages, "batch": args.batch, "runs": args.runs,
        "tokens_per_message": round(tokens / args.messages, 1),
        "index_wall_s_median": round(statistics.median(walls), 3), "index_wall_s": [round(w, 3) for w in walls],
        "index_cpu_s_median": round(statistics.median(cpus), 3),
        "index_messages_per_s_wall": round(args.messages / statistics.median(walls)),
        "store_messages_wall_s_including_index": round(store_wall, 3),
        "store_messages_cpu_s_including_index": round(store_cpu, 3),
        "index_share_of_store_wall": round(statistics.median(walls) / store_wall, 3),
        "index_share_of_store_cpu": round(statistics.median(cpus) / store_cpu, 3),
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    main()
