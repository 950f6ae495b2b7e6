"""ZIP centroids and distances (the ``zipcodes`` package's embedded data; nothing fetched)."""

from __future__ import annotations

import math

import pytest

from carepost.segments import geo


def test_centroids_of_known_zips():
    lat, lon = geo.zip_centroid("02108")  # Boston, Beacon Hill
    assert 42.3 < lat < 42.4 and -71.1 < lon < -71.0
    assert geo.zip_centroid("02108-1234") == geo.zip_centroid("02108") == geo.zip_centroid("021081234")
    lat, lon = geo.zip_centroid("99501")  # Anchorage
    assert 61 < lat < 62 and -150.5 < lon < -149
    assert geo.zip_centroid("00000") is None
    assert geo.zip_centroid("abcde") is None
    assert geo.zip_centroid("0210") is None
    assert geo.zip_centroid(None) is None


def test_known_distances():
    # Boston (02108) to Cambridge, MA (02139): about two miles
    assert 1.0 < geo.distance_miles("02108", "02139") < 3.0
    # Manhattan (10001) to downtown Los Angeles (90012): ~2,450 miles great-circle
    assert 2400 < geo.distance_miles("10001", "90012") < 2500
    # Chicago Loop (60601) to Milwaukee (53202): ~80 miles
    assert 75 < geo.distance_miles("60601", "53202") < 90
    assert geo.distance_miles("02108", "02108") == 0
    assert geo.distance_miles("02108", "00000") is None
    # symmetric
    assert math.isclose(geo.distance_miles("02139", "02108"), geo.distance_miles("02108", "02139"))


def test_haversine_against_a_known_value():
    # one degree of latitude on the mean-radius sphere
    assert math.isclose(geo.haversine_miles(0, 0, 1, 0), 69.09, abs_tol=0.01)


def test_zips_within_matches_a_full_scan():
    center = "02108"
    found = geo.zips_within(center, 25)
    assert found[0] == center
    assert "02139" in found  # Cambridge
    assert "01002" not in found  # Amherst, ~80 miles west
    # the bounding-box search returns exactly what a brute-force scan of every ZIP returns
    t = geo._get()
    clat, clon = geo.zip_centroid(center)
    brute = {z for z, la, lo in zip(t.zips, t.lats, t.lons) if geo.haversine_miles(clat, clon, la, lo) <= 25}
    assert set(found) == brute
    # nearest first
    dists = [geo.distance_miles(center, z) for z in found]
    assert dists == sorted(dists)


def test_zips_within_edge_cases():
    assert geo.zips_within("00000", 10) == []
    same_spot = geo.zips_within("02108", 0)
    assert "02108" in same_spot and all(geo.distance_miles("02108", z) == 0 for z in same_spot)
    for bad in (-1, 3001, float("nan"), "10", True):
        with pytest.raises(ValueError, match="miles"):
            geo.zips_within("02108", bad)
    # near the Aleutians the longitude box would cross -180: still correct
    assert geo.zip_centroid("99546")[1] < -176  # Adak, AK
    assert "99546" in geo.zips_within("99546", 50)


def test_zip3():
    assert geo.zip3("02108") == "021"
    assert geo.zip3("02108-1234") == "021"
    assert geo.zip3("2108") is None
    assert geo.zip3(None) is None
    # HIPAA Safe Harbor: restricted three-digit ZIPs become 000
    assert geo.zip3("03601") == "036"
    assert geo.zip3("03601", safe_harbor=True) == "000"
    assert geo.zip3("02108", safe_harbor=True) == "021"
