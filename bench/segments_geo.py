"""Benchmark: ZIP radius search (carepost.segments.geo.zips_within).

    .venv/bin/python bench/segments_geo.py

Builds the centroid table once (timed: the first call of a process), then times
``zips_within(zip, miles)`` for dense and sparse places at 10, 25 and 50 miles: three runs of
200 calls each, the median per run and the median of the three. Prints one JSON document.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PLACES = {"10001": "Manhattan", "02108": "Boston", "60601": "Chicago", "59001": "Absarokee, MT", "99501": "Anchorage"}


def main() -> None:
    from carepost.assembly import assemble
    from carepost.segments import geo

    assemble()  # the one composition root, as every entry point

    t = time.perf_counter()
    geo.zip_centroid("02108")
    build_ms = (time.perf_counter() - t) * 1000
    out = {"table_build_ms": round(build_ms, 1), "zips_known": len(geo._get().zips), "searches": []}
    for z, name in PLACES.items():
        for miles in (10, 25, 50):
            medians = []
            for _ in range(3):
                ts = []
                for _ in range(200):
                    t = time.perf_counter()
                    found = geo.zips_within(z, miles)
                    ts.append(time.perf_counter() - t)
                medians.append(statistics.median(ts))
            out["searches"].append({"zip": z, "place": name, "miles": miles, "zips_found": len(found),
                                    "runs_median_ms": [round(m * 1000, 3) for m in medians],
                                    "median_ms": round(statistics.median(medians) * 1000, 3)})
    out["loadavg"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
