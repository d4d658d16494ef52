"""Experiments, runs and assets: the server's state transitions over the metadata database.

Every method blocks (SQLite, file I/O): call it from a worker thread, never the event loop.
Uploads and finalize of one asset are serialized by a per-asset lock, so a finalize never
verifies bytes that a concurrent PUT replaces before the finalized state commits.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from methodic._paths import component_path_problem
from methodic.server.config import ServerConfig
from methodic.server.db import Database
from methodic.server.errors import APIError, conflict, invalid, not_found, too_large
from methodic.server.models import AssetCreate, ComponentIn
from methodic.server.signing import Grant
from methodic.server.storage import BlobKey, Measurement, Received, Storage, Upload

ASSET_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHOWN_IN_MESSAGE = 5


def new_id() -> str:
    return uuid.uuid4().hex


def part_count(size: int, part_size: int | None) -> int:
    """Parts of a component; a multipart component of 0 bytes is one empty part."""
    if part_size is None:
        return 1
    return max(1, math.ceil(size / part_size))


def part_range(size: int, part_size: int, part: int) -> tuple[int, int]:
    offset = (part - 1) * part_size
    return offset, (min(part_size, size - offset) if size else 0)


@dataclass(frozen=True)
class Component:
    index: int
    path: str
    size: int
    sha256: str | None  # the manifest's
    part_size: int | None
    stored_sha256: str | None
    parts_stored: tuple[int, ...] = ()

    @property
    def parts(self) -> int:
        return part_count(self.size, self.part_size)

    @property
    def stored(self) -> bool:
        if self.part_size is None:
            return self.stored_sha256 is not None
        return len(self.parts_stored) == self.parts

    def missing_parts(self) -> list[int]:
        have = set(self.parts_stored)
        return [n for n in range(1, self.parts + 1) if n not in have]

    def out(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.stored_sha256 or self.sha256,
            "part_size": self.part_size,
            "stored": self.stored,
            "parts_stored": list(self.parts_stored),
        }


@dataclass
class UploadSlot:
    """A PUT between ``begin_upload`` and ``end_upload``."""

    key: BlobKey
    part: int | None
    upload: Upload
    expected_sha256: str | None = None  # the manifest's, checked when a whole-file PUT ends


@dataclass
class _Guard:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class AssetLocks:
    """Per-asset locks (created on demand, dropped when unused) and in-flight part writers."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._guards: dict[str, _Guard] = {}
        self.part_writers: Counter[tuple[str, int]] = Counter()

    @contextmanager
    def hold(self, asset_id: str) -> Iterator[None]:
        with self._mutex:
            guard = self._guards.setdefault(asset_id, _Guard())
            guard.users += 1
        try:
            with guard.lock:
                yield
        finally:
            with self._mutex:
                guard.users -= 1
                if guard.users == 0:
                    del self._guards[asset_id]


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

    def create_asset(self, run_id: str, spec: AssetCreate) -> tuple[dict[str, Any], bool]:
        self._validate_manifest(spec)
        digest = _manifest_digest(run_id, spec.asset_type, spec.components)
        conn = self.db.connection()
        if conn.execute("SELECT 1 FROM assets WHERE id = ?", (spec.asset_id,)).fetchone() is None:
            # Leftovers of an aborted asset with this id (a crash between delete steps).
            self.storage.delete_asset(spec.asset_id)
        now = time.time()
        with self.locks.hold(spec.asset_id), self.db.write(durable=True) as tx:
            if tx.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise not_found(f"run {run_id} does not exist")
            existing = tx.execute(
                "SELECT run_id, asset_type, manifest_digest FROM assets WHERE id = ?",
                (spec.asset_id,),
            ).fetchone()
            if existing is not None:
                if existing["manifest_digest"] == digest:
                    created = False
                else:
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
            else:
                tx.execute(
                    "INSERT INTO assets (id, run_id, asset_type, metadata, manifest_digest, state,"
                    " component_count, total_size, created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                    (
                        spec.asset_id,
                        run_id,
                        spec.asset_type,
                        json.dumps(spec.metadata),
                        digest,
                        len(spec.components),
                        sum(c.size for c in spec.components),
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
        return self.get_asset(spec.asset_id), created

    def _asset_row(self, conn: sqlite3.Connection, asset_id: str) -> sqlite3.Row:
        row = conn.execute(f"{_ASSET_SELECT} WHERE a.id = ?", (asset_id,)).fetchone()
        if row is None:
            raise not_found(f"asset {asset_id} does not exist")
        return row

    def _components(self, conn: sqlite3.Connection, asset_id: str) -> list[Component]:
        parts: dict[int, list[int]] = {}
        for idx, part in conn.execute(
            "SELECT idx, part FROM parts WHERE asset_id = ? ORDER BY idx, part", (asset_id,)
        ):
            parts.setdefault(idx, []).append(part)
        return [
            Component(
                index=row["idx"],
                path=row["path"],
                size=row["size"],
                sha256=row["sha256"],
                part_size=row["part_size"],
                stored_sha256=row["stored_sha256"],
                parts_stored=tuple(parts.get(row["idx"], ())),
            )
            for row in conn.execute(
                "SELECT * FROM components WHERE asset_id = ? ORDER BY idx", (asset_id,)
            )
        ]

    def load(self, asset_id: str) -> tuple[dict[str, Any], list[Component]]:
        with self.db.read() as conn:
            return _asset(self._asset_row(conn, asset_id)), self._components(conn, asset_id)

    def get_asset(self, asset_id: str) -> dict[str, Any]:
        asset, components = self.load(asset_id)
        asset["components"] = [c.out() for c in components]
        return asset

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

    def upload_targets(
        self, asset_id: str, wanted: Sequence[tuple[str, int | None]] | None
    ) -> list[tuple[Component, int | None, int, int]]:
        """(component, part, offset, length) for each wanted (path, part), or for everything."""
        with self.db.read() as conn:
            asset = self._asset_row(conn, asset_id)
            if asset["state"] != "pending":
                raise conflict(f"asset {asset_id} is finalized; it takes no more uploads")
            components = self._components(conn, asset_id)
        out: list[tuple[Component, int | None, int, int]] = []
        if wanted is None:
            for c in components:
                if c.part_size is None:
                    out.append((c, None, 0, c.size))
                else:
                    out.extend(
                        (c, n, *part_range(c.size, c.part_size, n)) for n in range(1, c.parts + 1)
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
                out.append((c, None, 0, c.size))
            else:
                if part is None or not 1 <= part <= c.parts:
                    raise invalid(
                        f"component {path!r} is sent in parts 1..{c.parts}; part {part} is not one of them"
                    )
                out.append((c, part, *part_range(c.size, c.part_size, part)))
        return out

    def download_components(self, asset_id: str) -> tuple[dict[str, Any], list[Component]]:
        asset, components = self.load(asset_id)
        if asset["state"] != "finalized":
            raise not_found(f"asset {asset_id} is pending; it can be downloaded once finalized")
        return asset, components

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
                tx.execute("DELETE FROM assets WHERE id = ?", (asset_id,))
            self.storage.delete_asset(asset_id)

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
                return self.get_asset(asset_id)
            missing, forget_whole, forget_parts, verified = self._verify(
                asset_id, components, checksums
            )
            if missing:
                self._forget(asset_id, forget_whole, forget_parts)
                shown = ", ".join(
                    f"{m['path']} ({m['reason']})" for m in missing[:_SHOWN_IN_MESSAGE]
                )
                more = (
                    f" and {len(missing) - _SHOWN_IN_MESSAGE} more"
                    if len(missing) > _SHOWN_IN_MESSAGE
                    else ""
                )
                raise APIError(
                    409,
                    "asset_incomplete",
                    f"asset {asset_id} is missing {len(missing)} of {len(components)} components: "
                    f"{shown}{more}; upload them and finalize again",
                    missing=missing,
                )
            self.storage.make_durable(
                asset_id,
                [BlobKey(asset_id, c.index, c.path) for c in components],
                self.config.finalize_workers,
            )
            with self.db.write(durable=True) as tx:
                tx.executemany(
                    "UPDATE components SET stored_sha256 = ? WHERE asset_id = ? AND idx = ?",
                    ((verified[c.index], asset_id, c.index) for c in components),
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
            if want is not None and want != c.stored_sha256:
                raise conflict(
                    f"asset {asset_id} is already finalized and its {c.path!r} has sha256 {c.stored_sha256}, "
                    f"not {want}; upload different content under a new asset id"
                )

    def _verify(
        self, asset_id: str, components: list[Component], checksums: Mapping[str, str]
    ) -> tuple[
        list[dict[str, Any]], list[Component], list[tuple[Component, list[int]]], dict[int, str]
    ]:
        missing: list[dict[str, Any]] = []
        forget_whole: list[Component] = []
        forget_parts: list[tuple[Component, list[int]]] = []
        verified: dict[int, str] = {}
        to_measure: list[Component] = []
        for c in components:
            if self.locks.part_writers[(asset_id, c.index)]:
                missing.append({"path": c.path, "reason": "upload in progress"})
            elif not c.stored:
                item: dict[str, Any] = {"path": c.path, "reason": "not stored"}
                if c.part_size is not None:
                    item["parts_missing"] = c.missing_parts()
                missing.append(item)
            else:
                to_measure.append(c)

        def measure(c: Component) -> Measurement | None:
            return self.storage.measure(BlobKey(asset_id, c.index, c.path), c.size, c.part_size)

        workers = max(1, min(self.config.finalize_workers, len(to_measure)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            measurements = list(pool.map(measure, to_measure))
        recorded_parts = (
            self._recorded_part_hashes(asset_id) if any(c.part_size for c in to_measure) else {}
        )
        for c, m in zip(to_measure, measurements, strict=True):
            reason: str | None = None
            if m is None:
                reason = "not stored"
            elif m.size != c.size or m.sha256 is None:
                reason = f"size mismatch: stored {m.size} bytes, the manifest says {c.size}"
            elif c.part_size is not None:
                expected = recorded_parts.get(c.index, {})
                bad = [n for n, got in enumerate(m.part_sha256, 1) if expected.get(n) != got]
                if bad:
                    missing.append(
                        {
                            "path": c.path,
                            "reason": f"checksum mismatch: stored parts {bad} differ from what was uploaded",
                            "parts_missing": bad,
                        }
                    )
                    forget_parts.append((c, bad))
                    continue
            elif m.sha256 != c.stored_sha256:
                reason = "checksum mismatch: the stored bytes differ from what was uploaded"
            if reason is None and m is not None and m.sha256 is not None:
                if c.sha256 is not None and m.sha256 != c.sha256:
                    reason = (
                        f"checksum mismatch: stored sha256 {m.sha256}, the manifest says {c.sha256}"
                    )
                elif c.path in checksums and m.sha256 != checksums[c.path]:
                    reason = f"checksum mismatch: stored sha256 {m.sha256}, the client computed {checksums[c.path]}"
            if reason is None:
                assert m is not None and m.sha256 is not None
                verified[c.index] = m.sha256
            else:
                missing.append({"path": c.path, "reason": reason})
                forget_whole.append(c)
        return missing, forget_whole, forget_parts, verified

    def _recorded_part_hashes(self, asset_id: str) -> dict[int, dict[int, str]]:
        out: dict[int, dict[int, str]] = {}
        for idx, part, digest in self.db.connection().execute(
            "SELECT idx, part, sha256 FROM parts WHERE asset_id = ?", (asset_id,)
        ):
            out.setdefault(idx, {})[part] = digest
        return out

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
            self.storage.forget(BlobKey(asset_id, c.index, c.path))

    # ---- the blob data path ---------------------------------------------------------------

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
        return Component(
            index=c["idx"],
            path=c["path"],
            size=c["size"],
            sha256=c["sha256"],
            part_size=c["part_size"],
            stored_sha256=c["stored_sha256"],
        )

    def begin_upload(self, grant: Grant) -> UploadSlot:
        """Check that the asset takes this PUT and open its destination. Raises APIError."""
        with self.locks.hold(grant.asset_id):
            c = self._upload_component(self.db.connection(), grant)
            key = BlobKey(grant.asset_id, c.index, c.path)
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
                upload = self.storage.open_object_upload(key, grant.length)
                return UploadSlot(key, None, upload, expected_sha256=c.sha256)
            upload = self.storage.open_part_upload(key, grant.offset, grant.length)
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
        with self.db.read() as conn:
            row = conn.execute("SELECT state FROM assets WHERE id = ?", (asset_id,)).fetchone()
            c = conn.execute(
                "SELECT * FROM components WHERE asset_id = ? AND path = ?", (asset_id, path)
            ).fetchone()
        if row is None or row["state"] != "finalized" or c is None:
            raise not_found(f"asset {asset_id} has no finalized component {path[:300]!r}")
        component = Component(
            index=c["idx"],
            path=c["path"],
            size=c["size"],
            sha256=c["sha256"],
            part_size=c["part_size"],
            stored_sha256=c["stored_sha256"],
        )
        return self.storage.open_read(BlobKey(asset_id, c["idx"], c["path"])), component
