"""The tracker's SQLite schema, as forward migrations: a file of any older version is brought
up to date when it is opened; a newer one is refused."""

from __future__ import annotations

SCHEMA_VERSION = 3

# Forward migrations: MIGRATIONS[n] takes a database from version n to n + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE assets (
        asset_id      TEXT PRIMARY KEY,
        asset_type    TEXT NOT NULL,
        state         TEXT NOT NULL,
        sealed        INTEGER NOT NULL DEFAULT 0,
        metadata      TEXT NOT NULL DEFAULT '{}',
        server_url    TEXT,
        run_id        TEXT,
        experiment_id TEXT,
        variation     INTEGER,
        run           INTEGER,
        local_dir     TEXT,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        last_error    TEXT,
        owner_pid     INTEGER
    );
    CREATE INDEX assets_state ON assets(state);
    CREATE TABLE components (
        asset_id   TEXT NOT NULL REFERENCES assets(asset_id) ON DELETE CASCADE,
        path       TEXT NOT NULL,
        local_path TEXT NOT NULL,
        size       INTEGER NOT NULL,
        sha256     TEXT,
        mtime_ns   INTEGER,
        inode      INTEGER,
        part_size  INTEGER,
        state      TEXT NOT NULL DEFAULT 'queued',
        bytes_sent INTEGER NOT NULL DEFAULT 0,
        attempts   INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        checksum   TEXT,
        PRIMARY KEY (asset_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE parts (
        asset_id TEXT NOT NULL,
        path     TEXT NOT NULL,
        part     INTEGER NOT NULL,
        etag     TEXT,
        PRIMARY KEY (asset_id, path, part),
        FOREIGN KEY (asset_id, path) REFERENCES components(asset_id, path) ON DELETE CASCADE
    ) WITHOUT ROWID;
    """,
    # 1 -> 2: the owner is its pid and its start time (a pid alone may be reused once it
    # dies). ``owner_start_pid`` is the pid that start time was read for: a writer that
    # changes ``owner_pid`` alone (an older tool, a manual fix) leaves a start time that no
    # longer describes the owner, and the pid alone decides.
    """
    ALTER TABLE assets ADD COLUMN owner_start INTEGER;
    ALTER TABLE assets ADD COLUMN owner_start_pid INTEGER;
    """,
    # 2 -> 3: the integrity chain. A file's change time and device join its identity (a
    # rewrite with its mtime put back changes ctime); the caller's declared ``algo:hex``; and
    # each sent part's digest, which the server's receipts must match before it is published.
    """
    ALTER TABLE components ADD COLUMN ctime_ns INTEGER;
    ALTER TABLE components ADD COLUMN device INTEGER;
    ALTER TABLE components ADD COLUMN declared TEXT;
    ALTER TABLE parts ADD COLUMN digest TEXT;
    """,
]
