"""The embedded Chronicle server: ``methodic serve``, or in-process via EmbeddedServer.

The public names load on first use, so that ``methodic --version`` (cli.py, in this package)
does not import FastAPI and uvicorn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from methodic.server.app import create_app
    from methodic.server.cli import default_data_dir
    from methodic.server.config import ServerConfig
    from methodic.server.embedded import EmbeddedServer
    from methodic.server.state import DataDirError

__all__ = ["DataDirError", "EmbeddedServer", "ServerConfig", "create_app", "default_data_dir"]

_HOMES = {
    "DataDirError": "methodic.server.state",
    "EmbeddedServer": "methodic.server.embedded",
    "ServerConfig": "methodic.server.config",
    "create_app": "methodic.server.app",
    "default_data_dir": "methodic.server.cli",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
