"""OpenAI's speech API: POST /v1/audio/speech, GET /v1/models, GET /v1/audio/models and
GET /v1/audio/voices (routes.py), custom voices and their consents (voices.py), in its wire
schema (schemas.py)."""

from router.api.openai import voices  # noqa: F401 - adds the custom voice routes to the router
from router.api.openai.routes import router
from router.api.openai.schemas import openai_error

__all__ = ["openai_error", "router"]
