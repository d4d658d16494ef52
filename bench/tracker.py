"""Tracker benchmark: register N components in one call vs a raw sqlite3 executemany, same run.

    python bench/tracker.py [--components 100000] [--repeat 5]

Prints a table of medians and writes bench/results/tracker.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from methodic import ComponentSpec, UploadTracker
from methodic import _tracker_schema as schema


def components(n: int) -> list[ComponentSpec]:
    return [
        ComponentSpec(
            f"shards/model-{i:06d}.safetensors",
            f"/ckpt/shards/model-{i:06d}.safetensors",
            1_000_000 + i,
            None,
            1_700_000_000_000_000_000 + i,
            10_000 + i,
        )
        for i in range(n)
    ]


def raw_executemany(db: Path, specs: list[ComponentSpec]) -> float:
    """The floor: the same rows into the same table shape, with nothing but executemany."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(schema.MIGRATIONS[0])
    start = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO assets (asset_id, asset_type, state, created_at, updated_at)"
        " VALUES ('A', 'checkpoint', 'registered', 0, 0)"
    )
    conn.executemany(
        "INSERT INTO components (asset_id, path, local_path, size, sha256, mtime_ns, inode, part_size)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("A", s.path, str(s.local_path), s.size, s.sha256, s.mtime_ns, s.inode, None)
            for s in specs
        ],
    )
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def tracker_register(db: Path, specs: list[ComponentSpec]) -> tuple[float, float]:
    tracker = UploadTracker(db)
    start = time.perf_counter()
    tracker.register_components("A", specs, asset_type="checkpoint")
    registered = time.perf_counter() - start
    start = time.perf_counter()
    pending = tracker.get_pending_uploads()
    listed = time.perf_counter() - start
    assert len(pending) == 1 and len(pending[0].components) == len(specs)
    tracker.close()
    return registered, listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--components", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    specs = components(args.components)
    raw, reg, pend = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            raw.append(raw_executemany(Path(tmp) / f"raw{i}.sqlite", specs))
            r, p = tracker_register(Path(tmp) / f"t{i}.sqlite", specs)
            reg.append(r)
            pend.append(p)
    result = {
        "components": args.components,
        "repeat": args.repeat,
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        "raw_executemany_s": statistics.median(raw),
        "register_components_s": statistics.median(reg),
        "ratio": statistics.median(reg) / statistics.median(raw),
        "get_pending_uploads_s": statistics.median(pend),
    }
    print(f"{'operation':<40}{'median s':>10}")
    print(f"{'raw sqlite3 executemany':<40}{result['raw_executemany_s']:>10.3f}")
    print(
        f"{'UploadTracker.register_components':<40}{result['register_components_s']:>10.3f}"
        f"   ({result['ratio']:.2f}x raw)"
    )
    print(f"{'UploadTracker.get_pending_uploads':<40}{result['get_pending_uploads_s']:>10.3f}")
    out = Path(__file__).parent / "results" / "tracker.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
