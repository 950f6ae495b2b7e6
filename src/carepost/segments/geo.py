"""ZIP code centroids and distances for segments ("within 25 miles of 02108", ZIP3 breakdowns).

Centroids come from the ``zipcodes`` package (PyPI, MIT), which embeds its dataset — built from
the USPS ZIP Locale Detail file, GeoNames' US postal code export and a public ZIP database,
refreshed monthly by its maintainers — so nothing is fetched at run time. CarePost updates them
by upgrading the package.

The table of ~42,000 ZIPs is built once per process, on first use (about a second), into flat
arrays and a one-degree grid; :func:`zips_within` visits only the grid cells the bounding box
of the circle covers, drops what falls outside the latitude band and computes the haversine
distance for what is left (bench/segments_geo.py times it).
"""

from __future__ import annotations

import math
import re
import threading
from array import array
from dataclasses import dataclass

EARTH_RADIUS_MILES = 3958.7613  # mean Earth radius (IUGG), in statute miles
MILES_PER_DEGREE_LAT = math.pi * EARTH_RADIUS_MILES / 180.0
MAX_RADIUS_MILES = 3000.0

# HIPAA Safe Harbor (45 CFR 164.514(b)(2)(i)(B)): three-digit ZIPs whose geographic units hold
# 20,000 people or fewer (2000 Census, per the HHS de-identification guidance) become "000".
RESTRICTED_ZIP3 = frozenset({"036", "059", "063", "102", "203", "556", "692", "790", "821", "823",
                             "830", "831", "878", "879", "884", "890", "893"})

_ZIP = re.compile(r"^\s*(\d{5})(?:[- ]?\d{4})?\s*$")


@dataclass(frozen=True)
class _Table:
    zips: tuple[str, ...]  # sorted by latitude
    lats: array
    lons: array
    index: dict[str, int]
    cells: dict[tuple[int, int], list[int]]  # one-degree grid cell -> positions of its ZIPs


_table: _Table | None = None
_lock = threading.Lock()


def _build() -> _Table:
    import zipcodes

    rows = []
    for z in zipcodes.list_all():
        try:
            lat, lon = float(z["lat"]), float(z["long"])
        except (TypeError, ValueError, KeyError):
            continue
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0) or (lat == 0.0 and lon == 0.0):
            continue
        rows.append((lat, lon, z["zip_code"]))
    rows.sort()
    zips = tuple(r[2] for r in rows)
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (lat, lon, _) in enumerate(rows):
        cells.setdefault((math.floor(lat), math.floor(lon)), []).append(i)
    return _Table(zips=zips, lats=array("d", (r[0] for r in rows)), lons=array("d", (r[1] for r in rows)),
                  index={z: i for i, z in enumerate(zips)}, cells=cells)


def _get() -> _Table:
    global _table
    if _table is None:
        with _lock:
            if _table is None:
                _table = _build()
    return _table


def normalize_zip(value: str | None) -> str | None:
    """The five-digit ZIP of ``02108``, ``02108-1234`` or ``021081234``; None otherwise."""
    if not isinstance(value, str):
        return None
    m = _ZIP.match(value)
    return m.group(1) if m else None


def zip3(value: str | None, safe_harbor: bool = False) -> str | None:
    """The three-digit ZIP prefix; with ``safe_harbor`` the restricted prefixes become ``000``."""
    z = normalize_zip(value)
    if z is None:
        return None
    prefix = z[:3]
    return "000" if safe_harbor and prefix in RESTRICTED_ZIP3 else prefix


def zip_centroid(value: str | None) -> tuple[float, float] | None:
    """(latitude, longitude) of a ZIP's centroid, or None for an unknown ZIP."""
    z = normalize_zip(value)
    if z is None:
        return None
    t = _get()
    i = t.index.get(z)
    return None if i is None else (t.lats[i], t.lons[i])


def haversine_miles(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_MILES * math.asin(min(1.0, math.sqrt(a)))


def distance_miles(zip_a: str | None, zip_b: str | None) -> float | None:
    """Great-circle distance between two ZIP centroids in miles; None if either is unknown."""
    a, b = zip_centroid(zip_a), zip_centroid(zip_b)
    if a is None or b is None:
        return None
    return haversine_miles(a[0], a[1], b[0], b[1])


def zips_within(value: str | None, miles: float) -> list[str]:
    """Every known ZIP whose centroid lies within ``miles`` of the given ZIP's centroid (the ZIP
    itself included), nearest first. Unknown ZIP: empty list. ``miles`` must be 0..3000."""
    if not isinstance(miles, (int, float)) or isinstance(miles, bool) or math.isnan(miles) or not 0 <= miles <= MAX_RADIUS_MILES:
        raise ValueError(f"miles must be a number between 0 and {MAX_RADIUS_MILES:g}")
    center = zip_centroid(value)
    if center is None:
        return []
    return [z for _, z in _within(center[0], center[1], float(miles))]


def zips_within_point(lat: float, lon: float, miles: float) -> list[str]:
    """Every known ZIP whose centroid lies within ``miles`` of a point, nearest first."""
    if not 0 <= miles <= MAX_RADIUS_MILES:
        raise ValueError(f"miles must be a number between 0 and {MAX_RADIUS_MILES:g}")
    return [z for _, z in _within(lat, lon, float(miles))]


def _within(lat: float, lon: float, miles: float) -> list[tuple[float, str]]:
    t = _get()
    dlat = miles / MILES_PER_DEGREE_LAT
    # the bounding box: the latitude band, and the longitude half-width at its widest latitude
    widest = min(89.9, max(abs(lat - dlat), abs(lat + dlat)))
    dlon = min(180.0, miles / (MILES_PER_DEGREE_LAT * math.cos(math.radians(widest))))
    lats, lons, zips, cells = t.lats, t.lons, t.zips, t.cells
    lat_lo, lat_hi = lat - dlat, lat + dlat
    # candidates: the ZIPs of the one-degree cells the box covers (longitudes wrap at +-180)
    lon_cells = range(math.floor(lon - dlon), math.floor(lon + dlon) + 1)
    if len(lon_cells) >= 360:
        lon_cells = range(-180, 180)
    p1 = math.radians(lat)
    cos_p1 = math.cos(p1)
    radians, sin, cos, asin, sqrt = math.radians, math.sin, math.cos, math.asin, math.sqrt
    out = []
    seen_cells = set()
    for cy in range(math.floor(lat_lo), math.floor(lat_hi) + 1):
        for cx in lon_cells:
            key = (cy, ((cx + 180) % 360) - 180)
            if key in seen_cells:
                continue
            seen_cells.add(key)
            for i in cells.get(key, ()):
                y = lats[i]
                if y < lat_lo or y > lat_hi:
                    continue
                p2 = radians(y)
                a = sin((p2 - p1) / 2) ** 2 + cos_p1 * cos(p2) * sin(radians(lons[i] - lon) / 2) ** 2
                d = 2 * EARTH_RADIUS_MILES * asin(min(1.0, sqrt(a)))
                if d <= miles:
                    out.append((d, zips[i]))
    out.sort()
    return out
