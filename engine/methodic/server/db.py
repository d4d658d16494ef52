"""The server's metadata database: schema and per-thread SQLite connections.

WAL lets readers proceed while one writer commits; every write transaction starts with
``BEGIN IMMEDIATE`` so two writers queue on the busy timeout instead of failing halfway.
Commits are ``synchronous=NORMAL`` (consistent, possibly not yet on disk) unless the caller
asks for a durable one, which the state changes a client relies on (finalize, create) do.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_S = 30.0

# MIGRATIONS[n] takes a database from schema version n to n + 1.
MIGRATIONS: list[str] = [
    """
CREATE TABLE api_keys (
    key_hash   TEXT PRIMARY KEY,
    origin     TEXT NOT NULL,           -- 'generated' (DATA_DIR/api_key) or 'given' (--api-key)
    created_at REAL NOT NULL
);
CREATE TABLE experiments (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE runs (
    id            TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL REFERENCES experiments(id),
    variation     INTEGER NOT NULL,
    run           INTEGER NOT NULL,
    status        TEXT NOT NULL,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    UNIQUE (experiment_id, variation, run)
);
CREATE TABLE assets (
    seq             INTEGER PRIMARY KEY,  -- creation order, for oldest-first listings
    id              TEXT NOT NULL UNIQUE,
    run_id          TEXT NOT NULL REFERENCES runs(id),
    asset_type      TEXT NOT NULL,
    metadata        TEXT NOT NULL,        -- JSON object
    manifest_digest TEXT NOT NULL,
    state           TEXT NOT NULL,        -- 'pending' | 'finalized'
    component_count INTEGER NOT NULL,
    total_size      INTEGER NOT NULL,
    created_at      REAL NOT NULL,
    finalized_at    REAL
);
CREATE INDEX assets_by_run ON assets (run_id, seq);
CREATE TABLE components (
    asset_id      TEXT NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,       -- position in the manifest; names the stored file
    path          TEXT NOT NULL,
    size          INTEGER NOT NULL,
    sha256        TEXT,                   -- from the manifest
    part_size     INTEGER,                -- NULL: one PUT
    stored_sha256 TEXT,                   -- server-computed; single PUT: when stored, parts: at finalize
    PRIMARY KEY (asset_id, idx),
    UNIQUE (asset_id, path)
) WITHOUT ROWID;
CREATE TABLE parts (
    asset_id TEXT NOT NULL,
    idx      INTEGER NOT NULL,
    part     INTEGER NOT NULL,
    size     INTEGER NOT NULL,
    sha256   TEXT NOT NULL,
    PRIMARY KEY (asset_id, idx, part),
    FOREIGN KEY (asset_id, idx) REFERENCES components (asset_id, idx) ON DELETE CASCADE
) WITHOUT ROWID;
""",
    """
-- Last activity (create, presign, upload, finalize): pending assets idle longer expire.
ALTER TABLE assets ADD COLUMN touched_at REAL;
UPDATE assets SET touched_at = created_at;
CREATE INDEX assets_pending_by_touch ON assets (state, touched_at);
-- The storage's handle of a multipart upload in progress (S3's UploadId), per component.
CREATE TABLE multipart_uploads (
    asset_id   TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    upload_id  TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (asset_id, idx),
    FOREIGN KEY (asset_id, idx) REFERENCES components (asset_id, idx) ON DELETE CASCADE
) WITHOUT ROWID;
-- Assets deleted here whose stored bytes may still exist: removed by the next sweep.
CREATE TABLE purges (
    asset_id TEXT PRIMARY KEY,
    since    REAL NOT NULL
) WITHOUT ROWID;
""",
    """
-- The asset's checksum algorithm (crc64nvme, sha256, blake3): every receipt digest and its
-- settled checksum use it. NULL: an asset from before algorithms (sha256 receipts, legacy).
ALTER TABLE assets ADD COLUMN checksum_algorithm TEXT;
-- Receipts hold a digest in the asset's algorithm, and whether the PUT was bound to it (the
-- presigned URL carried the digest the client computed, and the body had it).
ALTER TABLE parts RENAME COLUMN sha256 TO digest;
ALTER TABLE parts ADD COLUMN bound INTEGER NOT NULL DEFAULT 0;
ALTER TABLE components RENAME COLUMN stored_sha256 TO stored_digest;
ALTER TABLE components ADD COLUMN stored_bound INTEGER NOT NULL DEFAULT 0;
-- The settled whole-file checksum, "algo:value", once finalized.
ALTER TABLE components ADD COLUMN checksum TEXT;
UPDATE components SET checksum = 'sha256:' || stored_digest
 WHERE stored_digest IS NOT NULL
   AND asset_id IN (SELECT id FROM assets WHERE state = 'finalized');
-- The checksum algorithm an S3 multipart upload was created with (NULL: none).
ALTER TABLE multipart_uploads ADD COLUMN checksum_algorithm TEXT;
""",
    """
-- Uploader sessions (server/sessions.py): the latest beat of each, written behind.
CREATE TABLE uploader_sessions (
    id            TEXT PRIMARY KEY,
    info          TEXT NOT NULL,          -- JSON: host, pid, user, version, runs
    status        TEXT NOT NULL,          -- JSON: the in-flight assets of the last beat
    registered_at REAL NOT NULL,
    last_beat     REAL NOT NULL,
    closed        INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
""",
    """
-- Multi-rank assets: one asset (named, per run) joined by world_size contributions, each a
-- rank's components; finalized by the server once every contribution is stored and verified.
ALTER TABLE assets ADD COLUMN asset_name TEXT;
ALTER TABLE assets ADD COLUMN world_size INTEGER;
ALTER TABLE components ADD COLUMN rank INTEGER;
CREATE TABLE contributions (
    asset_id        TEXT NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
    rank            INTEGER NOT NULL,
    manifest_digest TEXT NOT NULL,
    component_count INTEGER NOT NULL,
    total_size      INTEGER NOT NULL,
    state           TEXT NOT NULL,        -- 'registered' | 'stored'
    registered_at   REAL NOT NULL,
    seen_at         REAL NOT NULL,        -- last create, finalize or stored from this rank
    stored_at       REAL,
    PRIMARY KEY (asset_id, rank)
) WITHOUT ROWID;
-- Per run and asset type: keep the newest keep_last finalized assets, delete older ones.
CREATE TABLE retention (
    run_id     TEXT NOT NULL REFERENCES runs(id),
    asset_type TEXT NOT NULL,
    keep_last  INTEGER NOT NULL,
    PRIMARY KEY (run_id, asset_type)
) WITHOUT ROWID;
-- Finalized assets the retention deleted: their last summary (JSON), so that a rank still
-- waiting for one learns it was finalized, not lost. Kept for a while, then dropped.
CREATE TABLE retired (
    asset_id   TEXT PRIMARY KEY,
    summary    TEXT NOT NULL,
    retired_at REAL NOT NULL
) WITHOUT ROWID;
""",
    """
-- S3: the checksum ("algo:hex") every URL presigned for a one-PUT component was bound to, or
-- '' once one was bound to another or to none. S3 verified it on PUT: when it is the client's,
-- finalize need not ask S3 for the object's checksum (HeadObject).
CREATE TABLE s3_put_bindings (
    asset_id TEXT NOT NULL,
    idx      INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    PRIMARY KEY (asset_id, idx),
    FOREIGN KEY (asset_id, idx) REFERENCES components (asset_id, idx) ON DELETE CASCADE
) WITHOUT ROWID;
-- URLs an older server presigned for pending assets were not recorded: always ask about those.
INSERT INTO s3_put_bindings (asset_id, idx, checksum)
SELECT asset_id, idx, '' FROM components
 WHERE asset_id IN (SELECT id FROM assets WHERE state = 'pending');
""",
    """
-- A manifest sent in slices (the create carries the first, appends the rest) is open until
-- its last component is listed; component_count, total_size and manifest_digest are then
-- the declared ones, checked when it closes. An open asset cannot be finalized.
ALTER TABLE assets ADD COLUMN manifest_open INTEGER NOT NULL DEFAULT 0;
""",
]
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending)
            pending = ""
    return out


class SchemaError(RuntimeError):
    """The database was written by a newer methodic, or is not a methodic server database."""


class _Holder:
    """Owns one thread's connection and closes it when the thread (and its locals) go away."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def close(self) -> None:
        self.conn.close()

    def __del__(self) -> None:
        self.close()


class Database:
    """One SQLite file, one connection per thread (worker threads come and go)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._holders: weakref.WeakSet[_Holder] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        if not path.exists():
            # SQLite gives the -wal and -shm files the mode of the database file.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def connection(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("the server database is closed")
        holder: _Holder | None = getattr(self._local, "holder", None)
        if holder is None:
            holder = _Holder(self._connect())
            self._local.holder = holder
            with self._lock:
                self._holders.add(holder)
        return holder.conn

    def _migrate(self) -> None:
        conn = self.connection()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SchemaError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
        with self.write(durable=True) as tx:
            version = tx.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"{self.path} was written by a newer methodic (schema {version}); upgrade methodic"
                )
            if version == 0 and tx.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise SchemaError(f"{self.path} is not a methodic server database")
            for script in MIGRATIONS[version:]:
                # executescript() would COMMIT the open transaction, so run statements one by one.
                for statement in _statements(script):
                    tx.execute(statement)
            if version < SCHEMA_VERSION:
                tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same snapshot."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    @contextmanager
    def write(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``); ``durable`` syncs the WAL at commit."""
        conn = self.connection()
        if durable:
            conn.execute("PRAGMA synchronous = FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (SQLITE_FULL can), and a failed COMMIT
                # leaves the transaction open: either way the connection is usable again.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        finally:
            if durable:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        self._closed = True
        with self._lock:
            holders = list(self._holders)
        for holder in holders:
            holder.close()
