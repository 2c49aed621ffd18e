"""Liveness and readiness, outside every API family."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["System"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Models are loaded and requests can be served")
async def readyz(request: Request) -> JSONResponse:
    runner = request.app.state.speech.runner
    if runner.is_ready():
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "loading"}, status_code=503)
