"""Web UI of segments: the saved-segment list and the segment builder.

The builder (``/static/segments-builder.js``) has two modes kept in sync: a visual mode (nested
groups of criteria, a field picker grouped as demographic / clinical / journey / engagement /
consent, code search inside value sets) and a text mode (the segment language). Both speak the
API: ``/api/v1/segments/fields`` for the picker, ``/api/v1/segments/parse`` to turn text into a
tree and back, ``/api/v1/segments/count`` for the live count and breakdown, ``/api/v1/value-sets``
for code search, ``/api/v1/segments`` to save. The page itself holds no PHI; counts come from the
API with its small-cell suppression and sensitive-category rules.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.segments import service
from carepost.segments.service import Actor
from carepost.web.rendering import render

router = APIRouter(prefix="/app", include_in_schema=False)


@router.get("/segments")
def segment_list(request: Request, principal: Principal = Depends(require(P.SEGMENTS_READ))):
    session = request.state.db
    rows = service.list_segments(session, principal.org_id, Actor.of(principal, request))
    segments = [service.segment_dict(s, with_query=False) for s in rows]
    return render(request, "segments/list.html", {"segments": segments, "can_manage": principal.can(P.SEGMENTS_MANAGE)})


@router.get("/segments/new")
def segment_new(request: Request, principal: Principal = Depends(require(P.SEGMENTS_READ))):
    return render(request, "segments/builder.html", {"segment": None, "can_manage": principal.can(P.SEGMENTS_MANAGE)})


@router.get("/segments/{segment_id}")
def segment_edit(request: Request, segment_id: str, principal: Principal = Depends(require(P.SEGMENTS_READ))):
    session = request.state.db
    seg = service.get_segment(session, principal.org_id, segment_id, Actor.of(principal, request))
    return render(request, "segments/builder.html", {"segment": service.segment_dict(seg),
                                                     "can_manage": principal.can(P.SEGMENTS_MANAGE)})
