"""Opening a data directory: metadata database, API key, presigning secret, storage, sweeper."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass, field

from methodic.server.catalog import Catalog
from methodic.server.config import ServerConfig
from methodic.server.db import Database, SchemaError
from methodic.server.finalize import Finalizer
from methodic.server.keys import (
    ActiveKey,
    KeyFileError,
    KeyRing,
    activate_api_key,
    load_or_create_secret,
)
from methodic.server.records import AssetRecords
from methodic.server.signing import Signer
from methodic.server.storage.base import Storage, StorageSetupError
from methodic.server.storage.local import LocalStorage
from methodic.server.sweeper import Sweeper

DB_FILE = "metadata.sqlite"


class DataDirError(RuntimeError):
    """The data directory (or the storage it points at) cannot be used: a one-line reason."""


@dataclass
class ServerState:
    config: ServerConfig
    db: Database = field(repr=False)
    records: AssetRecords = field(repr=False)
    catalog: Catalog = field(repr=False)
    finalizer: Finalizer = field(repr=False)
    signer: Signer = field(repr=False)
    keyring: KeyRing = field(repr=False)
    active_key: ActiveKey
    storage: Storage = field(repr=False)
    sweeper: Sweeper = field(repr=False)

    def close(self) -> None:
        self.sweeper.stop()
        self.storage.close()
        self.db.close()


def _open_storage(config: ServerConfig, db: Database, signer: Signer) -> Storage:
    location = config.s3_location
    if location is None:
        local = LocalStorage(config.data_dir, signer)
        local.remove_stale_temp()
        return local
    from methodic.server.storage.s3 import open_s3_storage

    return open_s3_storage(
        location, db, endpoint_url=config.s3_endpoint_url, region=config.s3_region
    )


def open_state(config: ServerConfig) -> ServerState:
    """Prepare ``config.data_dir`` (mode 0700) and everything a server keeps in it.

    Also starts the sweeper of expired pending assets (``close()`` stops it). Raises
    DataDirError (with a one-line message) or ValueError (a bad API key).
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
        storage = _open_storage(config, db, signer)
    except StorageSetupError as exc:
        db.close()
        raise DataDirError(str(exc)) from None
    except (OSError, sqlite3.Error, KeyFileError) as exc:
        db.close()
        raise DataDirError(f"cannot use data dir {data_dir}: {exc}") from exc
    except BaseException:
        db.close()
        raise
    records = AssetRecords(db, storage, config)
    sweeper = Sweeper(records, config.effective_sweep_interval)
    sweeper.start()
    return ServerState(
        config=config,
        db=db,
        records=records,
        catalog=Catalog(records),
        finalizer=Finalizer(records),
        signer=signer,
        keyring=keyring,
        active_key=active,
        storage=storage,
        sweeper=sweeper,
    )
