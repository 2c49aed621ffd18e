"""ElevenLabs' API: text to speech over HTTP with and without character timings (routes.py), its
streaming WebSockets (socket.py: each context's text schedule in schedule.py, its speech in
speaker.py), sound generation (sound.py), voice listing and cloning (voices.py), all in its wire
schema (schemas.py)."""

from router.api.elevenlabs import routes, socket, sound, voices
from router.api.elevenlabs.schemas import elevenlabs_error

#: Every route of the family, for the app.
routers = (routes.router, voices.router, socket.router, sound.router)

__all__ = ["elevenlabs_error", "routers"]
