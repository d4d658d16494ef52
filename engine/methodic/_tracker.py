"""UploadTracker: the local SQLite record of every upload, safe across threads and processes.

The SQL and the logic live in ``_tracker_ops``; this module only opens databases and drives
operations: ``UploadTracker`` with sqlite3 for callers, ``AsyncTracker`` with aiosqlite for the
engine's event loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from methodic import _tracker_ops as ops
from methodic._errors import TrackerError
from methodic._tracker_schema import MIGRATIONS, SCHEMA_VERSION
from methodic._types import ComponentSpec, RunBinding, TrackedAsset

T = TypeVar("T")

BUSY_TIMEOUT_MS = 60_000
_PRAGMAS = (
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = NORMAL",
)


def tracker_error(exc: BaseException, path: Path) -> TrackerError:
    """Turn a sqlite3 failure into an error that names the file and what to do."""
    msg = str(exc)
    low = msg.lower()
    if "not a database" in low or "malformed" in low or "file is encrypted" in low:
        hint = "it is damaged or not a tracker; move it aside (keep it for support) and pass another --tracker path"
    elif "readonly" in low or "read-only" in low:
        hint = "the file or its directory is read-only; make it writable or pass another --tracker path"
    elif "disk is full" in low or "disk i/o" in low:
        hint = "the disk is full or failing; free space and retry: nothing half-written was kept"
    elif "unable to open" in low:
        hint = "its directory does not exist or is not writable; create it or pass another --tracker path"
    elif "locked" in low:
        hint = "another process held it locked for over a minute; check for a stuck process"
    else:
        hint = "see the cause above"
    return TrackerError(f"upload tracker {path}: {msg} ({hint})")


def _ensure_file(path: Path) -> None:
    """Create the database file with mode 0600 before SQLite does (it would use the umask)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise TrackerError(
            f"upload tracker {path}: cannot create it ({exc.strerror}); "
            "create its directory or pass another --tracker path"
        ) from None


def _migrate_statements(version: int, path: Path) -> list[str]:
    if version > SCHEMA_VERSION:
        raise TrackerError(
            f"upload tracker {path} has schema version {version}, newer than this methodic "
            f"understands ({SCHEMA_VERSION}); upgrade methodic, or pass another --tracker path"
        )
    return MIGRATIONS[version:]


def _drive_sync(conn: sqlite3.Connection, op: ops.Op[T]) -> T:
    gen = op.make()
    try:
        sql, params, is_many = next(gen)
        while True:
            if is_many:
                conn.executemany(sql, params)
                rows: list[Any] = []
            else:
                rows = conn.execute(sql, cast(Sequence[Any], params)).fetchall()
            sql, params, is_many = gen.send(rows)
    except StopIteration as stop:
        return cast(T, stop.value)


class UploadTracker:
    """Local record of upload state, per asset and component (SQLite, WAL).

    ```python
    from pathlib import Path
    from methodic import UploadTracker

    tracker = UploadTracker(db_path=Path("./uploads.sqlite"))
    ```

    Thread-safe (one connection behind a lock) and multi-process-safe (WAL, a busy timeout and
    ``BEGIN IMMEDIATE`` for every write). The file is created with mode 0600. Its schema is
    versioned: an older file is migrated forward on open, a file from a newer methodic is
    refused. A damaged file (not a database, truncated, on a read-only or full disk) raises
    ``TrackerError`` naming the file and what to do; it is never treated as empty. Progress
    (bytes sent) is written coalesced, at most twice a second, never per chunk.
    """

    def __init__(self, db_path: Path | str = Path("./uploads.sqlite")) -> None:
        self.db_path = Path(db_path).expanduser().absolute()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._open()

    # -- plumbing

    def _open(self) -> None:
        _ensure_file(self.db_path)
        try:
            conn = sqlite3.connect(
                self.db_path,
                isolation_level=None,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
            for pragma in _PRAGMAS:
                conn.execute(pragma)
            _set_wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                for i, script in enumerate(
                    _migrate_statements(version, self.db_path), start=version
                ):
                    for stmt in filter(str.strip, script.split(";")):
                        conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version = {i + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise tracker_error(exc, self.db_path) from None
        self._conn = conn

    def _execute(self, op: ops.Op[T]) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise TrackerError(f"upload tracker {self.db_path} is closed")
            try:
                conn.execute("BEGIN IMMEDIATE" if op.write else "BEGIN")
                try:
                    result = _drive_sync(conn, op)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise tracker_error(exc, self.db_path) from None

    def close(self) -> None:
        """Close the database connection (also on leaving a ``with`` block)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> UploadTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UploadTracker(db_path={str(self.db_path)!r})"

    # -- the public API

    def register_components(
        self,
        asset_id: str,
        components: Sequence[ComponentSpec],
        *,
        asset_type: str,
        seal: bool = True,
        binding: RunBinding | None = None,
        local_dir: Path | str | None = None,
        **asset_metadata: Any,
    ) -> None:
        """Record every component of ``asset_id`` in one transaction: all rows land, or none.

        With ``seal=True`` (the default) the asset is complete as registered; with
        ``seal=False`` more components may follow until ``seal()`` is called, and the asset
        never counts as complete before that. ``binding`` records which server run the asset
        belongs to (``Run.register_and_upload_async`` sets it) so a later process can finish it.
        """
        self._execute(
            ops.register(
                asset_id,
                list(components),
                asset_type=asset_type,
                seal=seal,
                metadata=asset_metadata,
                binding=binding,
                local_dir=os.fspath(local_dir) if local_dir is not None else None,
            )
        )

    def seal(self, asset_id: str) -> None:
        """Declare that every component of ``asset_id`` is registered."""
        self._execute(ops.seal(asset_id))

    def all_components_completed(self, asset_id: str) -> bool:
        """True when the asset is sealed and every one of its components is completed."""
        return self._execute(ops.all_completed(asset_id))

    def get_pending_uploads(self) -> list[TrackedAsset]:
        """Every asset not yet finalized or discarded, with its components, oldest first."""
        return self._execute(ops.pending_uploads())

    def get_asset(self, asset_id: str) -> TrackedAsset | None:
        """One asset with its components, or None when the tracker does not know it."""
        return self._execute(ops.get_asset(asset_id))

    def list_assets(self, states: Sequence[str] | None = None) -> list[TrackedAsset]:
        """Summaries (no components) of every asset, or of those in ``states``."""
        return self._execute(ops.list_assets(states))

    def discard(self, asset_id: str) -> bool:
        """Forget ``asset_id`` locally (state ``discarded``); False when it was unknown."""
        return self._execute(ops.discard(asset_id))


def _set_wal(conn: sqlite3.Connection) -> None:
    # Switching to WAL takes a lock that the busy handler does not always wait for.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class AsyncTracker:
    """The engine's connection to a tracker file, on its event loop (aiosqlite).

    An operation, once started, runs to its COMMIT or ROLLBACK even if its caller is cancelled:
    aiosqlite runs each statement on its own thread whatever happens to the awaiting task, so a
    cancelled caller that let go of the lock mid-transaction would leave the shared connection
    inside a transaction (the next BEGIN: "cannot start a transaction within a transaction").
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self.lost: str | None = None  # why the file can no longer be trusted, once it cannot

    async def open(self) -> AsyncTracker:
        # Create and migrate the file in a thread: a blocking open on this loop could wait on
        # a transaction that another connection of the same loop cannot finish meanwhile.
        await asyncio.to_thread(lambda: UploadTracker(self.db_path).close())
        try:
            self._conn = await aiosqlite.connect(
                self.db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
            )
            for pragma in _PRAGMAS:
                await self._conn.execute(pragma)
            st = await asyncio.to_thread(os.stat, self.db_path)
        except sqlite3.Error as exc:
            raise tracker_error(exc, self.db_path) from None
        self._identity = (st.st_dev, st.st_ino)
        return self

    async def check_file(self) -> str | None:
        """None while the file opened is still at ``db_path``; else why it is not (and from then on).

        A tracker deleted or replaced under a running process would take every later write into
        an unlinked file: a crash then leaves nothing that says what to resume.
        """
        if self.lost is None and self._identity is not None:
            try:
                st = await asyncio.to_thread(os.stat, self.db_path)
                moved = (st.st_dev, st.st_ino) != self._identity
            except FileNotFoundError:
                moved = True
            except OSError:
                moved = False  # unreadable for a moment (NFS): not proof it is gone
            if moved:
                self.lost = (
                    f"upload tracker {self.db_path} was removed or replaced while uploading; "
                    "this process stopped writing to it. Keep the server's pending asset: "
                    "register the checkpoint again with a tracker at a path nothing deletes, "
                    "or restore the tracker file and run `methodic-tui resume`"
                )
        return self.lost

    async def run(self, op: ops.Op[T]) -> T:
        if self.lost is not None:
            raise TrackerError(self.lost)
        task = asyncio.ensure_future(self._locked(op))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                # The transaction ends (COMMIT or ROLLBACK) before the caller learns it was
                # cancelled, so neither the lock nor the connection is left mid-transaction.
                await asyncio.wait({task})
                if not task.cancelled():
                    task.exception()  # retrieved: the caller was cancelled, not failed
            raise

    async def _locked(self, op: ops.Op[T]) -> T:
        async with self._lock:
            return await self._run(op)

    async def _run(self, op: ops.Op[T]) -> T:
        conn = self._conn
        if conn is None:
            raise TrackerError(f"upload tracker {self.db_path} is closed")
        try:
            if conn.in_transaction:  # never expected: end it rather than fail every later write
                await conn.execute("ROLLBACK")
            await conn.execute("BEGIN IMMEDIATE" if op.write else "BEGIN")
            try:
                gen = op.make()
                try:
                    sql, params, is_many = next(gen)
                    while True:
                        if is_many:
                            await conn.executemany(sql, params)
                            rows: list[Any] = []
                        else:
                            rows = list(await conn.execute_fetchall(sql, params))
                        sql, params, is_many = gen.send(rows)
                except StopIteration as stop:
                    result: T = stop.value
                await conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise tracker_error(exc, self.db_path) from None

    async def close(self) -> None:
        async with self._lock:  # after the operation in flight, never under it
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
