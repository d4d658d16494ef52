"""Opening a data directory: metadata database, API key, presigning secret, storage."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass, field

from methodic.server.catalog import Catalog
from methodic.server.config import ServerConfig
from methodic.server.db import Database, SchemaError
from methodic.server.keys import (
    ActiveKey,
    KeyFileError,
    KeyRing,
    activate_api_key,
    load_or_create_secret,
)
from methodic.server.signing import Signer
from methodic.server.storage import LocalStorage

DB_FILE = "metadata.sqlite"


class DataDirError(RuntimeError):
    """The data directory cannot be created, written or read."""


@dataclass
class ServerState:
    config: ServerConfig
    db: Database = field(repr=False)
    catalog: Catalog = field(repr=False)
    signer: Signer = field(repr=False)
    keyring: KeyRing = field(repr=False)
    active_key: ActiveKey

    def close(self) -> None:
        self.db.close()


def open_state(config: ServerConfig) -> ServerState:
    """Prepare ``config.data_dir`` (mode 0700) and everything a server keeps in it.

    Raises DataDirError (with a one-line message) or ValueError (a bad API key).
    """
    data_dir = config.data_dir
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            os.chmod(data_dir, 0o700)
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise DataDirError(f"data dir {data_dir} is not writable")
        db = Database(data_dir / DB_FILE)
    except (OSError, sqlite3.Error, SchemaError) as exc:
        raise DataDirError(f"cannot use data dir {data_dir}: {exc}") from exc
    try:
        active, keyring = activate_api_key(db, data_dir, config.api_key)
        signer = Signer(load_or_create_secret(data_dir))
        storage = LocalStorage(data_dir)
        storage.remove_stale_temp()
    except (OSError, sqlite3.Error, KeyFileError) as exc:
        db.close()
        raise DataDirError(f"cannot use data dir {data_dir}: {exc}") from exc
    except BaseException:
        db.close()
        raise
    return ServerState(
        config=config,
        db=db,
        catalog=Catalog(db, storage, config),
        signer=signer,
        keyring=keyring,
        active_key=active,
    )
