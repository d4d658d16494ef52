"""Every operation on the tracker, written once (its schema is ``_tracker_schema``).

Each operation is a generator that yields SQL statements and receives their rows, so the same
logic runs on sqlite3 (the sync ``UploadTracker``) and on aiosqlite (the engine's async path):
a driver opens the transaction (``BEGIN IMMEDIATE`` for writes), feeds the generator and commits.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from functools import wraps
from typing import Any, Generic, ParamSpec, TypeVar

from methodic._errors import InvalidInputError
from methodic._owner import my_identity, owner_alive
from methodic._scan import validate_specs
from methodic._states import DONE_STATES, UNFINISHED_STATES
from methodic._types import ComponentSpec, RunBinding, TrackedAsset, TrackedComponent

P = ParamSpec("P")
R = TypeVar("R")

Stmt = tuple[str, Sequence[Any] | Iterable[Sequence[Any]], bool]  # sql, params, executemany
OpGen = Generator[Stmt, list[tuple[Any, ...]], R]


@dataclass(frozen=True)
class Op(Generic[R]):
    """A tracker operation ready to run: a generator factory, and whether it writes."""

    make: Callable[[], OpGen[R]]
    write: bool
    name: str


def _op(write: bool) -> Callable[[Callable[P, OpGen[R]]], Callable[P, Op[R]]]:
    def deco(fn: Callable[P, OpGen[R]]) -> Callable[P, Op[R]]:
        @wraps(fn)
        def build(*args: P.args, **kwargs: P.kwargs) -> Op[R]:
            return Op(lambda: fn(*args, **kwargs), write, fn.__name__)

        return build

    return deco


write_op = _op(True)
read_op = _op(False)


def q(sql: str, params: Sequence[Any] = ()) -> Stmt:
    return (sql, params, False)


def many(sql: str, rows: Iterable[Sequence[Any]]) -> Stmt:
    return (sql, rows, True)


# ---------------------------------------------------------------- registration


def _component_rows(
    asset_id: str, components: Sequence[ComponentSpec], part_sizes: dict[str, int]
) -> list[tuple[Any, ...]]:
    """One ``components`` row per spec, in the order of the INSERT in ``register``."""
    rows: list[tuple[Any, ...]] = []
    for c in components:
        mtime_ns, inode, ctime_ns, device = c.mtime_ns, c.inode, c.ctime_ns, c.device
        if mtime_ns is None:  # a caller that gives its own stat gives what it has of it
            try:
                st = os.stat(c.local_path)
            except OSError as exc:
                raise InvalidInputError(
                    f"component {c.path!r}: cannot read {c.local_path} ({exc.strerror})"
                ) from None
            mtime_ns, inode, ctime_ns, device = (
                st.st_mtime_ns,
                st.st_ino,
                st.st_ctime_ns,
                st.st_dev,
            )
        rows.append(
            (
                asset_id,
                c.path,
                os.fspath(c.local_path),
                c.size,
                c.sha256,
                mtime_ns,
                inode,
                ctime_ns,
                device,
                c.declared,
                part_sizes.get(c.path),
            )
        )
    return rows


@write_op
def register(
    asset_id: str,
    components: Sequence[ComponentSpec],
    *,
    asset_type: str,
    seal: bool,
    metadata: dict[str, Any],
    binding: RunBinding | None = None,
    local_dir: str | None = None,
    part_sizes: dict[str, int] | None = None,
    validated: bool = False,
) -> OpGen[None]:
    """Record an asset and these components in one transaction (more may follow unless sealed).

    ``validated``: these very specs came from ``scan_directory``, which refuses everything
    ``validate_specs`` does; the specs of any other caller are always checked here.
    """
    if not validated:
        validate_specs(asset_id, components)
    rows = _component_rows(asset_id, components, part_sizes or {})
    now = time.time()
    existing = yield q("SELECT sealed, state FROM assets WHERE asset_id = ?", (asset_id,))
    if existing:
        sealed, state = existing[0]
        if sealed or state in DONE_STATES:
            raise InvalidInputError(
                f"asset {asset_id} is sealed ({state}); register every component in one call, "
                "or register with seal=False and call seal() once all are registered"
            )
        if state != "registered":
            # A pool has taken it unsealed (``drain(upload_unsealed=True)``): the server
            # fixed its manifest when it created it, so nothing more can join it.
            raise InvalidInputError(
                f"asset {asset_id} was uploaded unsealed ({state}) with the components "
                "registered so far; no more can join it: seal() it as it is, or discard() it"
            )
        have = yield q("SELECT path FROM components WHERE asset_id = ?", (asset_id,))
        clash = {p for (p,) in have}.intersection(r[1] for r in rows)
        if clash:
            raise InvalidInputError(
                f"component path {min(clash)!r} is already registered in asset {asset_id}"
            )
        yield q(
            "UPDATE assets SET sealed = ?, updated_at = ? WHERE asset_id = ?",
            (int(seal), now, asset_id),
        )
    else:
        b = binding
        yield q(
            "INSERT INTO assets (asset_id, asset_type, state, sealed, metadata, server_url, run_id,"
            " experiment_id, variation, run, local_dir, created_at, updated_at, owner_pid,"
            " owner_start, owner_start_pid)"
            " VALUES (?, ?, 'registered', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                asset_id,
                asset_type,
                int(seal),
                json.dumps(metadata, default=str),
                b and b.server_url,
                b and b.run_id,
                b and b.experiment_id,
                b and b.variation,
                b and b.run,
                local_dir,
                now,
                now,
                *_owner_columns(),
            ),
        )
    yield many(
        "INSERT INTO components (asset_id, path, local_path, size, sha256, mtime_ns, inode,"
        " ctime_ns, device, declared, part_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


@write_op
def seal(asset_id: str) -> OpGen[None]:
    rows = yield q(
        "UPDATE assets SET sealed = 1, updated_at = ? WHERE asset_id = ? RETURNING asset_id",
        (time.time(), asset_id),
    )
    if not rows:
        raise InvalidInputError(f"asset {asset_id} is not in the tracker")


# ---------------------------------------------------------------- queries


@read_op
def all_completed(asset_id: str) -> OpGen[bool]:
    rows = yield q(
        "SELECT a.sealed, count(c.path), coalesce(sum(c.state = 'completed'), 0)"
        " FROM assets a LEFT JOIN components c ON c.asset_id = a.asset_id"
        " WHERE a.asset_id = ? GROUP BY a.asset_id",
        (asset_id,),
    )
    if not rows:
        return False
    sealed, total, done = rows[0]
    return bool(sealed) and total > 0 and total == done


_ASSET_SUMMARY = (
    "SELECT a.asset_id, a.asset_type, a.state, a.sealed, a.metadata, a.server_url, a.run_id,"
    " a.experiment_id, a.variation, a.run, a.local_dir, a.created_at, a.updated_at, a.last_error,"
    " a.owner_pid, count(c.path), coalesce(sum(c.state = 'completed'), 0),"
    " coalesce(sum(c.size), 0), coalesce(sum(CASE WHEN c.state = 'completed' THEN c.size"
    " ELSE c.bytes_sent END), 0), a.owner_start, a.owner_start_pid"
    " FROM assets a LEFT JOIN components c ON c.asset_id = a.asset_id"
)


def _asset_from_row(
    row: tuple[Any, ...], components: tuple[TrackedComponent, ...] = ()
) -> TrackedAsset:
    binding = RunBinding(row[5], row[6], row[7], row[8], row[9]) if row[6] is not None else None
    return TrackedAsset(
        asset_id=row[0],
        asset_type=row[1],
        state=row[2],
        sealed=bool(row[3]),
        metadata=json.loads(row[4]),
        binding=binding,
        local_dir=row[10],
        created_at=row[11],
        updated_at=row[12],
        last_error=row[13],
        owner_pid=row[14],
        owner_start=_owner_start(row[14], row[19], row[20]),
        component_count=row[15],
        completed_count=row[16],
        total_bytes=row[17],
        bytes_sent=row[18],
        components=components,
    )


_COMPONENT_COLS = (
    "asset_id, path, local_path, size, sha256, mtime_ns, inode, part_size, state, bytes_sent,"
    " attempts, last_error, checksum, ctime_ns, device, declared"
)
_COMPONENT_FIELDS = tuple(name.strip() for name in _COMPONENT_COLS.split(","))
_PARTS_AT = _COMPONENT_FIELDS.index("checksum") + 1  # where parts_done goes among the columns


def _components(asset_ids: Sequence[str]) -> OpGen[dict[str, list[TrackedComponent]]]:
    out: dict[str, list[TrackedComponent]] = {a: [] for a in asset_ids}
    if not asset_ids:
        return out
    marks = ",".join("?" * len(asset_ids))
    parts = yield q(
        f"SELECT asset_id, path, part, digest FROM parts WHERE asset_id IN ({marks})", asset_ids
    )
    done: dict[tuple[str, str], dict[int, str | None]] = {}
    for a, p, n, digest in parts:
        done.setdefault((a, p), {})[n] = digest
    rows = yield q(
        f"SELECT {_COMPONENT_COLS} FROM components WHERE asset_id IN ({marks}) ORDER BY asset_id, path",
        asset_ids,
    )
    for r in rows:
        out[r[0]].append(_component_from_row(r, done.get((r[0], r[1]), {})))
    return out


def _component_from_row(r: tuple[Any, ...], parts: dict[int, str | None]) -> TrackedComponent:
    """A row of ``_COMPONENT_COLS``: ``TrackedComponent``'s fields in order, but for
    ``parts_done`` (after ``checksum``) and ``part_digests`` (last). Positional: a resume
    builds one per component, and keywords cost twice the time."""
    digests = {n: d for n, d in parts.items() if d is not None} if parts else {}
    fields: list[Any] = [*r[:_PARTS_AT], frozenset(parts), *r[_PARTS_AT:], digests]
    return TrackedComponent(*fields)


@read_op
def get_asset(asset_id: str, *, with_components: bool = True) -> OpGen[TrackedAsset | None]:
    rows = yield q(_ASSET_SUMMARY + " WHERE a.asset_id = ? GROUP BY a.asset_id", (asset_id,))
    if not rows:
        return None
    comps: tuple[TrackedComponent, ...] = ()
    if with_components:
        comps = tuple((yield from _components([asset_id]))[asset_id])
    return _asset_from_row(rows[0], comps)


@read_op
def list_assets(
    states: Sequence[str] | None = None, *, with_components: bool = False
) -> OpGen[list[TrackedAsset]]:
    if states:
        where = f" WHERE a.state IN ({','.join('?' * len(states))})"
        params: Sequence[Any] = tuple(states)
    else:
        where, params = "", ()
    rows = yield q(
        _ASSET_SUMMARY + where + " GROUP BY a.asset_id ORDER BY a.created_at, a.asset_id", params
    )
    comps: dict[str, list[TrackedComponent]] = {}
    if with_components and rows:
        comps = yield from _components([r[0] for r in rows])
    return [_asset_from_row(r, tuple(comps.get(r[0], ()))) for r in rows]


def pending_uploads() -> Op[list[TrackedAsset]]:
    return list_assets(sorted(UNFINISHED_STATES), with_components=True)


# ---------------------------------------------------------------- state changes


@write_op
def set_asset_state(
    asset_id: str, state: str, *, error: str | None = None, only_from: Sequence[str] | None = None
) -> OpGen[bool]:
    sql = "UPDATE assets SET state = ?, last_error = ?, updated_at = ? WHERE asset_id = ?"
    params: tuple[Any, ...] = (state, error, time.time(), asset_id)
    if only_from:
        sql += f" AND state IN ({','.join('?' * len(only_from))})"
        params += tuple(only_from)
    rows = yield q(sql + " RETURNING asset_id", params)
    return bool(rows)


@write_op
def set_component_state(
    asset_id: str, path: str, state: str, *, error: str | None = None
) -> OpGen[None]:
    yield q(
        "UPDATE components SET state = ?, last_error = ? WHERE asset_id = ? AND path = ?",
        (state, error, asset_id, path),
    )


@write_op
def mark_components(
    asset_id: str, paths: Sequence[str], state: str, *, sizes_done: bool = False
) -> OpGen[None]:
    """Set many components of one asset to ``state`` (e.g. completed after a server status call)."""
    yield many(
        "UPDATE components SET state = ?, last_error = NULL,"
        " bytes_sent = CASE WHEN ? THEN size ELSE bytes_sent END WHERE asset_id = ? AND path = ?",
        ((state, int(sizes_done), asset_id, p) for p in paths),
    )


@write_op
def resume_components(
    asset_id: str, stored: Sequence[str], forgotten: Sequence[str]
) -> OpGen[None]:
    """A resumed asset's components as the server accounts for them: every unfinished one
    queued (its error cleared), then ``stored`` ones completed and ``forgotten`` ones (completed
    here, not stored there) queued. Rows already right are not written: at 100,000 components
    a resume writes what changed, not every row."""
    yield q(
        "UPDATE components SET state = 'queued', last_error = NULL WHERE asset_id = ?"
        " AND state != 'completed' AND (state != 'queued' OR last_error IS NOT NULL)",
        (asset_id,),
    )
    yield many(
        "UPDATE components SET state = 'completed', last_error = NULL, bytes_sent = size"
        " WHERE asset_id = ? AND path = ?",
        ((asset_id, p) for p in stored),
    )
    yield many(
        "UPDATE components SET state = 'queued', last_error = NULL WHERE asset_id = ? AND path = ?",
        ((asset_id, p) for p in forgotten),
    )


@write_op
def reset_failed(asset_id: str) -> OpGen[list[str]]:
    rows = yield q(
        "UPDATE components SET state = 'queued', last_error = NULL, attempts = 0"
        " WHERE asset_id = ? AND state IN ('failed', 'uploading') RETURNING path",
        (asset_id,),
    )
    return [r[0] for r in rows]


@dataclass(frozen=True)
class ComponentProgressRow:
    """The pool's current view of one component, written behind by ``record_components``."""

    asset_id: str
    path: str
    state: str
    bytes_sent: int
    attempts: int
    last_error: str | None
    checksum: str | None


@write_op
def record_components(rows: Iterable[ComponentProgressRow]) -> OpGen[None]:
    """Write behind many components at once, in one transaction.

    Attempts never go down and a known checksum is never forgotten.
    """
    yield many(
        "UPDATE components SET state = ?, bytes_sent = ?, attempts = max(attempts, ?),"
        " last_error = ?, checksum = coalesce(?, checksum)"
        " WHERE asset_id = ? AND path = ?",
        (
            (r.state, r.bytes_sent, r.attempts, r.last_error, r.checksum, r.asset_id, r.path)
            for r in rows
        ),
    )


@write_op
def record_part(
    asset_id: str, path: str, part: int, *, etag: str | None, digest: str | None = None
) -> OpGen[None]:
    yield q(
        "INSERT OR REPLACE INTO parts (asset_id, path, part, etag, digest) VALUES (?, ?, ?, ?, ?)",
        (asset_id, path, part, etag, digest),
    )


@write_op
def discard(asset_id: str) -> OpGen[bool]:
    rows = yield q(
        "UPDATE assets SET state = 'discarded', updated_at = ? WHERE asset_id = ? RETURNING asset_id",
        (time.time(), asset_id),
    )
    yield q("DELETE FROM parts WHERE asset_id = ?", (asset_id,))
    return bool(rows)


def _owner_columns() -> tuple[int, int | None, int]:
    """This process as the owner: (owner_pid, owner_start, owner_start_pid)."""
    pid, start = my_identity()
    return pid, start, pid


def _owner_start(pid: int | None, start: int | None, start_pid: int | None) -> int | None:
    """The owner's recorded start time, if it was recorded for the pid the row names now."""
    return start if start is not None and start_pid == pid else None


@write_op
def claim(asset_id: str, *, take_over: bool = False) -> OpGen[tuple[int, int | None] | None]:
    """Record that this process is now the one uploading ``asset_id``, unless another live
    process owns it: then nothing changes and that owner's (pid, start time) is returned
    (None once claimed). ``take_over`` claims it even from a live owner.

    The owner is its pid and its start time: a live process that merely reuses a dead owner's
    pid does not hold the asset. Checked and written in one write transaction, so two
    processes adopting at once cannot both take the asset.
    """
    rows = yield q(
        "SELECT owner_pid, owner_start, owner_start_pid FROM assets WHERE asset_id = ?",
        (asset_id,),
    )
    if rows and not take_over:
        pid, start = rows[0][0], _owner_start(*rows[0])
        if owner_alive(pid, start):
            return int(pid), start
    yield q(
        "UPDATE assets SET owner_pid = ?, owner_start = ?, owner_start_pid = ? WHERE asset_id = ?",
        (*_owner_columns(), asset_id),
    )
    return None
