"""Liveness and readiness. Readiness checks each dependency for real, and says which failed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import CeleryDep, SessionsDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


# What /readyz answers, ready (200) or not (503): each dependency "ok" or its error.
READINESS = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not_ready"]},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@router.get(
    "/readyz",
    responses={
        200: {"description": "database, broker and store answered", "content": {
            "application/json": {"schema": READINESS}}},
        503: {"description": "one of them did not: `checks` says which", "content": {
            "application/json": {"schema": READINESS}}},
    },
)  # fmt: skip
def readyz(sessions: SessionsDep, store: StoreDep, celery: CeleryDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with sessions() as db:
            db.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as err:  # noqa: BLE001 - any failure means not ready; report it
        checks["database"] = f"error: {type(err).__name__}: {err}"[:300]
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as err:  # noqa: BLE001
        checks["broker"] = f"error: {type(err).__name__}: {err}"[:300]
    try:
        store.check()
        checks["store"] = "ok"
    except Exception as err:  # noqa: BLE001
        checks["store"] = f"error: {type(err).__name__}: {err}"[:300]
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )
