"""The embedded Chronicle server: ``methodic serve``, or in-process via EmbeddedServer."""

from methodic.server.app import create_app
from methodic.server.config import ServerConfig
from methodic.server.embedded import EmbeddedServer

__all__ = ["EmbeddedServer", "ServerConfig", "create_app"]
