"""Home Assistant's Wyoming protocol: every model's voices over TCP (server.py)."""

from router.api.wyoming.server import WyomingServer

__all__ = ["WyomingServer"]
