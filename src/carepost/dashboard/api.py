"""Health, readiness, metrics and the OpenAPI document.

``/readyz`` answers 503 when this server cannot reach the database or the task queue (a load
balancer then stops sending it requests); ``/metrics`` adds the installation-wide gauges
(carepost.dashboard.metrics) to this process's counters."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from carepost import __version__
from carepost.accounts.access import public
from carepost.core.database import session_factory
from carepost.web.metrics import exposition

router = APIRouter()


@router.get("/healthz", dependencies=[Depends(public("liveness probe, no data"))], tags=["health"])
def healthz() -> dict:
    return {"status": "ok", "version": __version__}


@router.get("/readyz", dependencies=[Depends(public("readiness probe, no data"))], tags=["health"])
def readyz() -> JSONResponse:
    checks = {}
    try:
        with session_factory()() as session:
            session.info["scope"] = "system"
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # report, don't crash: a load balancer reads this
        checks["database"] = f"error: {type(exc).__name__}"
    try:  # the task queue (Redis, or the SQLite queue in the data dir): nothing can be sent without it
        from carepost.core.queue import pending_count

        pending_count()
        checks["queue"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report, don't crash
        checks["queue"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", dependencies=[Depends(public("Prometheus scrape; aggregate counters only"))], include_in_schema=False)
def metrics() -> Response:
    from carepost.dashboard.metrics import COLLECTOR

    body, content_type = exposition(COLLECTOR)
    return Response(body, media_type=content_type)


@router.get("/api/v1/openapi.json", dependencies=[Depends(public("API description"))], include_in_schema=False)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


OPENAPI_URL = "/api/v1/openapi.json"


@router.get("/api/docs", dependencies=[Depends(public("API reference page; static, no data"))], include_in_schema=False)
def api_docs(request: Request):
    """Swagger UI served from /static (FastAPI's default page loads from a CDN)."""
    from carepost.web.rendering import render

    return render(request, "web/api_docs.html", {"openapi_url": OPENAPI_URL})
