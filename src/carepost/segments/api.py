"""REST routes of segments and value sets (``/api/v1/segments``, ``/api/v1/value-sets``).

* ``segments:read``: the field catalog, parse, count (with a breakdown), saved segments and their
  daily counts; viewers without ``phi:read_unmasked`` see counts 1..10 as "fewer than 11".
* ``segments:read`` + ``phi:read_masked``: preview (a sample of contacts, masked unless the
  caller holds ``phi:read_unmasked``) and member ids; both audited.
* ``segments:manage``: create, change, delete segments and value sets; explain (SQL and plan).
* A query touching a sensitive category needs ``phi:read_unmasked`` for everything; each
  evaluation of one is audited with its categories, a refusal too.

Errors in a query are 422 with the position (``line``, ``column``, ``found``, ``expected``) or
the JSON path in ``field``; nothing is run.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core.errors import NotFound, PermissionDenied
from carepost.segments import language, locations, service, valuesets
from carepost.segments.schemas import CountIn, LocationIn, ParseIn, PreviewIn, QueryIn, SegmentIn, SegmentPatch, ValueSetIn, ValueSetPatch
from carepost.segments.service import Actor

router = APIRouter(prefix="/api/v1", tags=["segments"])


def _actor(request: Request, principal: Principal) -> Actor:
    return Actor.of(principal, request)


def _guarded(request: Request, principal: Principal, fn, *args, **kwargs):
    """Run an evaluation; a refusal for a sensitive category is audited before it is raised."""
    session = request.state.db
    try:
        return fn(*args, **kwargs)
    except PermissionDenied:
        session.rollback()
        record_for(session, principal, request, "segment.denied", target_type="segment", outcome="denied",
                   details={"reason": "sensitive_category"})
        session.commit()
        raise


# --------------------------------------------------------------------------- language


@router.get("/segments/fields", summary="The field catalog of the segment language, grouped for a builder")
def fields(principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    return service.field_catalog()


@router.post("/segments/parse", summary="Text to JSON tree (or a tree to text); errors name the position")
def parse(body: ParseIn, principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    if (body.text is None) == (body.tree is None):
        from carepost.core.errors import ValidationFailed

        raise ValidationFailed("Give either text or tree.", field="text")
    tree = language.parse(body.text) if body.text is not None else language.validate(body.tree)
    clean = language.strip_positions(tree)
    return {"tree": clean, "text": language.to_text(clean)}


@router.post("/segments/count", summary="Count the contacts a query selects (optionally broken down by one field)")
def count(request: Request, body: CountIn, principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    session, actor = request.state.db, _actor(request, principal)
    out = _guarded(request, principal, service.count, session, principal.org_id, body.query, actor, at=body.at)
    if body.breakdown:
        out["breakdown"] = service.breakdown(session, principal.org_id, body.query, body.breakdown, actor, at=body.at)["groups"]
    session.commit()
    return out


@router.post("/segments/preview", summary="A sample of matching contacts, masked per the caller's permissions")
def preview(request: Request, body: PreviewIn,
            principal: Principal = Depends(require(P.SEGMENTS_READ, P.PHI_READ_MASKED))) -> dict:
    session = request.state.db
    out = _guarded(request, principal, service.preview, session, principal.org_id, body.query,
                   _actor(request, principal), limit=body.limit, at=body.at)
    session.commit()
    return out


@router.post("/segments/explain", summary="The SQL statement a query compiles to and the database's plan")
def explain(request: Request, body: QueryIn, principal: Principal = Depends(require(P.SEGMENTS_MANAGE))) -> dict:
    session = request.state.db
    out = _guarded(request, principal, service.explain, session, principal.org_id, body.query,
                   _actor(request, principal), at=body.at)
    session.commit()
    return out


# --------------------------------------------------------------------------- saved segments


@router.get("/segments", summary="List saved segments (sensitive ones only for holders of phi:read_unmasked)")
def list_segments(request: Request, principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    rows = service.list_segments(request.state.db, principal.org_id, _actor(request, principal))
    return {"data": [service.segment_dict(s) for s in rows]}


@router.post("/segments", status_code=201, summary="Save a segment (dynamic, or a snapshot of today's members)")
def create_segment(request: Request, body: SegmentIn, principal: Principal = Depends(require(P.SEGMENTS_MANAGE))):
    session = request.state.db
    seg = _guarded(request, principal, service.create_segment, session, principal.org_id, body.model_dump(),
                   _actor(request, principal))
    record_for(session, principal, request, "segment.create", target_type="segment", target_id=seg.id,
               details={"kind": seg.kind, "sensitive_categories": seg.sensitive_categories})
    session.commit()
    return JSONResponse(service.segment_dict(seg), status_code=201)


def _segment(request: Request, principal: Principal, segment_id: str):
    return _guarded(request, principal, service.get_segment, request.state.db, principal.org_id, segment_id,
                    _actor(request, principal))


@router.get("/segments/{segment_id}", summary="Read a saved segment")
def read_segment(request: Request, segment_id: str, principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    return service.segment_dict(_segment(request, principal, segment_id))


@router.patch("/segments/{segment_id}", summary="Change a saved segment (a snapshot is taken again when its query changes)")
def update_segment(request: Request, segment_id: str, body: SegmentPatch,
                   principal: Principal = Depends(require(P.SEGMENTS_MANAGE))) -> dict:
    session = request.state.db
    seg = _segment(request, principal, segment_id)
    _guarded(request, principal, service.update_segment, session, principal.org_id, seg,
             body.model_dump(exclude_unset=True), _actor(request, principal))
    record_for(session, principal, request, "segment.update", target_type="segment", target_id=seg.id,
               details={"kind": seg.kind, "sensitive_categories": seg.sensitive_categories})
    session.commit()
    return service.segment_dict(seg)


@router.delete("/segments/{segment_id}", status_code=204, summary="Delete a saved segment (refused while others use it)")
def delete_segment(request: Request, segment_id: str, principal: Principal = Depends(require(P.SEGMENTS_MANAGE))):
    session = request.state.db
    seg = _segment(request, principal, segment_id)
    record_for(session, principal, request, "segment.delete", target_type="segment", target_id=seg.id)
    service.delete_segment(session, principal.org_id, seg)
    session.commit()
    return Response(status_code=204)


@router.post("/segments/{segment_id}/count", summary="Count a saved segment now (kept as today's daily count)")
def count_segment(request: Request, segment_id: str, principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    session = request.state.db
    seg = _segment(request, principal, segment_id)
    out = service.count(session, principal.org_id, seg.query, _actor(request, principal), segment=seg)
    session.commit()
    return out


@router.get("/segments/{segment_id}/counts", summary="Daily member counts of a saved segment")
def daily_counts(request: Request, segment_id: str, days: int = Query(90, ge=1, le=3660),
                 principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    seg = _segment(request, principal, segment_id)
    return {"data": service.daily_counts(request.state.db, seg, _actor(request, principal), days)}


@router.get("/segments/{segment_id}/uses", summary="Who used a saved segment, for what, when")
def segment_uses(request: Request, segment_id: str, limit: int = Query(100, ge=1, le=1000),
                 principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    seg = _segment(request, principal, segment_id)
    return {"data": service.uses(request.state.db, seg, limit)}


@router.get("/segments/{segment_id}/members", summary="Member contact ids, a page at a time (read contacts through the contacts API)")
def segment_members(request: Request, segment_id: str, after: str | None = Query(None, max_length=32),
                    limit: int = Query(100, ge=1, le=1000),
                    principal: Principal = Depends(require(P.SEGMENTS_READ, P.PHI_READ_MASKED))) -> dict:
    session = request.state.db
    seg = _segment(request, principal, segment_id)
    ids, next_after = service.members(session, principal.org_id, seg, _actor(request, principal), after=after, limit=limit)
    session.commit()
    return {"data": ids, "next_after": next_after}


# --------------------------------------------------------------------------- value sets


def _vs_out(vs: dict) -> dict:
    return {k: vs.get(k) for k in ("key", "name", "version", "source", "description", "sensitive_category", "codes", "origin")}


@router.get("/value-sets", summary="Value sets: the shipped library merged with the organization's own")
def list_value_sets(request: Request, q: str | None = Query(None, max_length=100, description="Find by key, name or code"),
                    principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    rows = valuesets.all_value_sets(request.state.db, principal.org_id).values()
    if q:
        needle = q.lower()
        rows = [vs for vs in rows if needle in vs["key"].lower() or needle in vs["name"].lower()
                or any(needle in (c.get("code") or c.get("prefix") or "").lower() or needle in (c.get("display") or "").lower()
                       for c in vs["codes"])]
    return {"data": [_vs_out(vs) for vs in sorted(rows, key=lambda v: v["key"])]}


@router.get("/value-sets/{key}", summary="One value set as segments resolve it")
def read_value_set(request: Request, key: str, principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    vs = valuesets.resolve_value_set(request.state.db, principal.org_id, key)
    if vs is None:
        raise NotFound("No such value set.", field="key")
    return _vs_out(vs)


@router.get("/value-sets/{key}/versions", summary="Every version of a user value set")
def value_set_versions(request: Request, key: str, principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    rows = valuesets.value_set_versions(request.state.db, principal.org_id, key)
    if not rows:
        raise NotFound("No user value set with this key.", field="key")
    return {"data": rows}


@router.post("/value-sets", status_code=201, summary="Create a value set (a shipped key is overridden for this organization)")
def create_value_set(request: Request, body: ValueSetIn, principal: Principal = Depends(require(P.SEGMENTS_MANAGE))):
    session = request.state.db
    data = body.model_dump(exclude_none=True)
    data["codes"] = [c.model_dump(exclude_none=True) for c in body.codes]
    row = valuesets.save_value_set(session, principal.org_id, body.key, data, created_by=principal.actor_id, create=True)
    record_for(session, principal, request, "value_set.create", target_type="value_set", target_id=row.id,
               details={"key": row.key, "version": row.version})
    session.commit()
    return JSONResponse(_vs_out(valuesets.value_set_dict(row)), status_code=201)


@router.put("/value-sets/{key}", summary="Change a user value set (a new version)")
def update_value_set(request: Request, key: str, body: ValueSetPatch,
                     principal: Principal = Depends(require(P.SEGMENTS_MANAGE))) -> dict:
    session = request.state.db
    data = body.model_dump(exclude_none=True)
    data["codes"] = [c.model_dump(exclude_none=True) for c in body.codes]
    row = valuesets.save_value_set(session, principal.org_id, key, data, created_by=principal.actor_id, create=False)
    record_for(session, principal, request, "value_set.update", target_type="value_set", target_id=row.id,
               details={"key": row.key, "version": row.version})
    session.commit()
    return _vs_out(valuesets.value_set_dict(row))


@router.delete("/value-sets/{key}", status_code=204, summary="Delete a user value set (the shipped one of that key applies again)")
def delete_value_set(request: Request, key: str, principal: Principal = Depends(require(P.SEGMENTS_MANAGE))):
    session = request.state.db
    valuesets.delete_value_set(session, principal.org_id, key, created_by=principal.actor_id)
    record_for(session, principal, request, "value_set.delete", target_type="value_set", target_id=key)
    session.commit()
    return Response(status_code=204)


# --------------------------------------------------------------------------- locations


@router.get("/locations", tags=["segments"], summary="The organization's locations, for distance criteria")
def list_locations(request: Request, principal: Principal = Depends(require(P.SEGMENTS_READ))) -> dict:
    return {"data": [locations.to_dict(r) for r in locations.list_locations(request.state.db, principal.org_id)]}


@router.post("/locations", status_code=201, tags=["segments"],
             summary='Add a location (`within 25 miles of location "Main Street Clinic"`)')
def create_location(request: Request, body: LocationIn, principal: Principal = Depends(require(P.SEGMENTS_MANAGE))):
    session = request.state.db
    row = locations.save(session, principal.org_id, name=body.name, postal_code=body.postal_code,
                         created_by=principal.actor_id)
    record_for(session, principal, request, "location.create", target_type="location", target_id=row.id)
    session.commit()
    return JSONResponse(locations.to_dict(row), status_code=201)


@router.put("/locations/{location_id}", tags=["segments"],
            summary="Change a location (a rename is refused while saved segments name it)")
def update_location(request: Request, location_id: str, body: LocationIn,
                    principal: Principal = Depends(require(P.SEGMENTS_MANAGE))) -> dict:
    session = request.state.db
    row = locations.save(session, principal.org_id, name=body.name, postal_code=body.postal_code,
                         created_by=principal.actor_id, location_id=location_id)
    record_for(session, principal, request, "location.update", target_type="location", target_id=row.id)
    session.commit()
    return locations.to_dict(row)


@router.delete("/locations/{location_id}", status_code=204, tags=["segments"],
               summary="Delete a location (refused while saved segments name it)")
def delete_location(request: Request, location_id: str, principal: Principal = Depends(require(P.SEGMENTS_MANAGE))):
    session = request.state.db
    row = locations.delete(session, principal.org_id, location_id)
    record_for(session, principal, request, "location.delete", target_type="location", target_id=row.id)
    session.commit()
    return Response(status_code=204)
