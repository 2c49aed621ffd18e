"""GET /metrics: Prometheus text format. With API keys set it needs one (see router/auth.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["System"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    speech = request.app.state.speech
    speech.refresh_gauges()
    return Response(generate_latest(speech.metrics.registry), media_type=CONTENT_TYPE_LATEST)
