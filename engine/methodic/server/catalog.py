"""Experiments, runs and assets: the server's state transitions over the metadata database.

Every method blocks (SQLite, storage I/O): call it from a worker thread, never the event loop.
Uploads and finalize of one asset are serialized by a per-asset lock, so a finalize never
verifies bytes that a concurrent PUT replaces before the finalized state commits.

Storage is reached only through the ``Storage`` interface, so these transitions (and the JSON
they answer) are the same whichever backend holds the bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from methodic._paths import component_path_problem
from methodic.server.config import ServerConfig
from methodic.server.db import Database
from methodic.server.errors import APIError, conflict, invalid, not_found, too_large
from methodic.server.locks import KeyedLocks
from methodic.server.models import AssetCreate, ComponentIn
from methodic.server.signing import Grant, expiry
from methodic.server.storage.base import (
    BlobKey,
    Component,
    Found,
    Received,
    Receiver,
    Slot,
    Storage,
    Upload,
    part_count,
    part_range,
)

__all__ = ["ASSET_ID_PATTERN", "Catalog", "Component", "SweepReport", "UploadSlot"]

log = logging.getLogger("methodic.server")

ASSET_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHOWN_IN_MESSAGE = 5
# Presigning marks an asset active at most this often (one write per asset per minute).
_TOUCH_GRANULARITY_S = 60.0


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class UploadSlot:
    """A PUT between ``begin_upload`` and ``end_upload``."""

    key: BlobKey
    part: int | None
    upload: Upload
    expected_sha256: str | None = None  # the manifest's, checked when a whole-file PUT ends


@dataclass(frozen=True)
class SweepReport:
    expired: list[str]  # pending assets idle past the TTL, now deleted
    purged: list[str]  # deleted assets whose stored bytes were removed by this sweep


class AssetLocks(KeyedLocks):
    """Per-asset locks, plus the part PUTs in flight per (asset, component index)."""

    def __init__(self) -> None:
        super().__init__()
        self.part_writers: Counter[tuple[str, int]] = Counter()


def _manifest_digest(run_id: str, asset_type: str, components: Sequence[ComponentIn]) -> str:
    canonical = json.dumps(
        {
            "run_id": run_id,
            "asset_type": asset_type,
            "components": sorted((c.path, c.size, c.sha256, c.part_size) for c in components),
        },
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _path_problem(path: str) -> str | None:
    problem = component_path_problem(path)
    if problem is None:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    return problem


def _experiment(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "created_at": row["created_at"]}


def _run(row: sqlite3.Row) -> dict[str, Any]:
    return {
        key: row[key]
        for key in ("id", "experiment_id", "variation", "run", "status", "created_at", "updated_at")
    }


def _asset(row: sqlite3.Row) -> dict[str, Any]:
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


def _component_out(c: Component, found: Found) -> dict[str, Any]:
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


def _component(row: sqlite3.Row, parts: Sequence[tuple[int, str]] = ()) -> Component:
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


_ASSET_SELECT = "SELECT a.*, r.experiment_id FROM assets a JOIN runs r ON r.id = a.run_id"


class Catalog:
    def __init__(self, db: Database, storage: Storage, config: ServerConfig) -> None:
        self.db = db
        self.storage = storage
        self.config = config
        self.locks = AssetLocks()

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

    def _validate_manifest(self, spec: AssetCreate) -> None:
        if not ASSET_ID_PATTERN.fullmatch(spec.asset_id):
            raise invalid(
                f"asset id {spec.asset_id[:200]!r} is not valid: use 1-128 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit (a UUID fits)"
            )
        limit = self.config.max_components_per_asset
        if len(spec.components) > limit:
            raise too_large(
                f"the manifest has {len(spec.components)} components; this server accepts at most {limit} per asset"
            )
        seen: set[str] = set()
        for component in spec.components:
            problem = _path_problem(component.path)
            if problem is not None:
                raise invalid(
                    f"component path {component.path[:300]!r} {problem}", path=component.path[:1024]
                )
            if component.path in seen:
                raise invalid(
                    f"component path {component.path!r} appears twice in the manifest",
                    path=component.path,
                )
            seen.add(component.path)
            parts = part_count(component.size, component.part_size)
            if parts > self.config.max_parts_per_component:
                raise too_large(
                    f"component {component.path!r} would be sent in {parts} parts; at most "
                    f"{self.config.max_parts_per_component} are accepted (use a larger part_size)"
                )
            self._check_storage_limits(component, parts)
        # A path cannot be a file and a directory of the same download.
        for path in seen:
            head = path
            while "/" in head:
                head = head.rsplit("/", 1)[0]
                if head in seen:
                    raise invalid(
                        f"component path {head!r} is a file but {path!r} needs it to be a directory",
                        path=path,
                    )

    def _check_storage_limits(self, component: ComponentIn, parts: int) -> None:
        limits = self.storage.limits
        name = component.path[:300]
        if component.part_size is None:
            if limits.max_single_put is not None and component.size > limits.max_single_put:
                raise invalid(
                    f"component {name!r} has {component.size} bytes, over this server's storage "
                    f"limit of {limits.max_single_put} for one PUT: send it in parts (part_size)",
                    path=name,
                )
            return
        if parts > 1 and component.part_size < limits.min_part_size:
            raise invalid(
                f"component {name!r}: part_size {component.part_size} is below this server's "
                f"storage minimum of {limits.min_part_size} bytes per part",
                path=name,
            )
        if limits.max_part_size is not None and component.part_size > limits.max_part_size:
            raise invalid(
                f"component {name!r}: part_size {component.part_size} is over this server's "
                f"storage maximum of {limits.max_part_size} bytes per part",
                path=name,
            )

    def create_asset(self, run_id: str, spec: AssetCreate) -> tuple[dict[str, Any], bool]:
        self._validate_manifest(spec)
        digest = _manifest_digest(run_id, spec.asset_type, spec.components)
        conn = self.db.connection()
        if conn.execute("SELECT 1 FROM assets WHERE id = ?", (spec.asset_id,)).fetchone() is None:
            # Bytes of an earlier asset with this id (deleted or expired) must not count as stored.
            self._purge(spec.asset_id)
        now = time.time()
        with self.locks.hold(spec.asset_id), self.db.write(durable=True) as tx:
            if tx.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise not_found(f"run {run_id} does not exist")
            existing = tx.execute(
                "SELECT run_id, asset_type, manifest_digest FROM assets WHERE id = ?",
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
            else:
                tx.execute(
                    "INSERT INTO assets (id, run_id, asset_type, metadata, manifest_digest, state,"
                    " component_count, total_size, created_at, touched_at)"
                    " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                    (
                        spec.asset_id,
                        run_id,
                        spec.asset_type,
                        json.dumps(spec.metadata),
                        digest,
                        len(spec.components),
                        sum(c.size for c in spec.components),
                        now,
                        now,
                    ),
                )
                tx.executemany(
                    "INSERT INTO components (asset_id, idx, path, size, sha256, part_size) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        (spec.asset_id, i, c.path, c.size, c.sha256, c.part_size)
                        for i, c in enumerate(spec.components)
                    ),
                )
                created = True
        asset, components = self.load(spec.asset_id)
        # A new asset holds nothing yet: no need to ask the storage.
        found = [Found(False)] * len(components) if created else None
        return self._with_components(asset, components, found), created

    def _asset_row(self, conn: sqlite3.Connection, asset_id: str) -> sqlite3.Row:
        row = conn.execute(f"{_ASSET_SELECT} WHERE a.id = ?", (asset_id,)).fetchone()
        if row is None:
            raise not_found(f"asset {asset_id} does not exist")
        return row

    def _components(self, conn: sqlite3.Connection, asset_id: str) -> list[Component]:
        parts: dict[int, list[tuple[int, str]]] = {}
        for idx, part, digest in conn.execute(
            "SELECT idx, part, sha256 FROM parts WHERE asset_id = ? ORDER BY idx, part",
            (asset_id,),
        ):
            parts.setdefault(idx, []).append((part, digest))
        return [
            _component(row, parts.get(row["idx"], ()))
            for row in conn.execute(
                "SELECT * FROM components WHERE asset_id = ? ORDER BY idx", (asset_id,)
            )
        ]

    def load(self, asset_id: str) -> tuple[dict[str, Any], list[Component]]:
        with self.db.read() as conn:
            return _asset(self._asset_row(conn, asset_id)), self._components(conn, asset_id)

    def _found(self, asset: Mapping[str, Any], components: Sequence[Component]) -> list[Found]:
        if asset["state"] == "finalized":
            return [Found(True)] * len(components)
        return self.storage.inspect(
            asset["asset_id"], components, deep=False, workers=self.config.finalize_workers
        )

    def _with_components(
        self,
        asset: dict[str, Any],
        components: Sequence[Component],
        found: Sequence[Found] | None = None,
    ) -> dict[str, Any]:
        if found is None:
            found = self._found(asset, components)
        asset["components"] = [_component_out(c, f) for c, f in zip(components, found, strict=True)]
        return asset

    def get_asset(self, asset_id: str) -> dict[str, Any]:
        """The asset with what storage holds of each component (recovery's status call)."""
        asset, components = self.load(asset_id)
        return self._with_components(asset, components)

    def list_assets(
        self, run_id: str, include_pending: bool, asset_type: str | None
    ) -> list[dict[str, Any]]:
        self.get_run(run_id)
        sql = f"{_ASSET_SELECT} WHERE a.run_id = ?"
        args: list[Any] = [run_id]
        if not include_pending:
            sql += " AND a.state = 'finalized'"
        if asset_type is not None:
            sql += " AND a.asset_type = ?"
            args.append(asset_type)
        rows = self.db.connection().execute(sql + " ORDER BY a.seq", args).fetchall()
        return [_asset(row) for row in rows]

    def _touch(self, asset_id: str, touched_at: float | None) -> None:
        now = time.time()
        if touched_at is None or now - touched_at >= _TOUCH_GRANULARITY_S:
            with self.db.write() as tx:
                tx.execute("UPDATE assets SET touched_at = ? WHERE id = ?", (now, asset_id))

    def _slots(self, asset_id: str, wanted: Sequence[tuple[str, int | None]] | None) -> list[Slot]:
        """The PUTs for each wanted (path, part), or for everything; marks the asset active."""
        with self.db.read() as conn:
            asset = self._asset_row(conn, asset_id)
            if asset["state"] != "pending":
                raise conflict(f"asset {asset_id} is finalized; it takes no more uploads")
            components = self._components(conn, asset_id)
        self._touch(asset_id, asset["touched_at"])
        out: list[Slot] = []
        if wanted is None:
            for c in components:
                if c.part_size is None:
                    out.append(Slot(c, None, 0, c.size))
                else:
                    out.extend(
                        Slot(c, n, *part_range(c.size, c.part_size, n))
                        for n in range(1, c.parts + 1)
                    )
            return out
        by_path = {c.path: c for c in components}
        for path, part in wanted:
            c = by_path.get(path)
            if c is None:
                raise not_found(f"asset {asset_id} has no component {path[:300]!r}")
            if c.part_size is None:
                if part is not None:
                    raise invalid(
                        f"component {path!r} is sent in one PUT; ask for part null, not {part}"
                    )
                out.append(Slot(c, None, 0, c.size))
            else:
                if part is None or not 1 <= part <= c.parts:
                    raise invalid(
                        f"component {path!r} is sent in parts 1..{c.parts}; part {part} is not one of them"
                    )
                out.append(Slot(c, part, *part_range(c.size, c.part_size, part)))
        return out

    def presign(
        self, asset_id: str, wanted: Sequence[tuple[str, int | None]] | None, origin: str
    ) -> list[dict[str, Any]]:
        """Upload targets (docs/http-api.md ``Target``) for ``wanted``, or for every PUT.

        ``origin`` is where this server's blob routes are reached (for a receiving backend).
        """
        slots = self._slots(asset_id, wanted)
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
        asset, components = self.load(asset_id)
        if asset["state"] != "finalized":
            raise not_found(f"asset {asset_id} is pending; it can be downloaded once finalized")
        expires = expiry(self.config.presign_ttl)
        return {
            "asset": self._with_components(asset, components),
            "components": [
                {
                    "path": c.path,
                    "size": c.size,
                    "sha256": c.stored_sha256 or c.sha256,
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
                self._doom(tx, asset_id)
            self._purge(asset_id)

    @staticmethod
    def _doom(tx: sqlite3.Connection, asset_id: str) -> None:
        """Delete the asset's rows, remembering that its stored bytes are still to be removed."""
        tx.execute("DELETE FROM assets WHERE id = ?", (asset_id,))
        tx.execute(
            "INSERT OR REPLACE INTO purges (asset_id, since) VALUES (?, ?)", (asset_id, time.time())
        )

    def _purge(self, asset_id: str) -> bool:
        """Remove the stored bytes of a deleted asset; False when the storage failed (retried later)."""
        if (
            self.db.connection()
            .execute("SELECT 1 FROM purges WHERE asset_id = ?", (asset_id,))
            .fetchone()
            is None
        ):
            return True
        try:
            self.storage.delete_asset(asset_id)
        except Exception as exc:
            log.warning(
                "removing the stored bytes of deleted asset %s failed (%s); will retry",
                asset_id,
                exc,
            )
            return False
        with self.db.write() as tx:
            tx.execute("DELETE FROM purges WHERE asset_id = ?", (asset_id,))
        return True

    def sweep(self, now: float | None = None) -> SweepReport:
        """Expire pending assets idle for longer than ``pending_ttl``; retry unfinished purges."""
        cutoff = (time.time() if now is None else now) - self.config.pending_ttl
        idle = [
            row[0]
            for row in self.db.connection().execute(
                "SELECT id FROM assets WHERE state = 'pending' AND touched_at < ?", (cutoff,)
            )
        ]
        expired: list[str] = []
        for asset_id in idle:
            with self.locks.hold(asset_id):
                with self.db.write(durable=True) as tx:
                    cur = tx.execute(
                        "SELECT 1 FROM assets WHERE id = ? AND state = 'pending' AND touched_at < ?",
                        (asset_id, cutoff),
                    )
                    if cur.fetchone() is None:
                        continue  # finalized or used meanwhile
                    self._doom(tx, asset_id)
                expired.append(asset_id)
        if expired:
            log.warning(
                "expired %d pending asset(s) idle for over %g s: %s",
                len(expired),
                self.config.pending_ttl,
                ", ".join(expired[:10]),
            )
        doomed = [row[0] for row in self.db.connection().execute("SELECT asset_id FROM purges")]
        purged = []
        for asset_id in doomed:
            with self.locks.hold(asset_id):
                if self._purge(asset_id):
                    purged.append(asset_id)
        return SweepReport(expired, purged)

    # ---- finalize -------------------------------------------------------------------------

    def finalize(self, asset_id: str, checksums: Mapping[str, str]) -> dict[str, Any]:
        with self.locks.hold(asset_id):
            asset, components = self.load(asset_id)
            unknown = set(checksums) - {c.path for c in components}
            if unknown:
                shown = sorted(unknown)[:_SHOWN_IN_MESSAGE]
                raise invalid(
                    f"checksums name paths that are not components of asset {asset_id}: {shown}"
                )
            if asset["state"] == "finalized":
                self._check_refinalize(asset_id, components, checksums)
                return self._with_components(asset, components)
            self._touch(asset_id, None)
            verdict = self._verify(asset_id, components, checksums)
            if not verdict.missing:
                for c, why in self.storage.seal(asset_id, components, self.config.finalize_workers):
                    verdict.missing.append(_missing_item(c, why, c.parts))
                    verdict.forget_whole.append(c)
            if verdict.missing:
                self._forget(asset_id, verdict.forget_whole, verdict.forget_parts)
                raise _incomplete(asset_id, verdict.missing, len(components))
            with self.db.write(durable=True) as tx:
                tx.executemany(
                    "UPDATE components SET stored_sha256 = ? WHERE asset_id = ? AND idx = ?",
                    ((verdict.sha256[c.index], asset_id, c.index) for c in components),
                )
                cur = tx.execute(
                    "UPDATE assets SET state = 'finalized', finalized_at = ? WHERE id = ? AND state = 'pending'",
                    (time.time(), asset_id),
                )
                if (
                    cur.rowcount == 0
                    and tx.execute("SELECT 1 FROM assets WHERE id = ?", (asset_id,)).fetchone()
                    is None
                ):
                    raise not_found(f"asset {asset_id} was deleted while being finalized")
            return self.get_asset(asset_id)

    def _check_refinalize(
        self, asset_id: str, components: list[Component], checksums: Mapping[str, str]
    ) -> None:
        for c in components:
            want = checksums.get(c.path)
            known = c.stored_sha256 or c.sha256
            if want is not None and known is not None and want != known:
                raise conflict(
                    f"asset {asset_id} is already finalized and its {c.path!r} has sha256 {known}, "
                    f"not {want}; upload different content under a new asset id"
                )

    def _verify(
        self, asset_id: str, components: list[Component], checksums: Mapping[str, str]
    ) -> _Verdict:
        verdict = _Verdict()
        found = self.storage.inspect(
            asset_id, components, deep=True, workers=self.config.finalize_workers
        )
        for c, f in zip(components, found, strict=True):
            if self.locks.part_writers[(asset_id, c.index)]:
                verdict.missing.append({"path": c.path, "reason": "upload in progress"})
                continue
            if not f.complete:
                missing = [n for n in range(1, c.parts + 1) if n not in f.parts]
                verdict.missing.append(_missing_item(c, "not stored", missing))
                if c.received:  # receipts say stored, the bytes are gone: forget the receipts
                    verdict.forget_whole.append(c)
                continue
            reason: str | None = None
            if f.size is not None and f.size != c.size:
                reason = f"size mismatch: stored {f.size} bytes, the manifest says {c.size}"
            elif f.bad_parts:
                bad = list(f.bad_parts)
                verdict.missing.append(
                    _missing_item(
                        c,
                        f"checksum mismatch: stored parts {bad} differ from what was uploaded",
                        bad,
                    )
                )
                verdict.forget_parts.append((c, bad))
                continue
            elif f.damaged:
                reason = f"checksum mismatch: {f.damaged}"
            else:
                reason = _checksum_problem(c, f.sha256, checksums.get(c.path))
            if reason is None:
                verdict.sha256[c.index] = f.sha256 or checksums.get(c.path) or c.sha256
            else:
                verdict.missing.append(_missing_item(c, reason, c.parts if c.part_size else ()))
                verdict.forget_whole.append(c)
        return verdict

    def _forget(
        self, asset_id: str, whole: list[Component], parts: list[tuple[Component, list[int]]]
    ) -> None:
        """Drop the records (and for whole components the bytes) of what failed verification."""
        if not whole and not parts:
            return
        with self.db.write() as tx:
            for c in whole:
                tx.execute(
                    "UPDATE components SET stored_sha256 = NULL WHERE asset_id = ? AND idx = ?",
                    (asset_id, c.index),
                )
                tx.execute("DELETE FROM parts WHERE asset_id = ? AND idx = ?", (asset_id, c.index))
            for c, numbers in parts:
                tx.executemany(
                    "DELETE FROM parts WHERE asset_id = ? AND idx = ? AND part = ?",
                    ((asset_id, c.index, n) for n in numbers),
                )
        for c in whole:
            self.storage.forget(c.key(asset_id))

    # ---- the blob data path (receiving backends) ------------------------------------------

    def _receiver(self) -> Receiver:
        receiver = self.storage.receiver
        if receiver is None:
            raise not_found(
                f"this server's storage is {self.storage.describe()}: blobs are not sent here"
            )
        return receiver

    def _upload_component(self, conn: sqlite3.Connection, grant: Grant) -> Component:
        row = conn.execute("SELECT state FROM assets WHERE id = ?", (grant.asset_id,)).fetchone()
        if row is None:
            raise not_found(f"asset {grant.asset_id} does not exist")
        if row["state"] != "pending":
            raise conflict(f"asset {grant.asset_id} is finalized; it takes no more uploads")
        c = conn.execute(
            "SELECT * FROM components WHERE asset_id = ? AND path = ?", (grant.asset_id, grant.path)
        ).fetchone()
        if c is None:
            raise not_found(f"asset {grant.asset_id} has no component {grant.path[:300]!r}")
        return _component(c)

    def begin_upload(self, grant: Grant) -> UploadSlot:
        """Check that the asset takes this PUT and open its destination. Raises APIError."""
        receiver = self._receiver()
        with self.locks.hold(grant.asset_id):
            c = self._upload_component(self.db.connection(), grant)
            key = c.key(grant.asset_id)
            if c.part_size is None:
                expected = (None, 0, c.size)
            elif grant.part is not None and 1 <= grant.part <= c.parts:
                expected = (grant.part, *part_range(c.size, c.part_size, grant.part))
            else:
                expected = None
            if expected != (grant.part, grant.offset, grant.length):
                raise invalid(
                    f"this URL does not match the layout of component {c.path!r}; presign again"
                )
            assert grant.length is not None and grant.offset is not None
            if grant.part is None:
                upload = receiver.open_object_upload(key, grant.length)
                return UploadSlot(key, None, upload, expected_sha256=c.sha256)
            upload = receiver.open_part_upload(key, grant.offset, grant.length)
            self.locks.part_writers[(key.asset_id, key.index)] += 1
            return UploadSlot(key, grant.part, upload)

    def complete_upload(self, slot: UploadSlot, received: Received) -> None:
        """Make the received bytes the component's (or part's) and record them."""
        key = slot.key
        if slot.expected_sha256 is not None and received.sha256 != slot.expected_sha256:
            raise invalid(
                f"checksum mismatch: the body of {key.path!r} has sha256 {received.sha256}, "
                f"the manifest says {slot.expected_sha256}; nothing was stored"
            )
        with self.locks.hold(key.asset_id), self.db.write() as tx:
            row = tx.execute("SELECT state FROM assets WHERE id = ?", (key.asset_id,)).fetchone()
            if row is None:
                raise not_found(f"asset {key.asset_id} was deleted during the upload")
            if row["state"] != "pending":
                raise conflict(f"asset {key.asset_id} was finalized during the upload")
            slot.upload.commit()
            if slot.part is None:
                tx.execute(
                    "UPDATE components SET stored_sha256 = ? WHERE asset_id = ? AND idx = ?",
                    (received.sha256, key.asset_id, key.index),
                )
            else:
                tx.execute(
                    "INSERT OR REPLACE INTO parts (asset_id, idx, part, size, sha256) VALUES (?, ?, ?, ?, ?)",
                    (key.asset_id, key.index, slot.part, received.size, received.sha256),
                )
            tx.execute("UPDATE assets SET touched_at = ? WHERE id = ?", (time.time(), key.asset_id))

    def end_upload(self, slot: UploadSlot) -> None:
        """Release the slot whatever happened; a body that was not completed leaves no trace."""
        slot.upload.abort()
        if slot.part is not None:
            with self.locks.hold(slot.key.asset_id):
                writers = self.locks.part_writers
                writers[(slot.key.asset_id, slot.key.index)] -= 1
                if writers[(slot.key.asset_id, slot.key.index)] <= 0:
                    del writers[(slot.key.asset_id, slot.key.index)]

    def open_download(self, asset_id: str, path: str) -> tuple[BinaryIO, Component]:
        receiver = self._receiver()
        with self.db.read() as conn:
            row = conn.execute("SELECT state FROM assets WHERE id = ?", (asset_id,)).fetchone()
            c = conn.execute(
                "SELECT * FROM components WHERE asset_id = ? AND path = ?", (asset_id, path)
            ).fetchone()
        if row is None or row["state"] != "finalized" or c is None:
            raise not_found(f"asset {asset_id} has no finalized component {path[:300]!r}")
        component = _component(c)
        return receiver.open_read(component.key(asset_id)), component


@dataclass
class _Verdict:
    """What finalize's verification found: what is missing, what to forget, what was verified."""

    missing: list[dict[str, Any]] = field(default_factory=list)
    forget_whole: list[Component] = field(default_factory=list)
    forget_parts: list[tuple[Component, list[int]]] = field(default_factory=list)
    sha256: dict[int, str | None] = field(default_factory=dict)


def _missing_item(c: Component, reason: str, parts: Sequence[int] | int = ()) -> dict[str, Any]:
    item: dict[str, Any] = {"path": c.path, "reason": reason}
    if c.part_size is not None:
        item["parts_missing"] = list(range(1, parts + 1)) if isinstance(parts, int) else list(parts)
    return item


def _checksum_problem(c: Component, stored: str | None, client: str | None) -> str | None:
    """Why the stored bytes are not the manifest's or the client's, or None.

    ``stored`` is the sha256 storage computed (None when it cannot, as on S3): then the
    manifest's and the client's digests can still contradict each other.
    """
    if stored is not None:
        if c.sha256 is not None and stored != c.sha256:
            return f"checksum mismatch: stored sha256 {stored}, the manifest says {c.sha256}"
        if client is not None and stored != client:
            return f"checksum mismatch: stored sha256 {stored}, the client computed {client}"
        return None
    if c.sha256 is not None and client is not None and c.sha256 != client:
        return f"checksum mismatch: the client computed {client}, the manifest says {c.sha256}"
    return None


def _incomplete(asset_id: str, missing: list[dict[str, Any]], total: int) -> APIError:
    shown = ", ".join(f"{m['path']} ({m['reason']})" for m in missing[:_SHOWN_IN_MESSAGE])
    more = (
        f" and {len(missing) - _SHOWN_IN_MESSAGE} more" if len(missing) > _SHOWN_IN_MESSAGE else ""
    )
    return APIError(
        409,
        "asset_incomplete",
        f"asset {asset_id} is missing {len(missing)} of {total} components: {shown}{more}; "
        "upload them and finalize again",
        missing=missing,
    )
