"""Experiments, runs and assets: the server's state transitions over the metadata database.

Every method blocks (SQLite, storage I/O): call it from a worker thread, never the event loop.
Uploads and finalize of one asset are serialized by a per-asset lock, so a finalize never
verifies bytes that a concurrent PUT replaces before the finalized state commits. Finalize is
finalize.py, the bookkeeping of blob PUTs and GETs blobs/ledger.py, expiry sweeper.py.

Storage is reached only through the ``Storage`` interface, so these transitions (and the JSON
they answer) are the same whichever backend holds the bytes.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from methodic import _checksum
from methodic._manifest import manifest_digest
from methodic.server import contributions
from methodic.server.bulk import too_many_components
from methodic.server.errors import APIError, conflict, invalid, not_found
from methodic.server.manifest import validate_components, validate_manifest
from methodic.server.models import AssetCreate, ComponentIn, ComponentsAppend
from methodic.server.records import (
    ASSET_SELECT,
    IN_BATCH,
    AssetRecords,
    asset_out,
    marks,
    reported_sha256,
)
from methodic.server.signing import expiry
from methodic.server.storage.base import Component, Found, Slot, part_range
from methodic.server.sweeper import doom, purge

_COMPONENT_COLUMNS = "(asset_id, idx, path, size, sha256, part_size)"
# Manifests this big are staged in a TEMP table before the write transaction (``_staged``).
_STAGE_AT = 5000
# Presigning marks an asset active at most this often (one write per asset per minute).
_TOUCH_GRANULARITY_S = 60.0


def new_id() -> str:
    return uuid.uuid4().hex


def _experiment(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "created_at": row["created_at"]}


def _run(row: sqlite3.Row) -> dict[str, Any]:
    return {
        key: row[key]
        for key in ("id", "experiment_id", "variation", "run", "status", "created_at", "updated_at")
    }


class Catalog:
    def __init__(self, records: AssetRecords) -> None:
        self.records = records
        self.db = records.db
        self.storage = records.storage
        self.config = records.config
        self.locks = records.locks

    # ---- experiments and runs -------------------------------------------------------------

    def get_or_create_experiment(self, name: str) -> tuple[dict[str, Any], bool]:
        with self.db.write(durable=True) as tx:
            cur = tx.execute(
                "INSERT OR IGNORE INTO experiments (id, name, created_at) VALUES (?, ?, ?)",
                (new_id(), name, time.time()),
            )
            row = tx.execute("SELECT * FROM experiments WHERE name = ?", (name,)).fetchone()
        return _experiment(row), cur.rowcount == 1

    def list_experiments(self, name: str | None) -> list[dict[str, Any]]:
        conn = self.db.connection()
        if name is None:
            rows = conn.execute("SELECT * FROM experiments ORDER BY created_at, id").fetchall()
        else:
            rows = conn.execute("SELECT * FROM experiments WHERE name = ?", (name,)).fetchall()
        return [_experiment(row) for row in rows]

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        row = (
            self.db.connection()
            .execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,))
            .fetchone()
        )
        if row is None:
            raise not_found(f"experiment {experiment_id} does not exist")
        return _experiment(row)

    def get_or_create_run(
        self, experiment_id: str, variation: int, run: int
    ) -> tuple[dict[str, Any], bool]:
        now = time.time()
        with self.db.write(durable=True) as tx:
            if (
                tx.execute("SELECT 1 FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
                is None
            ):
                raise not_found(f"experiment {experiment_id} does not exist")
            cur = tx.execute(
                "INSERT OR IGNORE INTO runs (id, experiment_id, variation, run, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (new_id(), experiment_id, variation, run, now, now),
            )
            row = tx.execute(
                "SELECT * FROM runs WHERE experiment_id = ? AND variation = ? AND run = ?",
                (experiment_id, variation, run),
            ).fetchone()
        return _run(row), cur.rowcount == 1

    def get_run(self, run_id: str) -> dict[str, Any]:
        row = self.db.connection().execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise not_found(f"run {run_id} does not exist")
        return _run(row)

    def set_run_status(self, run_id: str, status: str) -> dict[str, Any]:
        with self.db.write(durable=True) as tx:
            cur = tx.execute(
                "UPDATE runs SET status = ?, updated_at = ? WHERE id = ?",
                (status, time.time(), run_id),
            )
            if cur.rowcount == 0:
                raise not_found(f"run {run_id} does not exist")
            row = tx.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _run(row)

    # ---- assets ---------------------------------------------------------------------------
    def create_asset(self, run_id: str, spec: AssetCreate) -> tuple[dict[str, Any], bool]:
        validate_manifest(spec, self.config, self.storage.limits)
        algorithm = spec.checksum_algorithm or _checksum.DEFAULT_ALGORITHM
        choices = self.storage.limits.checksum_algorithms
        if algorithm not in choices:
            raise invalid(
                f"checksum_algorithm {algorithm!r} is not verified by this server's storage "
                f"({self.storage.describe()}); use one of {', '.join(choices)}"
            )
        rank = contributions.check_spec(run_id, spec)
        digest = self._digest(run_id, spec, rank)
        conn = self.db.connection()
        new = conn.execute("SELECT 1 FROM assets WHERE id = ?", (spec.asset_id,)).fetchone() is None
        if new:
            # Bytes of an earlier asset with this id (deleted or expired) must not count as stored.
            purge(self.records, spec.asset_id)
        if rank is not None:
            return self._join(run_id, spec, digest, algorithm, rank)
        now = time.time()
        with self._staged(spec, new) as staged, self.locks.hold(spec.asset_id):
            created = self._create_asset(run_id, spec, digest, now, staged, algorithm)
        if spec.brief:
            with self.db.read() as conn:
                return {
                    **asset_out(self.records.asset_row(conn, spec.asset_id)),
                    "components": [],
                }, created
        asset, components = self.records.load(spec.asset_id)
        # A new asset holds nothing yet: no need to ask the storage.
        found = [Found(False)] * len(components) if created else None
        return self.records.with_components(asset, components, found), created

    def _digest(self, run_id: str, spec: AssetCreate, rank: int | None) -> str:
        """The manifest's digest: computed, or declared by a create that carries only the
        first components of its manifest (checked once the last is listed, ``_list``)."""
        declared = spec.manifest
        if declared is None:
            return manifest_digest(run_id, spec.asset_type, spec.components)
        if rank is not None:
            raise invalid(
                "a rank's contribution is created with its whole manifest: leave out manifest"
            )
        if declared.component_count > self.config.max_components_per_asset:
            raise too_many_components(
                declared.component_count, self.config.max_components_per_asset
            )
        if len(spec.components) > declared.component_count:
            raise invalid(
                f"the create carries {len(spec.components)} components but its manifest "
                f"declares {declared.component_count}"
            )
        if len(spec.components) == declared.component_count:
            _check_declared(
                run_id, spec.asset_type, spec.components, declared.digest, declared.total_size
            )
        return declared.digest

    def _join(
        self, run_id: str, spec: AssetCreate, digest: str, algorithm: str, rank: int
    ) -> tuple[dict[str, Any], bool]:
        """Create the multi-rank asset or join it with this rank's contribution
        (contributions.py); answers with the rank's own components."""
        with self.locks.hold(spec.asset_id):
            with self.db.write(durable=True) as tx:
                if tx.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                    raise not_found(f"run {run_id} does not exist")
                joined = contributions.join(tx, run_id, spec, digest, algorithm)
            asset, components = self.records.load(spec.asset_id)
            mine = contributions.rank_indexes(self.db.connection(), spec.asset_id, rank)
        own = [c for c in components if c.index in mine]
        found = [Found(False)] * len(own) if joined else None
        return self.records.with_components(asset, own, found), joined

    @staticmethod
    def _component_rows(spec: AssetCreate) -> Iterator[tuple[Any, ...]]:
        for i, c in enumerate(spec.components):
            yield (spec.asset_id, i, c["path"], c["size"], c.get("sha256"), c.get("part_size"))

    @contextmanager
    def _staged(self, spec: AssetCreate, new: bool) -> Iterator[str | None]:
        """For a big manifest: its component rows in this connection's TEMP table (written
        without the database's write lock), and the SELECT that copies them. Other writers
        (blob PUTs) then wait only for that copy, about half as long as for row-by-row inserts.
        """
        if not new or len(spec.components) < _STAGE_AT:
            yield None
            return
        conn = self.db.connection()
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS staged_components {_COMPONENT_COLUMNS}")
        conn.execute("DELETE FROM temp.staged_components")
        try:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO temp.staged_components VALUES (?, ?, ?, ?, ?, ?)",
                self._component_rows(spec),
            )
            conn.execute("COMMIT")
            yield "SELECT * FROM temp.staged_components ORDER BY idx"
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.execute("DELETE FROM temp.staged_components")

    def _create_asset(
        self,
        run_id: str,
        spec: AssetCreate,
        digest: str,
        now: float,
        staged: str | None,
        algorithm: str,
    ) -> bool:
        """Record the asset (unless it exists with this manifest); whether it is new."""
        with self.db.write(durable=True) as tx:
            if tx.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise not_found(f"run {run_id} does not exist")
            existing = tx.execute(
                "SELECT run_id, asset_type, manifest_digest, manifest_open, component_count,"
                " total_size FROM assets WHERE id = ?",
                (spec.asset_id,),
            ).fetchone()
            if existing is not None:
                if existing["manifest_digest"] != digest:
                    if existing["run_id"] != run_id:
                        what = f"it belongs to run {existing['run_id']}"
                    elif existing["asset_type"] != spec.asset_type:
                        what = f"its asset_type is {existing['asset_type']!r}"
                    else:
                        what = "its components differ"
                    raise conflict(
                        f"asset {spec.asset_id} already exists with another manifest ({what}); "
                        "use a new asset id for different content"
                    )
                created = False
                tx.execute("UPDATE assets SET touched_at = ? WHERE id = ?", (now, spec.asset_id))
                if existing["manifest_open"]:  # the same manifest: list what this create carries
                    self._list(tx, existing, spec.asset_id, spec.components)
            else:
                declared = spec.manifest
                count, size = (
                    (declared.component_count, declared.total_size)
                    if declared is not None
                    else (len(spec.components), sum(c["size"] for c in spec.components))
                )
                tx.execute(
                    "INSERT INTO assets (id, run_id, asset_type, metadata, manifest_digest, state,"
                    " component_count, total_size, created_at, touched_at, checksum_algorithm,"
                    " manifest_open) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                    (
                        spec.asset_id,
                        run_id,
                        spec.asset_type,
                        json.dumps(spec.metadata),
                        digest,
                        count,
                        size,
                        now,
                        now,
                        algorithm,
                        int(len(spec.components) < count),
                    ),
                )
                if staged:
                    tx.execute(f"INSERT INTO components {_COMPONENT_COLUMNS} {staged}")
                else:
                    tx.executemany(
                        f"INSERT INTO components {_COMPONENT_COLUMNS} VALUES (?, ?, ?, ?, ?, ?)",
                        self._component_rows(spec),
                    )
                created = True
        return created

    def append_components(self, asset_id: str, spec: ComponentsAppend) -> dict[str, Any]:
        """List more components of a manifest sent in slices; the asset's summary after."""
        with self.locks.hold(asset_id), self.db.write(durable=True) as tx:
            row = tx.execute(
                "SELECT run_id, asset_type, manifest_digest, manifest_open, component_count,"
                " total_size FROM assets WHERE id = ?",
                (asset_id,),
            ).fetchone()
            if row is None:
                raise not_found(f"asset {asset_id} does not exist")
            tx.execute("UPDATE assets SET touched_at = ? WHERE id = ?", (time.time(), asset_id))
            self._list(tx, row, asset_id, spec.components)
        return self.records.summary(asset_id)

    def _list(
        self,
        tx: sqlite3.Connection,
        asset: sqlite3.Row,
        asset_id: str,
        components: Sequence[ComponentIn],
    ) -> None:
        """Components of the asset's manifest, in any order: one listed already must be the
        same; the others are listed now. The last one closes the manifest."""
        count = asset["component_count"]
        validate_components(components, self.config, self.storage.limits)
        listed: dict[str, tuple[Any, ...]] = {}
        paths = [c["path"] for c in components]
        for at in range(0, len(paths), IN_BATCH):
            batch = paths[at : at + IN_BATCH]
            listed.update(
                (row[0], tuple(row))
                for row in tx.execute(
                    "SELECT path, size, sha256, part_size FROM components WHERE asset_id = ?"
                    f" AND path IN ({marks(batch)})",
                    (asset_id, *batch),
                )
            )
        changed = [c["path"] for c in components if listed.get(c["path"], _entry(c)) != _entry(c)]
        if changed:
            raise conflict(
                f"asset {asset_id} lists {changed[0]!r} with another size, sha256 or part_size:"
                " a manifest cannot change; use a new asset id for different content"
            )
        new = [c for c in components if c["path"] not in listed]
        if not new:
            return
        (have,) = tx.execute(
            "SELECT COUNT(*) FROM components WHERE asset_id = ?", (asset_id,)
        ).fetchone()
        if have + len(new) > count:
            raise invalid(
                f"asset {asset_id} lists {have} of its {count} components: {len(new)} more "
                "go past the count its create declared"
            )
        tx.executemany(
            f"INSERT INTO components {_COMPONENT_COLUMNS} VALUES (?, ?, ?, ?, ?, ?)",
            ((asset_id, have + i, *_entry(c)) for i, c in enumerate(new)),
        )
        if have + len(new) == count:
            entries: list[ComponentIn] = [
                {"path": p, "size": n, "sha256": h, "part_size": ps}
                for p, n, h, ps in tx.execute(
                    "SELECT path, size, sha256, part_size FROM components WHERE asset_id = ?",
                    (asset_id,),
                )
            ]
            try:
                validate_components(entries, self.config, self.storage.limits)
                _check_declared(
                    asset["run_id"],
                    asset["asset_type"],
                    entries,
                    asset["manifest_digest"],
                    asset["total_size"],
                )
            except APIError as exc:
                raise APIError(
                    exc.status,
                    exc.code,
                    f"{exc.message}; the components listed so far cannot close asset "
                    f"{asset_id}'s manifest: delete the asset and create it again",
                ) from None
            tx.execute("UPDATE assets SET manifest_open = 0 WHERE id = ?", (asset_id,))

    def get_asset(self, asset_id: str) -> dict[str, Any]:
        """The asset with what storage holds of each component (recovery's status call)."""
        return self.records.get_asset(asset_id)

    def list_assets(
        self, run_id: str, include_pending: bool, asset_type: str | None
    ) -> list[dict[str, Any]]:
        self.get_run(run_id)
        sql = f"{ASSET_SELECT} WHERE a.run_id = ?"
        args: list[Any] = [run_id]
        if not include_pending:
            sql += " AND a.state = 'finalized'"
        if asset_type is not None:
            sql += " AND a.asset_type = ?"
            args.append(asset_type)
        conn = self.db.connection()
        assets = [asset_out(row) for row in conn.execute(sql + " ORDER BY a.seq", args)]
        contributions.describe(conn, assets)
        return assets

    def _touch(self, asset_id: str, touched_at: float) -> None:
        if time.time() - touched_at >= _TOUCH_GRANULARITY_S:
            self.records.touch(asset_id)

    def _components(self, asset_id: str, paths: Sequence[str] | None = None) -> list[Component]:
        """The pending asset's components (only those at ``paths``, when given, in no
        particular order); marks the asset active."""
        with self.db.read() as conn:
            asset = self.records.asset_row(conn, asset_id)
            if asset["state"] != "pending":
                raise conflict(f"asset {asset_id} is finalized; it takes no more uploads")
            if paths is None:
                components = self.records.components(conn, asset_id)
            else:
                components = list(self.records.components_named(conn, asset_id, paths).values())
        self._touch(asset_id, asset["touched_at"])
        return components

    @staticmethod
    def _first_slots(components: Sequence[Component], limit: int) -> tuple[list[Slot], int]:
        """The manifest's first ``limit`` PUTs, and how many PUTs there are in all."""
        out: list[Slot] = []
        total = 0
        for c in components:
            if c.part_size is None:
                total += 1
                if len(out) < limit:
                    out.append(Slot(c, None, 0, c.size))
                continue
            total += c.parts
            for n in range(1, min(c.parts, limit - len(out)) + 1):
                out.append(Slot(c, n, *part_range(c.size, c.part_size, n)))
        return out, total

    def _slots(
        self, asset_id: str, wanted: Sequence[tuple[str, int | None, str | None]]
    ) -> list[Slot]:
        """The PUTs for each wanted (path, part, range digest); marks the asset active."""
        components = self._components(asset_id, [path for path, _, _ in wanted])
        out: list[Slot] = []
        by_path = {c.path: c for c in components}
        for path, part, digest in wanted:
            component = by_path.get(path)
            if component is None:
                raise not_found(f"asset {asset_id} has no component {path[:300]!r}")
            if component.checksum is not None:  # a stored contribution of a multi-rank asset
                raise conflict(
                    f"component {path[:300]!r} of asset {asset_id} is stored and verified; "
                    "it takes no more uploads"
                )
            checksum = None
            if digest is not None:
                algorithm = component.receipt_algorithm
                if not _checksum.is_digest(algorithm, digest):
                    raise invalid(
                        f"checksum {digest[:140]!r} of {path[:300]!r} is not a {algorithm} digest "
                        f"(the asset's algorithm): give {2 * _checksum.DIGEST_SIZE[algorithm]} "
                        "lowercase hex digits of exactly that range's bytes"
                    )
                checksum = f"{algorithm}:{digest}"
            if component.part_size is None:
                if part is not None:
                    raise invalid(
                        f"component {path!r} is sent in one PUT; ask for part null, not {part}"
                    )
                out.append(Slot(component, None, 0, component.size, checksum))
            else:
                if part is None or not 1 <= part <= component.parts:
                    raise invalid(
                        f"component {path!r} is sent in parts 1..{component.parts}; part {part} is not one of them"
                    )
                offset, length = part_range(component.size, component.part_size, part)
                out.append(Slot(component, part, offset, length, checksum))
        return out

    def presign(
        self, asset_id: str, wanted: Sequence[tuple[str, int | None, str | None]], origin: str
    ) -> list[dict[str, Any]]:
        """Upload targets (docs/http-api.md ``Target``) for ``wanted``, in that order.

        ``origin`` is where this server's blob routes are reached (for a receiving backend).
        """
        return self._targets(asset_id, self._slots(asset_id, wanted), origin)

    def presign_first(
        self, asset_id: str, origin: str, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        """Targets for the manifest's first ``limit`` PUTs, and how many PUTs they leave out.

        (A create with ``"presign": true``: the work is bounded by the presign batch, whatever
        the manifest; the client presigns the rest in batches.)
        """
        slots, total = self._first_slots(self._components(asset_id), limit)
        return self._targets(asset_id, slots, origin), total - len(slots)

    def _targets(self, asset_id: str, slots: list[Slot], origin: str) -> list[dict[str, Any]]:
        expires = expiry(self.config.presign_ttl)
        signed = self.storage.presign_puts(asset_id, slots, expires, origin)
        return [
            {
                "path": s.component.path,
                "part": s.part,
                "method": "PUT",
                "url": p.url,
                "headers": p.headers,
                "offset": s.offset,
                "length": s.length,
                "expires_at": float(expires),
            }
            for s, p in zip(slots, signed, strict=True)
        ]

    def download(self, asset_id: str, origin: str) -> dict[str, Any]:
        asset, components = self.records.load(asset_id)
        if asset["state"] != "finalized":
            raise not_found(f"asset {asset_id} is pending; it can be downloaded once finalized")
        expires = expiry(self.config.presign_ttl)
        return {
            "asset": self.records.with_components(asset, components),
            "components": [
                {
                    "path": c.path,
                    "size": c.size,
                    "sha256": reported_sha256(c),
                    "checksum": c.checksum,
                    "part_size": c.part_size,
                    "url": self.storage.presign_get(c.key(asset_id), expires, origin),
                }
                for c in components
            ],
        }

    # ---- deletion and expiry --------------------------------------------------------------

    def delete_asset(self, asset_id: str) -> None:
        with self.locks.hold(asset_id):
            with self.db.write(durable=True) as tx:
                row = tx.execute("SELECT state FROM assets WHERE id = ?", (asset_id,)).fetchone()
                if row is None:
                    raise not_found(f"asset {asset_id} does not exist")
                if row["state"] != "pending":
                    raise conflict(
                        f"asset {asset_id} is finalized; finalized assets are not deleted"
                    )
                doom(tx, asset_id)
            purge(self.records, asset_id)


def _entry(c: ComponentIn) -> tuple[Any, ...]:
    return (c["path"], c["size"], c.get("sha256"), c.get("part_size"))


def _check_declared(
    run_id: str, asset_type: str, components: Sequence[ComponentIn], digest: str, total: int
) -> None:
    """A manifest sent in slices, whole now, must be the one its create declared."""
    if manifest_digest(run_id, asset_type, components) != digest or total != sum(
        c["size"] for c in components
    ):
        raise conflict(
            "these components are not the manifest the create declared (its digest or total "
            "size differs): declare manifest_digest() of every component"
        )
