"""Opening a data directory: metadata database, API key, presigning secret, storage, sweeper."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

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
from methodic.server.retention import Retention
from methodic.server.sessions import SessionBook
from methodic.server.signing import Signer
from methodic.server.storage.base import Storage, StorageSetupError
from methodic.server.storage.local import LocalStorage
from methodic.server.sweeper import Sweeper

DB_FILE = "metadata.sqlite"
LOCK_FILE = "lock"


class DataDirError(RuntimeError):
    """The data directory (or the storage it points at) cannot be used: a one-line reason."""


class DataDirLock:
    """An exclusive ``flock`` on DATA_DIR/lock (mode 0600, holding the owner's pid): one server
    per data directory. The OS releases it when the process dies, however it dies."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self.created_dir = False
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Create the data dir (0700) if needed and lock it. Raises DataDirError."""
        data_dir = self.data_dir
        try:
            if not data_dir.is_dir():
                data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.created_dir = True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DataDirError(f"cannot use data dir {data_dir}: {exc}") from exc
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                who = f"pid {owner}" if owner else "pid unknown"
                raise DataDirError(
                    f"data dir {data_dir} is in use by another methodic server ({who}); "
                    "stop that one first, or give this one another data dir"
                ) from None
            raise DataDirError(f"cannot lock data dir {data_dir}: {exc}") from exc
        with contextlib.suppress(OSError):  # a full disk: the lock holds without the pid
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self, *, undo_create: bool = False) -> None:
        """Unlock; ``undo_create``: also remove the data dir if this lock created it (a server
        that never started leaves nothing behind)."""
        if self._fd is None:
            return
        if undo_create and self.created_dir:
            with contextlib.suppress(OSError):
                self.path.unlink()
                self.data_dir.rmdir()
        os.close(self._fd)  # releases the flock
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


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
    lock: DataDirLock = field(repr=False)
    sessions: SessionBook = field(repr=False)
    retention: Retention = field(repr=False)

    def close(self) -> None:
        self.sessions.stop()
        self.sweeper.stop()
        self.storage.close()
        self.db.close()
        self.lock.release()


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


def open_state(config: ServerConfig, lock: DataDirLock | None = None) -> ServerState:
    """Prepare ``config.data_dir`` (mode 0700) and everything a server keeps in it.

    ``lock``: the data dir's, acquired by the caller (else it is acquired here); the state owns
    it from now on and ``close()`` releases it, as it stops the sweeper of expired pending
    assets started here. Raises DataDirError (with a one-line message) or ValueError (a bad
    API key).
    """
    data_dir = config.data_dir
    lock = lock or DataDirLock(data_dir).acquire()
    try:
        return _open_state(config, lock)
    except BaseException:
        lock.release()
        raise


def _open_state(config: ServerConfig, lock: DataDirLock) -> ServerState:
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
    sessions = SessionBook(
        db,
        lost_after=config.session_lost_after,
        retention=config.session_retention,
        command_ttl=config.command_ttl,
    )
    sessions.start()
    retention = Retention(records)
    return ServerState(
        config=config,
        db=db,
        records=records,
        catalog=Catalog(records),
        finalizer=Finalizer(records, retention.apply),
        signer=signer,
        keyring=keyring,
        active_key=active,
        storage=storage,
        sweeper=sweeper,
        lock=lock,
        sessions=sessions,
        retention=retention,
    )
