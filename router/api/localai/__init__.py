"""LocalAI's text-to-speech API: POST /tts and its voice profiles (routes.py), in its wire schema
(schemas.py)."""

from router.api.localai.routes import router
from router.api.localai.schemas import localai_error

__all__ = ["localai_error", "router"]
