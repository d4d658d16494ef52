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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from methodic.server.config import ServerConfig
from methodic.server.contributions import describe
from methodic.server.db import Database
from methodic.server.errors import APIError, not_found
from methodic.server.locks import KeyedLocks
from methodic.server.storage.base import Component, Found, Storage, Upload

# Values per ``IN (...)`` list (SQLite allows 999 parameters in older builds).
IN_BATCH = 500


def marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


ASSET_SELECT = "SELECT a.*, r.experiment_id FROM assets a JOIN runs r ON r.id = a.run_id"


class AssetLocks(KeyedLocks):
    """Per-asset locks, plus the part PUTs writing into a file, per (asset, component index),
    and the small part bodies still arriving whole (not yet writing), per (asset, path)."""

    def __init__(self) -> None:
        super().__init__()
        self.part_writers: dict[tuple[str, int], set[Upload]] = {}
        # Changed on the blob listener's loop only (``arriving``); finalize just reads it.
        self.parts_arriving: Counter[tuple[str, str]] = Counter()

    @contextmanager
    def arriving(self, asset_id: str, path: str) -> Iterator[None]:
        """Count a part body of ``path`` as arriving while the block runs."""
        key = (asset_id, path)
        self.parts_arriving[key] += 1
        try:
            yield
        finally:
            self.parts_arriving[key] -= 1
            if not self.parts_arriving[key]:
                del self.parts_arriving[key]


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
        "checksum_algorithm": row["checksum_algorithm"],
        "manifest_complete": not row["manifest_open"],
        # A multi-rank asset has one per contribution instead.
        "manifest_digest": None if row["world_size"] else row["manifest_digest"],
        "asset_name": row["asset_name"],
        "world_size": row["world_size"],
    }


def reported_sha256(c: Component) -> str | None:
    """The component's whole-file sha256 when known: the manifest's, or a sha256 receipt or
    settlement that is one (a legacy asset's, or a one-PUT component of a sha256 asset)."""
    if c.sha256 is not None:
        return c.sha256
    if c.algorithm is None or (c.algorithm == "sha256" and c.part_size is None):
        settled = c.checksum.partition(":")[2] if c.checksum else None
        return c.stored_digest or settled
    return None


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
        "sha256": reported_sha256(c),
        "checksum": c.checksum,
        "part_size": c.part_size,
        "stored": found.complete,
        "parts_stored": parts,
    }


def component_of(
    row: sqlite3.Row, algorithm: str | None, parts: Sequence[tuple[int, str, int]] = ()
) -> Component:
    """A component row with its part receipts (part, digest, bound); ``algorithm`` is the
    asset's (None: legacy)."""
    # Positional, in field order: a status call of 100,000 components builds one each.
    return Component(
        row["idx"],
        row["path"],
        row["size"],
        row["sha256"],
        row["part_size"],
        row["stored_digest"],
        tuple(n for n, _, _ in parts) if parts else (),
        {n: digest for n, digest, _ in parts} if parts else {},
        algorithm,
        bool(row["stored_bound"]),
        frozenset(n for n, _, bound in parts if bound) if parts else frozenset(),
        row["checksum"],
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
    def algorithm(conn: sqlite3.Connection, asset_id: str) -> str | None:
        row = conn.execute(
            "SELECT checksum_algorithm FROM assets WHERE id = ?", (asset_id,)
        ).fetchone()
        return None if row is None else row[0]

    @classmethod
    def components(cls, conn: sqlite3.Connection, asset_id: str) -> list[Component]:
        parts: dict[int, list[tuple[int, str, int]]] = {}
        for idx, part, digest, bound in conn.execute(
            "SELECT idx, part, digest, bound FROM parts WHERE asset_id = ? ORDER BY idx, part",
            (asset_id,),
        ):
            parts.setdefault(idx, []).append((part, digest, bound))
        algorithm = cls.algorithm(conn, asset_id)
        return [
            component_of(row, algorithm, parts.get(row["idx"], ()))
            for row in conn.execute(
                "SELECT * FROM components WHERE asset_id = ? ORDER BY idx", (asset_id,)
            )
        ]

    @classmethod
    def components_named(
        cls, conn: sqlite3.Connection, asset_id: str, paths: Sequence[str]
    ) -> dict[str, Component]:
        """The components at ``paths`` that exist, by path, with their part receipts: rows of
        those paths only (a presign of 200 files of a 100,000-file asset reads 200, not all)."""
        algorithm = cls.algorithm(conn, asset_id)
        wanted = list(dict.fromkeys(paths))
        out: dict[str, Component] = {}
        for i in range(0, len(wanted), IN_BATCH):
            chunk = wanted[i : i + IN_BATCH]
            rows = conn.execute(
                f"SELECT * FROM components WHERE asset_id = ? AND path IN ({marks(chunk)})",
                (asset_id, *chunk),
            ).fetchall()
            parted = [row["idx"] for row in rows if row["part_size"] is not None]
            parts: dict[int, list[tuple[int, str, int]]] = {}
            if parted:
                for idx, part, digest, bound in conn.execute(
                    "SELECT idx, part, digest, bound FROM parts WHERE asset_id = ?"
                    f" AND idx IN ({marks(parted)}) ORDER BY idx, part",
                    (asset_id, *parted),
                ):
                    parts.setdefault(idx, []).append((part, digest, bound))
            for row in rows:
                out[row["path"]] = component_of(row, algorithm, parts.get(row["idx"], ()))
        return out

    def load(self, asset_id: str) -> tuple[dict[str, Any], list[Component]]:
        with self.db.read() as conn:
            asset = asset_out(self.asset_row(conn, asset_id))
            describe(conn, [asset])
            return asset, self.components(conn, asset_id)

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

    def summary(self, asset_id: str, retired: bool = False) -> dict[str, Any]:
        """The asset without its components (nor a look at storage). With ``retired``, of an
        asset the retention deleted: its last summary, with ``retired_at``."""
        with self.db.read() as conn:
            try:
                asset = asset_out(self.asset_row(conn, asset_id))
            except APIError:
                row = conn.execute(
                    "SELECT summary FROM retired WHERE asset_id = ?", (asset_id,)
                ).fetchone()
                if not retired or row is None:
                    raise
                gone: dict[str, Any] = json.loads(row[0])
                return gone
            describe(conn, [asset])
            return asset

    def get_asset(self, asset_id: str) -> dict[str, Any]:
        """The asset with what storage holds of each component (recovery's status call)."""
        asset, components = self.load(asset_id)
        return self.with_components(asset, components)

    def touch(self, asset_id: str) -> None:
        """Mark the asset active now (the sweeper expires pending assets left idle)."""
        with self.db.write() as tx:
            tx.execute("UPDATE assets SET touched_at = ? WHERE id = ?", (time.time(), asset_id))
