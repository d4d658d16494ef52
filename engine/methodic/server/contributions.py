"""Multi-rank assets: one asset that ``world_size`` ranks join by name, each with its own files.

Every rank derives the same asset id from (run, asset name) (``methodic._ids.contribution_id``)
and creates it with its own components; the first create makes the pending asset, the others
join it. A rank's finalize verifies that rank's components only (the same verification as any
finalize, finalize.py) and marks its contribution stored; the finalize that stores the last
contribution flips the asset to finalized, once, in the same transaction. Until then the
asset is pending, invisible to consumers, and its account says which ranks it waits for.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from methodic._ids import contribution_id
from methodic.server.errors import conflict, invalid
from methodic.server.models import AssetCreate

_SHOWN = 10
_CONTRIBUTION_FIELDS = (
    "rank",
    "state",
    "component_count",
    "total_size",
    "registered_at",
    "seen_at",
    "stored_at",
)
_COMPONENT_COLUMNS = "(asset_id, idx, path, size, sha256, part_size, rank)"


def check_spec(run_id: str, spec: AssetCreate) -> int | None:
    """The spec's rank when it is a contribution (None: an ordinary asset). Raises 400."""
    given = [spec.asset_name is not None, spec.rank is not None, spec.world_size is not None]
    if not any(given):
        return None
    if not all(given):
        raise invalid(
            "a contribution names asset_name, rank and world_size together "
            "(or none of them, for an asset of one process)"
        )
    assert spec.rank is not None and spec.world_size is not None and spec.asset_name is not None
    if spec.rank >= spec.world_size:
        raise invalid(
            f"rank {spec.rank} is not one of 0..{spec.world_size - 1} (world_size {spec.world_size})"
        )
    expected = contribution_id(run_id, spec.asset_name)
    if spec.asset_id != expected:
        raise invalid(
            f"asset id {spec.asset_id[:80]!r} is not the id of asset {spec.asset_name[:200]!r} of "
            f"run {run_id}: every rank uses {expected} (methodic derives it from the run and name)"
        )
    return spec.rank


def join(
    tx: sqlite3.Connection, run_id: str, spec: AssetCreate, digest: str, algorithm: str
) -> bool:
    """Create the asset or add this rank's contribution to it, in ``tx``; whether it changed.

    Raises 409 when the rank's files differ from what it registered before, when another rank
    claims one of its paths, when the world size differs, or when the name is taken by an
    asset of one process or another type.
    """
    assert spec.rank is not None and spec.world_size is not None
    now = time.time()
    name, rank = spec.asset_name, spec.rank
    row = tx.execute(
        "SELECT run_id, asset_type, world_size, state FROM assets WHERE id = ?", (spec.asset_id,)
    ).fetchone()
    if row is None:
        tx.execute(
            "INSERT INTO assets (id, run_id, asset_type, metadata, manifest_digest, state,"
            " component_count, total_size, created_at, touched_at, checksum_algorithm,"
            " asset_name, world_size)"
            " VALUES (?, ?, ?, ?, 'contributions', 'pending', 0, 0, ?, ?, ?, ?, ?)",
            (
                spec.asset_id,
                run_id,
                spec.asset_type,
                json.dumps(spec.metadata),
                now,
                now,
                algorithm,
                name,
                spec.world_size,
            ),
        )
    else:
        if row["world_size"] is None:
            raise conflict(
                f"asset {name!r} of run {run_id} exists as an asset of one process; "
                "give the multi-rank checkpoint another asset_name"
            )
        if row["asset_type"] != spec.asset_type:
            raise conflict(
                f"asset {name!r} of run {run_id} has asset_type {row['asset_type']!r}, "
                f"not {spec.asset_type!r}: every rank registers the same asset_type"
            )
        if row["world_size"] != spec.world_size:
            raise conflict(
                f"rank {rank} registers asset {name!r} with world_size {spec.world_size}, but it "
                f"was created with world_size {row['world_size']}: every rank must pass the same "
                "world_size (discard the asset to start it again with another)"
            )
    mine = tx.execute(
        "SELECT manifest_digest FROM contributions WHERE asset_id = ? AND rank = ?",
        (spec.asset_id, rank),
    ).fetchone()
    if mine is not None:
        if mine["manifest_digest"] != digest:
            raise conflict(
                f"rank {rank} already registered other files for asset {name!r}; a rank's "
                "contribution cannot change (discard the asset to start it again)"
            )
        tx.execute(
            "UPDATE contributions SET seen_at = ? WHERE asset_id = ? AND rank = ?",
            (now, spec.asset_id, rank),
        )
        tx.execute("UPDATE assets SET touched_at = ? WHERE id = ?", (now, spec.asset_id))
        return False
    if row is not None and row["state"] != "pending":
        raise conflict(f"asset {name!r} is finalized; rank {rank} cannot join it any more")
    _check_claims(tx, spec)
    first = tx.execute(
        "SELECT coalesce(max(idx) + 1, 0) FROM components WHERE asset_id = ?", (spec.asset_id,)
    ).fetchone()[0]
    tx.executemany(
        f"INSERT INTO components {_COMPONENT_COLUMNS} VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            (
                spec.asset_id,
                first + i,
                c["path"],
                c["size"],
                c.get("sha256"),
                c.get("part_size"),
                rank,
            )
            for i, c in enumerate(spec.components)
        ),
    )
    size = sum(c["size"] for c in spec.components)
    tx.execute(
        "INSERT INTO contributions (asset_id, rank, manifest_digest, component_count, total_size,"
        " state, registered_at, seen_at) VALUES (?, ?, ?, ?, ?, 'registered', ?, ?)",
        (spec.asset_id, rank, digest, len(spec.components), size, now, now),
    )
    tx.execute(
        "UPDATE assets SET component_count = component_count + ?, total_size = total_size + ?,"
        " touched_at = ? WHERE id = ?",
        (len(spec.components), size, now, spec.asset_id),
    )
    return True


def _check_claims(tx: sqlite3.Connection, spec: AssetCreate) -> None:
    """409 when a path of this contribution is another rank's (or a file/directory clash)."""
    paths = [c["path"] for c in spec.components]
    held: dict[str, sqlite3.Row] = {}
    for start in range(0, len(paths), 500):
        chunk = paths[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in tx.execute(
            f"SELECT path, size, sha256, rank FROM components WHERE asset_id = ? AND path IN ({marks})",
            (spec.asset_id, *chunk),
        ):
            held[r["path"]] = r
    for c in spec.components:
        path, size, sha256 = c["path"], c["size"], c.get("sha256")
        other = held.get(path)
        if other is None:
            continue
        if other["size"] != size:
            how = f"different content: {size} bytes here, {other['size']} there"
        elif sha256 is not None and other["sha256"] is not None and sha256 != other["sha256"]:
            how = "different content: the sha256 differs"
        else:
            how = "a path comes from exactly one rank"
        raise conflict(
            f"rank {spec.rank} claims {path!r} of asset {spec.asset_name!r}, which rank "
            f"{other['rank']} registered ({how}); give each rank only its own files "
            "(include=[...] globs, or a directory per rank)",
            path=path,
        )
    clash = _file_dir_clash(
        [
            r[0]
            for r in tx.execute("SELECT path FROM components WHERE asset_id = ?", (spec.asset_id,))
        ],
        paths,
    )
    if clash is not None:
        raise conflict(
            f"rank {spec.rank} registers {clash[1]!r} of asset {spec.asset_name!r}, but another "
            f"rank registered {clash[0]!r}: one cannot be a file and a directory",
            path=clash[1],
        )


def _file_dir_clash(held: Sequence[str], new: Sequence[str]) -> tuple[str, str] | None:
    """(held path, new path) when one is a directory of the other; None when they fit."""
    files = set(held)
    dirs: set[str] = set()
    for p in held:
        while "/" in p:
            p = p.rsplit("/", 1)[0]
            dirs.add(p)
    for path in new:
        if path in dirs:
            inside = next(h for h in held if h.startswith(path + "/"))
            return inside, path
        head = path
        while "/" in head:
            head = head.rsplit("/", 1)[0]
            if head in files:
                return head, path
    return None


def rank_indexes(conn: sqlite3.Connection, asset_id: str, rank: int) -> set[int]:
    return {
        r[0]
        for r in conn.execute(
            "SELECT idx FROM components WHERE asset_id = ? AND rank = ?", (asset_id, rank)
        )
    }


def contribution_state(conn: sqlite3.Connection, asset_id: str, rank: int) -> str | None:
    row = conn.execute(
        "SELECT state FROM contributions WHERE asset_id = ? AND rank = ?", (asset_id, rank)
    ).fetchone()
    return None if row is None else str(row[0])


def mark_stored(tx: sqlite3.Connection, asset_id: str, rank: int, world_size: int) -> bool:
    """Record the rank's contribution stored; whether every rank's now is."""
    now = time.time()
    tx.execute(
        "UPDATE contributions SET state = 'stored', stored_at = ?, seen_at = ?"
        " WHERE asset_id = ? AND rank = ?",
        (now, now, asset_id, rank),
    )
    stored = tx.execute(
        "SELECT count(*) FROM contributions WHERE asset_id = ? AND state = 'stored'", (asset_id,)
    ).fetchone()[0]
    return int(stored) >= world_size


def seen(tx: sqlite3.Connection, asset_id: str, rank: int) -> None:
    tx.execute(
        "UPDATE contributions SET seen_at = ? WHERE asset_id = ? AND rank = ?",
        (time.time(), asset_id, rank),
    )


def describe(conn: sqlite3.Connection, assets: Sequence[dict[str, Any]]) -> None:
    """Add each multi-rank asset's contributions, missing ranks and account, in place."""
    multi = [a for a in assets if a.get("world_size")]
    if not multi:
        return
    by_id: dict[str, list[dict[str, Any]]] = {a["asset_id"]: [] for a in multi}
    ids = list(by_id)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in conn.execute(
            "SELECT asset_id, rank, state, component_count, total_size, registered_at, seen_at,"
            f" stored_at FROM contributions WHERE asset_id IN ({marks}) ORDER BY asset_id, rank",
            chunk,
        ):
            by_id[r["asset_id"]].append({k: r[k] for k in _CONTRIBUTION_FIELDS})
    for a in multi:
        contributions = by_id[a["asset_id"]]
        a["contributions"] = contributions
        stored = {c["rank"] for c in contributions if c["state"] == "stored"}
        missing = [r for r in range(a["world_size"]) if r not in stored]
        a["ranks_missing"] = missing
        a["waiting"] = waiting_text(missing, contributions) if a["state"] == "pending" else None


def waiting_text(missing: Sequence[int], contributions: Sequence[dict[str, Any]]) -> str:
    """'waiting for ranks 5, 7 (last seen: 5 at 12:00:03 UTC, 7 never)'."""
    seen_at = {c["rank"]: c["seen_at"] for c in contributions}
    shown = list(missing[:_SHOWN])
    more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
    ranks = ", ".join(str(r) for r in shown)
    last = ", ".join(
        f"{r} at {_clock(seen_at[r])}" if r in seen_at else f"{r} never" for r in shown
    )
    word = "rank" if len(missing) == 1 else "ranks"
    return f"waiting for {word} {ranks}{more} (last seen: {last})"


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
