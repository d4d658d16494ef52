"""UploadTracker on real SQLite files: atomicity, sealing, migrations, many threads and processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from methodic import ComponentSpec, InvalidInputError, TrackerError, UploadTracker
from methodic import _tracker_ops as ops
from methodic import _tracker_schema as schema


def specs(n: int, prefix: str = "f") -> list[ComponentSpec]:
    return [
        ComponentSpec(
            f"{prefix}{i}.bin", f"/data/{prefix}{i}.bin", 100 + i, mtime_ns=1, inode=i + 1
        )
        for i in range(n)
    ]


def complete(tracker: UploadTracker, asset_id: str, paths: list[str]) -> None:
    tracker._execute(ops.mark_components(asset_id, paths, "completed", sizes_done=True))


def test_register_is_all_or_nothing(tmp_path: Path) -> None:
    t = UploadTracker(tmp_path / "u.sqlite")
    bad = [*specs(5), ComponentSpec("z.bin", "\udcff-not-encodable", 1, mtime_ns=1, inode=1)]
    with pytest.raises((TrackerError, UnicodeEncodeError)):
        t.register_components("A", bad, asset_type="checkpoint")
    assert t.list_assets() == []
    assert t.get_asset("A") is None
    with sqlite3.connect(tmp_path / "u.sqlite") as raw:
        assert raw.execute("SELECT count(*) FROM components").fetchone() == (0,)


def test_duplicate_paths_register_nothing(tmp_path: Path) -> None:
    t = UploadTracker(tmp_path / "u.sqlite")
    with pytest.raises(InvalidInputError, match="twice"):
        t.register_components("A", [*specs(3), specs(1)[0]], asset_type="checkpoint")
    assert t.list_assets() == []


def test_split_registration_cannot_finalize_before_seal(tmp_path: Path) -> None:
    """The seed's race: [a, b] complete, then [c, d] arrive. Unsealed, it never looks complete."""
    t = UploadTracker(tmp_path / "u.sqlite")
    t.register_components("A", specs(2, "a"), asset_type="checkpoint", seal=False)
    complete(t, "A", ["a0.bin", "a1.bin"])
    assert t.all_components_completed("A") is False
    t.register_components("A", specs(2, "c"), asset_type="checkpoint", seal=False)
    assert t.all_components_completed("A") is False
    t.seal("A")
    assert t.all_components_completed("A") is False
    complete(t, "A", ["c0.bin", "c1.bin"])
    assert t.all_components_completed("A") is True
    with pytest.raises(InvalidInputError, match="sealed"):
        t.register_components("A", specs(1, "late"), asset_type="checkpoint")
    asset = t.get_asset("A")
    assert asset is not None and asset.component_count == 4


def test_default_registration_is_sealed(tmp_path: Path) -> None:
    t = UploadTracker(tmp_path / "u.sqlite")
    t.register_components("A", specs(2), asset_type="checkpoint", step=1000)
    asset = t.get_asset("A")
    assert asset is not None and asset.sealed and asset.metadata == {"step": 1000}
    complete(t, "A", ["f0.bin", "f1.bin"])
    assert t.all_components_completed("A")


def test_pending_and_discard(tmp_path: Path) -> None:
    t = UploadTracker(tmp_path / "u.sqlite")
    t.register_components("A", specs(2), asset_type="checkpoint")
    t.register_components("B", specs(1), asset_type="checkpoint")
    t._execute(ops.set_asset_state("B", "finalized"))
    assert [a.asset_id for a in t.get_pending_uploads()] == ["A"]
    assert len(t.get_pending_uploads()[0].components) == 2
    assert t.discard("A") is True
    assert t.get_pending_uploads() == []
    assert t.discard("nope") is False


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite"
    UploadTracker(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    with pytest.raises(TrackerError, match="newer") as info:
        UploadTracker(path)
    assert str(path) in str(info.value)


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(TrackerError) as info:
        UploadTracker(path)
    assert str(path) in str(info.value) and "--tracker" in str(info.value)
    assert path.read_bytes().startswith(b"this is not sqlite")  # nothing overwritten


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrackerError, match="--tracker"):
        UploadTracker(tmp_path / "no" / "such" / "dir" / "u.sqlite")


def _register_many(db: str, worker: int, assets: int, per_asset: int) -> None:
    t = UploadTracker(db)
    for a in range(assets):
        t.register_components(f"p{worker}-a{a}", specs(per_asset), asset_type="checkpoint")
        t._execute(
            ops.record_components(
                [
                    ops.ComponentProgressRow(
                        asset_id=f"p{worker}-a{a}",
                        path="f0.bin",
                        state="uploading",
                        bytes_sent=7,
                        attempts=1,
                        last_error=None,
                        checksum=None,
                    )
                ]
            )
        )
    t.close()


def test_four_processes_and_eight_threads_at_once(tmp_path: Path) -> None:
    db = str(tmp_path / "u.sqlite")
    UploadTracker(db).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(db, w, 25, 20)) for w in range(4)]
    for p in procs:
        p.start()
    shared = UploadTracker(db)
    errors: list[BaseException] = []

    def thread_body(i: int) -> None:
        try:
            for a in range(25):
                shared.register_components(f"t{i}-a{a}", specs(20), asset_type="checkpoint")
                shared.get_pending_uploads() if a % 10 == 0 else None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread_body, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert errors == []
    assets = shared.list_assets()
    assert len(assets) == (4 + 8) * 25
    assert all(a.component_count == 20 for a in assets)
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM components").fetchone() == ((4 + 8) * 25 * 20,)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_truncated_tracker_is_a_clear_error_not_an_empty_state(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite"
    t = UploadTracker(path)
    for i in range(50):
        t.register_components(f"A{i}", specs(40), asset_type="checkpoint")
    t.close()
    with sqlite3.connect(path) as raw:  # fold the WAL in so the main file holds everything
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(TrackerError) as info:
        UploadTracker(path).get_pending_uploads()
    assert str(path) in str(info.value) and "--tracker" in str(info.value)


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 2 MiB tmpfs of our own, to fill up or make read-only (the suite runs as root)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_leaves_no_half_registered_asset(tiny_fs: Path) -> None:
    t = UploadTracker(tiny_fs / "u.sqlite")
    t.register_components("small", specs(3), asset_type="checkpoint")
    filler = tiny_fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with pytest.raises(TrackerError, match="full") as info:
        t.register_components(
            "big", specs(20_000, "long-component-name-to-fill-pages-"), asset_type="checkpoint"
        )
    assert str(tiny_fs / "u.sqlite") in str(info.value)
    filler.unlink()
    assert t.get_asset("big") is None
    assert [a.asset_id for a in t.list_assets()] == ["small"]
    t.register_components("after", specs(2), asset_type="checkpoint")  # usable again
    assert len(t.list_assets()) == 2


def test_read_only_disk_is_a_clear_error(tiny_fs: Path) -> None:
    t = UploadTracker(tiny_fs / "u.sqlite")
    t.register_components("A", specs(2), asset_type="checkpoint")
    t.close()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(TrackerError) as info:
        tracker = UploadTracker(tiny_fs / "u.sqlite")
        tracker.register_components("B", specs(1), asset_type="checkpoint")
    msg = str(info.value)
    assert str(tiny_fs / "u.sqlite") in msg and ("read-only" in msg or "writable" in msg)


def test_a_component_reads_back_field_by_field(tmp_path: Path) -> None:
    """Every column lands in its own field (rows are read positionally, for speed)."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"w" * 30)
    spec = ComponentSpec(
        "w.bin", f, 30, sha256="ab" * 32, mtime_ns=11, inode=12, ctime_ns=13, device=14
    )
    t = UploadTracker(tmp_path / "u.sqlite")
    t.register_components("a", [spec], asset_type="checkpoint")
    with sqlite3.connect(t.db_path) as conn:  # set when the engine plans the file's parts
        conn.execute("UPDATE components SET part_size = 8")
    t._execute(ops.record_part("a", "w.bin", 2, etag=None, digest="d2"))
    t._execute(ops.record_part("a", "w.bin", 3, etag=None))
    row = ops.ComponentProgressRow("a", "w.bin", "uploading", 16, 5, "slow", "sha256:cd")
    t._execute(ops.record_components([row]))
    (c,) = t.get_asset("a").components
    assert (c.asset_id, c.path, c.local_path, c.size, c.sha256) == (
        "a",
        "w.bin",
        str(f),
        30,
        "ab" * 32,
    )
    assert (c.mtime_ns, c.inode, c.ctime_ns, c.device, c.part_size) == (11, 12, 13, 14, 8)
    assert (c.state, c.bytes_sent, c.attempts, c.last_error) == ("uploading", 16, 5, "slow")
    assert (c.checksum, c.declared) == ("sha256:cd", "sha256:" + "ab" * 32)
    assert c.parts_done == {2, 3} and c.part_digests == {2: "d2"}
