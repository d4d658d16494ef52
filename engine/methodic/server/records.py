"""An asset as the metadata database records it, beside what storage holds of it.

``AssetRecords`` is what the catalog, finalize, the sweeper and the blob ledger share: the
database, the storage backend, the settings, and the per-asset locks that serialize uploads,
finalize and deletion of one asset. Every method blocks (SQLite, storage I/O).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from methodic.server.config import ServerConfig
from methodic.server.db import Database
from methodic.server.errors import not_found
from methodic.server.locks import KeyedLocks
from methodic.server.storage.base import Component, Found, Storage

ASSET_SELECT = "SELECT a.*, r.experiment_id FROM assets a JOIN runs r ON r.id = a.run_id"


class AssetLocks(KeyedLocks):
    """Per-asset locks, plus the part PUTs in flight per (asset, component index)."""

    def __init__(self) -> None:
        super().__init__()
        self.part_writers: Counter[tuple[str, int]] = Counter()


def asset_out(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "asset_id": row["id"],
        "run_id": row["run_id"],
        "experiment_id": row["experiment_id"],
        "asset_type": row["asset_type"],
        "state": row["state"],
        "metadata": json.loads(row["metadata"]),
        "created_at": row["created_at"],
        "finalized_at": row["finalized_at"],
        "component_count": row["component_count"],
        "total_size": row["total_size"],
    }


def component_out(c: Component, found: Found) -> dict[str, Any]:
    if c.part_size is None:
        parts: list[int] = []
    elif found.complete:
        parts = list(range(1, c.parts + 1))
    else:
        parts = sorted(found.parts)
    return {
        "path": c.path,
        "size": c.size,
        "sha256": c.stored_sha256 or c.sha256,
        "part_size": c.part_size,
        "stored": found.complete,
        "parts_stored": parts,
    }


def component_of(row: sqlite3.Row, parts: Sequence[tuple[int, str]] = ()) -> Component:
    return Component(
        index=row["idx"],
        path=row["path"],
        size=row["size"],
        sha256=row["sha256"],
        part_size=row["part_size"],
        stored_sha256=row["stored_sha256"],
        parts_stored=tuple(n for n, _ in parts),
        part_sha256=dict(parts),
    )


class AssetRecords:
    def __init__(self, db: Database, storage: Storage, config: ServerConfig) -> None:
        self.db = db
        self.storage = storage
        self.config = config
        self.locks = AssetLocks()

    @staticmethod
    def asset_row(conn: sqlite3.Connection, asset_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            f"{ASSET_SELECT} WHERE a.id = ?", (asset_id,)
        ).fetchone()
        if row is None:
            raise not_found(f"asset {asset_id} does not exist")
        return row

    @staticmethod
    def components(conn: sqlite3.Connection, asset_id: str) -> list[Component]:
        parts: dict[int, list[tuple[int, str]]] = {}
        for idx, part, digest in conn.execute(
            "SELECT idx, part, sha256 FROM parts WHERE asset_id = ? ORDER BY idx, part",
            (asset_id,),
        ):
            parts.setdefault(idx, []).append((part, digest))
        return [
            component_of(row, parts.get(row["idx"], ()))
            for row in conn.execute(
                "SELECT * FROM components WHERE asset_id = ? ORDER BY idx", (asset_id,)
            )
        ]

    def load(self, asset_id: str) -> tuple[dict[str, Any], list[Component]]:
        with self.db.read() as conn:
            return asset_out(self.asset_row(conn, asset_id)), self.components(conn, asset_id)

    def _found(self, asset: Mapping[str, Any], components: Sequence[Component]) -> list[Found]:
        if asset["state"] == "finalized":
            return [Found(True)] * len(components)
        return self.storage.inspect(
            asset["asset_id"], components, deep=False, workers=self.config.finalize_workers
        )

    def with_components(
        self,
        asset: dict[str, Any],
        components: Sequence[Component],
        found: Sequence[Found] | None = None,
    ) -> dict[str, Any]:
        if found is None:
            found = self._found(asset, components)
        asset["components"] = [component_out(c, f) for c, f in zip(components, found, strict=True)]
        return asset

    def get_asset(self, asset_id: str) -> dict[str, Any]:
        """The asset with what storage holds of each component (recovery's status call)."""
        asset, components = self.load(asset_id)
        return self.with_components(asset, components)

    def touch(self, asset_id: str) -> None:
        """Mark the asset active now (the sweeper expires pending assets left idle)."""
        with self.db.write() as tx:
            tx.execute("UPDATE assets SET touched_at = ? WHERE id = ?", (time.time(), asset_id))
